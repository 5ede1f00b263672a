"""The compute stage: records → model → warmup → per-checkpoint subspace and coordinates → a run.

Stages, each resumable (a killed run re-run with the same options continues where it stopped and
gives the same result):
  1. prepare    read and tokenise the pool and validation files; tables and bad-record report
  2. warmup     LoRA training on a seeded fraction of the pool, a checkpoint per epoch
  3. per checkpoint c:
       validation gradients G (spilled to a disk memmap beyond the memory budget) → subspace,
       spectrum and coupling;  then training gradients in shards → coordinates Vᵀg (and, for
       LESS/G2IS, the projected Adam-preconditioned sketch), one file per finished shard
  4. merge      shards → train_coords.npy (C, N, k); LESS scores; manifest status "complete"
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl
import torch

from . import geometry
from .data import DataError, Record, fingerprint, load_records, render_text, tokenize_records
from .gist import fit_subspace
from .grads import iter_gradients, lora_factors
from .runs import (
    tool_version,
    utc_now,
    FORMAT_VERSION,
    RunError,
    atomic_path,
    read_json,
    read_tensors,
    record_file,
    write_json,
    write_manifest,
    write_npy,
    write_parquet,
    write_tensors,
)
from .warmup import run_warmup, warmup_indices

METHOD_CHOICES = ("gist", "less", "g2is")


@dataclass
class ComputeConfig:
    """Everything that defines a run; all fields but the last group change the result."""

    model: str
    train: list[str]
    val: list[str]
    max_len: int = 1024
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] | None = None
    adapter: str | None = None
    warmup: bool = True
    warmup_fraction: float = 0.05
    warmup_epochs: int = 4
    warmup_lr: float = 2e-5
    warmup_batch: int = 32
    k_max: int = 128
    methods: list[str] = field(default_factory=lambda: ["gist"])
    less_dim: int = 8192
    seed: int = 0
    dtype: str = "auto"
    # Below: execution only, never change the numbers (beyond float rounding across devices).
    device: str = "auto"
    max_tokens: int = 8192
    max_batch: int = 64
    shard_size: int = 2048
    memory_budget_gb: float = 2.0
    model_cache_dir: str | None = None

    def result_hash(self) -> str:
        """Hash of the options that determine the result: a resumed run must match it."""
        keys = [f for f in asdict(self) if f not in ("device", "max_tokens", "max_batch", "memory_budget_gb", "model_cache_dir")]
        return hashlib.sha256(json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True).encode()).hexdigest()[:16]


class Progress:
    """Writes ``progress.json`` (stage, done, total, rate, ETA) at most twice a second."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = run_dir / "progress.json"
        self.enabled = enabled
        self.last = 0.0

    def __call__(self, stage: str, done: int, total: int, rate: float = 0.0, force: bool = False) -> None:
        now = time.time()
        if not self.enabled or (not force and now - self.last < 0.5 and done < total):
            return
        self.last = now
        eta = (total - done) / rate if rate > 0 else None
        write_json(self.path, {"stage": stage, "done": done, "total": total, "rate": rate, "eta_s": eta, "updated": now})


def distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun with several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # Rank 0 runs the warmup and the subspace while the others wait: allow for hours.
        dist.init_process_group(backend, timeout=timedelta(hours=12))
    return dist.get_rank(), dist.get_world_size()


def barrier(world: int) -> None:
    """Wait for every rank (no-op in a single process)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when available (the local rank's GPU under torchrun), else CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtypes(dtype: str, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(weight dtype, autocast dtype): bf16 weights and autocast on CUDA by default, fp32 on CPU."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return torch.float32, None
    if dtype == "bfloat16":
        return torch.bfloat16, torch.bfloat16
    raise ValueError(f"dtype must be auto, float32 or bfloat16, got {dtype}")


def _versions() -> dict:
    out = {"python": platform.python_version(), "gist-curator": tool_version()}
    for pkg in ("torch", "transformers", "peft", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def load_split(paths: Sequence[str], split: str) -> tuple[list[Record], list[dict]]:
    """Records of several files with run-wide unique ids, plus the bad-record report rows."""
    records: list[Record] = []
    bad: list[dict] = []
    seen: dict[str, int] = {}
    for path in paths:
        recs, bads = load_records(path)
        bad += [{"split": split, "file": b.file, "line": b.line, "reason": b.reason} for b in bads]
        for rec in recs:
            count = seen.get(rec.id, 0)
            seen[rec.id] = count + 1
            if count:  # same id in two files: keep both, disambiguated in file order
                rec = Record(f"{rec.id}-{count + 1}", rec.source, rec.task, rec.messages, rec.raw, rec.file, rec.line)
            records.append(rec)
    return records, bad


def example_table(records: Sequence[Record], examples: Sequence) -> pl.DataFrame:
    """The Parquet table of usable rows (records that survived tokenisation, in file order)."""
    by_id = {r.id: r for r in records}
    rows = [by_id[e.id] for e in examples]
    return pl.DataFrame(
        {
            "row": np.arange(len(rows), dtype=np.int64),
            "id": [r.id for r in rows],
            "source": [r.source for r in rows],
            "task": [r.task for r in rows],
            "n_tokens": [len(e.input_ids) for e in examples],
            "n_response_tokens": [sum(label != -100 for label in e.labels) for e in examples],
            "text": [render_text(r) for r in rows],
            "raw": [r.raw for r in rows],
            "file": [r.file for r in rows],
            "line": [r.line for r in rows],
        }
    )


def prepare(config: ComputeConfig, tokenizer, run_dir: Path, write: bool = True) -> tuple[list, list, list[dict], pl.DataFrame, pl.DataFrame]:
    """Load and tokenise both splits, and (if ``write``) save their tables and the bad-record report.

    Returns (train examples, val examples, bad rows, train table, val table).
    """
    train_records, bad = load_split(config.train, "train")
    val_records, val_bad = load_split(config.val, "val")
    bad += val_bad
    train_ex, train_tok_bad = tokenize_records(train_records, tokenizer, config.max_len)
    val_ex, val_tok_bad = tokenize_records(val_records, tokenizer, config.max_len)
    bad += [{"split": "train", "file": b.file, "line": b.line, "reason": b.reason} for b in train_tok_bad]
    bad += [{"split": "val", "file": b.file, "line": b.line, "reason": b.reason} for b in val_tok_bad]
    if not train_ex:
        raise DataError(f"no usable training example in {', '.join(config.train)} after tokenisation; see {run_dir / 'bad_records.jsonl'}")
    if not val_ex:
        raise DataError(f"no usable validation example in {', '.join(config.val)} after tokenisation; see {run_dir / 'bad_records.jsonl'}")
    train_table, val_table = example_table(train_records, train_ex), example_table(val_records, val_ex)
    if write:
        write_parquet(run_dir / "train.parquet", train_table)
        write_parquet(run_dir / "val.parquet", val_table)
        with atomic_path(run_dir / "bad_records.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(b, ensure_ascii=False) + "\n" for b in bad))
    return train_ex, val_ex, bad, train_table, val_table


def _load_adapter_weights(model: torch.nn.Module, adapter_dir: Path) -> None:
    """Put a saved adapter's weights into the already-wrapped model (no re-wrapping per checkpoint)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = adapter_dir / "adapter_model.safetensors"
    try:
        weights = load_file(str(path))
    except FileNotFoundError:
        raise RunError(f"{path}: missing. Delete {adapter_dir.parent} and re-run the same command to rebuild it.") from None
    except Exception as err:  # safetensors' own error types for a damaged file
        raise RunError(f"{path}: unreadable ({err}). Delete {adapter_dir.parent} and re-run the same command to rebuild it.") from None
    set_peft_model_state_dict(model, weights)


def _save_adapter_atomic(model, adapter_dir: Path) -> None:
    """save_pretrained into a temporary sibling folder, then rename it into place: a kill never leaves half an adapter."""
    import shutil
    import tempfile

    adapter_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{adapter_dir.name}.", suffix=".tmp", dir=adapter_dir.parent))
    try:
        model.save_pretrained(str(tmp))
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        os.replace(tmp, adapter_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tensors_ok(path: Path, shapes: dict[str, tuple | None]) -> bool:
    """True if ``path`` is a complete safetensors file holding these tensors (shape None: any) — a cheap header check."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:  # also checks the data covers the whole file
            keys = set(f.keys())
            return all(k in keys and (shape is None or tuple(f.get_slice(k).get_shape()) == shape) for k, shape in shapes.items())
    except Exception:
        return False


def checkpoints_for(config: ComputeConfig, model, tokenizer, train_ex, run_dir: Path, device, autocast, progress) -> list[dict]:
    """The adapter states to take gradients at: warmup epochs, the given adapter, or a fresh init."""
    if config.adapter:
        optimizer = next((p for p in (Path(config.adapter) / "optimizer.safetensors", Path(config.adapter) / "optimizer.pt") if p.exists()), None)
        return [{"name": "adapter", "adapter": str(Path(config.adapter)), "optimizer": str(optimizer) if optimizer else None, "weight": 1.0}]
    if not config.warmup:
        init_dir = run_dir / "warmup" / "init"
        if not _tensors_ok(init_dir / "adapter" / "adapter_model.safetensors", {}):
            _save_adapter_atomic(model, init_dir / "adapter")
        return [{"name": "init", "adapter": str(init_dir / "adapter"), "optimizer": None, "weight": 1.0}]
    subset = [train_ex[i] for i in warmup_indices(len(train_ex), config.warmup_fraction, config.seed)]
    epochs = run_warmup(
        model, subset, tokenizer.pad_token_id, run_dir,
        epochs=config.warmup_epochs, lr=config.warmup_lr, batch_size=config.warmup_batch, seed=config.seed,
        device=device, max_tokens=config.max_tokens, autocast_dtype=autocast,
        progress=lambda done, total, rate: progress("warmup", done, total, rate),
    )  # fmt: skip
    return [
        {"name": f"epoch-{e['epoch']}", "adapter": str(Path(e["dir"]) / "adapter"), "optimizer": str(Path(e["dir"]) / "optimizer.safetensors"), "weight": e["mean_lr"]}
        for e in epochs
    ]


def _adam_state(ckpt: dict, model) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    from .adam import load_adam_state

    if not ckpt.get("optimizer"):
        raise RunError(
            f"LESS and G2IS need the warmup's Adam state, and checkpoint '{ckpt['name']}' has none. "
            "Run with warmup (the default), or give --adapter a folder holding optimizer.safetensors or optimizer.pt."
        )
    named = [(n, module.weight) for n, module in lora_factors(model)]
    return load_adam_state(ckpt["optimizer"], [n for n, _ in named], [p.shape for _, p in named])


def validation_stage(config, model, val_ex, pad_id, ckpt_dir: Path, device, autocast, progress, dump_dir: Path | None) -> None:
    """Validation gradients → subspace, spectrum, coupling (and LESS sketch) for one checkpoint."""
    factors = lora_factors(model)
    d = sum(module.weight.numel() for _, module in factors)
    m = len(val_ex)
    spill = m * d * 4 > config.memory_budget_gb * 2**30
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    spill_path = ckpt_dir / "val_grads.spill.npy"
    grads = np.lib.format.open_memmap(spill_path, mode="w+", dtype=np.float32, shape=(m, d)) if spill else np.empty((m, d), np.float32)
    for indices, batch_grads, _ in iter_gradients(
        model, val_ex, pad_id, device=device, max_tokens=config.max_tokens, max_batch=config.max_batch,
        autocast_dtype=autocast, desc=f"val grads {ckpt_dir.name}",
        progress=lambda done, total, rate: progress(f"validation gradients ({ckpt_dir.name})", done, total, rate),
    ):  # fmt: skip
        grads[indices] = batch_grads.cpu().numpy()
    sigma_all, basis, val_coords = fit_subspace(grads, config.k_max)
    tensors = {"sigma": sigma_all.astype(np.float32), "basis": basis, "val_coords": val_coords}
    if set(config.methods) & {"less", "g2is"}:
        from .projection import make_projection, project

        proj = make_projection(d, config.less_dim, config.seed)
        tensors["val_sketch"] = np.concatenate(
            [project(proj, torch.as_tensor(np.asarray(grads[s : s + 256]))).numpy() for s in range(0, m, 256)]
        ).astype(np.float16)
    names = [n for n, _ in factors]
    slices = geometry.module_slices(names, [module.weight.numel() for _, module in factors])
    summary, blocks = geometry.coupling(grads, slices)
    blocks["gist_block"] = geometry.normalised_block(val_coords[:, : geometry.MAX_BLOCK]).astype(np.float32)
    if dump_dir is not None:
        write_npy(dump_dir / "val_grads.npy", np.asarray(grads))
    write_tensors(ckpt_dir / "coupling.safetensors", blocks)
    write_json(ckpt_dir / "geometry.json", {"spectrum": geometry.spectrum(sigma_all), **summary})
    write_tensors(ckpt_dir / "subspace.safetensors", tensors)  # last: marks the stage finished
    del grads
    spill_path.unlink(missing_ok=True)


def training_stage(config, model, train_ex, pad_id, ckpt: dict, ckpt_dir: Path, device, autocast, progress, dump: np.ndarray | None, rank: int = 0, world: int = 1) -> None:
    """Training gradients → coordinates (and sketches) in shards; finished shards are skipped.

    Under torchrun, rank r takes shards r, r + world, …: every shard is computed exactly as in a
    single process, so merging gives the same run.
    """
    subspace = read_tensors(ckpt_dir / "subspace.safetensors")
    basis = torch.as_tensor(subspace["basis"]).to(device)
    sketching = bool(set(config.methods) & {"less", "g2is"})
    if sketching:
        from .adam import adam_precondition
        from .projection import make_projection, project

        exp_avg, exp_avg_sq, beta1, beta2 = _adam_state(ckpt, model)
        exp_avg, exp_avg_sq = exp_avg.to(device), exp_avg_sq.to(device)
        proj = make_projection(basis.shape[0], config.less_dim, config.seed)
    n = len(train_ex)
    shards = range(0, n, config.shard_size)
    for s, start in enumerate(shards):
        path = ckpt_dir / "train" / f"shard-{s:05d}.safetensors"
        if s % world != rank:
            continue
        shard = train_ex[start : start + config.shard_size]
        expected = {"coords": (len(shard), basis.shape[1]), "loss": (len(shard),)}
        if sketching:
            expected["sketch"] = (len(shard), config.less_dim)
        if dump is None and path.exists() and _tensors_ok(path, expected):
            continue  # finished earlier (a damaged or mismatched shard is recomputed)
        coords = np.empty((len(shard), basis.shape[1]), np.float32)
        losses = np.empty(len(shard), np.float32)
        sketch = np.empty((len(shard), config.less_dim if sketching else 0), np.float16)
        for indices, grads, batch_losses in iter_gradients(
            model, shard, pad_id, device=device, max_tokens=config.max_tokens, max_batch=config.max_batch,
            autocast_dtype=autocast, desc=f"train grads {ckpt_dir.name} shard {s + 1}/{len(shards)}",
            progress=lambda done, total, rate: progress(f"training gradients ({ckpt_dir.name})", start + done, n, rate),
        ):  # fmt: skip
            coords[indices] = (grads @ basis).cpu().numpy()
            losses[indices] = batch_losses.cpu().numpy()
            if sketching:
                sketch[indices] = project(proj, adam_precondition(grads, exp_avg, exp_avg_sq, beta1, beta2)).cpu().numpy()
            if dump is not None:
                dump[[start + i for i in indices]] = grads.cpu().numpy()
        tensors = {"coords": coords, "loss": losses}
        if sketching:
            tensors["sketch"] = sketch
        write_tensors(path, tensors)


def merge(config: ComputeConfig, run_dir: Path, manifest: dict, checkpoints: list[dict], n_train: int, val_tasks: list[str]) -> None:
    """Concatenate shards into the run's final arrays and summaries."""
    subspaces = [read_tensors(run_dir / f"ckpt-{c}" / "subspace.safetensors") for c in range(len(checkpoints))]
    k = min(s["basis"].shape[1] for s in subspaces)
    n_shards = -(-n_train // config.shard_size)
    train_coords = np.empty((len(checkpoints), n_train, k), np.float32)
    sketching = bool(set(config.methods) & {"less", "g2is"})
    if sketching:
        (run_dir / "sketches").mkdir(exist_ok=True)
        sketch_tmp = run_dir / "sketches" / "train.npy.tmp"
        sketches = np.lib.format.open_memmap(sketch_tmp, mode="w+", dtype=np.float16, shape=(len(checkpoints), n_train, config.less_dim))
    for c in range(len(checkpoints)):
        for s in range(n_shards):
            shard = read_tensors(run_dir / f"ckpt-{c}" / "train" / f"shard-{s:05d}.safetensors")
            lo = s * config.shard_size
            train_coords[c, lo : lo + shard["coords"].shape[0]] = shard["coords"][:, :k]
            if sketching:
                sketches[c, lo : lo + shard["sketch"].shape[0]] = shard["sketch"]
    write_npy(run_dir / "train_coords.npy", train_coords)
    write_npy(run_dir / "val_coords.npy", np.stack([s["val_coords"][:, :k] for s in subspaces]))
    weights = np.asarray([c["weight"] for c in checkpoints], dtype=np.float64)
    weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(checkpoints), 1 / len(checkpoints))
    geometry_json = {"checkpoints": []}
    for c, ckpt in enumerate(checkpoints):
        geometry_json["checkpoints"].append({"name": ckpt["name"], **read_json(run_dir / f"ckpt-{c}" / "geometry.json")})
    write_json(run_dir / "geometry.json", geometry_json)
    write_tensors(run_dir / "coupling.safetensors", read_tensors(run_dir / f"ckpt-{len(checkpoints) - 1}" / "coupling.safetensors"))
    names = ["train.parquet", "val.parquet", "train_coords.npy", "val_coords.npy", "geometry.json", "coupling.safetensors"]
    if sketching:
        from .less import less_scores

        sketches.flush()
        del sketches
        sketch_path = run_dir / "sketches" / "train.npy"
        sketch_tmp.replace(sketch_path)
        val_sketch = np.stack([s["val_sketch"] for s in subspaces])
        write_npy(run_dir / "sketches" / "val.npy", val_sketch)
        train_sketch = np.load(sketch_path, mmap_mode="r")
        scores, _, per_task = less_scores(
            [torch.from_numpy(np.array(train_sketch[c])) for c in range(len(checkpoints))],
            [torch.as_tensor(val_sketch[c]) for c in range(len(checkpoints))],
            val_tasks, weights.tolist(),
        )  # fmt: skip
        write_npy(run_dir / "less_scores.npy", scores.numpy().astype(np.float32))
        write_npy(run_dir / "less_task_scores.npy", per_task.numpy().astype(np.float32))
        names += ["sketches/train.npy", "sketches/val.npy", "less_scores.npy", "less_task_scores.npy"]
    for name in names:
        record_file(manifest, run_dir, name)
    manifest.update(k_max=k, ckpt_weights=weights.tolist(), checkpoints=[{"name": c["name"], "weight": w} for c, w in zip(checkpoints, weights.tolist())])


def _write_dump_examples(path: Path, examples: Sequence, tasks: Sequence[str]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            for e, task in zip(examples, tasks):
                f.write(json.dumps({"id": e.id, "task": task, "input_ids": e.input_ids, "labels": e.labels}) + "\n")


def compute(config: ComputeConfig, run_dir: str | Path, *, dump_full_grads: str | Path | None = None, overwrite: bool = False) -> Path:
    """Run (or resume) the whole compute stage into ``run_dir``; returns the run directory.

    Under ``torchrun`` every rank runs this: rank 0 does the warmup, the subspace and the merge
    and writes the manifest; the training shards are split across ranks.
    """
    from .model import attach_lora, load_adapter, load_model, model_fingerprint

    bad_methods = set(config.methods) - set(METHOD_CHOICES)
    if bad_methods or "gist" not in config.methods:
        raise ValueError(f"methods must include gist and be among {', '.join(METHOD_CHOICES)}; got {', '.join(config.methods)}")
    rank, world = distributed()
    main = rank == 0
    if dump_full_grads and world > 1:
        raise ValueError("--dump-full-grads is for small single-process checks; run it without torchrun")
    run_dir = Path(run_dir)
    manifest_path = run_dir / "manifest.json"
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if manifest_path.exists() and not overwrite:
            manifest = read_json(manifest_path)
            if manifest.get("config_hash") != config.result_hash():
                raise RunError(
                    f"{run_dir} holds a run with different options ({manifest.get('config')}). "
                    "Use a new --run-dir, the same options to resume, or --overwrite to start again."
                )
        else:
            manifest = {"format": "gist-curator-run", "version": FORMAT_VERSION, "created": utc_now(), "timings": {}}
    else:
        manifest = {"timings": {}}
    if main and manifest.get("status") == "complete" and dump_full_grads is None:
        print(f"{run_dir}: already complete")
        barrier(world)
        return run_dir
    progress = Progress(run_dir, enabled=main)
    timings = manifest.setdefault("timings", {})

    def save_manifest(**fields) -> None:
        manifest.update(fields)
        if main:
            write_manifest(manifest_path, manifest)

    def timed(stage: str, start: float) -> None:
        timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - start, 3)
        save_manifest()

    save_manifest(
        status="running", tool_version=tool_version(), versions=_versions(), config=asdict(config),
        config_hash=config.result_hash(), methods=list(config.methods), error=None, world_size=world,
    )  # fmt: skip
    try:
        t0 = time.perf_counter()
        device = resolve_device(config.device)
        weight_dtype, autocast = resolve_dtypes(config.dtype, device)
        progress("loading model", 0, 1, force=True)
        cache_dir = Path(config.model_cache_dir) if config.model_cache_dir else None
        model, tokenizer = load_model(config.model, dtype=weight_dtype, device=str(device), cache_dir=cache_dir)
        timed("load_model", t0)

        t0 = time.perf_counter()
        progress("reading data", 0, 1, force=True)
        train_ex, val_ex, bad, train_table, val_table = prepare(config, tokenizer, run_dir, write=main)
        val_tasks = val_table["task"].to_list()
        save_manifest(
            n_train=len(train_ex), n_val=len(val_ex), bad_records=len(bad),
            fingerprints={"train": {p: fingerprint(p) for p in config.train}, "val": {p: fingerprint(p) for p in config.val}, "model": model_fingerprint(config.model)},
        )  # fmt: skip
        timed("prepare", t0)

        torch.manual_seed(config.seed)
        if config.adapter:
            model = load_adapter(model, config.adapter)
        else:
            model = attach_lora(
                model, rank=config.lora_rank, alpha=config.lora_alpha, target_modules=config.lora_targets,
                init_b_nonzero=not config.warmup, seed=config.seed,
            )  # fmt: skip
        model.to(device)
        manifest["d"] = sum(module.weight.numel() for _, module in lora_factors(model))
        t0 = time.perf_counter()
        if main:
            checkpoints = checkpoints_for(config, model, tokenizer, train_ex, run_dir, device, autocast, progress)
        barrier(world)
        if not main:  # the checkpoints are on disk now: this only lists them
            checkpoints = checkpoints_for(config, model, tokenizer, train_ex, run_dir, device, autocast, progress)
        timed("warmup", t0)

        dump_dir = Path(dump_full_grads) if dump_full_grads else None
        pad_id = tokenizer.pad_token_id
        for c, ckpt in enumerate(checkpoints):
            ckpt_dir = run_dir / f"ckpt-{c}"
            _load_adapter_weights(model, Path(ckpt["adapter"]))
            last = c == len(checkpoints) - 1
            t0 = time.perf_counter()
            subspace_keys = {"sigma": None, "basis": None, "val_coords": None}
            if set(config.methods) & {"less", "g2is"}:
                subspace_keys["val_sketch"] = None
            if main and (not _tensors_ok(ckpt_dir / "subspace.safetensors", subspace_keys) or (dump_dir and last)):
                validation_stage(config, model, val_ex, pad_id, ckpt_dir, device, autocast, progress, dump_dir if last else None)
            barrier(world)
            timed("validation", t0)
            t0 = time.perf_counter()
            dump = None
            if dump_dir and last:
                dump_path = dump_dir / "train_grads.npy"
                dump_path.parent.mkdir(parents=True, exist_ok=True)
                dump = np.lib.format.open_memmap(dump_path, mode="w+", dtype=np.float32, shape=(len(train_ex), manifest["d"]))
            training_stage(config, model, train_ex, pad_id, ckpt, ckpt_dir, device, autocast, progress, dump, rank, world)
            if dump is not None:
                dump.flush()
                model.save_pretrained(str(dump_dir / "adapter"))
                _write_dump_examples(dump_dir / "train_examples.jsonl", train_ex, train_table["task"].to_list())
                _write_dump_examples(dump_dir / "val_examples.jsonl", val_ex, val_tasks)
            timed("training", t0)

        barrier(world)
        if main:
            t0 = time.perf_counter()
            progress("merging", 0, 1, force=True)
            merge(config, run_dir, manifest, checkpoints, len(train_ex), val_tasks)
            timed("merge", t0)
            save_manifest(status="complete", finished=utc_now())
            for c in range(len(checkpoints)):  # merged into train_coords.npy (and sketches): only resume needed them
                shutil.rmtree(run_dir / f"ckpt-{c}" / "train", ignore_errors=True)
            progress("complete", 1, 1, force=True)
        barrier(world)
        return run_dir
    except KeyboardInterrupt:
        save_manifest(status="cancelled", error="cancelled by the user; re-run the same command to resume")
        raise
    except Exception as err:
        save_manifest(status="failed", error=f"{type(err).__name__}: {err}")
        raise
