"""Stage 4: the shards of every pass → the run's arrays and LESS scores, handed to ``runs.write_run``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..methods.less import less_scores
from ..runs.files import read_json, read_tensors
from ..runs.store import TargetData, write_run
from .checkpoints import Checkpoint, Plan
from .passes import shard_path, validation_file
from .prepare import Prepared


def _gather_sketches(run_dir: Path, key: str, ckpts: list[int], n: int, shard_size: int, name: str) -> Path:
    """One sketch array of every listed checkpoint, (C, N, p) float16, built on disk (it can be large)."""
    path = run_dir / "sketches" / f".{name}.npy.tmp"
    path.parent.mkdir(parents=True, exist_ok=True)
    p = read_tensors(shard_path(run_dir / f"ckpt-{ckpts[0]}", 0))[key].shape[1]
    sketches = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(len(ckpts), n, p))
    for j, c in enumerate(ckpts):
        _gather(run_dir / f"ckpt-{c}", key, n, shard_size, p, np.float16, out=sketches[j])
    sketches.flush()
    del sketches
    return path


def _gather(ckpt_dir: Path, key: str, n: int, shard_size: int, width: int | None, dtype, out: np.ndarray | None = None) -> np.ndarray:
    """One array of the pool pass, concatenated over the shards of a checkpoint."""
    out = np.empty((n,) if width is None else (n, width), dtype) if out is None else out
    for s, start in enumerate(range(0, n, shard_size)):
        values = read_tensors(shard_path(ckpt_dir, s))[key]
        out[start : start + values.shape[0]] = values if width is None else values[:, :width]
    return out


def merge(run_dir: Path, manifest: dict, prepared: Prepared, checkpoints: list[Checkpoint], plan: Plan, target: str,
          val_files: list[str], val_fingerprints: dict[str, str], shard_size: int) -> Path:  # fmt: skip
    """Concatenate the shards into the run's final arrays, compute LESS scores, and write the run (complete)."""
    n, tasks = len(prepared.train), prepared.val_table["task"].to_list()
    subspaces = [read_tensors(validation_file(run_dir / f"ckpt-{c}", target)) for c in plan.gist]
    k = min(s["basis"].shape[1] for s in subspaces)
    train_coords = np.stack([_gather(run_dir / f"ckpt-{c}", "coords", n, shard_size, k, np.float32) for c in plan.gist])
    grad_norms = np.stack([_gather(run_dir / f"ckpt-{c}", "grad_norm", n, shard_size, None, np.float32) for c in plan.gist])
    geometry = [{"name": checkpoints[c].name, **read_json(run_dir / f"ckpt-{c}" / f"geometry-{target}.json")} for c in plan.gist]
    coupling = read_tensors(run_dir / f"ckpt-{plan.gist[-1]}" / f"coupling-{target}.safetensors")
    sketch_path, val_sketch, scores, per_task = None, None, None, None
    if plan.less:
        sketch_path = _gather_sketches(run_dir, "sketch", plan.less, n, shard_size, "train")
        sketches = np.load(sketch_path, mmap_mode="r")
        val_sketch = np.stack([read_tensors(validation_file(run_dir / f"ckpt-{c}", target))["val_sketch"] for c in plan.less])
        result, _, per_task = less_scores(list(sketches), list(val_sketch), tasks, plan.less_weights)
        scores, per_task = result.numpy(), per_task.numpy()
        del sketches
    pool_sketch = _gather_sketches(run_dir, "pool_sketch", plan.gist, n, shard_size, "gist") if manifest.get("reusable") else None
    data = TargetData(
        name=target, val=prepared.val_table, files=list(val_files), fingerprints=val_fingerprints,
        train_coords=train_coords, val_coords=np.stack([s["val_coords"][:, :k] for s in subspaces]), geometry=geometry,
        coupling=coupling, val_sketch=val_sketch, less_scores=scores, less_task_scores=per_task,
    )  # fmt: skip
    manifest["gist"] = {"checkpoints": [checkpoints[c].name for c in plan.gist], "weights": plan.gist_weights}
    if plan.less:
        manifest["less"] = {"checkpoints": [checkpoints[c].name for c in plan.less], "weights": plan.less_weights, "dim": int(val_sketch.shape[-1])}
    return write_run(run_dir, manifest, train=prepared.train_table, targets=[data], grad_norms=grad_norms, train_sketch=sketch_path,
                     gist_sketch=pool_sketch)  # fmt: skip
