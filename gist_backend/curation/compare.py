"""Compare selections at one budget: the methods' on one target (overlaps, score correlations, source mixes), or the targets' with one method."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from ..runs.store import Run, open_run
from .budget import resolve_budget_note
from .export import source_mix
from .scoring import available_methods, scores
from .selection import select


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    return pl.Series(x).rank("average").to_numpy().astype(np.float64)


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation, None when either vector is constant."""
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denom if denom > 0 else None


def overlaps(sets: dict[str, set]) -> tuple[dict, dict]:
    """(Jaccard |A∩B| / |A∪B|, intersection size) for every ordered pair of named sets."""
    jaccard: dict = {a: {} for a in sets}
    inter: dict = {a: {} for a in sets}
    for a in sets:
        for b in sets:
            common, union = len(sets[a] & sets[b]), len(sets[a] | sets[b])
            inter[a][b] = common
            jaccard[a][b] = common / union if union else 1.0
    return jaccard, inter


def compare(run: Run, budget: int | float | str, methods: Sequence[str] | None = None, rank: int | None = None, *, apply_edits: bool = False) -> dict:
    """Pairwise Jaccard overlaps of the methods' selections at one budget, score correlations, source mixes.

    Selections are the methods' own (no caps; curation edits only with ``apply_edits``). Correlations
    (Spearman with averaged ties, Pearson) are over all pool rows, for methods with scores (not G2IS);
    None where a score vector is constant.
    """
    methods = list(dict.fromkeys(methods or available_methods(run)))
    edits = None if apply_edits else []
    sels = {m: select(run, method=m, rank=rank, budget=budget, edits=edits) for m in methods}
    jaccard, inter = overlaps({m: set(s.rows.tolist()) for m, s in sels.items()})
    scored = [m for m in methods if m != "g2is"]
    vectors = {m: np.asarray(scores(run, m, sels[m].rank), dtype=np.float64) for m in scored}
    ranks = {m: average_ranks(v) for m, v in vectors.items()}
    gist_rank = next((s.rank for s in sels.values() if s.rank is not None), rank if rank is not None else run.k_max)
    return {
        "budget": next(iter(sels.values())).budget if sels else resolve_budget_note(budget, run.train.height)[0],
        "rank": gist_rank, "target": run.target, "methods": methods, "counts": {m: len(s.rows) for m, s in sels.items()},
        "jaccard": jaccard, "intersection": inter,
        "spearman": {a: {b: pearson(ranks[a], ranks[b]) for b in scored} for a in scored},
        "pearson": {a: {b: pearson(vectors[a], vectors[b]) for b in scored} for a in scored},
        "source_mix": {m: source_mix(run, s.rows) for m, s in sels.items()},
        "pool_source_mix": source_mix(run, np.arange(run.train.height)),
        "shortfall": {m: s.shortfall for m, s in sels.items() if s.shortfall},
        "warnings": {m: s.warnings for m, s in sels.items() if s.warnings},
    }  # fmt: skip


def compare_targets(run_dir: str | Path, budget: int | float | str, targets: Sequence[str] | None = None, method: str = "gist",
                    rank: int | None = None) -> dict:  # fmt: skip
    """How the targets of one run pick from the pool with one method: overlaps of their selections and score correlations.

    Each target's selection is the method's own (no caps, no edits) at the same budget; G2IS contributes its set
    to the overlaps and nothing to the correlations. ``rank`` above a target's k_max is clipped to it.
    """
    first = open_run(run_dir)
    targets = list(dict.fromkeys(targets or first.targets))
    runs = {t: first if t == first.target else open_run(run_dir, t) for t in targets}
    ranks = {t: None if rank is None else min(rank, r.k_max) for t, r in runs.items()}
    sels = {t: select(r, method=method, rank=ranks[t], budget=budget, edits=[]) for t, r in runs.items()}
    jaccard, inter = overlaps({t: set(s.rows.tolist()) for t, s in sels.items()})
    vectors = {} if method == "g2is" else {t: np.asarray(scores(r, method, sels[t].rank), dtype=np.float64) for t, r in runs.items()}
    by_rank = {t: average_ranks(v) for t, v in vectors.items()}
    return {
        "method": method, "budget": next(iter(sels.values())).budget, "targets": targets,
        "ranks": {t: s.rank for t, s in sels.items()}, "counts": {t: len(s.rows) for t, s in sels.items()},
        "jaccard": jaccard, "intersection": inter,
        "spearman": {a: {b: pearson(by_rank[a], by_rank[b]) for b in vectors} for a in vectors},
        "pearson": {a: {b: pearson(vectors[a], vectors[b]) for b in vectors} for a in vectors},
    }  # fmt: skip
