"""G2IS (Zhao et al. 2025, arXiv 2502.11062): gradient-graph walk selection over LESS-style features.

Math. Rows x_i (training) and v_j (validation) are L2-normalised, so dot = cosine.
1. PCA of the centred validation features; keep components c = 1..K, K the smallest count whose cumulative
   explained-variance ratio exceeds `variance_threshold` (sklearn's rule for a float n_components). PCA signs
   are arbitrary and the anchors depend on them. "sklearn" orientation (the default, as the authors'
   ``gradient_walk.py`` runs with scikit-learn ≥ 1.5) makes the largest-|entry| of each component positive;
   "mean" points each component along the mean validation feature (v_c · mean ≥ 0), falling back to the
   sklearn rule when that dot is ~0.
2. Budget B split as B·r_c / Σ_K r (r = explained-variance ratio), largest-remainder rounding; equal
   remainders go to the later component first, as the authors' reversed ``argsort`` does.
3. Components are walked in order c = 1..K; "unused" means not chosen by any component so far. For v_c:
   start = first unused of the `n_anchors` training rows with highest cos(x, v_c) (if all are used: the best
   unused row overall, counted as a fallback step). Then, from the last added node u, scan its k nearest
   neighbours (cosine, descending) and accept the first unused x with
       (a) x · s ≥ 0 for every s already chosen for this component, and
       (b) |cos(S + x, v_c)| ≥ δ · |cos(S, v_c)|, S = Σ chosen for this component;
   if none qualifies, take the unused row with highest cos(x, v_c) satisfying (a) and (b) (fallback step);
   if none exists, stop the component and report the shortfall. All-zero feature rows are never chosen.
   With ‖x‖ = 1: cos(S + x, v) = (S·v + x·v) / sqrt(‖S‖² + 2 x·S + 1), so (a) and (b) need only the running
   vectors mindot_i = min_{s chosen} x_i·s and sdot_i = x_i·S, updated with X @ s for each added s (the products
   of up to `flush_every` additions are batched into one matmul; not-yet-flushed additions are applied exactly
   to the k candidates being checked).

Multiple checkpoints are the caller's job: pass, per example, the concatenation over checkpoints c of the
normalised features scaled by sqrt(w_c) (Σ w_c = 1), for train and validation alike; the rows then have unit
norm and every dot product is the checkpoint-weighted sum of cosines.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .less import normalize_rows

ORIENTATIONS = ("sklearn", "mean")


@dataclass
class G2ISResult:
    """Selected training rows (a set, listed in the order chosen) and per-component walk statistics."""

    selected: list[int]
    per_component: list[dict] = field(default_factory=list)
    # per_component: {component, explained_variance_ratio, budget, chosen (row ids in walk order), shortfall,
    #                 fallback_steps, start_from_anchor}


def split_budget(budget: int, ratios: list[float], earlier_first: bool = False) -> list[int]:
    """Split `budget` in proportion to `ratios` with largest-remainder rounding; sums exactly to budget.

    Equal remainders go to the later part (the authors' rule for G2IS's components), or the earlier with ``earlier_first``.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    total = float(sum(ratios))
    if not ratios or total <= 0 or any(r < 0 for r in ratios):
        raise ValueError(f"ratios must be non-negative with a positive sum, got {ratios}")
    quotas = [budget * r / total for r in ratios]
    parts = [math.floor(q) for q in quotas]
    order = sorted(range(len(ratios)), key=lambda c: (-(quotas[c] - parts[c]), c if earlier_first else -c))
    for c in order[: budget - sum(parts)]:
        parts[c] += 1
    return parts


def pca_components(val: torch.Tensor, variance_threshold: float = 0.5, orientation: str = "sklearn") -> tuple[torch.Tensor, list[float]]:
    """Oriented principal directions (K, p) fp32 of the normalised validation rows up to the cumulative threshold, and their ratios."""
    if not 0 < variance_threshold <= 1:
        raise ValueError(f"variance_threshold must be in (0, 1], got {variance_threshold}")
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {', '.join(ORIENTATIONS)}, got {orientation!r}")
    v = normalize_rows(val).to("cpu", torch.float64)
    mean = v.mean(dim=0)
    cen = v - mean
    if cen.shape[0] <= cen.shape[1]:  # m ≤ p: eigh of the m × m Gram C Cᵀ = U Λ Uᵀ, directions Cᵀ U Λ^(-1/2)
        lam, u = torch.linalg.eigh(cen @ cen.T)
    else:  # m > p: eigh of the p × p scatter Cᵀ C
        lam, u = torch.linalg.eigh(cen.T @ cen)
    lam, u = lam.flip(0).clamp_min(0), u.flip(1)
    if v.shape[0] < 2 or lam.sum() <= 1e-20:
        raise ValueError("G2IS needs at least 2 validation examples with different features (PCA of the validation set is empty)")
    ratio = lam / lam.sum()
    k = int(torch.searchsorted(ratio.cumsum(0), torch.tensor(variance_threshold, dtype=torch.float64), right=True).item()) + 1
    k = min(k, int((lam > 1e-12 * lam[0]).sum()))
    if cen.shape[0] <= cen.shape[1]:
        comps = (cen.T @ u[:, :k] / lam[:k].sqrt()).T.contiguous()
        comps /= comps.norm(dim=1, keepdim=True)  # re-normalise against round-off
    else:
        comps = u[:, :k].T.contiguous()
    for c in range(comps.shape[0]):
        dot = float(comps[c][comps[c].abs().argmax()])  # sklearn: the largest-|entry| is positive
        if orientation == "mean" and abs(float(comps[c] @ mean)) > 1e-8 * max(float(mean.norm()), 1e-300):
            dot = float(comps[c] @ mean)
        if dot < 0:
            comps[c] = -comps[c]
    return comps.to(torch.float32), [float(r) for r in ratio[: comps.shape[0]]]


def knn_graph(
    x: torch.Tensor,
    k: int,
    *,
    block: int = 8192,
    device: torch.device | str | None = None,
    knn_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Exact k nearest neighbours by dot product (= cosine for unit rows), self excluded: (N, k) int32, most similar first.

    Blockwise over the upper triangle of the Gram matrix (each block × block tile computed once, used for both
    its rows and its columns), memory O(block² + N·k). `knn_dtype` (e.g. torch.bfloat16 on CUDA, or on CPUs with
    AVX512-BF16) makes the products approximate but several times faster. Exact ties are broken deterministically
    for a given device and block (order by similarity, then index), membership at the k-th place is by topk.
    """
    dev = torch.device(device) if device is not None else x.device
    n = x.shape[0]
    k = min(int(k), n - 1)
    if k <= 0:
        return torch.zeros(n, 0, dtype=torch.int32)
    xs = x.to(device=dev, dtype=knn_dtype or torch.float32)
    best_v = torch.full((n, k), -math.inf, dtype=torch.float32, device=dev)
    best_i = torch.zeros((n, k), dtype=torch.int32, device=dev)
    bs = max(1, int(block))
    starts = list(range(0, n, bs))
    pairs = [(a, b) for ai, a in enumerate(starts) for b in starts[ai:]]
    bar = _bar(len(pairs), "kNN graph", progress)

    def merge(r0: int, r1: int, sims: torch.Tensor, c0: int) -> None:
        v, i = sims.topk(min(k, sims.shape[1]), dim=1)
        cv = torch.cat([best_v[r0:r1], v], dim=1)
        ci = torch.cat([best_i[r0:r1], (i + c0).to(torch.int32)], dim=1)
        nv, pos = cv.topk(k, dim=1)
        best_v[r0:r1] = nv
        best_i[r0:r1] = ci.gather(1, pos)

    for a, b in pairs:
        a1, b1 = min(n, a + bs), min(n, b + bs)
        sims = (xs[a:a1] @ xs[b:b1].T).to(torch.float32)
        if a == b:
            sims.fill_diagonal_(-math.inf)
        merge(a, a1, sims, b)
        if a != b:
            merge(b, b1, sims.T.contiguous(), a)
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    # deterministic order among equal similarities: by index, then stably by similarity (descending)
    order = best_i.argsort(dim=1, stable=True)
    best_v, best_i = best_v.gather(1, order), best_i.gather(1, order)
    order = best_v.argsort(dim=1, descending=True, stable=True)
    return best_i.gather(1, order)


def _bar(total: int, desc: str, on: bool):
    """A tqdm bar, or None when progress is off."""
    if not on:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


class _Component:
    """The walk of one PCA component: the chosen set S and, for every row, min_{s∈S} x·s and x·S (see the module docstring)."""

    def __init__(self, x: torch.Tensor, used: torch.Tensor, cv: torch.Tensor, delta: float, flush_every: int):
        self.x, self.used, self.cv, self.delta = x, used, cv, delta
        self.mindot = torch.full((x.shape[0],), math.inf, dtype=torch.float32, device=x.device)
        self.sdot = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        self.pend = torch.empty(max(1, int(flush_every)), x.shape[1], dtype=torch.float32, device=x.device)
        self.n_pend, self.s_v, self.s_2 = 0, 0.0, 0.0  # additions not yet in mindot/sdot; S·v; ‖S‖²
        self.chosen: list[int] = []

    def flush(self) -> None:
        """Fold the pending additions into mindot and sdot with one matmul."""
        if self.n_pend:
            dots = self.x @ self.pend[: self.n_pend].T  # (N, n_pend)
            torch.minimum(self.mindot, dots.amin(dim=1), out=self.mindot)
            self.sdot.add_(dots.sum(dim=1))
            self.n_pend = 0

    def consistent(self, cand_cv: torch.Tensor, cand_sdot: torch.Tensor) -> torch.Tensor:
        """Rule (b): |cos(S + x, v)| ≥ δ |cos(S, v)| for each candidate (true for every x while S is empty)."""
        if not self.chosen:
            return torch.ones_like(cand_cv, dtype=torch.bool)
        lhs = (cand_cv + self.s_v).abs() / (cand_sdot * 2 + (self.s_2 + 1.0)).clamp_min(1e-20).sqrt()
        return lhs >= self.delta * abs(self.s_v) / math.sqrt(max(self.s_2, 1e-20))

    def from_neighbours(self, nb: torch.Tensor) -> tuple[int, float]:
        """The first of the last pick's neighbours that is unused, conflict-free and consistent: (row, x·S), or (-1, 0)."""
        md, sd = self.mindot[nb], self.sdot[nb]
        if self.n_pend:
            d_p = self.x[nb] @ self.pend[: self.n_pend].T
            md, sd = torch.minimum(md, d_p.amin(dim=1)), sd + d_p.sum(dim=1)
        ok = ~self.used[nb] & (md >= 0) & self.consistent(self.cv[nb], sd)
        if not bool(ok.any()):
            return -1, 0.0
        j = int(ok.to(torch.uint8).argmax())
        return int(nb[j]), float(sd[j])

    def fallback(self) -> tuple[int, float]:
        """The unused row of highest cos(x, v) satisfying rules (a) and (b): (row, x·S), or (-1, 0) when none does."""
        self.flush()
        ok = ~self.used & (self.mindot >= 0) & self.consistent(self.cv, self.sdot)
        if not bool(ok.any()):
            return -1, 0.0
        j = int(self.cv.masked_fill(~ok, -math.inf).argmax())
        return j, float(self.sdot[j])

    def add(self, pick: int, pick_sdot: float) -> None:
        """S ← S + x_pick, with ‖S + x‖² = ‖S‖² + 2 x·S + ‖x‖²."""
        self.s_2 += 2.0 * pick_sdot + float(self.x[pick].square().sum())
        self.s_v += float(self.cv[pick])
        self.chosen.append(pick)
        self.used[pick] = True
        if self.n_pend == self.pend.shape[0]:
            self.flush()
        self.pend[self.n_pend] = self.x[pick]
        self.n_pend += 1


def _walk(walk: _Component, budget: int, anchors: torch.Tensor, nbrs: torch.Tensor, info: dict, bar) -> None:
    """Walk one component until its budget is met or no row qualifies (the shortfall is recorded in ``info``)."""
    while len(walk.chosen) < budget:
        pick, pick_sdot = -1, 0.0
        if not walk.chosen:
            free = ~walk.used[anchors]
            if bool(free.any()):
                pick = int(anchors[int(free.to(torch.uint8).argmax())])
                info["start_from_anchor"] = True
        else:
            pick, pick_sdot = walk.from_neighbours(nbrs[walk.chosen[-1]].to(device=walk.x.device, dtype=torch.long))
        if pick < 0:
            pick, pick_sdot = walk.fallback()
            if pick < 0:
                info["shortfall"] = budget - len(walk.chosen)
                return
            info["fallback_steps"] += 1
            if not walk.chosen:
                info["start_from_anchor"] = False
        walk.add(pick, pick_sdot)
        if bar:
            bar.update(1)


def g2is_select(
    train_feats: torch.Tensor,
    val_feats: torch.Tensor,
    budget: int,
    *,
    knn_k: int = 100,
    delta: float = 0.8,
    n_anchors: int = 1000,
    variance_threshold: float = 0.5,
    orientation: str = "sklearn",
    device: torch.device | str | None = None,
    block: int = 8192,
    progress: bool = True,
    flush_every: int = 64,
    knn_dtype: torch.dtype | None = None,
    timings: dict | None = None,
) -> G2ISResult:
    """G2IS selection of `budget` training rows (see module docstring); features (N, p) / (m, p), any float dtype."""
    if train_feats.ndim != 2 or val_feats.ndim != 2 or train_feats.shape[1] != val_feats.shape[1]:
        raise ValueError(f"expected (N, p) train and (m, p) validation features, got {tuple(train_feats.shape)} and {tuple(val_feats.shape)}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if not 0 <= delta:
        raise ValueError(f"delta must be >= 0, got {delta}")
    t0, c0 = time.perf_counter(), time.process_time()
    dev = torch.device(device) if device is not None else train_feats.device
    x = train_feats.to(device=dev, dtype=torch.float32)
    norms = x.norm(dim=1, keepdim=True)
    x = x.div_(norms.clamp_min(1e-30)) if x.data_ptr() != train_feats.data_ptr() else x / norms.clamp_min(1e-30)
    # x: (N, p) fp32, unit rows (or zero rows, never chosen); the caller's tensor is never modified
    avail = norms[:, 0] > 0
    comps, ratios = pca_components(val_feats, variance_threshold, orientation)
    budgets = split_budget(int(budget), ratios)
    cosv = x @ comps.to(dev).T  # (N, K): cos(x_i, v_c)
    t1 = time.perf_counter()
    nbrs = knn_graph(x, knn_k, block=block, device=dev, knn_dtype=knn_dtype, progress=progress)
    t2 = time.perf_counter()
    used = ~avail  # global: chosen by any component, or unusable
    selected: list[int] = []
    per_component: list[dict] = []
    bar = _bar(int(budget), "G2IS walk", progress)
    for c, (b_c, r_c) in enumerate(zip(budgets, ratios)):
        walk = _Component(x, used, cosv[:, c].contiguous(), delta, flush_every)
        info = {"component": c, "explained_variance_ratio": r_c, "budget": b_c, "chosen": walk.chosen, "shortfall": 0,
                "fallback_steps": 0, "start_from_anchor": None}  # fmt: skip
        per_component.append(info)
        if b_c:
            anchors = walk.cv.masked_fill(~avail, -math.inf).topk(min(int(n_anchors), int(avail.sum()))).indices if n_anchors > 0 else walk.cv[:0].long()
            _walk(walk, b_c, anchors, nbrs, info, bar)
        selected.extend(walk.chosen)
    if bar:
        bar.close()
    if timings is not None:
        timings.update(prepare_s=t1 - t0, knn_s=t2 - t1, walk_s=time.perf_counter() - t2, process_cpu_s=time.process_time() - c0)
    return G2ISResult(selected=selected, per_component=per_component)
