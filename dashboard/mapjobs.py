"""UMAP maps for the Map view: served from the run's cache, awaited while a fit runs, or fitted in the background.

A map already in the run's cache (made by the `gist-curate map` process compute starts when it completes, or
earlier here) loads in milliseconds. While that process runs (its pid in ``<run>/map.pid``, its progress in
``<run>/maps/progress.json``) the view waits for it and never starts a second fit. A missing map is fitted in a
daemon thread of this server, one at a time: at once when the run has no map yet or the pool is small
(``AUTO_FIT_UP_TO``), otherwise on request, the latest map of another rank being shown meanwhile (its layout
is still a faithful picture; colours and scores follow the slider). The registry of jobs is a Streamlit
resource (one per server), not module state.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import streamlit as st

from dashboard import backend, session
from dashboard.jobs import JobStatus
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


AUTO_FIT_UP_TO = 20_000  # a missing map of a pool up to this size is fitted at once; larger ones on request


@dataclass
class MapState:
    """What the Map view can show now: a map (at ``rank``, maybe not the slider's) and what is being done about it."""

    rank: int | None = None  # the rank of the map in ``xy`` (None: no map yet)
    xy: dict[str, np.ndarray] | None = None
    waiting: str | None = None  # "server": a fit in this server; "background": `gist-curate map`; None: nothing runs
    job: JobStatus | None = None  # the background job waited on
    error: BaseException | None = None  # why the fit in this server failed


def background_job(run: Run) -> JobStatus | None:
    """The `gist-curate map` process of this run (started by compute when it completed), while it runs."""
    from dashboard import jobs

    if jobs.read_pid(run.path, "map") is None:
        return None
    status = jobs.job_status(run.path, "map")
    return status if status.state == "running" else None


def _known(run: Run, at_rank: int) -> Future | None:
    """This server's future for the map at a rank, if any."""
    jobs = registry()
    with jobs.lock:
        return jobs.jobs.get((backend.run_key(run), at_rank))


def _remember(run: Run, at_rank: int, xy: dict[str, np.ndarray]) -> None:
    """Keep a map read from the run's cache as this server's finished job for that rank."""
    fut: Future = Future()
    fut.set_result(xy)
    jobs = registry()
    with jobs.lock:
        jobs.jobs.setdefault((backend.run_key(run), at_rank), fut)


def map_state(run: Run, at_rank: int, fit: bool = False) -> MapState:
    """The map at ``at_rank`` if made; else wait for a running fit (the background job first: never a second fit beside
    it) and show the latest map meanwhile; else fit one here when ``fit``, the run has no map yet, or the pool is small."""
    from gist_backend.curation.maps import cached_map

    fut = _known(run, at_rank)
    if fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
        return MapState(at_rank, fut.result())
    if fut is None and (ready := cached_map(run, at_rank)) is not None:
        _remember(run, at_rank, ready)
        return MapState(at_rank, ready)
    latest = latest_map(run)
    shown = dict(zip(("rank", "xy"), latest)) if latest else {}
    if (job := background_job(run)) is not None:
        return MapState(**shown, waiting="background", job=job)
    if fut is not None and fut.done() and not fut.cancelled() and not fit:
        return MapState(**shown, error=fut.exception())
    if (fut is not None and not fut.done()) or fit or latest is None or run.train.height <= AUTO_FIT_UP_TO:
        map_job(run, at_rank)
        return MapState(**shown, waiting="server")
    return MapState(**shown)


@st.cache_resource(max_entries=4, show_spinner=False)
def _y_order(key: str, map_rank: int, _xy: dict) -> np.ndarray:
    return np.argsort(_xy["train_xy"][:, 1], kind="stable")


@st.cache_resource(max_entries=16, show_spinner=False)
def _region_rows(key: str, map_rank: int, regions_json: str, _xy: dict) -> np.ndarray:
    import json

    from dashboard.filters import region_mask

    mask = region_mask(_xy["train_xy"], json.loads(regions_json), _y_order(key, map_rank, _xy))
    return np.flatnonzero(mask)


def region_rows(run: Run, map_rank: int, xy: dict, regions: list[dict]) -> np.ndarray:
    """Rows of every pool example inside the drawn regions of the map at ``map_rank`` (cached per map and regions)."""
    import json

    return _region_rows(backend.run_key(run), map_rank, json.dumps(regions, sort_keys=True), xy)


@st.cache_resource(max_entries=6, show_spinner=False)
def _figure(key: str, map_rank: int, score_rank: int, colour: str, method_name: str, sel_key: tuple, _run: Run, _xy: dict):
    from dashboard.figures import POINTS_UP_TO, STATE_COLOURS, map_figure

    categories = None
    if colour == "score":
        values = backend.scores(_run, method_name, score_rank)
    elif colour == "source":
        categories, values = _run.source_codes
    else:
        categories, values = list(STATE_COLOURS), backend.selection_states(_run)
    labels = _run.train["id"].to_numpy() if _run.train.height <= POINTS_UP_TO else None
    names = sorted(set(_run.val_tasks))  # the map's centroids are in sorted task order
    return map_figure(_xy["train_xy"], colour, values, _xy.get("val_xy"), _xy.get("centroid_xy"), names, labels=labels, categories=categories)


def _figure_args(run: Run, map_rank: int, colour: str) -> tuple:
    """What the Map view's figure depends on (colours follow the slider even on the layout of another rank)."""
    method_name = backend.score_method(backend.method(run))
    sel_key = (backend.method(run), backend.budget(run), session.per_source_cap(), backend.edits_key(run)) if colour == "selection state" else ()
    return backend.run_key(run), map_rank, session.rank(), colour, method_name, sel_key


def map_figure(run: Run, map_rank: int, xy: dict, colour: str):
    """The Map view's figure for a map computed at ``map_rank`` (cached: a selection rerun does not rebuild it)."""
    return _figure(*_figure_args(run, map_rank, colour), run, xy)


def figure_key(run: Run, map_rank: int, colour: str) -> str:
    """Identity of the figure ``map_figure`` draws now (a new one means the chart is drawn afresh, without its selection)."""
    return repr(_figure_args(run, map_rank, colour))
