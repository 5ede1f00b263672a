"""Shared session state (open run, rank, method, budget, edits) and cached calls into the backend.

Every page reads the run, scores and selection through these helpers so that the sidebar's rank,
method and budget are the single source of truth for all views.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import streamlit as st

from gist_backend import scoring
from gist_backend.runs import Run, open_run, read_tensors

RUN_DIR = "run_dir"
RANK = "rank"
METHOD = "method"
BUDGET_MODE = "budget_mode"
BUDGET_COUNT = "budget_count"
BUDGET_PCT = "budget_pct"
CAP = "per_source_cap"
RUNS_ROOT = "runs_root"
# Widget keys whose values must survive visiting a page that does not draw them.
PERSISTENT = (RANK, METHOD, BUDGET_MODE, BUDGET_COUNT, BUDGET_PCT, "cap_on", "cap_mode", "cap_count", "cap_pct",
              "f_text", "f_regex", "f_sources", "f_tasks", "f_state", "f_score", "f_length",
              "map_colour", "page_size", "compare_x", "compare_y", "detail_tab")  # fmt: skip
# Defaults of persistent widgets, set once per session (widgets then take no value/default argument).
WIDGET_DEFAULTS = {"map_colour": "score", "cap_on": False, "cap_mode": "% of budget", "cap_count": 100, "cap_pct": 50.0,
                   "f_text": "", "f_regex": False, "f_state": "all", "f_sources": [], "f_tasks": [], "page_size": 100,
                   "detail_tab": "Conversation"}  # fmt: skip
METHOD_LABELS = {"gist": "GIST", "less": "LESS", "g2is": "G2IS", "random": "Random"}


# ---------------------------------------------------------------- session


def cli_run_dir(argv: list[str] | None = None) -> str | None:
    """The run given on the command line (`-- --run-dir D`) or in GIST_RUN_DIR."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--run-dir", default=None)
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return args.run_dir or os.environ.get("GIST_RUN_DIR") or None


def init_session() -> None:
    """First-visit defaults; keeps widget values alive across pages."""
    ss = st.session_state
    if "_initialised" not in ss:
        ss["_initialised"] = True
        given = cli_run_dir()
        if given:
            ss[RUN_DIR] = str(Path(given).expanduser().resolve())
        ss.setdefault(RUNS_ROOT, os.environ.get("GIST_CACHE", "cache"))
        ss.setdefault(METHOD, "gist")
        ss.setdefault(BUDGET_MODE, "%")
        ss.setdefault(BUDGET_PCT, 5.0)
        ss.setdefault(BUDGET_COUNT, 100)
        for key, value in WIDGET_DEFAULTS.items():
            ss.setdefault(key, value)
    for key in PERSISTENT:  # re-assigning detaches the value from the widget's lifetime
        if key in ss:
            ss[key] = ss[key]


def allowed_roots() -> list[Path]:
    """Folders the dashboard may read runs from and write exports to (plus the run named at start-up)."""
    from gist_backend.safety import allowed_roots as roots

    given = cli_run_dir()
    return roots(extra=[given] if given else [])


def allowed_path(path: str | Path, *, must_exist: bool = False) -> Path:
    """A user-typed folder resolved and checked against the allowed roots (PermissionError outside them)."""
    from gist_backend.safety import resolve_allowed

    return resolve_allowed(path, allowed_roots(), must_exist=must_exist)


def allowed_export_path(path: str | Path) -> Path:
    """A user-typed export file path, checked like ``allowed_path``."""
    from gist_backend.safety import resolve_export_path

    return resolve_export_path(path, allowed_roots())


def set_run(path: str | Path | None) -> None:
    """Open another run (takes effect on the next rerun; rank resets to the run's default)."""
    ss = st.session_state
    if path is None:
        ss.pop(RUN_DIR, None)
    else:
        ss[RUN_DIR] = str(allowed_path(path, must_exist=True))
    ss.pop("_rank_for", None)
    ss.pop("detail_id", None)


def run_path() -> str | None:
    """The path of the open run, if any."""
    return st.session_state.get(RUN_DIR)


def _stamp(path: str) -> int:
    try:
        return (Path(path) / "manifest.json").stat().st_mtime_ns
    except OSError:
        return 0


@st.cache_resource(max_entries=4, show_spinner=False)
def _open(path: str, stamp: int) -> Run:
    """open_run, cached per (path, manifest mtime) so a recomputed run is reloaded."""
    return open_run(path)


def current_run() -> Run | None:
    """The open run (cached); RunError if it cannot be opened."""
    path = run_path()
    return None if not path else _open(path, _stamp(path))


def run_key(run: Run) -> str:
    """Cache key of a run: its path and manifest mtime."""
    return f"{run.path}@{_stamp(str(run.path))}"


def sync_rank(run: Run) -> None:
    """Give the rank slider the run's default (k_max) when a run is opened; clamp to 1..k_max."""
    ss = st.session_state
    key = str(run.path)
    if ss.get("_rank_for") != key or RANK not in ss:
        ss["_rank_for"] = key
        ss[RANK] = run.k_max
    ss[RANK] = int(min(max(int(ss[RANK]), 1), run.k_max))


def rank() -> int:
    """The rank of the sidebar slider (scores of every view use it)."""
    return int(st.session_state[RANK])


def method(run: Run) -> str:
    """The selection method chosen in the sidebar (falls back to GIST if the run lacks it)."""
    chosen = st.session_state.get(METHOD, "gist")
    return chosen if chosen in available_methods(run) else "gist"


def available_methods(run: Run) -> list[str]:
    """Methods this run can select with (random is always available)."""
    return [m for m in ("gist", "less", "g2is") if m == "gist" or m in run.methods] + ["random"]


def budget(run: Run) -> int | str:
    """The shared budget: a count, or 'p%' of the pool."""
    ss = st.session_state
    if ss.get(BUDGET_MODE) == "count":
        return int(min(max(int(ss.get(BUDGET_COUNT, 100)), 1), run.train.height))
    return f"{float(ss.get(BUDGET_PCT, 5.0)):g}%"


def per_source_cap() -> int | str | None:
    """The per-source cap of the Export view: a count, 'p%' of the budget, or None."""
    ss = st.session_state
    if not ss.get("cap_on"):
        return None
    if ss.get("cap_mode") == "count":
        return int(ss.get("cap_count", 100))
    return f"{float(ss.get('cap_pct', 50.0)):g}%"


def show_error(err: BaseException, what: str = "") -> None:
    """An error box with the reason (never a bare stack trace)."""
    prefix = f"{what}: " if what else ""
    st.error(f"{prefix}{err}", icon=":material/error:")


# ---------------------------------------------------------------- scores


@st.cache_data(max_entries=16, show_spinner=False)
def _task_scores(key: str, rank: int, _run: Run) -> tuple[list[str], np.ndarray]:
    """Backend per-sub-task GIST cosines, cached per (run, rank)."""
    names, values = scoring.task_scores(_run, rank)
    return list(names), np.asarray(values)


@st.cache_data(max_entries=48, show_spinner=False)
def _scores(key: str, method: str, rank: int, _run: Run) -> np.ndarray:
    """Backend scores, cached per (run, method, rank)."""
    if method == "gist":  # scoring.scores(gist) is the max over sub-tasks: reuse the per-task pass (one pass per rank)
        return _task_scores(key, rank, _run)[1].max(axis=1).astype(np.float64)
    return np.asarray(scoring.scores(_run, method, rank), dtype=np.float64)


def scores(run: Run, method: str | None = None, at_rank: int | None = None) -> np.ndarray:
    """Scores of every row for a scoring method (G2IS has none: GIST's are used)."""
    method = method or st.session_state.get(METHOD, "gist")
    method = method if method in ("gist", "less", "random") else "gist"
    return _scores(run_key(run), method, int(at_rank or rank()), run)


def score_method(method: str) -> str:
    """The method whose scores a view shows for ``method`` (G2IS is a set, scored by GIST)."""
    return method if method in ("gist", "less", "random") else "gist"


def task_scores(run: Run, at_rank: int | None = None) -> tuple[list[str], np.ndarray]:
    """GIST per-sub-task scores (names, (N, T)) at the current rank."""
    return _task_scores(run_key(run), int(at_rank or rank()), run)


@st.cache_data(max_entries=16, show_spinner=False)
def _best_task(key: str, rank: int, _run: Run) -> np.ndarray:
    """Sub-task of largest cosine per row, cached per (run, rank)."""
    names, values = _task_scores(key, rank, _run)
    return np.asarray(names, dtype=object)[values.argmax(axis=1)]


def best_task(run: Run) -> np.ndarray:
    """The sub-task each row aligns with most (GIST, current rank)."""
    return _best_task(run_key(run), rank(), run)


@st.cache_data(max_entries=16, show_spinner=False)
def _order(key: str, method: str, rank: int, _run: Run) -> tuple[np.ndarray, np.ndarray]:
    """Backend ranking and each row's position in it, cached per (run, method, rank)."""
    values = _scores(key, method, rank, _run)
    order = scoring.ranking(values)
    positions = np.empty_like(order)
    positions[order] = np.arange(order.size)
    return order, positions


def ordering(run: Run, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows best first, position of each row in that order) for a scoring method."""
    return _order(run_key(run), score_method(method), rank(), run)


# ---------------------------------------------------------------- edits and selection


def edits_key(run: Run) -> str:
    """Identity of the edit log on disk (inode, mtime, size: every write renames a new file into place)."""
    from gist_backend.curation import EDITS_FILE

    try:
        st_ = (Path(run.path) / EDITS_FILE).stat()
    except OSError:
        return "none"
    return f"{st_.st_ino}:{st_.st_mtime_ns}:{st_.st_size}"


@st.cache_resource(max_entries=16, show_spinner=False)
def _edits(path: str, key: str) -> tuple[list[dict], dict[str, str]]:
    """The edit log and the state it implies, re-read when the file changes."""
    from gist_backend.curation import edit_state as replay
    from gist_backend.curation import load_edits

    log = load_edits(path)
    return log, replay(log)


def edits(run: Run) -> list[dict]:
    """The run's curation edits, oldest first (re-read whenever the file changes; do not mutate)."""
    return _edits(str(run.path), edits_key(run))[0]


def edit_state(run: Run) -> dict[str, str]:
    """id → 'include' | 'exclude' after replaying the edits (do not mutate)."""
    return _edits(str(run.path), edits_key(run))[1]


def add_edit(run: Run, op: str, ids: list[str], kind: str, detail: Any) -> int:
    """Record an include / exclude / reset edit at once; returns the number of ids."""
    from gist_backend.curation import add_edit as record

    if not ids:
        return 0
    record(run.path, op, list(ids), {"kind": kind, "detail": detail})
    return len(ids)


def undo_edit(run: Run) -> int:
    """Undo the last edit; returns how many edits remain."""
    from gist_backend.curation import undo

    return len(undo(run.path))


@st.cache_resource(max_entries=32, show_spinner=False)
def _select(key: str, method: str, rank: int, budget: int | str, cap: int | str | None, ekey: str, _run: Run, _edits: list[dict]):
    """Backend selection, cached per (run, method, rank, budget, cap, edit log)."""
    from gist_backend.selection import select

    row_scores = _scores(key, method, rank, _run) if method != "g2is" else None
    return select(_run, method=method, rank=rank, budget=budget, per_source_cap=cap, edits=_edits, row_scores=row_scores)


def selection(run: Run, by: str | None = None):
    """The current selection (sidebar method, rank and budget; Export caps; all edits)."""
    key = edits_key(run)
    return _select(run_key(run), by or method(run), rank(), budget(run), per_source_cap(), key, run, _edits(str(run.path), key)[0])


def selected_mask(run: Run) -> np.ndarray:
    """Boolean mask of the rows in the current selection."""
    mask = np.zeros(run.train.height, dtype=bool)
    mask[np.asarray(selection(run).rows, dtype=np.int64)] = True
    return mask


def selection_states(run: Run) -> np.ndarray:
    """Per row: 'selected', 'not selected', 'included by hand' or 'excluded by hand'."""
    out = np.where(selected_mask(run), "selected", "not selected").astype(object)
    by_hand = edit_state(run)
    if by_hand:
        ids = run.train["id"]
        out[ids.is_in([i for i, op in by_hand.items() if op == "include"]).to_numpy()] = "included by hand"
        out[ids.is_in([i for i, op in by_hand.items() if op == "exclude"]).to_numpy()] = "excluded by hand"
    return out


def source_shares(info: dict) -> dict[str, float]:
    """Source → share of the selection, from ``selection.summary`` (counts or shares)."""
    mix = info.get("source_mix") or {}
    total = float(sum(mix.values())) or 1.0
    return {str(k): float(v) / total for k, v in mix.items()}


def selection_preview(run: Run, sel: Any, n: int = 200) -> pl.DataFrame:
    """The first ``n`` selected rows, best first, for the Export preview."""
    rows = np.asarray(sel.rows, dtype=np.int64)[:n]
    idx = pl.Series(rows)
    return pl.DataFrame(
        {
            "#": np.arange(1, len(rows) + 1),
            "id": run.train["id"].gather(idx),
            "score": np.asarray(sel.scores, dtype=np.float64)[: len(rows)] if sel.scores is not None else np.full(len(rows), np.nan),
            "source": run.train["source"].gather(idx),
            "length": run.train["n_tokens"].gather(idx),
            "text": run.train["text"].gather(idx).fill_null("").str.replace_all(r"\s+", " ").str.slice(0, 200),
        }
    )


def export_bytes(run: Run, sel: Any, with_meta: bool = False) -> bytes:
    """The selection as JSONL bytes (written by the backend exporter to a temporary file)."""
    import tempfile

    from gist_backend.selection import export_jsonl

    with tempfile.TemporaryDirectory(prefix="gist-export-") as tmp:
        out = Path(tmp) / "selection.jsonl"
        export_jsonl(run, sel, out, with_meta=with_meta)
        return out.read_bytes()


# ---------------------------------------------------------------- examples view helpers


@st.cache_data(max_entries=32, show_spinner=False)
def _text_hits(key: str, query: str, regex: bool, _run: Run) -> np.ndarray:
    """Search mask over text and id, cached per (run, query)."""
    from dashboard.filters import text_mask

    return text_mask(_run.train["text"], query, regex) | text_mask(_run.train["id"], query, regex)


def text_hits(run: Run, query: str, regex: bool) -> np.ndarray | None:
    """Cached search mask over text and id (None when there is no query); ValueError for a bad regex."""
    return _text_hits(run_key(run), query, regex, run) if query else None


def row_of(run: Run, example_id: str) -> int | None:
    """Row number of an example id."""
    hits = run.train["row"].filter(run.train["id"] == example_id)
    return int(hits[0]) if hits.len() else None


_TURN = re.compile(r"(?:^|\n\n)\[(system|user|assistant)\] ")


def conversation(text: str) -> list[tuple[str, str]]:
    """Split a rendered conversation ('[role] content' blocks) into (role, content) turns."""
    pieces = _TURN.split(text or "")
    if len(pieces) < 3:
        return [("user", text or "")]
    return [(pieces[i], pieces[i + 1]) for i in range(1, len(pieces) - 1, 2)]


def nearest_validation(run: Run, row: int, at_rank: int, k: int = 5) -> pl.DataFrame:
    """The validation examples closest to a row at the current rank (see scoring.nearest_validation)."""
    return scoring.nearest_validation(run, row, at_rank, k)


# ---------------------------------------------------------------- map and geometry


# UMAP of a large pool takes minutes: maps are computed in the background, one at a time, so the app stays
# usable. Daemon threads, so stopping the server never waits for a UMAP to finish.
_MAP_JOBS: dict[tuple[str, int], Future] = {}
_MAP_LOCK = threading.Lock()
_MAP_RUNNING = threading.Lock()


def _compute_map(fut: Future, run: Run, at_rank: int) -> None:
    """Worker: wait for the previous map, then compute this one unless it was cancelled meanwhile."""
    from gist_backend.maps import umap_map

    with _MAP_RUNNING:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(umap_map(run, at_rank, seed=0))
        except BaseException as err:  # handed to the view, which shows the reason
            fut.set_exception(err)


def map_job(run: Run, at_rank: int | None = None) -> Future:
    """The background computation of the map at a rank (started if needed; stale queued ones are dropped)."""
    at_rank = int(at_rank or rank())
    key = (run_key(run), at_rank)
    with _MAP_LOCK:
        for other, fut in list(_MAP_JOBS.items()):
            if other[0] == key[0] and other != key and fut.cancel():  # queued for a rank nobody looks at any more
                del _MAP_JOBS[other]
        fut = _MAP_JOBS.get(key)
        if fut is None or fut.cancelled() or (fut.done() and fut.exception() is not None):
            fut = Future()
            _MAP_JOBS[key] = fut
            threading.Thread(target=_compute_map, args=(fut, run, at_rank), name=f"gist-map-r{at_rank}", daemon=True).start()
        done = [k for k, f in _MAP_JOBS.items() if f.done() and k != key]
        for old in done[:-4]:  # keep a few finished maps to show while another rank computes
            del _MAP_JOBS[old]
    return fut


def latest_map(run: Run) -> tuple[int, dict[str, np.ndarray]] | None:
    """The most recently finished map of this run at any rank: (rank, arrays), or None."""
    key = run_key(run)
    with _MAP_LOCK:
        ready = [(r, f) for (k, r), f in _MAP_JOBS.items() if k == key and f.done() and not f.cancelled() and f.exception() is None]
    return (ready[-1][0], ready[-1][1].result()) if ready else None


@st.cache_resource(max_entries=6, show_spinner=False)
def _map_figure(key: str, map_rank: int, score_rank: int, colour: str, method: str, sel_key: tuple, density_above: int, _run: Run, _xy: dict):
    """The map figure, cached per (run, map rank, score rank, colouring)."""
    from dashboard.figures import map_figure

    if colour == "score":
        values = _scores(key, method, score_rank, _run)
    elif colour == "source":
        values = _run.train["source"].to_numpy()
    else:
        values = selection_states(_run)
    names = _task_scores(key, score_rank, _run)[0]
    return map_figure(_xy["train_xy"], _run.train["id"].to_numpy(), colour, values, _xy.get("val_xy"), _xy.get("centroid_xy"), names,
                      density_above=density_above)  # fmt: skip


def map_figure(run: Run, map_rank: int, xy: dict, colour: str, density_above: int):
    """The Map view's figure for a map computed at ``map_rank`` (cached: a selection rerun does not rebuild it)."""
    method = score_method(st.session_state.get(METHOD, "gist"))
    sel_key = (st.session_state.get(METHOD), budget(run), per_source_cap(), edits_key(run)) if colour == "selection state" else ()
    # colours follow the slider even while the map of an earlier rank is shown
    return _map_figure(run_key(run), map_rank, rank(), colour, method, sel_key, density_above, run, xy)


@st.cache_data(max_entries=8, show_spinner=False)
def _coupling(key: str, _run: Run) -> dict[str, np.ndarray]:
    """coupling.safetensors of the run, cached."""
    return read_tensors(Path(_run.path) / "coupling.safetensors")


def coupling_blocks(run: Run) -> dict[str, np.ndarray]:
    """Heatmap blocks stored by the run (last checkpoint)."""
    return _coupling(run_key(run), run)


@st.cache_data(max_entries=8, show_spinner=False)
def _geometry(key: str, _run: Run) -> dict:
    """geometry.json of the run, cached."""
    return _run.geometry()


def geometry(run: Run) -> dict:
    """geometry.json of the run (spectrum and coupling per checkpoint)."""
    return _geometry(run_key(run), run)


def selection_ids(event: Any) -> list[str]:
    """Example ids of a plotly selection event, read dict-style from each point's customdata."""
    try:
        points = event["selection"]["points"]
    except (KeyError, TypeError):
        return []
    ids: list[str] = []
    for point in points or []:
        data = point.get("customdata") if isinstance(point, dict) else None
        if isinstance(data, (list, tuple)):
            data = data[0] if data else None
        if data is not None:
            ids.append(str(data))
    return list(dict.fromkeys(ids))


def selection_regions(event: Any) -> list[dict]:
    """Box and lasso regions of a plotly selection event ({'kind', 'x', 'y'})."""
    try:
        sel = event["selection"]
    except (KeyError, TypeError):
        return []
    regions = []
    for box in sel.get("box", []) or []:
        regions.append({"kind": "box", "x": list(box.get("x", [])), "y": list(box.get("y", []))})
    for lasso in sel.get("lasso", []) or []:
        regions.append({"kind": "lasso", "x": list(lasso.get("x", [])), "y": list(lasso.get("y", []))})
    return regions


# ---------------------------------------------------------------- compare


@st.cache_resource(max_entries=8, show_spinner=False)
def _comparison(key: str, budget: int | str, rank: int, methods: tuple[str, ...], _run: Run) -> dict:
    """Backend comparison plus the G2IS set, normalised for the Compare view (cached)."""
    from gist_backend.selection import compare, select

    raw = compare(_run, budget, methods=list(methods), rank=rank)
    names = list(raw["methods"])
    jaccard = np.array([[raw["jaccard"][a][b] for b in names] for a in names], dtype=np.float64)
    scored = [m for m in names if m != "g2is"]
    corr = [
        {"a": METHOD_LABELS.get(a, a), "b": METHOD_LABELS.get(b, b), "spearman": raw["spearman"][a][b], "pearson": raw["pearson"][a][b]}
        for i, a in enumerate(scored)
        for b in scored[i + 1 :]
    ]
    g2is_rows = None
    if "g2is" in names:  # the G2IS set (cached on disk by the backend after compare ran it)
        g2is_rows = np.asarray(select(_run, method="g2is", budget=budget, edits=[]).rows, dtype=np.int64)
    mix = {m: {s: c / max(1, sum(counts.values())) for s, c in counts.items()} for m, counts in raw["source_mix"].items()}
    pool_total = max(1, sum(raw["pool_source_mix"].values()))
    return {
        "methods": names,
        "jaccard": jaccard,
        "source_mix": {"pool": {s: c / pool_total for s, c in raw["pool_source_mix"].items()}} | mix,
        "correlations": pl.DataFrame(corr) if corr else None,
        "g2is_rows": g2is_rows,
        "table": {
            "method": [METHOD_LABELS.get(m, m) for m in names],
            "kind": ["set" if m == "g2is" else "ranking" for m in names],
            "selected": [raw["counts"][m] for m in names],
            "overlap with GIST": [raw["intersection"]["gist"][m] if "gist" in raw["intersection"] else None for m in names],
            "warnings": ["; ".join(raw.get("warnings", {}).get(m, [])) for m in names],
        },
        "budget": raw["budget"],
    }


def comparison(run: Run) -> dict:
    """Every available method's own selection (no caps, no edits) at the shared budget and rank (cached)."""
    return _comparison(run_key(run), budget(run), rank(), tuple(available_methods(run)), run)
