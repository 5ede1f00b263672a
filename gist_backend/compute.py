"""The compute: records → model → warmup → gradient passes → a run (docs/design.md, "Data flow").

``compute(config, run_dir)`` runs four stages, each resumable: a killed compute re-run with the same options
continues where it stopped and gives the same result.
  1. prepare      read and tokenise the pool and validation files            (stages/prepare.py)
  2. checkpoints  warmup LoRA on a seeded part of the pool, one per epoch     (stages/checkpoints.py)
  3. passes       at each checkpoint a method uses: validation gradients → subspace and sketch,
                  then the pool's gradients in shards → coordinates and sketches   (stages/passes.py)
  4. merge        shards → the run's arrays, written by ``runs.write_run``    (stages/merge.py)
Guarantees: one writer per run folder at a time (its "run" lock); re-running a compute on a folder refuses
other options or input files that changed since (naming the file); ``overwrite`` builds the new run beside
the old one, which stays readable until the new one is complete and they are swapped. Under torchrun every
process runs this: process 0 does the warmup, the subspace and the merge; the pool's shards are split.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from .config import ComputeConfig, pool_sketch_dim  # noqa: F401 (ComputeConfig is public: from gist_backend.compute import ComputeConfig)
from .engine.device import barrier, distributed, resolve_device, resolve_dtypes
from .engine.grads import lora_dim, lora_factors
from .curation.edits import EDITS_FILE
from .engine.records import fingerprint, resolve_input
from .runs.files import RunError, tool_version, utc_now, write_json
from .runs.lock import run_lock
from .runs.manifest import FORMAT, FORMAT_VERSION, read_manifest, write_manifest
from .stages.checkpoints import attach_run_adapter, checkpoints_for, load_adapter_weights, plan
from .stages.merge import merge
from .stages.passes import pool_pass, validation_done, validation_pass
from .stages.prepare import prepare, write_bad_records


class Progress:
    """Writes a progress file (stage, done, total, rate, ETA) at most twice a second, and "status" when the work ends."""

    def __init__(self, folder: Path, enabled: bool = True, file: str = "progress.json"):
        self.path = Path(folder) / file
        self.enabled = enabled
        self.last = 0.0

    def __call__(self, stage: str, done: int, total: int, rate: float = 0.0, force: bool = False) -> None:
        now = time.time()
        if not self.enabled or (not force and now - self.last < 0.5 and done < total):
            return
        self.last = now
        eta = (total - done) / rate if rate > 0 else None
        write_json(self.path, {"stage": stage, "done": done, "total": total, "rate": rate, "eta_s": eta, "updated": now})

    def finish(self, status: str, error: str | None) -> None:
        """Record how the work ended: complete, failed or cancelled (read by the dashboard's job panel)."""
        if self.enabled:
            write_json(self.path, {"stage": status, "done": 1, "total": 1, "rate": 0.0, "eta_s": None, "updated": time.time(),
                                   "status": status, "error": error})  # fmt: skip


def _versions() -> dict:
    out = {"python": platform.python_version(), "gist-curator": tool_version()}
    for pkg in ("torch", "transformers", "peft", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def input_fingerprints(config: ComputeConfig) -> dict:
    """sha256 of every input file (or dataset folder) and the model's identity."""
    from .engine.model import model_fingerprint

    return {"train": {p: fingerprint(p) for p in config.train}, "val": {p: fingerprint(p) for p in config.val},
            "model": model_fingerprint(config.model)}  # fmt: skip


def input_stats(config: ComputeConfig) -> dict[str, list[int]]:
    """Size and modification time of every input file: a cheap later check that a file changed (``changed_inputs``)."""
    out = {}
    for path in [*config.train, *config.val]:
        resolved = resolve_input(path)
        if resolved.is_file():
            stat = resolved.stat()
            out[str(resolved)] = [stat.st_size, stat.st_mtime_ns]
    return out


def check_same_inputs(manifest: dict, config: ComputeConfig, fingerprints: dict, run_dir: Path) -> None:
    """Refuse to resume or reuse a run whose options or input files differ from this compute's."""
    if manifest.get("config_hash") != config.result_hash():
        changed = "; ".join(config.differences(manifest.get("config") or {})) or "options of an older version"
        raise RunError(f"{run_dir} holds a run with different options ({changed}). "
                       "Use a new --run-dir, the same options to resume, or --overwrite to start again.")  # fmt: skip
    recorded = manifest.get("fingerprints") or {}
    for split in ("train", "val"):
        for path, digest in (recorded.get(split) or {}).items():
            if fingerprints[split].get(path) != digest:
                raise RunError(f"{path} changed since run {run_dir} was computed from it (sha256 differs). "
                               "Recompute with --overwrite (or use a new --run-dir) to compute from the file as it is now.")  # fmt: skip
    if recorded.get("model") not in (None, fingerprints["model"]):
        raise RunError(f"the model {config.model} changed since run {run_dir} was computed; recompute with --overwrite or a new --run-dir.")


def compute(config: ComputeConfig, run_dir: str | Path, *, dump_full_grads: str | Path | None = None, overwrite: bool = False) -> Path:
    """Run (or resume) the whole compute into ``run_dir``; returns the run directory."""
    problems = config.problems()
    if problems:
        raise ValueError(" ".join(problems))
    proc_rank, world = distributed()
    if dump_full_grads and world > 1:
        raise ValueError("--dump-full-grads is for small single-process checks; run it without torchrun")
    run_dir = Path(run_dir)
    dump_dir = Path(dump_full_grads) if dump_full_grads else None
    work_dir = run_dir.with_name(f".{run_dir.name}.overwrite") if overwrite else run_dir
    if proc_rank != 0:
        _compute(config, work_dir, proc_rank, world, dump_dir)
        barrier(world)
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir, "run", "gist-curate compute"):
        if overwrite and (work_dir / "manifest.json").exists():
            try:
                check_same_inputs(read_manifest(work_dir), config, input_fingerprints(config), work_dir)
            except RunError:  # an earlier --overwrite with other options or inputs: start that one afresh
                shutil.rmtree(work_dir)
        _compute(config, work_dir, proc_rank, world, dump_dir)
        if overwrite:
            _swap(work_dir, run_dir)
    barrier(world)
    return run_dir


def _swap(new: Path, old: Path) -> None:
    """Put the finished new run in place of the old one (readable and editable until now), keeping its curation edits.

    Edits name examples by id, so they carry over; what was computed from the old run (its evaluations, added
    targets, maps and cached selections) does not, and is listed as discarded.
    """
    trash = old.with_name(f".{old.name}.replaced")
    shutil.rmtree(trash, ignore_errors=True)
    with run_lock(old, "edits", "gist-curate compute --overwrite", wait_s=30):
        if (old / EDITS_FILE).exists():
            shutil.copy2(old / EDITS_FILE, new / EDITS_FILE)
        discarded = [name for name in ("evals", "maps", "selections") if (old / name).is_dir() and any((old / name).iterdir())]
        kept_targets = {t["name"] for t in read_manifest(new).get("targets", [])}
        discarded += [f"target {t['name']!r}" for t in _old_manifest(old).get("targets") or [] if isinstance(t, dict) and t.get("name") not in kept_targets]
        for name in (".lock-run", ".lock-edits"):  # the lock files stay with the folder that is locked
            (old / name).unlink(missing_ok=True)
        os.rename(old, trash)
        os.rename(new, old)
    shutil.rmtree(trash, ignore_errors=True)
    kept = "its curation edits kept" if (old / EDITS_FILE).exists() else "no curation edits to keep"
    print(f"{old}: replaced by the new run ({kept}" + (f"; discarded: {', '.join(discarded)})" if discarded else ")"))


def _old_manifest(run_dir: Path) -> dict:
    """The manifest of the run being replaced, or {} if it is unreadable (it is being discarded either way)."""
    try:
        return read_manifest(run_dir)
    except (RunError, OSError):
        return {}


def _compute(config: ComputeConfig, run_dir: Path, proc_rank: int, world: int, dump_dir: Path | None) -> None:
    """The stages, in order, into ``run_dir`` (process 0 owns the manifest)."""
    from .engine.model import load_model

    main = proc_rank == 0
    run_dir.mkdir(parents=True, exist_ok=True)
    fingerprints = input_fingerprints(config)
    manifest = _resumed_manifest(config, run_dir, fingerprints, main, dump=dump_dir is not None)
    if manifest is None:
        return
    progress = Progress(run_dir, enabled=main)
    timings = manifest.setdefault("timings", {})

    def save(**fields) -> None:
        manifest.update(fields)
        if main:
            write_manifest(run_dir / "manifest.json", manifest)

    def timed(stage: str, start: float) -> None:
        timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - start, 3)
        save()

    target = config.target_name()
    save(status="running", tool_version=tool_version(), versions=_versions(), config=asdict(config), config_hash=config.result_hash(),
         methods=list(config.methods), target=target, error=None, world_size=world, fingerprints=fingerprints,
         inputs=[str(resolve_input(p)) for p in [*config.train, *config.val]], input_stats=input_stats(config))  # fmt: skip
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
        prepared = prepare(config.train, config.val, tokenizer, config.max_len)
        if main:
            write_bad_records(run_dir / "bad_records.jsonl", prepared.bad)
        if prepared.renamed and main:
            print(f"{len(prepared.renamed)} id(s) repeated in or across input files were made unique (e.g. {prepared.renamed[0]['id']!r} → "
                  f"{prepared.renamed[0]['new_id']!r}, {prepared.renamed[0]['file']} line {prepared.renamed[0]['line']})")  # fmt: skip
        save(n_train=len(prepared.train), n_val=len(prepared.val), bad_records=len(prepared.bad), renamed_ids=prepared.renamed[:100],
             n_renamed_ids=len(prepared.renamed))  # fmt: skip
        timed("prepare", t0)

        model = attach_run_adapter(config, model, device)
        pad_id = tokenizer.pad_token_id
        t0 = time.perf_counter()
        if main:
            checkpoints = checkpoints_for(config, model, prepared.train, pad_id, run_dir, device, autocast, progress)
        barrier(world)
        if not main:  # the checkpoints are on disk now: this only lists them
            checkpoints = checkpoints_for(config, model, prepared.train, pad_id, run_dir, device, autocast, progress)
        timed("warmup", t0)
        chosen = plan(config, checkpoints)
        d = lora_dim(model)
        memory = memory_plan(config, model, d, len(prepared.val), weight_dtype)
        if main:
            print(memory.describe(), flush=True)
        save(d=d, gradient_passes=len(chosen.passes), checkpoints=[{"name": c.name, "lr": c.lr} for c in checkpoints],
             memory_plan={**asdict(memory), "device": memory.device, "host": memory.host})  # fmt: skip

        for c in chosen.passes:
            _checkpoint_passes(config, model, prepared, pad_id, checkpoints[c], run_dir / f"ckpt-{c}", target, c in chosen.gist, c in chosen.less,
                               last=c == chosen.passes[-1], dump_dir=dump_dir, device=device, autocast=autocast, progress=progress,
                               proc_rank=proc_rank, world=world, timed=timed)  # fmt: skip
        barrier(world)
        if main:
            progress("merging", 0, 1, force=True)
            _merge_and_finish(config, run_dir, manifest, prepared, checkpoints, chosen, target, d, fingerprints["val"])
            progress("complete", 1, 1, force=True)
    except KeyboardInterrupt:
        save(status="cancelled", error="cancelled by the user; re-run the same command to resume")
        raise
    except Exception as err:
        save(status="failed", error=f"{type(err).__name__}: {err}")
        raise


def _resumed_manifest(config: ComputeConfig, run_dir: Path, fingerprints: dict, main: bool, *, dump: bool) -> dict | None:
    """The manifest to continue from: a fresh one, the folder's own (same inputs, checked), or None when it is complete."""
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "created": utc_now(), "timings": {}}
    if not (run_dir / "manifest.json").exists():
        return manifest
    existing = read_manifest(run_dir)
    if main:
        check_same_inputs(existing, config, fingerprints, run_dir)
        manifest = existing
    if existing.get("status") == "complete" and not dump:
        if main:
            print(f"{run_dir}: already complete")
            if config.reusable and not existing.get("reusable"):
                print("warning: it was computed without --reusable, so it has no pool sketch for add-target; "
                      "recompute with --overwrite --reusable to add one")  # fmt: skip
        return None
    return manifest


def _merge_and_finish(config: ComputeConfig, run_dir: Path, manifest: dict, prepared, checkpoints, chosen, target: str, d: int,
                      val_fingerprints) -> None:
    """Merge the passes into the run's arrays, mark the run complete, and drop the per-pass shards (process 0 only)."""
    t0 = time.perf_counter()
    manifest["reusable"] = {"dim": pool_sketch_dim(config.sketch_dim, d), "seed": config.seed} if config.reusable else None
    merge(run_dir, manifest, prepared, checkpoints, chosen, target, config.val, val_fingerprints, config.shard_size)
    manifest["warnings"] = degenerate_subspace_warnings(len(prepared.val), config.k_max, manifest["k_max"])
    manifest.setdefault("timings", {})["merge"] = round(time.perf_counter() - t0, 3)
    write_manifest(run_dir / "manifest.json", manifest)
    for c in chosen.passes:  # merged into the run's arrays: only resuming needed them
        shutil.rmtree(run_dir / f"ckpt-{c}" / "pool", ignore_errors=True)
    for warning in manifest["warnings"]:
        print(f"warning: {warning}")


def _checkpoint_passes(config, model, prepared, pad_id: int, checkpoint, ckpt_dir: Path, target: str, gist: bool, sketch: bool, *, last: bool,
                       dump_dir, device, autocast, progress, proc_rank: int, world: int, timed) -> None:  # fmt: skip
    """The validation pass (process 0) and the pool pass (all processes) at one checkpoint."""
    load_adapter_weights(model, Path(checkpoint.adapter))
    dump = dump_dir if (dump_dir is not None and last) else None
    t0 = time.perf_counter()
    if proc_rank == 0 and (dump is not None or not validation_done(ckpt_dir, target, gist, sketch)):
        validation_pass(config, model, prepared.val, pad_id, ckpt_dir, target, gist=gist, sketch=sketch, device=device,
                        autocast=autocast, progress=progress, dump_dir=dump, name=checkpoint.name)  # fmt: skip
    barrier(world)
    timed("validation", t0)
    t0 = time.perf_counter()
    grads = None
    if dump is not None:
        d = lora_dim(model)
        dump.mkdir(parents=True, exist_ok=True)
        grads = np.lib.format.open_memmap(dump / "train_grads.npy", mode="w+", dtype=np.float32, shape=(len(prepared.train), d))
    pool_pass(config, model, prepared.train, pad_id, checkpoint, ckpt_dir, target, gist=gist, sketch=sketch, device=device,
              autocast=autocast, progress=progress, dump=grads, proc_rank=proc_rank, world=world)  # fmt: skip
    if grads is not None:
        grads.flush()
        model.save_pretrained(str(dump / "adapter"))
        _write_dump_examples(dump / "train_examples.jsonl", prepared.train, prepared.train_table["task"].to_list())
        _write_dump_examples(dump / "val_examples.jsonl", prepared.val, prepared.val_table["task"].to_list())
    timed("pool", t0)


def memory_plan(config: ComputeConfig, model, d: int, m: int, weight_dtype: torch.dtype):
    """The memory model of this compute (engine/memory.py) from the loaded model and the options."""
    from .engine import memory

    n_params = sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n)
    width = torch.empty((), dtype=weight_dtype).element_size()
    cfg = model.config
    factors = lora_factors(model)
    activations = memory.activation_bytes(config.max_tokens, getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0),
                                          getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0),
                                          len(factors) // 2 // max(1, getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 1)),
                                          factors[0][1].weight.shape[0], width)  # fmt: skip
    return memory.plan(n_params=n_params, weight_bytes=width, d=d, k=config.k_max, m=m, batch=config.max_batch,
                       basis_bytes=2 if config.basis_dtype == "bfloat16" else 4, grad_memory=config.grad_memory_gb * 2**30,
                       basis_memory=config.basis_memory_gb * 2**30, host_memory=config.memory_budget_gb * 2**30, activations=activations)  # fmt: skip


def degenerate_subspace_warnings(n_val: int, k_max: int, directions: int) -> list[str]:
    """Warnings for a subspace too small to rank by (``directions`` kept of the validation gradients): with one, every GIST score is ±1."""
    out = []
    if directions < 2:
        if min(n_val, k_max) < 2:
            cause = f"only {n_val} validation example" if n_val < 2 else f"--k-max {k_max}"
            fix = "Give more validation examples (10 or more)" if n_val < 2 else "Use --k-max 2 or more"
        else:
            cause = f"the {n_val} validation gradients are parallel: duplicate or near-identical examples"
            fix = "Give distinct validation examples (10 or more)"
        out.append(f"the task subspace has 1 direction ({cause}): every GIST score is ±1 and the ranking is meaningless. {fix}.")
    elif n_val < 10:
        out.append(f"only {n_val} validation examples: the task subspace has at most {n_val} directions and GIST scores are coarse. "
                   "Give at least 10 (the papers use a few per sub-task, hundreds in all).")  # fmt: skip
    return out


def _write_dump_examples(path: Path, examples, tasks) -> None:
    import json

    from .runs.files import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for e, task in zip(examples, tasks):
            f.write(json.dumps({"id": e.id, "task": task, "input_ids": e.input_ids, "labels": e.labels}) + "\n")

