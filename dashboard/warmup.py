"""Warm caches: when the server starts with a run (the first page after opening is drawn from them), and after a
run's first page (what later clicks read is loaded in the background)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import streamlit as st

from gist_backend.runs.store import Run


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


@st.cache_resource(max_entries=4, show_spinner=False)
def _prefetch(key: str, _run: Run) -> threading.Thread:
    def load() -> None:
        _ = _run.resident_unit_coords  # scores at another rank then read no file and convert nothing
        _ = _run.text, _run.raw  # read by Examples, Map and Export on first use: 0.4 s each at 270k rows

    thread = threading.Thread(target=load, name="gist-prefetch", daemon=True)
    thread.start()
    return thread


def prefetch(run: Run) -> None:
    """Load, once per run and in the background, what later clicks read: float32 coordinates and the text columns
    (app.py calls it after a page is drawn, so it does not compete with the first one)."""
    from dashboard.backend import run_key

    _prefetch(run_key(run), run)
