"""Selections: a budget of pool examples by one method, with per-source caps and the curator's edits.

Rules of ``select`` (every method; budgets and caps as in ``budget``):
- Forced includes (curation edits) are always in; forced excludes never. More forced includes than the budget
  is an error (raise the budget or reset some includes).
- The rest is filled greedily in score order (G2IS: in its walk order), skipping examples whose source has
  reached its cap. ``capped`` counts, per source, the examples skipped by the cap before the budget was filled.
- The result has exactly ``budget`` examples unless caps, exclusions or a G2IS shortfall leave too few (then a
  warning says so), listed in score order (forced includes placed by their score).
G2IS gives a set, not scores: it runs once per (budget, knn_k, orientation) and is cached, checksummed, in
``<run>/selections/``. When its walk stops early the shortfall is reported and never filled. When edits or caps
remove some of its picks, the gap is topped up from a G2IS run at a larger budget (its picks not yet chosen,
in walk order), so excluding one example swaps one example; those rows are listed in ``topups``.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import check_rank
from ..methods.g2is import ORIENTATIONS
from ..runs.files import RunError, read_json, read_npy, utc_now, write_json
from ..runs.manifest import manifest_checksum
from ..runs.store import Run
from .budget import cap_count, fill, resolve_budget_note
from .edits import edit_state, load_edits
from .scoring import check_method, ranking, scores

G2IS_MAX_TOPUPS = 2  # larger G2IS runs tried to refill picks that edits or caps removed


@dataclass
class Selection:
    """A selection of pool rows: ids, rows and scores aligned and in score order, plus how edits and caps acted."""

    method: str
    rank: int | None  # subspace rank used (GIST methods; None for the others)
    budget: int  # the resolved count asked for
    ids: list[str]
    rows: np.ndarray  # int64 row numbers into run.train
    scores: np.ndarray | None  # aligned with rows; None for G2IS (a set, not a score)
    forced_in: list[str]  # ids included by edits (all are in the selection)
    forced_out: list[str]  # ids excluded by edits that exist in this run (in score order)
    capped: dict[str, int]  # source → examples skipped because the source was at its cap
    per_source_cap: int | float | str | None = None  # as given
    cap: int | None = None  # the cap as a count
    n_edits: int = 0  # edit records applied
    warnings: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # method extras (G2IS: knn_k, orientation, per-component statistics)
    shortfall: int = 0  # G2IS: picks its walk could not make (reported, never filled)
    topups: list[str] = field(default_factory=list)  # G2IS: ids taken from a larger budget to replace removed picks
    target: str = ""  # the run target the selection was made for


# ----------------------------------------------------------------------------- G2IS


def g2is_features(run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """G2IS inputs: per LESS checkpoint the row-normalised sketch times sqrt(weight), concatenated over checkpoints."""
    from ..methods.less import normalize_rows

    train, val = read_npy(run.paths["train_sketch"]), read_npy(run.paths["val_sketch"])
    n_ckpt, n, p = train.shape
    if n != run.train.height or val.shape[:2] != (n_ckpt, run.val.height):
        raise RunError(f"{run.paths['train_sketch']}: sketch shapes {train.shape} / {val.shape} do not match the run; recompute it.")
    weights = run.less_weights()
    x = torch.empty(n, n_ckpt * p, dtype=torch.float32)
    v = torch.empty(val.shape[1], n_ckpt * p, dtype=torch.float32)
    for c in range(n_ckpt):
        scale = math.sqrt(float(weights[c]))
        for start in range(0, n, 16384):
            rows = torch.from_numpy(np.asarray(train[c, start : start + 16384], dtype=np.float32))
            if not torch.isfinite(rows).all():
                raise RunError(f"{run.paths['train_sketch']}: holds NaN or infinite values; recompute the run.")
            x[start : start + rows.shape[0], c * p : (c + 1) * p] = normalize_rows(rows) * scale
        v[:, c * p : (c + 1) * p] = normalize_rows(torch.from_numpy(np.asarray(val[c], dtype=np.float32))) * scale
    return x, v


def _g2is_cache_ok(cached: object, key: dict, n: int) -> bool:
    """A cache entry is trusted only if it is for this run and request, checksummed, and its rows are a valid walk result."""
    if not isinstance(cached, dict) or cached.get("request") != key or cached.get("checksum") != manifest_checksum(cached):
        return False
    rows, parts = cached.get("selected"), cached.get("per_component")
    if not isinstance(rows, list) or not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
        return False
    if not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < n for r in rows) or len(set(rows)) != len(rows):
        return False
    shortfall = sum(int(p.get("shortfall", 0)) for p in parts)
    return len(rows) == key["budget"] - shortfall


def g2is_rows(run: Run, budget: int, knn_k: int = 100, orientation: str = "sklearn", *, device: str | None = None,
              progress: bool = False) -> tuple[list[int], list[dict]]:  # fmt: skip
    """G2IS picks (rows in walk order) and per-component statistics for a budget; cached, checksummed, in the run."""
    if orientation not in ORIENTATIONS:
        raise ValueError(f"G2IS orientation must be one of {', '.join(ORIENTATIONS)}, got {orientation!r}")
    m = run.manifest
    key = {"run": m.get("checksum") or m.get("created"), "target": run.target, "budget": budget, "knn_k": knn_k, "orientation": orientation}
    path = run.path / "selections" / f"g2is-{run.target}-{budget}-k{knn_k}-{orientation}.json"
    if path.exists():
        try:
            cached = read_json(path)
        except RunError:
            cached = None  # a damaged cache is recomputed
        if _g2is_cache_ok(cached, key, run.train.height):
            return list(cached["selected"]), cached["per_component"]
    from ..methods.g2is import g2is_select

    train_feats, val_feats = g2is_features(run)
    if device is None and torch.cuda.is_available():
        device = "cuda"
    t0 = time.perf_counter()
    result = g2is_select(train_feats, val_feats, budget, knn_k=knn_k, orientation=orientation, device=device, progress=progress)
    entry = {"format": "gist-curator-g2is", "request": key, "seconds": round(time.perf_counter() - t0, 3), "created": utc_now(),
             "selected": [int(r) for r in result.selected], "per_component": result.per_component}  # fmt: skip
    entry["checksum"] = manifest_checksum(entry)
    try:
        write_json(path, entry)
    except OSError as err:  # a read-only run (or a full disk) still selects; only the next call repeats the walk
        warnings.warn(f"G2IS selection not cached in {path.parent} ({err.strerror or err}); it is recomputed next time", stacklevel=2)
    return entry["selected"], entry["per_component"]


def _g2is_fill(run: Run, count: int, knn_k: int, orientation: str, forced_in, excluded, codes, n_sources, cap, device):
    """G2IS rows in walk order: its own picks, then top-ups from larger runs for picks that edits or caps removed."""
    n = run.train.height
    picks, per_component = g2is_rows(run, count, knn_k, orientation, device=device)
    shortfall = sum(int(c.get("shortfall", 0)) for c in per_component)
    goal = count - shortfall  # the walk's own count: a shortfall is reported, never filled
    order = np.asarray(picks, dtype=np.int64)
    chosen, capped = fill(order, goal, forced_in, excluded, codes, n_sources, cap)
    asked, tried = count, 0
    while chosen.size < goal and asked < n and tried < G2IS_MAX_TOPUPS:
        tried += 1
        asked = min(n, asked + 2 * (goal - chosen.size) + (tried - 1) * count)
        more, _ = g2is_rows(run, asked, knn_k, orientation, device=device)
        seen = np.zeros(n, bool)
        seen[order] = True
        order = np.concatenate([order, np.asarray([r for r in more if not seen[r]], dtype=np.int64)])
        chosen, capped = fill(order, goal, forced_in, excluded, codes, n_sources, cap)
    own = set(picks) | set(forced_in.tolist())
    topups = [int(r) for r in chosen if int(r) not in own]
    info = {"knn_k": knn_k, "orientation": orientation, "topup_budgets_tried": tried,
            "per_component": [{k: v for k, v in c.items() if k != "chosen"} for c in per_component]}  # fmt: skip
    return order, chosen, capped, info, shortfall, topups


# ----------------------------------------------------------------------------- select


def _ties_at_the_edge(row_scores: np.ndarray, chosen: np.ndarray, forced_in: np.ndarray, excluded: np.ndarray) -> tuple[int, float]:
    """(how many candidates share the lowest score selected by score, when some of them were left out, else 0; that score)."""
    by_score = np.setdiff1d(chosen, forced_in)
    if by_score.size == 0:
        return 0, 0.0
    edge = row_scores[by_score].min()
    tied = (row_scores == edge) & ~excluded
    tied[forced_in] = False  # forced includes are in whatever their score
    return (int(tied.sum()), float(edge)) if tied.sum() > tied[by_score].sum() else (0, float(edge))


def _rows_of(run: Run, ids: list[str]) -> tuple[np.ndarray, list[str]]:
    """(sorted row numbers of the ids found in the run, ids not in the run)."""
    index = run.row_index
    rows = sorted({index[i] for i in ids if i in index})
    return np.asarray(rows, dtype=np.int64), [i for i in ids if i not in index]


def select(
    run: Run,
    *,
    method: str = "gist",
    rank: int | None = None,
    budget: int | float | str,
    per_source_cap: int | float | str | None = None,
    edits: list[dict] | None = None,
    seed: int = 0,
    knn_k: int = 100,
    g2is_orientation: str = "sklearn",
    device: str | None = None,
    row_scores: np.ndarray | None = None,
) -> Selection:
    """Select ``budget`` examples by ``method`` honouring caps and edits (``edits=None`` reads the run's log).

    ``row_scores`` may pass in ``scores(run, method, rank, seed)`` already computed (the dashboard caches them).
    """
    check_method(run, method)
    n = run.train.height
    count, warning = resolve_budget_note(budget, n)
    notes = [warning] if warning else []
    rank = check_rank(rank, run.k_max) if method in ("gist", "gist-global") else None
    edits = load_edits(run.path) if edits is None else list(edits)
    state = edit_state(edits, run.target)
    forced_in, unknown_in = _rows_of(run, [i for i, s in state.items() if s == "include"])
    excluded_rows, unknown_out = _rows_of(run, [i for i, s in state.items() if s == "exclude"])
    unknown = unknown_in + unknown_out
    if unknown:
        notes.append(f"{len(unknown)} edited id(s) are not in this run and were ignored (e.g. {unknown[0]!r})")
    excluded = np.zeros(n, bool)
    excluded[excluded_rows] = True
    if forced_in.size > count:
        raise ValueError(f"{forced_in.size} examples are force-included but the budget is {count}; raise the budget or reset some includes")
    names, codes = run.source_codes
    cap = cap_count(per_source_cap, count)
    if cap is not None:
        for s in np.flatnonzero(np.bincount(codes[forced_in], minlength=len(names)) > cap):
            notes.append(f"source {names[s]!r} has more forced includes than its cap of {cap}; they are all kept")
    info: dict = {}
    shortfall, topups = 0, []
    if method == "g2is":
        row_scores = None
        order, chosen, capped, info, shortfall, topups = _g2is_fill(
            run, count, knn_k, g2is_orientation, forced_in, excluded, codes, len(names), cap, device
        )
        if shortfall:
            notes.append(f"G2IS stopped {shortfall} short of the budget {count}: no further example satisfies its rules "
                         "(no conflict, consistency δ); the gap is reported, not filled")  # fmt: skip
        if topups:
            notes.append(f"{len(topups)} G2IS pick(s) removed by edits or caps were replaced by picks of a larger G2IS run (listed as top-ups)")
    else:
        row_scores = scores(run, method, rank, seed) if row_scores is None else np.asarray(row_scores)
        if row_scores.shape != (n,):
            raise ValueError(f"row_scores has shape {row_scores.shape}, expected ({n},)")
        order = ranking(row_scores)
        chosen, capped = fill(order, count, forced_in, excluded, codes, len(names), cap)
        tie, edge = _ties_at_the_edge(row_scores, chosen, forced_in, excluded)
        if tie:
            notes.append(f"{tie} examples tie at the last score selected ({edge:.4g}); the budget takes them in pool order"
                         + ("; at rank 1 GIST's cosine is ±1 for every example: use a higher rank or gist-global" if method == "gist" and rank == 1 else ""))  # fmt: skip
    position = np.full(n, n, np.int64)
    position[order] = np.arange(order.size)
    chosen = chosen[np.lexsort((chosen, position[chosen]))]
    if chosen.size < count - shortfall:
        reasons = [f"the per-source cap of {cap} × {len(names)} sources"] if cap is not None else []
        reasons += [f"{int(excluded.sum())} excluded examples"] if excluded.any() else []
        notes.append(f"selected {chosen.size} of the budget {count}: limited by {' and '.join(reasons) or 'the pool size'}")
    ids = run.train["id"]
    out_rows = np.flatnonzero(excluded)
    out_rows = out_rows[np.argsort(position[out_rows], kind="stable")]
    return Selection(
        method=method, rank=rank, budget=count, ids=ids.gather(chosen).to_list(), rows=chosen,
        scores=None if row_scores is None else np.asarray(row_scores)[chosen],
        forced_in=ids.gather(forced_in[np.argsort(position[forced_in], kind="stable")]).to_list(),
        forced_out=ids.gather(out_rows).to_list(), capped={names[s]: int(c) for s, c in enumerate(capped) if c},
        per_source_cap=per_source_cap, cap=cap, n_edits=len(edits), warnings=notes, info=info, shortfall=shortfall,
        topups=ids.gather(np.asarray(topups, dtype=np.int64)).to_list() if topups else [], target=run.target,
    )  # fmt: skip
