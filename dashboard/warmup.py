"""Warm-up when the server starts with a run: the first page after opening is then drawn from warm caches."""

from __future__ import annotations

import threading
import time
from pathlib import Path


def _run(path: str, wait_s: float) -> None:
    """Import the heavy libraries, wait for Streamlit's runtime (the caches are its own), then fill them (backend.warm)."""
    import gist_backend.curation.selection  # noqa: F401 (torch, polars: most of the first page's imports)
    import plotly.graph_objects  # noqa: F401
    from streamlit.runtime import Runtime

    deadline = time.monotonic() + wait_s
    while not Runtime.exists():  # server.py is imported before the runtime starts
        if time.monotonic() > deadline:
            return
        time.sleep(0.02)
    from dashboard.backend import warm

    warm(path)


def start(run_dir: str, wait_s: float = 60.0) -> threading.Thread:
    """Warm the caches for ``run_dir`` in a daemon thread; returns the thread."""
    thread = threading.Thread(target=_run, args=(str(Path(run_dir).expanduser().resolve()), wait_s), name="gist-warm-up", daemon=True)
    thread.start()
    return thread
