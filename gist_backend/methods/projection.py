"""Seeded random projection d → p (subsampled randomised Hadamard transform), shared by train and validation features.

Math (SRHT). Let n = 2^ceil(log2 d), x̃ = x zero-padded to n, D = diag(s) with seeded signs s ∈ {±1}^d,
H = the unnormalised Sylvester Hadamard matrix (entries ±1, H Hᵀ = n I), and idx = p of the n coordinates
drawn without replacement (seeded, stored sorted). Then

    y = sqrt(n/p) · (1/sqrt(n)) · (H D x̃)[idx] = (H D x̃)[idx] / sqrt(p),

so E[⟨y1, y2⟩] = ⟨x1, x2⟩ (H D / sqrt(n) is orthogonal; sampling p of n coordinates scaled by sqrt(n/p) is
unbiased). Signs and indices are regenerated from `seed` alone (see `_srht_params`), so a stored sketch
needs only (d, p, seed, ALGORITHM) to be reproduced. When p >= d there is nothing to reduce: the
projection is the identity, zero-padded to p columns (so every output has p columns and train/validation
sketches of any run line up), which preserves every inner product exactly.

The transform uses only sign flips, IEEE additions/subtractions and one final scaling in fp32, so the output
is bit-identical across calls, chunk sizes and devices (CPU/CUDA).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

ALGORITHM = "srht-v1"  # bump if the derivation of signs/indices from the seed ever changes (stored sketches depend on it)


@dataclass(frozen=True)
class Projection:
    """A seeded SRHT d → p; everything else (signs, kept coordinates) is derived from (d, p, seed)."""

    d: int
    p: int
    seed: int

    @property
    def identity(self) -> bool:
        """True when p >= d: no reduction, the projection returns its input (fp32) zero-padded to p columns."""
        return self.p >= self.d

    @property
    def n(self) -> int:
        """Padded length: the next power of two >= d."""
        return 1 << max(0, (self.d - 1).bit_length())


def make_projection(d: int, p: int = 8192, seed: int = 0) -> Projection:
    """Validate and build a projection description (cheap: nothing is materialised here)."""
    if int(d) < 1 or int(p) < 1:
        raise ValueError(f"make_projection needs d >= 1 and p >= 1, got d={d}, p={p}")
    if not (0 <= int(seed) < 2**63):
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return Projection(int(d), int(p), int(seed))


@functools.lru_cache(maxsize=4)
def _srht_params(d: int, p: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signs (d,) fp32 ±1 and sorted kept coordinates (p,) int64, from one CPU torch.Generator(seed): signs first, then randperm(n)[:p]."""
    n = 1 << max(0, (d - 1).bit_length())
    g = torch.Generator(device="cpu").manual_seed(seed)
    signs = torch.randint(0, 2, (d,), generator=g, dtype=torch.int64).mul_(2).sub_(1).to(torch.float32)
    idx = torch.randperm(n, generator=g)[:p].sort().values
    return signs, idx


def fwht_(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh–Hadamard transform of the rows of `a` (R, n), n a power of two; `b` is same-shape scratch.

    Returns whichever of the two buffers holds the result (= a @ H_n, Sylvester order, as scipy.linalg.hadamard);
    both buffers are overwritten. O(R·n·log2 n) additions, no allocation.
    """
    rows, n = a.shape
    if n & (n - 1):
        raise ValueError(f"FWHT length must be a power of two, got {n}")
    h = 1
    while h < n:
        src = a.view(rows, n // (2 * h), 2, h)
        dst = b.view(rows, n // (2 * h), 2, h)
        torch.add(src[:, :, 0], src[:, :, 1], out=dst[:, :, 0])
        torch.sub(src[:, :, 0], src[:, :, 1], out=dst[:, :, 1])
        a, b = b, a
        h *= 2
    return a


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh–Hadamard transform along the last dim (power-of-two length), fp32, out of place."""
    n = x.shape[-1]
    a = x.reshape(-1, n).to(torch.float32, copy=True)
    return fwht_(a, torch.empty_like(a)).reshape(*x.shape[:-1], n)


def project(proj: Projection, x: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Project rows (B, d) → (B, p) fp32 on x's device, chunked over B (default: ~128 MiB of scratch per buffer)."""
    squeeze = x.ndim == 1
    if squeeze:
        x = x.unsqueeze(0)
    if x.ndim != 2 or x.shape[1] != proj.d:
        raise ValueError(f"project expects (B, {proj.d}) features for this projection, got shape {tuple(x.shape)}")
    if not (x.is_floating_point()):
        raise TypeError(f"project expects floating-point features, got {x.dtype}")
    if proj.identity:
        out = torch.zeros(x.shape[0], proj.p, dtype=torch.float32, device=x.device)
        out[:, : proj.d] = x
        return out[0] if squeeze else out
    n, rows_total, dev = proj.n, x.shape[0], x.device
    signs, idx = _srht_params(proj.d, proj.p, proj.seed)
    signs, idx = signs.to(dev), idx.to(dev)
    scale = torch.tensor(1.0 / math.sqrt(proj.p), dtype=torch.float32, device=dev)
    if chunk_rows is None:
        chunk_rows = max(1, (1 << 25) // n)
    chunk_rows = max(1, min(int(chunk_rows), max(rows_total, 1)))
    out = torch.empty(rows_total, proj.p, dtype=torch.float32, device=dev)
    buf_a = torch.zeros(chunk_rows, n, dtype=torch.float32, device=dev)
    buf_b = torch.empty(chunk_rows, n, dtype=torch.float32, device=dev)
    for r0 in range(0, rows_total, chunk_rows):
        r1 = min(rows_total, r0 + chunk_rows)
        a, b = buf_a[: r1 - r0], buf_b[: r1 - r0]
        torch.mul(x[r0:r1], signs, out=a[:, : proj.d])  # x fp16/bf16 → fp32 happens exactly in the product
        a[:, proj.d :].zero_()
        res = fwht_(a, b)
        torch.index_select(res, 1, idx, out=out[r0:r1])
        out[r0:r1].mul_(scale)
    return out[0] if squeeze else out
