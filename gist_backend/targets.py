"""Add a target to a finished run without another pass over the pool (`gist-curate add-target`).

GIST needs only inner products between pool and validation gradients: z_i = Vᵀ g_i = Σ⁻¹ Uᵀ G g_i, with G the
target's validation gradients. A run computed with ``--reusable`` keeps S g_i, a seeded SRHT sketch of every
pool gradient at its GIST checkpoints, and an SRHT keeps inner products (⟨S g, S h⟩ ≈ ⟨g, h⟩). A new target
then needs only
  1. its validation gradients at the run's saved adapters (m examples: seconds to minutes, not hours);
  2. its subspace from their Gram matrix (exact), with its spectrum and coupling (exact);
  3. the pool's coordinates z_i ≈ Wᵀ (S g_i), W = (S G)ᵀ U Σ⁻¹ (methods/gist.py ``sketched_basis``), no model.
LESS for the new target is exact: its pool sketches do not depend on the target. Validation work is kept per
checkpoint in ``targets/.<name>.work/`` (resumable); the target is listed in the manifest only when all its
artefacts are written, under the run's "run" lock.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .config import ComputeConfig
from .engine.device import resolve_device, resolve_dtypes
from .engine.records import fingerprint
from .methods.gist import eig_subspace, sketched_basis
from .methods.projection import make_projection
from .runs.files import RunError, read_json, read_npy, read_tensors, tensors_complete, write_json, write_tensors
from .runs.lock import run_lock
from .runs.manifest import check_target_name, read_manifest, write_manifest
from .runs.store import TargetData, open_run, write_target
from .stages.checkpoints import Checkpoint, attach_run_adapter, load_adapter_weights, stored_checkpoints
from .stages.passes import sketch_rows, validation_gradients, write_geometry
from .stages.prepare import prepare_targets


def run_config(manifest: dict) -> ComputeConfig:
    """The ComputeConfig a run was computed with, from its manifest."""
    stored = manifest.get("config") or {}
    return ComputeConfig(**{f.name: stored[f.name] for f in fields(ComputeConfig) if f.name in stored})


def _validation(config: ComputeConfig, model, examples: list, pad_id: int, path: Path, *, gist: bool, less: bool, device, autocast,
                reusable: dict, progress, name: str) -> None:  # fmt: skip
    """One checkpoint's (``name``) validation gradients → subspace, geometry and sketches of the new target (no d × k basis)."""
    spill_path = path.with_suffix(".spill.npy")
    grads = validation_gradients(config, model, examples, pad_id, spill_path, device=device, autocast=autocast, progress=progress, name=name)
    d = grads.shape[1]
    tensors: dict[str, np.ndarray] = {}
    if gist:
        sigma_all, val_coords = eig_subspace(grads, config.k_max)
        pool_proj = make_projection(d, reusable["dim"], reusable.get("seed", config.seed))
        tensors.update(sigma=sigma_all.astype(np.float32), val_coords=val_coords, val_pool_sketch=sketch_rows(grads, pool_proj))
        write_geometry(grads, model, sigma_all, val_coords, path.with_name(path.stem + "-coupling.safetensors"), path.with_suffix(".json"))
    if less:
        tensors["val_sketch"] = sketch_rows(grads, make_projection(d, config.less_dim, config.seed)).astype(np.float16)
    write_tensors(path, tensors)  # last: marks this checkpoint finished
    del grads
    spill_path.unlink(missing_ok=True)


def pool_coordinates(pool_sketch: np.ndarray, val_pool_sketch: np.ndarray, val_coords: np.ndarray, sigma: np.ndarray, block: int = 1 << 14,
                     columns: tuple[np.ndarray, float] | None = None) -> np.ndarray:  # fmt: skip
    """(N, k) GIST coordinates of the pool from its sketches: z_i ≈ Wᵀ (S g_i) (on ``columns`` of them, rescaled, if given)."""
    keep, scale = columns if columns is not None else (slice(None), 1.0)
    # both sketches scaled by sqrt(P/P'): the inner products, so the coordinates, by P/P'
    w = sketched_basis(np.asarray(val_pool_sketch)[:, keep], val_coords, sigma) * np.float32(scale * scale)
    out = np.empty((pool_sketch.shape[0], w.shape[1]), np.float32)
    for start in range(0, pool_sketch.shape[0], block):
        out[start : start + block] = np.asarray(pool_sketch[start : start + block][:, keep], dtype=np.float32) @ w
    return out


def subsample_columns(full_dim: int, dim: int, seed: int) -> tuple[np.ndarray, float]:
    """(columns, scale): a seeded uniform ``dim``-subset of a ``full_dim``-column SRHT sketch and its rescaling factor.

    The stored SRHT keeps a uniform random set of coordinates scaled by 1/sqrt(P); a uniform subset of those is
    a uniform subset of the same transform, so taking it and scaling by sqrt(P/P') is an SRHT with P' rows: what
    a run computed with ``--sketch-dim P'`` would hold (in distribution).
    """
    if not 0 < dim <= full_dim:
        raise ValueError(f"--sketch-dim must be between 1 and the run's sketch size {full_dim}, got {dim}")
    columns = np.sort(np.random.default_rng([int(seed), int(dim)]).choice(full_dim, size=dim, replace=False))
    return columns, float(np.sqrt(full_dim / dim))


def add_target(run_dir: str | Path, val_files: list[str], name: str, *, device: str = "auto", max_tokens: int | None = None,
               sketch_dim: int | None = None, progress: Callable = lambda *a, **k: None) -> Path:  # fmt: skip
    """Add target ``name`` (validation records in ``val_files``) to a finished ``--reusable`` run; returns the run folder.

    ``sketch_dim`` below the run's sketch size uses only that many of its coordinates (``subsample_columns``), to
    see what a smaller, cheaper ``--sketch-dim`` would give before computing runs with it.
    """
    run = open_run(run_dir)
    check_target_name(name)
    if name in run.targets:
        raise ValueError(f"{run.path} already has a target {name!r}; choose another --name")
    reusable = run.manifest.get("reusable")
    if not reusable:
        raise RunError(f"{run.path} was computed without --reusable, so it keeps no sketch of the pool's gradients to add a target from. "
                       f"Recompute it with the same `gist-curate compute …` command plus `--overwrite --reusable` "
                       f"(the old run stays readable until the new one is complete), or compute a new run for {name!r}.")  # fmt: skip
    if sketch_dim is not None:
        subsample_columns(int(reusable["dim"]), int(sketch_dim), 0)  # refuse a bad size before any gradient is computed
    t0 = time.perf_counter()
    with run_lock(run.path, "run", "gist-curate add-target"):
        config = run_config(run.manifest)
        if max_tokens:
            config.max_tokens = max_tokens
        dev = resolve_device(device)
        model, tokenizer = _model(config, dev)
        examples, table, bad = prepare_targets(val_files, tokenizer, config.max_len)
        fingerprints = {p: fingerprint(p) for p in val_files}
        work = _work_folder(run.path / "targets" / f".{name}.work", {"val": fingerprints, "max_len": config.max_len})
        checkpoints = stored_checkpoints(run.path, run.manifest)
        by_name = {c.name: i for i, c in enumerate(checkpoints)}
        gist = [by_name[n] for n in run.manifest["gist"]["checkpoints"]]
        less = [by_name[n] for n in (run.manifest.get("less") or {}).get("checkpoints", [])]
        autocast = resolve_dtypes(config.dtype, dev)[1]
        for c in sorted(set(gist) | set(less)):
            if not tensors_complete(work / f"ckpt-{c}.safetensors", {}):  # finished checkpoints of an interrupted add-target are kept
                load_adapter_weights(model, Path(checkpoints[c].adapter))
                _validation(config, model, examples, tokenizer.pad_token_id, work / f"ckpt-{c}.safetensors", gist=c in gist, less=c in less,
                            device=dev, autocast=autocast, reusable=reusable, progress=progress,
                            name=checkpoints[c].name)  # fmt: skip
        del model
        columns = subsample_columns(int(reusable["dim"]), int(sketch_dim), int(reusable.get("seed", config.seed))) if sketch_dim else None
        data = _target_data(run, name, val_files, fingerprints, table, checkpoints, gist, less, work, columns)
        manifest = read_manifest(run.path)
        write_target(run.path, manifest, data)
        manifest.setdefault("timings", {})[f"add-target {name}"] = round(time.perf_counter() - t0, 3)
        manifest.setdefault("bad_records_by_target", {})[name] = len(bad)
        if sketch_dim:
            manifest.setdefault("target_sketch_dims", {})[name] = int(sketch_dim)
        _report_bad_records(run.path / "bad_records.jsonl", name, bad)
        write_manifest(run.path / "manifest.json", manifest)
        shutil.rmtree(work, ignore_errors=True)
    return run.path


def _model(config: ComputeConfig, dev: torch.device):
    """(model with the run's LoRA attached, tokenizer), loaded once, on ``dev``, in the run's dtype."""
    from .engine.model import load_model

    weight_dtype, _ = resolve_dtypes(config.dtype, dev)
    model, tokenizer = load_model(config.model, dtype=weight_dtype, device=str(dev), cache_dir=Path(config.model_cache_dir) if config.model_cache_dir else None)
    return attach_run_adapter(config, model, dev), tokenizer


def _work_folder(work: Path, inputs: dict) -> Path:
    """The validation work folder, emptied first if an interrupted add-target left it for other validation files."""
    stamp = work / "inputs.json"
    if work.exists():
        try:
            same = read_json(stamp) == inputs
        except (RunError, OSError):
            same = False
        if not same:
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_json(stamp, inputs)
    return work


def _report_bad_records(path: Path, target: str, bad: list[dict]) -> None:
    """List the target's skipped validation records in the run's bad-record report (replacing an earlier list for it)."""
    import json

    from .stages.prepare import write_bad_records

    lines = path.read_text().splitlines() if path.exists() else []
    kept = [row for row in map(json.loads, filter(None, lines)) if row.get("target") != target]
    write_bad_records(path, kept + [{**b, "target": target} for b in bad])


def _target_data(run, name: str, val_files: list[str], fingerprints: dict, table, checkpoints: list[Checkpoint], gist: list[int], less: list[int], work: Path,
                 columns: tuple[np.ndarray, float] | None = None) -> TargetData:  # fmt: skip
    """Everything the run stores for the new target, from the validation work and the run's pool sketches."""
    parts = {c: read_tensors(work / f"ckpt-{c}.safetensors") for c in set(gist) | set(less)}
    k = min(parts[c]["val_coords"].shape[1] for c in gist)
    pool_sketch = read_npy(run.paths["gist_sketch"])
    coords = np.stack([pool_coordinates(pool_sketch[j], parts[c]["val_pool_sketch"], parts[c]["val_coords"][:, :k], parts[c]["sigma"], columns=columns)
                       for j, c in enumerate(gist)])  # fmt: skip
    geometry_list = [{"name": checkpoints[c].name, **read_json(work / f"ckpt-{c}.json")} for c in gist]
    coupling = read_tensors(work / f"ckpt-{gist[-1]}-coupling.safetensors")
    data = TargetData(name=name, val=table, files=list(val_files), fingerprints=fingerprints, train_coords=coords,
                      val_coords=np.stack([parts[c]["val_coords"][:, :k] for c in gist]), geometry=geometry_list, coupling=coupling)  # fmt: skip
    if less:
        from dataclasses import replace

        from .methods.less import less_scores

        train = read_npy(run.paths["train_sketch"])
        val_sketch = np.stack([parts[c]["val_sketch"] for c in less])
        scores, _, per_task = less_scores(list(train), list(val_sketch), table["task"].to_list(), run.less_weights().tolist())
        data = replace(data, val_sketch=val_sketch, less_scores=scores.numpy(), less_task_scores=per_task.numpy())
    return data
