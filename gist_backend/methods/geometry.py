"""Geometry diagnostics of the validation gradients (docs/design.md, "Geometry"): spectrum and off-diagonal coupling.

Second moment M = GᵀG / m (d × d) is never formed. Its off-diagonal energy fraction is
    ρ = 1 − Σ_p M_pp² / ‖M‖_F²,   ‖M‖_F² = ‖G Gᵀ‖_F² / m²,   M_pp = Σ_i G_ip² / m,
and per LoRA module the same with G restricted to that module's columns. ρ ≈ 0 would justify a
diagonal (Adam-like) preconditioner; for LoRA gradients it is typically far from 0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

MAX_BLOCK = 128


def spectrum(sigma: np.ndarray) -> dict:
    """σ, energy share σ_j²/Σσ², cumulative energy, and the ranks reaching 90/95/99% energy."""
    sigma = np.asarray(sigma, dtype=np.float64)
    energy = sigma**2 / max(float((sigma**2).sum()), 1e-300)
    cumulative = np.cumsum(energy)

    def rank_at(level: float) -> int:
        return int(min(np.searchsorted(cumulative, level - 1e-12) + 1, sigma.size))

    return {
        "sigma": sigma.tolist(),
        "energy": energy.tolist(),
        "cumulative": cumulative.tolist(),
        "r90": rank_at(0.90),
        "r95": rank_at(0.95),
        "r99": rank_at(0.99),
    }


def _columns(val_grads, start: int, stop: int) -> torch.Tensor:
    return torch.as_tensor(np.asarray(val_grads[:, start:stop])).to(torch.float64)


def coupling(val_grads, module_slices: dict[str, tuple[int, int]], block_size: int = MAX_BLOCK) -> tuple[dict, dict[str, np.ndarray]]:
    """Off-diagonal energy fractions (overall and per module) and normalised |M| heatmap blocks.

    ``module_slices`` maps a LoRA module name to its [start, stop) column range in G. Returns
    (summary JSON, arrays): arrays hold ``top_idx`` and ``top_block`` (the highest-variance
    coordinates overall) and ``<module>.idx`` / ``<module>.block`` for each module.
    """
    m = val_grads.shape[0]
    k_total = torch.zeros(m, m, dtype=torch.float64)
    diag_sq_total = 0.0
    per_module = {}
    variances = []
    arrays: dict[str, np.ndarray] = {}
    for name, (start, stop) in module_slices.items():
        cols = _columns(val_grads, start, stop)
        k_mod = cols @ cols.T
        m_pp = (cols**2).sum(0) / m
        diag_sq = float((m_pp**2).sum())
        frob_sq = float((k_mod**2).sum()) / m**2
        per_module[name] = _rho(diag_sq, frob_sq)
        k_total += k_mod
        diag_sq_total += diag_sq
        variances.append(m_pp.numpy())
        idx = np.sort(np.argsort(-m_pp.numpy(), kind="stable")[: min(block_size // 2, stop - start)])
        arrays[f"{name}.idx"] = (idx + start).astype(np.int64)
        arrays[f"{name}.block"] = normalised_block(cols[:, idx]).astype(np.float32)
    rho = _rho(diag_sq_total, float((k_total**2).sum()) / m**2)
    all_var = np.concatenate(variances)
    top = np.sort(np.argsort(-all_var, kind="stable")[: min(block_size, all_var.size)])
    top_cols = torch.cat([_columns(val_grads, int(p), int(p) + 1) for p in top], dim=1)
    arrays["top_idx"] = top.astype(np.int64)
    arrays["top_block"] = normalised_block(top_cols).astype(np.float32)
    return {"rho": rho, "rho_per_module": per_module}, arrays


def _rho(diag_sq: float, frob_sq: float) -> float:
    return float(1.0 - diag_sq / frob_sq) if frob_sq > 0 else 0.0


def normalised_block(cols: torch.Tensor | np.ndarray) -> np.ndarray:
    """|M_pq| / sqrt(M_pp M_qq) for the second moment of the given columns (m × b)."""
    cols = torch.as_tensor(np.asarray(cols)).to(torch.float64)
    moment = cols.T @ cols / cols.shape[0]
    scale = moment.diagonal().clamp_min(1e-300).sqrt()
    return (moment.abs() / scale[:, None] / scale[None, :]).numpy()


def module_slices(param_names: Sequence[str], param_sizes: Sequence[int]) -> dict[str, tuple[int, int]]:
    """Group flattened LoRA parameters into modules (A and B of one adapted layer) by column range."""
    slices: dict[str, list[int]] = {}
    offset = 0
    for name, size in zip(param_names, param_sizes):
        module = name.split(".lora_")[0].removeprefix("base_model.model.")
        lo_hi = slices.setdefault(module, [offset, offset])
        lo_hi[1] = offset + size
        offset += size
    return {name: (lo, hi) for name, (lo, hi) in slices.items()}
