"""Scores of every training example under each method, from what a run stores (no model needed).

GIST rescoring at any rank touches only the stored coordinates (O(N·r·T)). LESS scores are fixed
by the run (computed once from the sketches at compute time). G2IS selects a set for a budget
rather than scoring; see ``selection``. Random is a seeded baseline.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from .gist import gist_task_scores
from .runs import Run, RunError, read_npy

METHODS = ("gist", "less", "g2is", "random")


def check_method(run: Run, method: str) -> None:
    """Raise a clear error for a method the run cannot serve."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    if method in ("less", "g2is") and method not in run.methods:
        raise RunError(
            f"{run.path}: this run was computed without {method.upper()}. "
            f"Recompute with `gist-curate compute ... --methods gist,less,g2is`."
        )


def task_scores(run: Run, rank: int | None = None) -> tuple[list[str], np.ndarray]:
    """GIST checkpoint-weighted cosine to each sub-task centroid: (task names, (N, T))."""
    rank = run.k_max if rank is None else rank
    return gist_task_scores(run.train_coords, run.val_coords, run.val_tasks, run.ckpt_weights, rank)


def scores(run: Run, method: str = "gist", rank: int | None = None, seed: int = 0) -> np.ndarray:
    """Score per training row (higher = more helpful to the target) for a scoring method."""
    check_method(run, method)
    if method == "gist":
        return task_scores(run, rank)[1].max(axis=1)
    if method == "less":
        return np.asarray(read_npy(run.path / "less_scores.npy", mmap=False), dtype=np.float64)
    if method == "random":
        return np.random.default_rng(seed).random(run.train.height)
    raise ValueError("G2IS selects a set for a budget and gives no scores; use gist_backend.selection.select")


def ranking(row_scores: np.ndarray) -> np.ndarray:
    """Row order by descending score, ties broken by row number (deterministic)."""
    return np.argsort(-np.asarray(row_scores), kind="stable")


def nearest_validation(run: Run, row: int, rank: int | None = None, k: int = 5) -> pl.DataFrame:
    """The k validation examples closest to training row ``row`` (checkpoint-weighted cosine, first ``rank`` coordinates)."""
    rank = run.k_max if rank is None else rank
    total = np.zeros(run.val.height)
    for c, weight in enumerate(run.ckpt_weights):
        z = np.asarray(run.train_coords[c, row, :rank], dtype=np.float64)
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
