"""Scores of every pool example under each method, from what a run stores (no model needed).

GIST and GIST-global rescore at any rank from the stored coordinates (O(N·r·T)); LESS scores are fixed by
the run (computed from the sketches at compute time); G2IS selects a set for a budget and has no scores
(see ``selection``); random is a seeded baseline. The formulas are in ``methods/gist.py`` and ``methods/less.py``.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from ..config import METHODS, SKETCH_METHODS, check_rank
from ..methods.gist import gist_task_scores
from ..runs.files import RunError, read_npy
from ..runs.store import Run


def available_methods(run: Run) -> list[str]:
    """The methods this run can select with, in the order of ``config.METHODS``."""
    have = {"gist", "random", *run.methods}
    if run.grad_norms is not None:
        have.add("gist-global")
    return [m for m in METHODS if m in have]


def check_method(run: Run, method: str) -> None:
    """Raise a clear error for a method the run cannot serve."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    if method in SKETCH_METHODS and method not in run.methods:
        raise RunError(f"{run.path}: this run was computed without {method.upper()}. "
                       "Recompute with `gist-curate compute ... --methods gist,less,g2is`.")  # fmt: skip
    if method == "gist-global" and run.grad_norms is None:
        raise RunError(f"{run.path}: this run predates stored gradient norms, so gist-global is not available; recompute it.")


def task_scores(run: Run, rank: int | None = None, method: str = "gist") -> tuple[list[str], np.ndarray]:
    """GIST (or GIST-global) checkpoint-weighted alignment with each sub-task: (task names, (N, T))."""
    rank = check_rank(rank, run.k_max)
    norms = {}
    if method == "gist-global":
        check_method(run, method)
        norms = {"coord_norms": run.coord_norms, "grad_norms": run.grad_norms}
    elif method != "gist":
        raise ValueError(f"per-task scores exist for gist and gist-global, not {method!r}")
    return gist_task_scores(run.scoring_unit_coords, run.val_coords, run.val_tasks, run.gist_weights, rank, **norms)


def scores(run: Run, method: str = "gist", rank: int | None = None, seed: int = 0) -> np.ndarray:
    """Score per pool row (higher = more helpful to the target) for a scoring method."""
    check_method(run, method)
    if method in ("gist", "gist-global"):
        return task_scores(run, rank, method)[1].max(axis=1).astype(np.float64)
    if method == "less":
        values = np.asarray(read_npy(run.paths["less_scores"], mmap=False), dtype=np.float64)
        if values.shape != (run.train.height,) or not np.isfinite(values).all():
            raise RunError(f"{run.paths['less_scores']}: shape {values.shape} or non-finite values do not fit the run; recompute it.")
        return values
    if method == "random":
        return np.random.default_rng(seed).random(run.train.height)
    raise ValueError("G2IS selects a set for a budget and gives no scores; use gist_backend.select(run, method='g2is', ...)")


def ranking(row_scores: np.ndarray) -> np.ndarray:
    """Row order by descending score, ties broken by row number (deterministic)."""
    return np.argsort(-np.asarray(row_scores), kind="stable")


def nearest_validation(run: Run, row: int, rank: int | None = None, k: int = 5) -> pl.DataFrame:
    """The k validation examples closest to pool row ``row`` (checkpoint-weighted cosine over the first ``rank`` coordinates)."""
    rank = check_rank(rank, run.k_max)
    total = np.zeros(run.val.height)
    for c, weight in enumerate(run.gist_weights):
        z = np.asarray(run.unit_coords[c, row, :rank], dtype=np.float64)
        v = np.asarray(run.val_coords[c, :, :rank], dtype=np.float64)
        denom = np.linalg.norm(v, axis=1) * max(float(np.linalg.norm(z)), 1e-300)
        total += weight * (v @ z) / np.where(denom > 0, denom, 1.0)
    top = np.argsort(-total, kind="stable")[:k]
    return pl.DataFrame(
        {
            "cosine": total[top],
            "task": run.val["task"].gather(top),
            "id": run.val["id"].gather(top),
            "text": run.val["text"].gather(top).fill_null("").str.slice(0, 400),
        }
    )
