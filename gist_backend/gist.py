"""GIST: the task subspace from validation gradients, coordinates in it, and alignment scores.

With validation gradients G (m × d):
    K = G Gᵀ = U Λ Uᵀ,   σ_j = sqrt(max(λ_j, 0)) in descending order
    V = Gᵀ U_k Σ_k⁻¹      (d × k, orthonormal columns: the top right singular vectors of G)
    Z = U_k Σ_k = G V     validation coordinates;   z_i = Vᵀ g_i   training coordinates
Score at rank r: per sub-task t, c_t = normalise(mean of Z[t, :r]); score_i = max_t cos(z_i[:r], c_t).
With several checkpoints the per-task cosines are averaged with the checkpoint weights before the max.
Because the basis is ordered by σ, k_max stored coordinates give the exact score at every r ≤ k_max.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

# Singular values below this fraction of the largest are numerical noise, not task directions.
RELATIVE_RANK_TOL = 1e-6


def gram(val_grads: np.ndarray | torch.Tensor, block: int = 1 << 20) -> torch.Tensor:
    """K = G Gᵀ in float64, reading G in column blocks so a disk-backed G is streamed once."""
    m, d = val_grads.shape
    k = torch.zeros(m, m, dtype=torch.float64)
    for start in range(0, d, block):
        cols = torch.as_tensor(np.asarray(val_grads[:, start : start + block])).to(torch.float64)
        k += cols @ cols.T
    return k


def fit_subspace(
    val_grads: np.ndarray | torch.Tensor, k_max: int = 128, block: int = 1 << 20
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (all singular values (m,), V (d, k), val_coords (m, k)) for the top k ≤ k_max directions of G."""
    m, d = val_grads.shape
    k_mat = gram(val_grads, block)
    eigvals, eigvecs = torch.linalg.eigh(k_mat)
    order = torch.argsort(eigvals, descending=True)
    sigma_all = eigvals[order].clamp_min(0).sqrt()
    eigvecs = eigvecs[:, order]
    keep = int((sigma_all > RELATIVE_RANK_TOL * max(float(sigma_all[0]), 1e-300)).sum())
    if keep == 0:
        raise ValueError("all validation gradients are zero: check that the validation records have response tokens")
    k = min(k_max, keep)
    sigma, u_k = sigma_all[:k], eigvecs[:, :k]
    # V = Gᵀ U_k Σ_k⁻¹, one column block of G at a time.
    basis = np.empty((d, k), dtype=np.float32)
    scale = u_k / sigma
    for start in range(0, d, block):
        cols = torch.as_tensor(np.asarray(val_grads[:, start : start + block])).to(torch.float64)
        basis[start : start + cols.shape[1]] = (cols.T @ scale).to(torch.float32).numpy()
    val_coords = (u_k * sigma).to(torch.float32).numpy()
    return sigma_all.numpy(), basis, val_coords


def task_centroids(val_coords: np.ndarray, val_tasks: Sequence[str], rank: int) -> tuple[list[str], np.ndarray]:
    """Unit-norm mean validation coordinate (first ``rank`` dims) per sub-task: (names, (T, rank))."""
    tasks = sorted(set(val_tasks))
    labels = np.asarray(val_tasks)
    centroids = np.stack([val_coords[labels == t, :rank].astype(np.float64).mean(axis=0) for t in tasks])
    norms = np.linalg.norm(centroids, axis=1, keepdims=True)
    return tasks, centroids / np.where(norms > 0, norms, 1.0)


def per_task_cosines(
    train_coords: np.ndarray, val_coords: np.ndarray, val_tasks: Sequence[str], rank: int
) -> tuple[list[str], np.ndarray]:
    """cos(z_i[:rank], c_t) for one checkpoint: (task names, (N, T))."""
    tasks, centroids = task_centroids(val_coords, val_tasks, rank)
    z = np.asarray(train_coords[:, :rank], dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", z, z))[:, None]
    cos = (z @ centroids.T.astype(np.float32)) / np.where(norms > 0, norms, 1.0)
    return tasks, cos


def gist_task_scores(
    train_coords: np.ndarray,
    val_coords: np.ndarray,
    val_tasks: Sequence[str],
    ckpt_weights: Sequence[float],
    rank: int,
) -> tuple[list[str], np.ndarray]:
    """Checkpoint-weighted per-task cosines (N, T) from stored (C, N, k) / (C, m, k) coordinates."""
    n_ckpt, _, k_max = train_coords.shape
    if not 1 <= rank <= k_max:
        raise ValueError(f"rank must be between 1 and k_max={k_max}, got {rank}")
    weights = np.asarray(ckpt_weights, dtype=np.float64)
    weights = weights / weights.sum()
    total = None
    tasks: list[str] = []
    for c in range(n_ckpt):
        tasks, cos = per_task_cosines(train_coords[c], val_coords[c], val_tasks, rank)
        total = cos * weights[c] if total is None else total + cos * weights[c]
    return tasks, total


def gist_scores(
    train_coords: np.ndarray,
    val_coords: np.ndarray,
    val_tasks: Sequence[str],
    ckpt_weights: Sequence[float],
    rank: int,
) -> np.ndarray:
    """GIST score per training example at ``rank``: max over sub-tasks of the weighted cosine."""
    _, per_task = gist_task_scores(train_coords, val_coords, val_tasks, ckpt_weights, rank)
    return per_task.max(axis=1)
