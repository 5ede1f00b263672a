"""GIST (Min et al. 2026): the task subspace from validation gradients, coordinates in it, and alignment scores.

With validation gradients G (m × d):
    K = G Gᵀ = U Λ Uᵀ,   σ_j = sqrt(max(λ_j, 0)) in descending order
    V = Gᵀ U_k Σ_k⁻¹      (d × k, orthonormal columns: the top right singular vectors of G)
    Z = U_k Σ_k = G V     validation coordinates;   z_i = Vᵀ g_i   training coordinates
Per sub-task t at rank r, c_t = normalise(mean of Z[t, :r]) is the target direction. Two scores:
    gist         cos(z_i[:r], c_t)                  alignment inside the subspace, as published
    gist-global  ⟨z_i[:r], c_t⟩ / ‖g_i‖             the same direction measured against the whole gradient
                 = cos(z_i[:r], c_t) · ‖P_r g_i‖ / ‖g_i‖
and score_i = max_t of the checkpoint-weighted per-task values. The subspace cosine ranks an example whose
gradient barely touches the subspace as high as one lying in it; gist-global discounts it by the share of
its gradient the subspace holds. Because the basis is ordered by σ, k_max stored coordinates give both
scores exactly at every r ≤ k_max. Coordinates are stored as unit rows u_i = z_i / ‖z_i‖ plus ‖z_i‖, so
    cos(z_i[:r], c_t) = u_i[:r]·c_t / ‖u_i[:r]‖,    ⟨z_i[:r], c_t⟩ / ‖g_i‖ = (‖z_i‖ / ‖g_i‖) · u_i[:r]·c_t.
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


def eig_subspace(val_grads: np.ndarray | torch.Tensor, k_max: int = 128, block: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """(all singular values (m,) float64, validation coordinates Z = U_k Σ_k (m, k) float32) from the Gram matrix of G."""
    k_mat = gram(val_grads, block)
    eigvals, eigvecs = torch.linalg.eigh(k_mat)
    order = torch.argsort(eigvals, descending=True)
    sigma_all = eigvals[order].clamp_min(0).sqrt()
    eigvecs = eigvecs[:, order]
    keep = int((sigma_all > RELATIVE_RANK_TOL * max(float(sigma_all[0]), 1e-300)).sum())
    if keep == 0:
        raise ValueError("all validation gradients are zero: check that the validation records have response tokens")
    k = min(k_max, keep)
    return sigma_all.numpy(), (eigvecs[:, :k] * sigma_all[:k]).to(torch.float32).numpy()


def fit_subspace(
    val_grads: np.ndarray | torch.Tensor, k_max: int = 128, block: int = 1 << 20
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (all singular values (m,), V (d, k), val_coords (m, k)) for the top k ≤ k_max directions of G."""
    d = val_grads.shape[1]
    sigma_all, val_coords = eig_subspace(val_grads, k_max, block)
    k = val_coords.shape[1]
    # V = Gᵀ U_k Σ_k⁻¹ = Gᵀ Z Σ_k⁻², one column block of G at a time.
    scale = torch.as_tensor(val_coords, dtype=torch.float64) / torch.as_tensor(sigma_all[:k] ** 2)
    basis = np.empty((d, k), dtype=np.float32)
    for start in range(0, d, block):
        cols = torch.as_tensor(np.asarray(val_grads[:, start : start + block])).to(torch.float64)
        basis[start : start + cols.shape[1]] = (cols.T @ scale).to(torch.float32).numpy()
    return sigma_all, basis, val_coords


def sketched_basis(val_sketch: np.ndarray, val_coords: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """W = (S G)ᵀ Z Σ⁻² (P × k): pool coordinates from sketches, z_i ≈ Wᵀ (S g_i), since ⟨S g, S h⟩ ≈ ⟨g, h⟩.

    Exact GIST has z_i = Vᵀ g_i = Σ⁻¹ Uᵀ G g_i; a seeded SRHT S keeps inner products, so G g_i ≈ (S G)(S g_i).
    """
    k = val_coords.shape[1]
    scale = np.asarray(val_coords, dtype=np.float64) / (np.asarray(sigma[:k], dtype=np.float64) ** 2)
    return (np.asarray(val_sketch, dtype=np.float64).T @ scale).astype(np.float32)


class Projector:
    """z = Vᵀ g for batches of gradients: V resident on the device, or kept on the host and streamed in row blocks.

    The basis (d × k) is held in ``dtype`` (bfloat16 halves it). When it is larger than ``memory_bytes`` it stays
    on the host (pinned on CUDA) and each batch is projected one block of rows at a time, so the device never
    holds more than ``memory_bytes`` of it; the result is the same sum, accumulated in float32.
    """

    def __init__(self, basis: np.ndarray, device: torch.device | str, dtype: torch.dtype = torch.float32, memory_bytes: int = 1 << 34):
        self.device, self.dtype = torch.device(device), dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        d, k = basis.shape
        self.resident = d * k * itemsize <= memory_bytes
        host = torch.as_tensor(np.asarray(basis)).to(dtype)
        if self.resident:
            self.basis = host.to(self.device)
            self.rows = d
        else:
            self.basis = host.pin_memory() if self.device.type == "cuda" else host
            self.rows = max(1, int(memory_bytes // (k * itemsize)))

    @property
    def k(self) -> int:
        return int(self.basis.shape[1])

    def __call__(self, grads: torch.Tensor) -> torch.Tensor:
        """(B, d) gradients on the device → (B, k) float32 coordinates."""
        if self.resident:
            return (grads.to(self.dtype) @ self.basis).float()
        out = torch.zeros(grads.shape[0], self.k, dtype=torch.float32, device=grads.device)
        for start in range(0, self.basis.shape[0], self.rows):
            block = self.basis[start : start + self.rows].to(grads.device, non_blocking=True)
            out += (grads[:, start : start + block.shape[0]].to(self.dtype) @ block).float()
        return out


def task_centroids(val_coords: np.ndarray, val_tasks: Sequence[str], rank: int) -> tuple[list[str], np.ndarray]:
    """Unit-norm mean validation coordinate (first ``rank`` dims) per sub-task: (names, (T, rank))."""
    tasks = sorted(set(val_tasks))
    labels = np.asarray(val_tasks)
    centroids = np.stack([val_coords[labels == t, :rank].astype(np.float64).mean(axis=0) for t in tasks])
    norms = np.linalg.norm(centroids, axis=1, keepdims=True)
    return tasks, centroids / np.where(norms > 0, norms, 1.0)


def task_alignment(
    unit: np.ndarray,
    val_coords: np.ndarray,
    val_tasks: Sequence[str],
    rank: int,
    norm_ratio: np.ndarray | None = None,
    block: int = 1 << 16,
) -> tuple[list[str], np.ndarray]:
    """Per-task alignment (N, T) float32 for one checkpoint: subspace cosines, or, given ‖z‖/‖g‖, gist-global values."""
    tasks, centroids = task_centroids(val_coords, val_tasks, rank)
    centroids = centroids.T.astype(np.float32)
    out = np.empty((unit.shape[0], len(tasks)), np.float32)
    for start in range(0, unit.shape[0], block):
        u = np.asarray(unit[start : start + block, :rank], dtype=np.float32)
        dots = u @ centroids
        if norm_ratio is None:
            norms = np.sqrt(np.einsum("ij,ij->i", u, u))[:, None]
            out[start : start + block] = dots / np.where(norms > 0, norms, 1.0)
        else:
            out[start : start + block] = dots * np.asarray(norm_ratio[start : start + block], dtype=np.float32)[:, None]
    return tasks, out


def gist_task_scores(
    unit: np.ndarray,
    val_coords: np.ndarray,
    val_tasks: Sequence[str],
    weights: Sequence[float],
    rank: int,
    *,
    coord_norms: np.ndarray | None = None,
    grad_norms: np.ndarray | None = None,
) -> tuple[list[str], np.ndarray]:
    """Checkpoint-weighted per-task values (N, T) from stored (G, N, k) unit coordinates; gist-global when both norms are given."""
    n_ckpt, _, k_max = unit.shape
    if not 1 <= rank <= k_max:
        raise ValueError(f"rank must be between 1 and k_max={k_max}, got {rank}")
    if (coord_norms is None) != (grad_norms is None):
        raise ValueError("gist-global needs both coord_norms (‖z‖) and grad_norms (‖g‖); give both, or neither for GIST")
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    total, tasks = None, []
    for c in range(n_ckpt):
        ratio = None
        if grad_norms is not None:
            g = np.asarray(grad_norms[c], dtype=np.float64)
            ratio = (np.asarray(coord_norms[c], dtype=np.float64) / np.where(g > 0, g, 1.0)).astype(np.float32)
        tasks, values = task_alignment(unit[c], val_coords[c], val_tasks, rank, ratio)
        total = values * w[c] if total is None else total + values * w[c]
    return tasks, total


def gist_scores(unit: np.ndarray, val_coords: np.ndarray, val_tasks: Sequence[str], weights: Sequence[float], rank: int, **norms) -> np.ndarray:
    """GIST score per training example at ``rank``: the max over sub-tasks of the weighted per-task value."""
    return gist_task_scores(unit, val_coords, val_tasks, weights, rank, **norms)[1].max(axis=1)
