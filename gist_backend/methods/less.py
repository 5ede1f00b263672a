"""LESS (Xia et al. 2024, arXiv 2402.04333) scores from projected features, plus row normalisation shared with G2IS.

Math: x̂_ic, v̂_jc = L2-normalised training / validation features at checkpoint c, w = checkpoint
weights normalised to sum 1, t = validation sub-task:

    per_task[i, t] = Σ_c w_c · mean_{j∈t} cos(x_ic, v_jc) = Σ_c w_c · x̂_ic · μ_tc,   μ_tc = mean_{j∈t} v̂_jc
    score_i        = max_t per_task[i, t]

so each block of training rows costs one (block × p) @ (p × T) product per checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm, computed in fp32 (all-zero rows stay zero)."""
    x = x.to(torch.float32)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def _tensor(x, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 of a tensor or a (possibly memory-mapped) array, as a tensor."""
    return x[r0:r1] if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x[r0:r1]))


def _normalized_weights(weights: Sequence[float], n: int) -> list[float]:
    """Weights checked (n of them, ≥ 0, positive sum) and scaled to sum 1."""
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"got {len(w)} checkpoint weights for {n} checkpoints")
    if any(x < 0 or x != x for x in w) or sum(w) <= 0:
        raise ValueError(f"checkpoint weights must be non-negative with a positive sum, got {w}")
    s = sum(w)
    return [x / s for x in w]


def less_scores(
    train_feats: Sequence[torch.Tensor],
    val_feats: Sequence[torch.Tensor],
    val_tasks: Sequence[str],
    ckpt_weights: Sequence[float],
    *,
    device: torch.device | str | None = None,
    block: int = 65536,
) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """LESS scores: (scores (N,), task names in first-appearance order, per_task (N, T)), fp32 on CPU.

    One (N, p) and one (m, p) tensor or array (memory-mapped ones are read in blocks of rows) per checkpoint.
    """
    if len(train_feats) == 0 or len(train_feats) != len(val_feats):
        raise ValueError(f"need one train and one validation tensor per checkpoint, got {len(train_feats)} and {len(val_feats)}")
    w = _normalized_weights(ckpt_weights, len(train_feats))
    n_train, m = train_feats[0].shape[0], val_feats[0].shape[0]
    for c, (x, v) in enumerate(zip(train_feats, val_feats)):
        if x.ndim != 2 or v.ndim != 2 or x.shape[1] != v.shape[1]:
            raise ValueError(f"checkpoint {c}: expected (N, p) and (m, p) with the same p, got {tuple(x.shape)} and {tuple(v.shape)}")
        if x.shape[0] != n_train or v.shape[0] != m:
            raise ValueError(f"checkpoint {c}: {x.shape[0]} train / {v.shape[0]} validation rows, checkpoint 0 has {n_train} / {m}")
    if len(val_tasks) != m:
        raise ValueError(f"val_tasks has {len(val_tasks)} entries for {m} validation rows")
    if m == 0:
        raise ValueError("no validation rows: LESS needs at least one validation example")
    dev = torch.device(device) if device is not None else (train_feats[0].device if isinstance(train_feats[0], torch.Tensor) else torch.device("cpu"))
    tasks = list(dict.fromkeys(str(t) for t in val_tasks))
    t_index = torch.tensor([tasks.index(str(t)) for t in val_tasks], device=dev)
    onehot = torch.zeros(len(tasks), m, dtype=torch.float32, device=dev)
    onehot[t_index, torch.arange(m, device=dev)] = 1.0
    onehot /= onehot.sum(dim=1, keepdim=True)  # row t averages the validation rows of task t
    # weighted task means per checkpoint: (T, p) each, w_c folded in
    means = [(onehot @ normalize_rows(_tensor(v, 0, v.shape[0]).to(dev))) * wc for v, wc in zip(val_feats, w)]
    per_task = torch.empty(n_train, len(tasks), dtype=torch.float32)
    for r0 in range(0, n_train, max(1, int(block))):
        r1 = min(n_train, r0 + max(1, int(block)))
        acc = torch.zeros(r1 - r0, len(tasks), dtype=torch.float32, device=dev)
        for x, mu in zip(train_feats, means):
            acc += normalize_rows(_tensor(x, r0, r1).to(dev)) @ mu.T
        per_task[r0:r1] = acc.cpu()
    scores = per_task.max(dim=1).values if n_train else torch.zeros(0)
    return scores, tasks, per_task


def checkpoint_weights_from_lrs(epoch_mean_lrs: Sequence[float]) -> list[float]:
    """LESS default checkpoint weights: each warmup epoch's mean learning rate, normalised to sum 1."""
    return _normalized_weights(epoch_mean_lrs, len(epoch_mean_lrs))
