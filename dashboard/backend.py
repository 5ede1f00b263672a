"""The dashboard's one gateway to ``gist_backend``: every page reads runs, scores, selections and edits through here.

Calls are cached per (run, target, manifest mtime) and their arguments, so the sidebar's method, rank, budget and
the edit log decide every number a view shows, and a click recomputes only what changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import streamlit as st

from dashboard import session
from gist_backend.curation import scoring
from gist_backend.runs.files import RunError  # noqa: F401 (re-exported for the views)
from gist_backend.runs.store import Run, open_run

METHOD_LABELS = session.METHOD_LABELS


# ---------------------------------------------------------------- the open run


def _stamp(path: str) -> int:
    try:
        return (Path(path) / "manifest.json").stat().st_mtime_ns
    except OSError:
        return 0


@st.cache_resource(max_entries=4, show_spinner=False)
def _open(path: str, target: str | None, stamp: int) -> Run:
    """open_run, cached per (path, target, manifest mtime) so a recomputed run is reloaded."""
    return open_run(path, target)


def current_run() -> Run | None:
    """The open run on the sidebar's target (cached); RunError if it cannot be opened."""
    path = session.run_path()
    if not path:
        return None
    target = session.target()
    try:
        return _open(path, target, _stamp(path))
    except RunError:
        if target is None:
            raise
        st.session_state.pop(session.TARGET, None)  # a target the run does not have (from an old URL): its first
        return _open(path, None, _stamp(path))


def run_key(run: Run) -> str:
    """Cache key of a run and target: its path, target and manifest mtime."""
    return f"{run.path}@{run.target}@{_stamp(str(run.path))}"


def available_methods(run: Run) -> list[str]:
    """Methods this run can select with (random is always available)."""
    return scoring.available_methods(run)


def method(run: Run) -> str:
    """The selection method chosen in the sidebar (GIST if the run lacks it)."""
    chosen = session.method_choice()
    return chosen if chosen in available_methods(run) else "gist"


def score_method(method_name: str) -> str:
    """The method whose scores a view shows for ``method_name`` (G2IS is a set, scored by GIST)."""
    return "gist" if method_name == "g2is" else method_name


def budget(run: Run) -> int | str:
    """The shared budget for this run's pool."""
    return session.budget(run.train.height)


# ---------------------------------------------------------------- scores


@st.cache_data(max_entries=16, show_spinner=False)
def _task_scores(key: str, method_name: str, rank: int, _run: Run) -> tuple[list[str], np.ndarray]:
    names, values = scoring.task_scores(_run, rank, method_name)
    return list(names), np.asarray(values)


@st.cache_data(max_entries=48, show_spinner=False)
def _scores(key: str, method_name: str, rank: int, _run: Run) -> np.ndarray:
    if method_name in ("gist", "gist-global"):  # the max over sub-tasks: reuse the per-task pass
        return _task_scores(key, method_name, rank, _run)[1].max(axis=1).astype(np.float64)
    return np.asarray(scoring.scores(_run, method_name, rank), dtype=np.float64)


def scores(run: Run, method_name: str | None = None, at_rank: int | None = None) -> np.ndarray:
    """Scores of every row for a scoring method (G2IS has none: GIST's are used)."""
    return _scores(run_key(run), score_method(method_name or method(run)), int(at_rank or session.rank()), run)


def task_scores(run: Run, at_rank: int | None = None) -> tuple[list[str], np.ndarray]:
    """Per-sub-task values (names, (N, T)) of the sidebar's GIST method at the current rank."""
    name = method(run) if method(run) == "gist-global" else "gist"
    return _task_scores(run_key(run), name, int(at_rank or session.rank()), run)


@st.cache_data(max_entries=16, show_spinner=False)
def _best_task(key: str, rank: int, _run: Run) -> np.ndarray:
    names, values = _task_scores(key, "gist", rank, _run)
    return np.asarray(names, dtype=object)[values.argmax(axis=1)]


def best_task(run: Run) -> np.ndarray:
    """The sub-task each row aligns with most (GIST, current rank)."""
    return _best_task(run_key(run), session.rank(), run)


@st.cache_data(max_entries=16, show_spinner=False)
def _order(key: str, method_name: str, rank: int, _run: Run) -> tuple[np.ndarray, np.ndarray]:
    order = scoring.ranking(_scores(key, method_name, rank, _run))
    positions = np.empty_like(order)
    positions[order] = np.arange(order.size)
    return order, positions


def ordering(run: Run, method_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows best first, position of each row in that order) for a scoring method."""
    return _order(run_key(run), score_method(method_name), session.rank(), run)


def nearest_validation(run: Run, row: int, at_rank: int, k: int = 5) -> pl.DataFrame:
    """The validation examples closest to a row at a rank (see gist_backend.curation.scoring)."""
    return scoring.nearest_validation(run, row, at_rank, k)


# ---------------------------------------------------------------- edits and selection


def edits_key(run: Run) -> str:
    """Identity of the edit log on disk (inode, mtime, size: every write renames a new file into place)."""
    from gist_backend.curation.edits import EDITS_FILE

    try:
        stat = (Path(run.path) / EDITS_FILE).stat()
    except OSError:
        return "none"
    return f"{stat.st_ino}:{stat.st_mtime_ns}:{stat.st_size}"


@st.cache_resource(max_entries=16, show_spinner=False)
def _edits(path: str, target: str, key: str) -> tuple[list[dict], dict[str, str]]:
    from gist_backend.curation.edits import edit_state as replay
    from gist_backend.curation.edits import load_edits

    log = load_edits(path)
    return log, replay(log, target)


def edits(run: Run) -> list[dict]:
    """The run's curation edits, oldest first (re-read whenever the file changes; do not mutate)."""
    return _edits(str(run.path), run.target, edits_key(run))[0]


def edit_state(run: Run) -> dict[str, str]:
    """id → 'include' | 'exclude' for the open target after replaying the edits (do not mutate)."""
    return _edits(str(run.path), run.target, edits_key(run))[1]


def add_edit(run: Run, op: str, ids: list[str], kind: str, detail: Any, only_target: bool | None = None) -> int:
    """Record an include / exclude / reset edit at once (for every target, or the open one: the sidebar's scope); returns the number of ids."""
    from gist_backend.curation.edits import add_edit as record

    if not ids:
        return 0
    if only_target is None:
        only_target = len(run.targets) > 1 and bool(st.session_state.get(session.EDIT_SCOPE))
    record(run.path, op, list(ids), {"kind": kind, "detail": detail}, target=run.target if only_target else None)
    return len(ids)


def undo_edit(run: Run) -> int:
    """Undo the last edit; returns how many edits remain."""
    from gist_backend.curation.edits import undo

    return len(undo(run.path))


@st.cache_resource(max_entries=32, show_spinner=False)
def _select(key: str, method_name: str, rank: int, budget_: int | str, cap: int | str | None, ekey: str, _run: Run, _edits: list[dict]):
    from gist_backend.curation.selection import select

    row_scores = _scores(key, method_name, rank, _run) if method_name != "g2is" else None
    return select(_run, method=method_name, rank=rank, budget=budget_, per_source_cap=cap, edits=_edits, row_scores=row_scores)


def selection(run: Run, by: str | None = None):
    """The current selection (sidebar method, rank and budget; Export caps; all edits)."""
    key = edits_key(run)
    return _select(run_key(run), by or method(run), session.rank(), budget(run), session.per_source_cap(), key, run, edits(run))


def selected_mask(run: Run) -> np.ndarray:
    """Boolean mask of the rows in the current selection."""
    mask = np.zeros(run.train.height, dtype=bool)
    mask[np.asarray(selection(run).rows, dtype=np.int64)] = True
    return mask


def selection_states(run: Run) -> np.ndarray:
    """Per row: 'selected', 'not selected', 'included by hand' or 'excluded by hand'."""
    out = np.where(selected_mask(run), "selected", "not selected").astype(object)
    index = run.row_index
    for example_id, op in edit_state(run).items():
        if example_id in index:
            out[index[example_id]] = "included by hand" if op == "include" else "excluded by hand"
    return out


def summary(run: Run, sel) -> dict:
    """Counts, source mix and lengths of a selection (gist_backend.curation.export.summary)."""
    from gist_backend.curation.export import summary as backend_summary

    return backend_summary(run, sel)


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
            "text": run.text.gather(idx).fill_null("").str.replace_all(r"\s+", " ").str.slice(0, 200),
        }
    )


def export_bytes(run: Run, sel: Any, with_meta: bool = False) -> bytes:
    """The selection as JSONL bytes (written by the backend exporter to a temporary file)."""
    import tempfile

    from gist_backend.curation.export import export_jsonl

    with tempfile.TemporaryDirectory(prefix="gist-export-") as tmp:
        out = Path(tmp) / "selection.jsonl"
        export_jsonl(run, sel, out, with_meta=with_meta)
        return out.read_bytes()


def export_to(run: Run, sel: Any, target_path: str, with_meta: bool, force: bool) -> Path:
    """Write the selection to a user-typed path inside the allowed folders (the backend refuses unsafe targets)."""
    from dashboard.paths import resolve_export_path
    from gist_backend.curation.export import export_jsonl

    return export_jsonl(run, sel, resolve_export_path(target_path), with_meta=with_meta, force=force)


# ---------------------------------------------------------------- examples and geometry


@st.cache_data(max_entries=32, show_spinner=False)
def _text_hits(key: str, query: str, regex: bool, _run: Run) -> np.ndarray:
    from dashboard.filters import text_mask

    return text_mask(_run.text, query, regex) | text_mask(_run.train["id"], query, regex)


def text_hits(run: Run, query: str, regex: bool) -> np.ndarray | None:
    """Cached search mask over text and id (None when there is no query); ValueError for a bad regex."""
    return _text_hits(run_key(run), query, regex, run) if query else None


def row_of(run: Run, example_id: str) -> int | None:
    """Row number of an example id."""
    return run.row_index.get(example_id)


@st.cache_data(max_entries=8, show_spinner=False)
def _coupling(key: str, _run: Run) -> dict[str, np.ndarray]:
    return _run.coupling()


def coupling_blocks(run: Run) -> dict[str, np.ndarray]:
    """Heatmap blocks stored by the run (last GIST checkpoint of the target)."""
    return _coupling(run_key(run), run)


@st.cache_data(max_entries=8, show_spinner=False)
def _geometry(key: str, _run: Run) -> dict:
    return _run.geometry()


def geometry(run: Run) -> dict:
    """Spectrum and coupling per GIST checkpoint of the target."""
    return _geometry(run_key(run), run)


@st.cache_resource(max_entries=8, show_spinner=False)
def _comparison(key: str, budget_: int | str, rank: int, methods: tuple[str, ...], _run: Run) -> dict:
    from gist_backend.curation.compare import compare

    raw = compare(_run, budget_, methods=list(methods), rank=rank)
    names = list(raw["methods"])
    scored = [m for m in names if m != "g2is"]
    corr = [{"a": METHOD_LABELS[a], "b": METHOD_LABELS[b], "spearman": raw["spearman"][a][b], "pearson": raw["pearson"][a][b]}
            for i, a in enumerate(scored) for b in scored[i + 1 :]]  # fmt: skip
    g2is_rows = _select(key, "g2is", rank, budget_, None, "none", _run, []).rows if "g2is" in names else None
    mix = {m: {s: c / max(1, sum(counts.values())) for s, c in counts.items()} for m, counts in raw["source_mix"].items()}
    pool_total = max(1, sum(raw["pool_source_mix"].values()))
    return {
        "methods": names, "jaccard": np.array([[raw["jaccard"][a][b] for b in names] for a in names], dtype=np.float64),
        "source_mix": {"pool": {s: c / pool_total for s, c in raw["pool_source_mix"].items()}} | mix,
        "correlations": pl.DataFrame(corr) if corr else None, "g2is_rows": g2is_rows, "budget": raw["budget"],
        "table": {
            "method": [METHOD_LABELS[m] for m in names], "kind": ["set" if m == "g2is" else "ranking" for m in names],
            "selected": [raw["counts"][m] for m in names],
            "overlap with GIST": [raw["intersection"]["gist"][m] if "gist" in raw["intersection"] else None for m in names],
            "shortfall": [raw["shortfall"].get(m, 0) for m in names],
            "warnings": ["; ".join(raw.get("warnings", {}).get(m, [])) for m in names],
        },
    }  # fmt: skip


def comparison(run: Run) -> dict:
    """Every available method's own selection (no caps, no edits) at the shared budget and rank (cached)."""
    return _comparison(run_key(run), budget(run), session.rank(), tuple(available_methods(run)), run)


@st.cache_resource(max_entries=8, show_spinner=False)
def _target_comparison(key: str, budget_: int | str, method_name: str, rank: int, _path: Path) -> dict:
    from gist_backend.curation.compare import compare_targets

    return compare_targets(_path, budget_, method=method_name, rank=rank)


def target_comparison(run: Run) -> dict:
    """Every target's own selection (sidebar method, rank and budget; no caps, no edits), overlaps and score correlations."""
    return _target_comparison(run_key(run), budget(run), method(run), session.rank(), run.path)


def target_ranks(run: Run) -> dict[str, int]:
    """Each target's k_max (its largest GIST rank)."""
    return {t: run.k_max if t == run.target else _open(str(run.path), t, _stamp(str(run.path))).k_max for t in run.targets}


def combined_selection(run: Run, parts: list, mode: str):
    """One selection serving several targets (gist_backend.curation.combine) at the sidebar's budget, with every edit."""
    from gist_backend.curation.combine import combine

    return combine(run.path, parts, budget(run), mode=mode, edits=edits(run))


# ---------------------------------------------------------------- evaluations


def eval_recipe(run: Run):
    """The run's warmup recipe, the default for fine-tuning evaluation arms."""
    from gist_backend.evaluate import EvalRecipe

    return EvalRecipe.from_run(run)


def past_evaluations(run: Run) -> list[dict]:
    """The run's stored evaluations, newest first."""
    from gist_backend.evaluate import past_evaluations as stored

    return stored(run)


def suggested_test_file(run: Run) -> str:
    """The test file the Evaluate page offers first: the target's last one, or a test.jsonl beside the validation file."""
    from gist_backend.evaluate import suggested_test_file as suggest
    return str(suggest(run) or "")


# ---------------------------------------------------------------- warm-up


def warm(path: str) -> None:
    """Fill the caches the first page after opening reads, at the sidebar's defaults (GIST, rank k_max, 5 %, no cap).

    Run by ``warmup.start`` in a thread when the server starts with a run: opening the run, its scores, ranking
    and selection are then ready (or under way) when the browser connects.
    A run that cannot be opened is left to the page, which says why.
    """
    from dashboard.session import WIDGET_DEFAULTS

    try:
        run = _open(path, None, _stamp(path))
        key, rank, method_name = run_key(run), run.k_max, WIDGET_DEFAULTS[session.METHOD]
        _order(key, method_name, rank, run)
        _select(key, method_name, rank, f"{WIDGET_DEFAULTS[session.BUDGET_PCT]:g}%", None, edits_key(run), run, edits(run))
        _ = run.row_index
    except Exception:  # noqa: BLE001 (the first page opens the run again and shows the reason)
        return
