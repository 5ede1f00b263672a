"""2-D maps of the training pool in the GIST subspace (the dashboard's Map view), cached per rank.

At rank r the map is a UMAP (cosine metric) of the last checkpoint's training coordinates z_i[:r], L2-normalised
(cosine is what the GIST score measures). Validation coordinates and the sub-task centroids (unit vectors) are
placed into the same map, embedded together with the training points (see ``_umap``). Beyond ``fit_sample``
points UMAP is fitted on a seeded sample and the rest is placed from their nearest fitted neighbours, which
bounds the cost. Ranks 1 and 2 need no embedding: the map is the coordinates themselves (rank 1 padded with a
zero column), centroids being the task means.

Cached in ``<run>/maps/umap-<target>-r<rank>.safetensors`` (arrays train_xy (N, 2), val_xy (m, 2), centroid_xy (T, 2),
centroids in sorted task-name order; the parameters and run identity are in the safetensors metadata, and a
cache made with other parameters or for another run is recomputed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import check_rank
from ..methods.gist import task_centroids
from ..runs.files import read_tensors, write_tensors
from ..runs.store import Run

MAP_KEYS = ("train_xy", "val_xy", "centroid_xy")
FIT_SAMPLE = 20_000  # UMAP is fitted on at most this many pool points; the rest are placed from their fitted neighbours


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def _params(run: Run, rank: int, seed: int, fit_sample: int, n_neighbors: int) -> dict[str, str]:
    """Everything the cached map depends on, as safetensors metadata (strings)."""
    m = run.manifest
    return {
        "rank": str(rank), "seed": str(seed), "fit_sample": str(fit_sample), "n_neighbors": str(n_neighbors),
        "n_train": str(run.train.height), "run_created": str(m.get("created")), "run_config_hash": str(m.get("config_hash")),
        "target": run.target,
    }  # fmt: skip


def _shapes(run: Run) -> dict[str, tuple[int, int]]:
    """The shape each map array must have for this run: one point per pool example, validation example and sub-task."""
    return {"train_xy": (run.train.height, 2), "val_xy": (len(run.val_tasks), 2), "centroid_xy": (len(set(run.val_tasks)), 2)}


def _cached(path, params: dict[str, str], shapes: dict[str, tuple[int, int]]) -> dict[str, np.ndarray] | None:
    """The cached map if it exists, is readable, was made with the same parameters for this run and has its shapes."""
    if not path.exists():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            if (f.metadata() or {}) != params:
                return None
        arrays = read_tensors(path)
    except Exception:  # a damaged cache (bad header, truncated file) is recomputed
        return None
    ok = all(k in arrays and arrays[k].shape == shapes[k] and np.isfinite(arrays[k]).all() for k in MAP_KEYS)
    return arrays if ok else None  # rows of a map become edits: a map of another shape is never served


def map_path(run: Run, rank: int) -> Path:
    """Where the map of a target at a rank is cached."""
    return run.path / "maps" / f"umap-{run.target}-r{rank}.safetensors"


def cached_map(run: Run, rank: int, *, seed: int = 0, fit_sample: int = FIT_SAMPLE, n_neighbors: int = 15) -> dict[str, np.ndarray] | None:
    """The cached map at ``rank`` if one was made with these parameters for this run, else None (nothing is computed)."""
    cached = _cached(map_path(run, check_rank(rank, run.k_max)), _params(run, rank, seed, fit_sample, n_neighbors), _shapes(run))
    return None if cached is None else {k: cached[k] for k in MAP_KEYS}


def latest_cached_map(run: Run) -> tuple[int, dict[str, np.ndarray]] | None:
    """The most recently written valid cached map of this run's target at any rank: (rank, arrays), or None."""
    found = sorted(run.path.glob(f"maps/umap-{run.target}-r*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in found:
        rank_text = path.stem.rsplit("-r", 1)[-1]
        if rank_text.isdigit() and 1 <= int(rank_text) <= run.k_max:
            arrays = cached_map(run, int(rank_text))
            if arrays is not None:
                return int(rank_text), arrays
    return None


def umap_map(run: Run, rank: int, *, seed: int = 0, fit_sample: int = FIT_SAMPLE, n_neighbors: int = 15) -> dict[str, np.ndarray]:
    """{"train_xy" (N, 2), "val_xy" (m, 2), "centroid_xy" (T, 2)} float32 at ``rank``; cached in the run."""
    rank = check_rank(rank, run.k_max)
    cached = cached_map(run, rank, seed=seed, fit_sample=fit_sample, n_neighbors=n_neighbors)
    if cached is not None:
        return cached
    params = _params(run, rank, seed, fit_sample, n_neighbors)
    path = map_path(run, rank)
    train = np.asarray(run.train_coords[-1, :, :rank], dtype=np.float32)
    val = np.asarray(run.val_coords[-1, :, :rank], dtype=np.float32)
    if rank <= 2:
        tasks = sorted(set(run.val_tasks))
        labels = np.asarray(run.val_tasks)
        centroids = np.stack([val[labels == t].mean(axis=0) for t in tasks]).astype(np.float32)
        out = {k: np.pad(x, ((0, 0), (0, 2 - rank))) for k, x in (("train_xy", train), ("val_xy", val), ("centroid_xy", centroids))}
    else:
        out = _umap(_unit_rows(train), _unit_rows(val), task_centroids(val, run.val_tasks, rank)[1], seed, fit_sample, n_neighbors)
    out = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}
    write_tensors(path, out, metadata=params)
    return out


def knn(query: np.ndarray, ref: np.ndarray, k: int, block_elems: int = 1 << 25) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of ``ref`` for each unit row of ``query`` by cosine: (indices int64, distances 1 − cos)."""
    q, r = torch.from_numpy(np.ascontiguousarray(query, np.float32)), torch.from_numpy(np.ascontiguousarray(ref, np.float32))
    k = min(k, r.shape[0])
    idx = np.empty((q.shape[0], k), np.int64)
    dist = np.empty((q.shape[0], k), np.float32)
    block = max(1, block_elems // max(r.shape[0], 1))
    for start in range(0, q.shape[0], block):
        sims, nearest = (q[start : start + block] @ r.T).topk(k, dim=1)
        idx[start : start + block] = nearest.numpy()
        dist[start : start + block] = (1.0 - sims).clamp_min(0.0).numpy()
    return idx, dist


def _umap(train: np.ndarray, val: np.ndarray, centroids: np.ndarray, seed: int, fit_sample: int, n_neighbors: int) -> dict[str, np.ndarray]:
    """UMAP of (a seeded sample of) ``train`` with the validation rows and centroids embedded alongside.

    The neighbour graph is exact (blockwise cosine top-k in torch) and handed to UMAP as ``precomputed_knn``:
    on a 2-core box UMAP's own NN-descent took half of the ~200 s a 50k map cost, and its ``transform`` would
    need that search index. Validation rows and centroids (a few hundred unit vectors) are therefore fitted
    together with the training sample rather than transformed. Training rows beyond ``fit_sample`` are placed
    at the similarity-weighted mean position of their ``n_neighbors`` nearest fitted training rows (UMAP's own
    transform starts from this point).
    """
    import warnings

    import umap

    n, n_val = train.shape[0], val.shape[0]
    rng = np.random.default_rng(seed)
    fit_rows = np.sort(rng.choice(n, fit_sample, replace=False)) if n > fit_sample else np.arange(n)
    fit = np.concatenate([train[fit_rows], val, centroids]).astype(np.float32)
    if fit.shape[0] < 4:
        raise ValueError(f"a UMAP map needs at least 4 points, the run has {fit.shape[0]}; use rank 2 for a plain scatter")
    k = max(2, min(n_neighbors, fit.shape[0] - 1))
    knn_idx, knn_dist = knn(fit, fit, k)
    reducer = umap.UMAP(n_components=2, n_neighbors=k, metric="cosine", random_state=seed, precomputed_knn=(knn_idx, knn_dist))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(n_jobs|knn_search_index|transforming new data).*")
        xy = reducer.fit_transform(fit).astype(np.float32)
    train_xy = np.empty((n, 2), np.float32)
    train_xy[fit_rows] = xy[: fit_rows.size]
    if fit_rows.size < n:
        rest = np.setdiff1d(np.arange(n), fit_rows)
        idx, dist = knn(train[rest], train[fit_rows], k)
        weights = np.clip(1.0 - dist, 1e-6, None)
        train_xy[rest] = (xy[idx] * weights[..., None]).sum(axis=1) / weights.sum(axis=1, keepdims=True)
    return {"train_xy": train_xy, "val_xy": xy[fit_rows.size : fit_rows.size + n_val], "centroid_xy": xy[fit_rows.size + n_val :]}
