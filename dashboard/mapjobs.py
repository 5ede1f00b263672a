"""Background UMAP maps: one computation at a time per server, so the app stays usable while a map is made.

A map already in the run's cache (computed at the end of ``compute``, or earlier in the dashboard) loads in
milliseconds; a missing one is computed in a daemon thread, and the view shows the latest finished map
meanwhile. The registry of jobs is a Streamlit resource (one per server), not module state.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import streamlit as st

from dashboard import backend, session
from gist_backend.runs.store import Run


@dataclass
class MapJobs:
    """Futures of maps per (run key, rank), and the lock that runs them one at a time."""

    jobs: dict[tuple[str, int], Future] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    running: threading.Lock = field(default_factory=threading.Lock)


@st.cache_resource(show_spinner=False)
def registry() -> MapJobs:
    """The server's map jobs."""
    return MapJobs()


def _compute(jobs: MapJobs, fut: Future, run: Run, at_rank: int) -> None:
    """Worker: wait for the previous map, then compute this one unless it was cancelled meanwhile."""
    from gist_backend.curation.maps import umap_map

    with jobs.running:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(umap_map(run, at_rank, seed=0))
        except BaseException as err:  # handed to the view, which shows the reason
            fut.set_exception(err)


def map_job(run: Run, at_rank: int | None = None) -> Future:
    """The map at a rank: from the run's cache at once, else computed in the background (stale queued ones dropped)."""
    from gist_backend.curation.maps import cached_map

    at_rank = int(at_rank or session.rank())
    key = (backend.run_key(run), at_rank)
    jobs = registry()
    with jobs.lock:
        fut = jobs.jobs.get(key)
        if fut is None or fut.cancelled() or (fut.done() and fut.exception() is not None):
            fut = Future()
            ready = cached_map(run, at_rank)
            if ready is not None:
                fut.set_result(ready)
            jobs.jobs[key] = fut
        for other, queued in list(jobs.jobs.items()):
            if other[0] == key[0] and other != key and queued.cancel():  # queued for a rank nobody looks at any more
                del jobs.jobs[other]
        if not fut.done() and not fut.running():
            threading.Thread(target=_compute, args=(jobs, fut, run, at_rank), name=f"gist-map-r{at_rank}", daemon=True).start()
        finished = [k for k, f in jobs.jobs.items() if f.done() and k != key]
        for old in finished[:-4]:  # keep a few finished maps to show while another rank computes
            del jobs.jobs[old]
    return fut


def latest_map(run: Run) -> tuple[int, dict[str, np.ndarray]] | None:
    """The most recently finished map of this run at any rank: (rank, arrays), or None."""
    from gist_backend.curation.maps import latest_cached_map

    key = backend.run_key(run)
    jobs = registry()
    with jobs.lock:
        ready = [(r, f) for (k, r), f in jobs.jobs.items() if k == key and f.done() and not f.cancelled() and f.exception() is None]
    return (ready[-1][0], ready[-1][1].result()) if ready else latest_cached_map(run)


@st.cache_resource(max_entries=6, show_spinner=False)
def _figure(key: str, map_rank: int, score_rank: int, colour: str, method_name: str, sel_key: tuple, density_above: int, _run: Run, _xy: dict):
    from dashboard.figures import map_figure

    if colour == "score":
        values = backend.scores(_run, method_name, score_rank)
    elif colour == "source":
        values = _run.train["source"].to_numpy()
    else:
        values = backend.selection_states(_run)
    names = backend.task_scores(_run, score_rank)[0]
    return map_figure(_xy["train_xy"], _run.train["id"].to_numpy(), colour, values, _xy.get("val_xy"), _xy.get("centroid_xy"), names,
                      density_above=density_above)  # fmt: skip


def map_figure(run: Run, map_rank: int, xy: dict, colour: str, density_above: int):
    """The Map view's figure for a map computed at ``map_rank`` (cached: a selection rerun does not rebuild it)."""
    method_name = backend.score_method(backend.method(run))
    sel_key = (backend.method(run), backend.budget(run), session.per_source_cap(), backend.edits_key(run)) if colour == "selection state" else ()
    # colours follow the slider even while the map of an earlier rank is shown
    return _figure(backend.run_key(run), map_rank, session.rank(), colour, method_name, sel_key, density_above, run, xy)
