"""Selections: a budget of training examples by one method, with per-source caps and the curator's edits; export.

Rules of ``select`` (every method):
- Budget: a count (int, or a float ≥ 1 with no fraction) or a fraction of the pool (float < 1, or "5%").
  A budget above the pool size is clamped to the pool, with a warning in ``Selection.warnings``.
- Forced includes (curation edits) are always in; forced excludes never. More forced includes than the
  budget is an error (raise the budget or reset some includes).
- The rest is filled greedily in score order (G2IS: in its walk order), skipping examples whose source has
  reached its cap. A float cap is a fraction of the budget (floor), an int cap a count. Forced includes count
  towards their source's cap but are never dropped by it. ``capped`` counts, per source, the examples skipped
  by the cap before the budget was filled.
- The result has exactly ``budget`` examples unless caps or exclusions leave too few (then a warning says so),
  listed in score order (forced includes placed by their score).
G2IS gives a set, not scores: it is run once per (budget, knn_k) and cached in
``<run>/selections/g2is-<budget>-k<knn_k>.json``. When edits or caps remove some of its picks, the gap is
filled from a G2IS run at a larger budget (its picks that are not yet chosen, in walk order), so excluding one
example swaps one example instead of reshuffling the set.
"""

from __future__ import annotations

import json
import math
import time
import warnings as _warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl
import torch

from .curation import edit_state, load_edits
from .runs import Run, RunError, atomic_path, file_sha256, read_json, read_npy, tool_version, utc_now, write_json
from .scoring import METHODS, check_method, ranking, scores

EXPORT_VERSION = 1
G2IS_MAX_TOPUPS = 2  # larger G2IS runs tried to fill a gap left by edits or caps


@dataclass
class Selection:
    """A selection of training rows: ids/rows/scores aligned and in score order, plus how edits and caps acted."""

    method: str
    rank: int | None  # GIST rank used (None for the other methods)
    budget: int  # the resolved count asked for
    ids: list[str]
    rows: np.ndarray  # int64 row numbers into run.train
    scores: np.ndarray | None  # aligned with rows; None for G2IS (a set, not a score)
    forced_in: list[str]  # ids included by edits (all are in the selection)
    forced_out: list[str]  # ids excluded by edits that exist in this run (in score order)
    capped: dict[str, int]  # source → examples skipped because the source was at its cap
    per_source_cap: int | float | None = None  # as given
    cap: int | None = None  # the cap as a count
    n_edits: int = 0  # edit records applied
    warnings: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # method extras (G2IS: knn_k, per-component walk statistics)


# ----------------------------------------------------------------------------- budget and caps


def _resolve_budget(budget: int | float | str, n: int) -> tuple[int, str | None]:
    """(count, warning or None); see ``resolve_budget``."""
    given = budget
    if isinstance(budget, bool) or not isinstance(budget, (int, float, str, np.integer, np.floating)):
        raise TypeError(f"budget must be a count, a fraction or a percentage string, got {budget!r}")
    if isinstance(budget, str):
        text = budget.strip()
        try:
            if text.endswith("%"):
                budget = float(text[:-1]) / 100.0
                if not 0 < budget <= 1:
                    raise ValueError
            else:
                budget = float(text) if any(c in text for c in ".eE") else int(text)
        except ValueError:
            raise ValueError(f"budget {given!r} is not a count (500), a fraction (0.05) or a percentage (5%) in (0, 100]") from None
    if isinstance(budget, (float, np.floating)):
        if not math.isfinite(budget) or budget <= 0:
            raise ValueError(f"budget must be positive, got {given!r}")
        if budget < 1 or (isinstance(given, str) and given.strip().endswith("%")):
            count = int(math.floor(budget * n + 0.5))
        elif float(budget).is_integer():
            count = int(budget)
        else:
            raise ValueError(f"budget {given!r}: a float is a fraction (< 1) or a whole count; use 0.05, 5% or 500")
    else:
        count = int(budget)
    if count < 1:
        raise ValueError(f"budget {given!r} selects no example from a pool of {n}; use a count ≥ 1 or a larger fraction")
    if count > n:
        return n, f"pool smaller than the budget: {count} asked, the pool has {n} examples; selecting all {n}"
    return count, None


def resolve_budget(budget: int | float | str, n: int) -> int:
    """Budget → count: an int (or whole float ≥ 1, or "500") is a count; a float < 1 or "5%" a fraction of ``n``
    (rounded half up). Above ``n`` it is clamped to ``n`` with a warning (``warnings.warn``; ``select`` records it)."""
    count, warning = _resolve_budget(budget, n)
    if warning:
        _warnings.warn(warning, stacklevel=2)
    return count


def _cap_count(cap: int | float | str | None, budget: int) -> int | None:
    """Per-source cap as a count: an int is a count, a float in (0, 1] (or "30%") a fraction of the budget (floor, ≥ 1)."""
    if cap is None:
        return None
    if isinstance(cap, bool) or not isinstance(cap, (int, float, str, np.integer, np.floating)):
        raise TypeError(f"per_source_cap must be a count or a fraction of the budget, got {cap!r}")
    if isinstance(cap, str):
        text = cap.strip()
        try:
            cap = float(text[:-1]) / 100 if text.endswith("%") else (float(text) if any(c in text for c in ".eE") else int(text))
        except ValueError:
            raise ValueError(f"per_source_cap {text!r} is not a count (50), a fraction (0.3) or a percentage (30%)") from None
    if isinstance(cap, (float, np.floating)):
        if not 0 < cap <= 1:
            raise ValueError(f"per_source_cap {cap}: a float cap is a fraction of the budget in (0, 1]; use an int for a count")
        return max(1, int(math.floor(cap * budget + 1e-9)))
    if int(cap) < 1:
        raise ValueError(f"per_source_cap must be ≥ 1 (or a fraction of the budget), got {cap}")
    return int(cap)


def _within_group_rank(groups: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions share its group (0-based running count)."""
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    counts = np.diff(np.r_[starts, groups.size])
    out = np.empty(groups.size, np.int64)
    out[order] = np.arange(groups.size) - np.repeat(starts, counts)
    return out


def _fill(
    order: np.ndarray, count: int, forced_in: np.ndarray, excluded: np.ndarray, codes: np.ndarray, n_sources: int, cap: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy fill: forced rows plus the first allowed candidates of ``order``; returns (rows, capped per source)."""
    is_forced = np.zeros(codes.size, bool)
    is_forced[forced_in] = True
    cand = order[~excluded[order] & ~is_forced[order]]
    need = count - forced_in.size
    capped = np.zeros(n_sources, np.int64)
    if cap is None:
        take = cand[:need]
    else:
        src = codes[cand]
        room = np.maximum(cap - np.bincount(codes[forced_in], minlength=n_sources), 0)
        allowed = _within_group_rank(src) < room[src]
        positions = np.flatnonzero(allowed)[:need]
        take = cand[positions]
        horizon = 0 if need <= 0 else (positions[-1] + 1 if positions.size == need else cand.size)
        capped = np.bincount(src[:horizon][~allowed[:horizon]], minlength=n_sources)
    return np.concatenate([forced_in, take]).astype(np.int64), capped


# ----------------------------------------------------------------------------- G2IS


def _g2is_cache_key(run: Run) -> dict:
    m = run.manifest
    return {"created": m.get("created"), "config_hash": m.get("config_hash"), "n_train": run.train.height}


def g2is_features(run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """G2IS inputs: per checkpoint the row-normalised sketch times sqrt(weight), concatenated over checkpoints."""
    from .less import normalize_rows

    train = read_npy(run.path / "sketches" / "train.npy")
    val = read_npy(run.path / "sketches" / "val.npy")
    n_ckpt, n, p = train.shape
    if n != run.train.height or val.shape[:2] != (n_ckpt, run.val.height):
        raise RunError(f"{run.path / 'sketches'}: sketch shapes {train.shape} / {val.shape} do not match the run; recompute it.")
    x = torch.empty(n, n_ckpt * p, dtype=torch.float32)
    v = torch.empty(val.shape[1], n_ckpt * p, dtype=torch.float32)
    for c in range(n_ckpt):
        scale = math.sqrt(float(run.ckpt_weights[c]))
        for start in range(0, n, 16384):
            rows = torch.from_numpy(np.asarray(train[c, start : start + 16384], dtype=np.float32))
            x[start : start + rows.shape[0], c * p : (c + 1) * p] = normalize_rows(rows) * scale
        v[:, c * p : (c + 1) * p] = normalize_rows(torch.from_numpy(np.asarray(val[c], dtype=np.float32))) * scale
    return x, v


def g2is_rows(run: Run, budget: int, knn_k: int = 100, *, device: str | None = None, progress: bool = False) -> tuple[list[int], list[dict]]:
    """G2IS picks (row numbers, walk order) and per-component statistics for a budget, cached in the run."""
    path = run.path / "selections" / f"g2is-{budget}-k{knn_k}.json"
    key = _g2is_cache_key(run)
    if path.exists():
        try:
            cached = read_json(path)
            if cached.get("run") == key and cached.get("budget") == budget and cached.get("knn_k") == knn_k:
                return [int(r) for r in cached["selected"]], cached["per_component"]
        except (RunError, KeyError, TypeError):
            pass  # a damaged or stale cache is recomputed
    from .g2is import g2is_select

    train_feats, val_feats = g2is_features(run)
    if device is None and torch.cuda.is_available():
        device = "cuda"
    t0 = time.perf_counter()
    result = g2is_select(train_feats, val_feats, budget, knn_k=knn_k, device=device, progress=progress)
    write_json(
        path,
        {
            "format": "gist-curator-g2is", "budget": budget, "knn_k": knn_k, "run": key, "seconds": round(time.perf_counter() - t0, 3),
            "created": utc_now(), "selected": [int(r) for r in result.selected], "per_component": result.per_component,
        },
    )  # fmt: skip
    return [int(r) for r in result.selected], result.per_component


# ----------------------------------------------------------------------------- select


def _rows_of(run: Run, ids: list[str]) -> tuple[np.ndarray, list[str]]:
    """(sorted row numbers of the ids found in the run, ids not in the run)."""
    if not ids:
        return np.zeros(0, np.int64), []
    found = run.train["id"].is_in(ids).to_numpy()
    rows = np.flatnonzero(found).astype(np.int64)
    missing = set(ids) - set(run.train["id"].gather(rows).to_list()) if rows.size < len(ids) else set()
    return rows, [i for i in ids if i in missing]


def source_codes(run: Run) -> tuple[list[str], np.ndarray]:
    """(sorted source names, int code per row into them)."""
    src = run.train["source"].cast(pl.String)
    return src.unique().sort().to_list(), (src.rank("dense") - 1).to_numpy().astype(np.int64)


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
    device: str | None = None,
    row_scores: np.ndarray | None = None,
) -> Selection:
    """Select ``budget`` examples by ``method`` honouring caps and edits (``edits=None`` reads the run's log).

    ``row_scores`` may pass in ``scores(run, method, rank, seed)`` already computed (the dashboard caches them).
    """
    check_method(run, method)
    n = run.train.height
    count, warning = _resolve_budget(budget, n)
    notes = [warning] if warning else []
    if method == "gist":
        rank = run.k_max if rank is None else int(rank)
        if not 1 <= rank <= run.k_max:
            raise ValueError(f"rank must be between 1 and k_max={run.k_max}, got {rank}")
    else:
        rank = None
    edits = load_edits(run.path) if edits is None else list(edits)
    state = edit_state(edits)
    forced_in, unknown_in = _rows_of(run, [i for i, s in state.items() if s == "include"])
    excluded_rows, unknown_out = _rows_of(run, [i for i, s in state.items() if s == "exclude"])
    unknown = unknown_in + unknown_out
    if unknown:
        notes.append(f"{len(unknown)} edited id(s) are not in this run and were ignored (e.g. {unknown[0]!r})")
    excluded = np.zeros(n, bool)
    excluded[excluded_rows] = True
    if forced_in.size > count:
        raise ValueError(
            f"{forced_in.size} examples are force-included but the budget is {count}; raise the budget or reset some includes"
        )
    names, codes = source_codes(run)
    cap = _cap_count(per_source_cap, count)
    if cap is not None:
        over = np.bincount(codes[forced_in], minlength=len(names)) > cap
        for s in np.flatnonzero(over):
            notes.append(f"source {names[s]!r} has more forced includes than its cap of {cap}; they are all kept")
    info: dict = {}
    if method == "g2is":
        row_scores = None
        order, chosen, capped, info = _g2is_fill(run, count, knn_k, forced_in, excluded, codes, len(names), cap, device)
    else:
        row_scores = scores(run, method, rank, seed) if row_scores is None else np.asarray(row_scores)
        if row_scores.shape != (n,):
            raise ValueError(f"row_scores has shape {row_scores.shape}, expected ({n},)")
        order = ranking(row_scores)
        chosen, capped = _fill(order, count, forced_in, excluded, codes, len(names), cap)
    position = np.full(n, n, np.int64)
    position[order] = np.arange(order.size)
    chosen = chosen[np.lexsort((chosen, position[chosen]))]
    if chosen.size < count:
        reasons = []
        if cap is not None:
            reasons.append(f"the per-source cap of {cap} × {len(names)} sources")
        if excluded.any():
            reasons.append(f"{int(excluded.sum())} excluded examples")
        if method == "g2is":
            reasons.append("G2IS found no further example satisfying its rules")
        notes.append(f"selected {chosen.size} of the budget {count}: limited by {' and '.join(reasons) or 'the pool size'}")
    ids = run.train["id"]
    out_rows = np.flatnonzero(excluded)
    out_rows = out_rows[np.argsort(position[out_rows], kind="stable")]
    return Selection(
        method=method, rank=rank, budget=count, ids=ids.gather(chosen).to_list(), rows=chosen,
        scores=None if row_scores is None else np.asarray(row_scores)[chosen],
        forced_in=ids.gather(forced_in[np.argsort(position[forced_in], kind="stable")]).to_list(),
        forced_out=ids.gather(out_rows).to_list(),
        capped={names[s]: int(c) for s, c in enumerate(capped) if c},
        per_source_cap=per_source_cap, cap=cap, n_edits=len(edits), warnings=notes, info=info,
    )  # fmt: skip


def _g2is_fill(run, count, knn_k, forced_in, excluded, codes, n_sources, cap, device):
    """G2IS candidates in walk order, topped up from larger G2IS runs when edits or caps leave a gap."""
    n = run.train.height
    picks, per_component = g2is_rows(run, count, knn_k, device=device)
    order = np.asarray(picks, dtype=np.int64)
    chosen, capped = _fill(order, count, forced_in, excluded, codes, n_sources, cap)
    asked, topups = count, []
    while chosen.size < count and asked < n and len(topups) < G2IS_MAX_TOPUPS:
        asked = min(n, asked + 2 * (count - chosen.size) + len(topups) * count)
        more, _ = g2is_rows(run, asked, knn_k, device=device)
        seen = np.zeros(n, bool)
        seen[order] = True
        order = np.concatenate([order, np.asarray([r for r in more if not seen[r]], dtype=np.int64)])
        topups.append(asked)
        chosen, capped = _fill(order, count, forced_in, excluded, codes, n_sources, cap)
    info = {"knn_k": knn_k, "per_component": [{k: v for k, v in c.items() if k != "chosen"} for c in per_component], "topup_budgets": topups}
    return order, chosen, capped, info


# ----------------------------------------------------------------------------- export, summaries, comparison


def _source_mix(run: Run, rows: np.ndarray) -> dict[str, int]:
    counts = run.train["source"].gather(rows).value_counts(sort=True)
    return {str(s): int(c) for s, c in counts.iter_rows()}


def export_jsonl(run: Run, selection: Selection, out_path: str | Path, *, with_meta: bool = False) -> Path:
    """Write the selected original records verbatim as JSONL (selection order) plus ``<out>.manifest.json``; returns the manifest path.

    Each line is the record's ``raw`` text exactly as read from the input. With ``with_meta`` each record is
    re-serialised with a ``_gist`` field {"score", "rank" (1 = first in the selection), "method"}.
    A raw record spanning several lines (possible only from pretty-printed JSON input) is re-serialised compactly.
    """
    out = Path(out_path)
    if run.train["id"].gather(selection.rows).to_list() != selection.ids:
        raise ValueError(f"this selection was not made on run {run.path}; select again on this run before exporting")
    raws = run.train["raw"].gather(selection.rows).to_list()
    lines, reserialised = [], 0
    for position, raw in enumerate(raws):
        if with_meta:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError(f"record {selection.ids[position]!r} is not a JSON object; export it without --with-meta")
            score = None if selection.scores is None else float(selection.scores[position])
            meta = {"score": score, "rank": position + 1, "method": selection.method}
            if selection.rank is not None:
                meta["subspace_rank"] = selection.rank
            record["_gist"] = meta
            raw = json.dumps(record, ensure_ascii=False)
        elif "\n" in raw or "\r" in raw:
            raw = json.dumps(json.loads(raw), ensure_ascii=False)
            reserialised += 1
        lines.append(raw)
    with atomic_path(out) as tmp:
        tmp.write_bytes("".join(line + "\n" for line in lines).encode("utf-8"))
    manifest_path = out.with_name(out.name + ".manifest.json")
    m = run.manifest
    write_json(
        manifest_path,
        {
            "format": "gist-curator-export", "version": EXPORT_VERSION, "created": utc_now(), "tool_version": tool_version(),
            "output": str(out.resolve()), "output_sha256": file_sha256(out), "count": len(lines), "with_meta": with_meta,
            "reserialised": reserialised, "method": selection.method, "rank": selection.rank, "budget": selection.budget,
            "per_source_cap": selection.per_source_cap, "per_source_cap_count": selection.cap, "capped": selection.capped,
            "source_mix": _source_mix(run, selection.rows),
            "edits": {"n_edits": selection.n_edits, "forced_in": selection.forced_in, "forced_out": selection.forced_out},
            "warnings": selection.warnings, "method_info": selection.info,
            "run": {
                "path": str(run.path.resolve()), "id": run.path.name, "created": m.get("created"), "config_hash": m.get("config_hash"),
                "n_train": run.train.height, "fingerprints": m.get("fingerprints"),
                "manifest_sha256": file_sha256(run.path / "manifest.json"),
            },
        },
    )  # fmt: skip
    return manifest_path


def _quantiles(values: np.ndarray) -> dict:
    if values.size == 0:
        return {}
    q = np.quantile(values, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    names = ("min", "p10", "p25", "median", "p75", "p90", "max")
    return {**{k: float(v) for k, v in zip(names, q)}, "mean": float(values.mean()), "total": int(values.sum())}


def summary(run: Run, selection: Selection) -> dict:
    """Count, source mix (vs the pool), token-length distribution and score statistics of a selection."""
    rows = selection.rows
    mix = _source_mix(run, rows)
    pool = _source_mix(run, np.arange(run.train.height))
    count = int(rows.size)
    sc = selection.scores
    return {
        "method": selection.method, "rank": selection.rank, "budget": selection.budget, "count": count,
        "source_mix": mix, "source_share": {s: c / count for s, c in mix.items()} if count else {},
        "pool_source_share": {s: c / run.train.height for s, c in pool.items()},
        "n_tokens": _quantiles(run.train["n_tokens"].to_numpy()[rows]),
        "n_response_tokens": _quantiles(run.train["n_response_tokens"].to_numpy()[rows]),
        "mean_score": None if sc is None or sc.size == 0 else float(np.mean(sc)),
        "min_score": None if sc is None or sc.size == 0 else float(np.min(sc)),
        "max_score": None if sc is None or sc.size == 0 else float(np.max(sc)),
        "forced_in": len(selection.forced_in), "forced_out": len(selection.forced_out), "capped": selection.capped,
        "warnings": selection.warnings,
    }  # fmt: skip


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    return pl.Series(x).rank("average").to_numpy().astype(np.float64)


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denom if denom > 0 else None


def compare(run: Run, budget: int | float | str, methods: Sequence[str] | None = None, rank: int | None = None, *, apply_edits: bool = False) -> dict:
    """Pairwise Jaccard overlaps of the methods' selections at one budget, score correlations, source mixes.

    Selections are the methods' own (no caps; curation edits only with ``apply_edits``). Correlations
    (Spearman with averaged ties, Pearson) are over all pool rows, for methods with scores (not G2IS);
    None where a score vector is constant.
    """
    if methods is None:
        methods = [m for m in METHODS if m in ("gist", "random") or m in run.methods]
    methods = list(dict.fromkeys(methods))
    edits = None if apply_edits else []
    sels = {m: select(run, method=m, rank=rank, budget=budget, edits=edits) for m in methods}
    sets = {m: set(s.rows.tolist()) for m, s in sels.items()}
    jaccard: dict = {a: {} for a in methods}
    inter: dict = {a: {} for a in methods}
    for a in methods:
        for b in methods:
            common = len(sets[a] & sets[b])
            union = len(sets[a] | sets[b])
            inter[a][b] = common
            jaccard[a][b] = common / union if union else 1.0
    scored = [m for m in methods if m != "g2is"]
    vectors = {m: np.asarray(scores(run, m, sels[m].rank), dtype=np.float64) for m in scored}
    ranks = {m: _average_ranks(v) for m, v in vectors.items()}
    spearman = {a: {b: _pearson(ranks[a], ranks[b]) for b in scored} for a in scored}
    pearson = {a: {b: _pearson(vectors[a], vectors[b]) for b in scored} for a in scored}
    gist_rank = sels["gist"].rank if "gist" in sels else (run.k_max if rank is None else rank)
    return {
        "budget": next(iter(sels.values())).budget if sels else _resolve_budget(budget, run.train.height)[0],
        "rank": gist_rank, "methods": methods, "counts": {m: len(s.rows) for m, s in sels.items()},
        "jaccard": jaccard, "intersection": inter, "spearman": spearman, "pearson": pearson,
        "source_mix": {m: _source_mix(run, s.rows) for m, s in sels.items()},
        "pool_source_mix": _source_mix(run, np.arange(run.train.height)),
        "warnings": {m: s.warnings for m, s in sels.items() if s.warnings},
    }  # fmt: skip
