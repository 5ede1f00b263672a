"""Stage 3: the gradient passes at one checkpoint.

``validation_pass``: the target's validation gradients G (m × d; on disk beyond the memory budget) → the GIST
subspace, spectrum and coupling (at GIST checkpoints) and the projected validation sketch (at LESS checkpoints).
``pool_pass``: the pool's gradients in resumable shards → GIST coordinates Vᵀg and ‖g‖ (GIST checkpoints; with
``--reusable`` also the target-independent sketch S g) and the Adam-preconditioned projected sketch (LESS checkpoints). Each file is written last in its stage, so its presence
marks the stage finished; a damaged or mismatched file is recomputed. Under torchrun, process r takes shards
r, r + world, …: every shard is computed exactly as in a single process, so merging gives the same run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import ComputeConfig, pool_sketch_dim
from ..engine.grads import iter_gradients, lora_dim, lora_factors
from ..methods import geometry
from ..methods.gist import Projector, fit_subspace
from ..runs.files import read_tensors, tensors_complete, write_json, write_npy, write_tensors
from .checkpoints import Checkpoint, adam_state

SKETCH_BLOCK = 256  # validation rows projected at a time
BASIS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def batch_limit(config: ComputeConfig, d: int) -> int:
    """Examples per gradient batch: --max-batch, and no more than --grad-memory-gb of per-example gradients (B × d × 4 bytes)."""
    return max(1, min(config.max_batch, int(config.grad_memory_gb * 2**30 // (d * 4))))


def validation_file(ckpt_dir: Path, target: str) -> Path:
    """The file that holds a target's subspace and validation sketch at a checkpoint."""
    return ckpt_dir / f"val-{target}.safetensors"


def validation_done(ckpt_dir: Path, target: str, gist: bool, sketch: bool) -> bool:
    """True when the validation pass of this checkpoint and target finished earlier."""
    keys = ({"sigma": None, "basis": None, "val_coords": None} if gist else {}) | ({"val_sketch": None} if sketch else {})
    return tensors_complete(validation_file(ckpt_dir, target), keys)


def validation_gradients(config: ComputeConfig, model, val_ex: list, pad_id: int, spill_path: Path, *, device, autocast, progress,
                         name: str) -> np.ndarray:  # fmt: skip
    """The (m, d) validation gradients at the model's adapter: in memory, or memory-mapped at ``spill_path`` beyond --memory-budget-gb."""
    d, m = lora_dim(model), len(val_ex)
    if m * d * 4 > config.memory_budget_gb * 2**30:
        spill_path.parent.mkdir(parents=True, exist_ok=True)
        grads = np.lib.format.open_memmap(spill_path, mode="w+", dtype=np.float32, shape=(m, d))
    else:
        grads = np.empty((m, d), np.float32)
    for indices, batch_grads, _ in iter_gradients(
        model, val_ex, pad_id, device=device, max_tokens=config.max_tokens, max_batch=batch_limit(config, d), autocast_dtype=autocast,
        desc=f"val grads {name}", progress=lambda done, total, rate: progress(f"validation gradients ({name})", done, total, rate),
    ):  # fmt: skip
        grads[indices] = batch_grads.cpu().numpy()
    return grads


def write_geometry(grads: np.ndarray, model, sigma_all: np.ndarray, val_coords: np.ndarray, coupling_path: Path, geometry_path: Path) -> None:
    """The target's spectrum and coupling summary (JSON) and its heatmap blocks (safetensors) at one checkpoint."""
    factors = lora_factors(model)
    slices = geometry.module_slices([n for n, _ in factors], [module.weight.numel() for _, module in factors])
    summary, blocks = geometry.coupling(grads, slices)
    blocks["gist_block"] = geometry.normalised_block(val_coords[:, : geometry.MAX_BLOCK]).astype(np.float32)
    write_tensors(coupling_path, blocks)
    write_json(geometry_path, {"spectrum": geometry.spectrum(sigma_all), **summary})


def sketch_rows(grads: np.ndarray, proj) -> np.ndarray:
    """``proj`` applied to the rows of ``grads`` (memory-mapped or not), SKETCH_BLOCK rows at a time."""
    from ..methods.projection import project

    blocks = range(0, grads.shape[0], SKETCH_BLOCK)
    return np.concatenate([project(proj, torch.as_tensor(np.asarray(grads[s : s + SKETCH_BLOCK]))).numpy() for s in blocks])


def validation_pass(config: ComputeConfig, model, val_ex: list, pad_id: int, ckpt_dir: Path, target: str, *, gist: bool, sketch: bool,
                    device, autocast, progress, dump_dir: Path | None = None, name: str | None = None) -> None:  # fmt: skip
    """Validation gradients → subspace, spectrum, coupling (GIST) and projected sketch (LESS) for one checkpoint (``name``, for progress)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    spill_path = ckpt_dir / f"val-{target}.spill.npy"
    grads = validation_gradients(config, model, val_ex, pad_id, spill_path, device=device, autocast=autocast, progress=progress,
                                 name=name or ckpt_dir.name)  # fmt: skip
    tensors: dict[str, np.ndarray] = {}
    if gist:
        sigma_all, basis, val_coords = fit_subspace(grads, config.k_max)
        tensors.update(sigma=sigma_all.astype(np.float32), basis=basis, val_coords=val_coords)
        write_geometry(grads, model, sigma_all, val_coords, ckpt_dir / f"coupling-{target}.safetensors", ckpt_dir / f"geometry-{target}.json")
    if sketch:
        from ..methods.projection import make_projection

        tensors["val_sketch"] = sketch_rows(grads, make_projection(grads.shape[1], config.less_dim, config.seed)).astype(np.float16)
    if dump_dir is not None:
        write_npy(dump_dir / "val_grads.npy", np.asarray(grads))
    write_tensors(validation_file(ckpt_dir, target), tensors)  # last: marks the stage finished
    del grads
    spill_path.unlink(missing_ok=True)


def shard_path(ckpt_dir: Path, shard: int) -> Path:
    """A finished shard of the pool pass."""
    return ckpt_dir / "pool" / f"shard-{shard:05d}.safetensors"


def pool_pass(config: ComputeConfig, model, train_ex: list, pad_id: int, checkpoint: Checkpoint, ckpt_dir: Path, target: str, *,
              gist: bool, sketch: bool, device, autocast, progress, dump: np.ndarray | None = None,
              proc_rank: int = 0, world: int = 1) -> None:  # fmt: skip
    """Pool gradients → coordinates and ‖g‖ (GIST) and sketches (LESS), shard by shard; finished shards are skipped."""
    d = lora_dim(model)
    projector = None
    if gist:
        projector = Projector(read_tensors(validation_file(ckpt_dir, target))["basis"], device, BASIS_DTYPES[config.basis_dtype],
                              int(config.basis_memory_gb * 2**30))  # fmt: skip
    from ..methods.projection import make_projection, project

    reusable = gist and config.reusable  # the target-independent sketch S g of SGD gradients, for add-target
    pool_proj = make_projection(d, pool_sketch_dim(config.sketch_dim, d), config.seed) if reusable else None
    if sketch:
        from ..methods.adam import adam_precondition

        exp_avg, exp_avg_sq, beta1, beta2 = adam_state(checkpoint, model)
        exp_avg, exp_avg_sq = exp_avg.to(device), exp_avg_sq.to(device)
        proj = make_projection(d, config.less_dim, config.seed)
    n = len(train_ex)
    starts = range(0, n, config.shard_size)
    for s, start in enumerate(starts):
        if s % world != proc_rank:
            continue
        shard = train_ex[start : start + config.shard_size]
        expected = {"loss": (len(shard),)}
        if gist:
            expected.update(coords=(len(shard), projector.k), grad_norm=(len(shard),))
        if sketch:
            expected["sketch"] = (len(shard), config.less_dim)
        if reusable:
            expected["pool_sketch"] = (len(shard), pool_proj.p)
        if dump is None and tensors_complete(shard_path(ckpt_dir, s), expected):
            continue  # finished earlier (a damaged or mismatched shard is recomputed)
        out = {name: np.empty(shape, np.float16 if name.endswith("sketch") else np.float32) for name, shape in expected.items()}
        for indices, grads, losses in iter_gradients(
            model, shard, pad_id, device=device, max_tokens=config.max_tokens, max_batch=batch_limit(config, d), autocast_dtype=autocast,
            desc=f"pool grads {checkpoint.name} shard {s + 1}/{len(starts)}",
            progress=lambda done, total, rate: progress(f"pool gradients ({checkpoint.name})", start + done, n, rate),
        ):  # fmt: skip
            out["loss"][indices] = losses.cpu().numpy()
            if gist:
                out["coords"][indices] = projector(grads).cpu().numpy()
                out["grad_norm"][indices] = grads.double().norm(dim=1).float().cpu().numpy()
            if sketch:
                out["sketch"][indices] = project(proj, adam_precondition(grads, exp_avg, exp_avg_sq, beta1, beta2)).cpu().numpy()
            if reusable:
                out["pool_sketch"][indices] = project(pool_proj, grads).cpu().numpy()
            if dump is not None:
                dump[[start + i for i in indices]] = grads.cpu().numpy()
        write_tensors(shard_path(ckpt_dir, s), out)
