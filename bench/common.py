"""Helpers shared by the bench scripts: timing, machine description, tables, JSON and RESULT lines (no polars here)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued CUDA work (no-op on CPU), so wall-clock timings cover the whole computation."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device | str | None = None, clock: str = "wall") -> tuple[float, Any]:
    """(seconds, result) of fn(), synchronised on CUDA before and after.

    clock "wall" is elapsed time; "cpu" is this process's CPU time (all threads), which other processes on a
    shared machine disturb far less (use it with one torch thread; meaningless for GPU work).
    """
    now = time.perf_counter if clock == "wall" else time.process_time
    sync(device)
    t0 = now()
    out = fn()
    sync(device)
    return now() - t0, out


def median(xs: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(xs))


def machine() -> dict:
    """What ran the benchmark: host, CPU count, load, torch and the accelerator."""
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain fixed-width text table."""
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if abs(value) >= 1e4:
            return f"{value:,.0f}"
        if value == 0 or abs(value) >= 1e-3:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return "-" if value is None else str(value)


def write_json(path: str | Path | None, obj: dict) -> None:
    """Write the benchmark's JSON (atomically) when a path was given."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def result_lines(results: dict[str, float | None]) -> str:
    """The closing `RESULT <name> <value>` lines, one per headline figure."""
    return "\n".join(f"RESULT {name} {'nan' if v is None else f'{v:.6g}'}" for name, v in results.items())
