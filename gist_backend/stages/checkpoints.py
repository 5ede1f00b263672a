"""Stage 2: the adapter states to take gradients at, and which methods use which of them.

A warmup trains the LoRA adapter on a seeded part of the pool and keeps one checkpoint per epoch, each with
its Adam state and mean learning rate. GIST uses the final checkpoint with weight 1, as its authors' scripts
do (``gist_checkpoints="all"``: every checkpoint, weighted by mean learning rate); LESS and G2IS use every
checkpoint, weighted by mean learning rate, as LESS does. A pool pass is made only at checkpoints some
method uses, so a GIST-only run makes one pass over the pool.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ComputeConfig, needs_sketches
from ..engine.warmup import run_warmup, warmup_indices
from ..runs.files import RunError, tensors_complete


@dataclass(frozen=True)
class Checkpoint:
    """An adapter state: its name, adapter folder, Adam state file (if any) and mean warmup learning rate."""

    name: str
    adapter: str
    optimizer: str | None
    lr: float


@dataclass(frozen=True)
class Plan:
    """Which checkpoints each method uses (indices into the checkpoint list) and with which weights."""

    gist: list[int]
    gist_weights: list[float]
    less: list[int]
    less_weights: list[float]

    @property
    def passes(self) -> list[int]:
        """Checkpoints that need a pass over the pool, in order."""
        return sorted(set(self.gist) | set(self.less))


def _normalised(values: list[float]) -> list[float]:
    total = sum(values)
    return [v / total for v in values] if total > 0 else [1.0 / len(values)] * len(values)


def plan(config: ComputeConfig, checkpoints: list[Checkpoint]) -> Plan:
    """GIST at the final checkpoint (or all, lr-weighted), LESS/G2IS at all (lr-weighted)."""
    every = list(range(len(checkpoints)))
    gist = every if config.gist_checkpoints == "all" else [every[-1]]
    less = every if needs_sketches(config.methods) else []
    return Plan(gist, _normalised([checkpoints[c].lr for c in gist]), less, _normalised([checkpoints[c].lr for c in less]) if less else [])


def save_adapter_atomic(model, adapter_dir: Path) -> None:
    """save_pretrained into a temporary sibling folder, then rename it into place: a kill never leaves half an adapter."""
    adapter_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{adapter_dir.name}.", suffix=".tmp", dir=adapter_dir.parent))
    try:
        model.save_pretrained(str(tmp))
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        os.replace(tmp, adapter_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_adapter_weights(model: torch.nn.Module, adapter_dir: Path) -> None:
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


def attach_run_adapter(config: ComputeConfig, model, device: torch.device):
    """The model with the run's LoRA on ``device``: the user's --adapter, or a new one (seeded; B nonzero without a warmup)."""
    from ..engine.model import attach_lora, load_adapter

    if config.adapter:
        model = load_adapter(model, config.adapter)
    else:
        torch.manual_seed(config.seed)
        model = attach_lora(model, rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout, target_modules=config.lora_targets,
                            init_b_nonzero=not config.warmup, seed=config.seed)  # fmt: skip
    return model.to(device)


def _given_adapter(folder: Path, lr: float) -> Checkpoint:
    """A user's --adapter folder as the one checkpoint, with its optimizer state if saved beside it (LESS needs it)."""
    optimizer = next((p for p in (folder / "optimizer.safetensors", folder / "optimizer.pt") if p.exists()), None)
    return Checkpoint("adapter", str(folder), str(optimizer) if optimizer else None, lr)


def checkpoints_for(config: ComputeConfig, model, train_ex: list, pad_id: int, run_dir: Path, device, autocast, progress) -> list[Checkpoint]:
    """The adapter states to take gradients at: warmup epochs, the given adapter, or a fresh init."""
    if config.adapter:
        return [_given_adapter(Path(config.adapter), 1.0)]
    if not config.warmup:
        init_dir = run_dir / "warmup" / "init"
        if not tensors_complete(init_dir / "adapter" / "adapter_model.safetensors", {}):
            save_adapter_atomic(model, init_dir / "adapter")
        return [Checkpoint("init", str(init_dir / "adapter"), None, 1.0)]
    subset = [train_ex[i] for i in warmup_indices(len(train_ex), config.warmup_fraction, config.seed)]
    epochs = run_warmup(
        model, subset, pad_id, run_dir, epochs=config.warmup_epochs, lr=config.warmup_lr, batch_size=config.warmup_batch,
        seed=config.seed, device=device, max_tokens=config.max_tokens, autocast_dtype=autocast,
        progress=lambda done, total, rate: progress("warmup", done, total, rate),
    )  # fmt: skip
    return [Checkpoint(f"epoch-{e['epoch']}", str(Path(e["dir"]) / "adapter"), str(Path(e["dir"]) / "optimizer.safetensors"), e["mean_lr"]) for e in epochs]


def stored_checkpoints(run_dir: Path, manifest: dict) -> list[Checkpoint]:
    """The checkpoints a finished run was computed at, from its manifest and warmup folder."""
    config = manifest.get("config") or {}
    out = []
    for entry in manifest.get("checkpoints") or []:
        name = entry["name"]
        if name == "adapter":
            out.append(_given_adapter(Path(config["adapter"]), float(entry.get("lr", 1.0))))
        elif name == "init":
            out.append(Checkpoint(name, str(run_dir / "warmup" / "init" / "adapter"), None, 1.0))
        else:
            folder = run_dir / "warmup" / name
            out.append(Checkpoint(name, str(folder / "adapter"), str(folder / "optimizer.safetensors"), float(entry.get("lr", 1.0))))
    return out


def adam_state(checkpoint: Checkpoint, model) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The checkpoint's Adam moments, flattened in the gradient order, and betas (LESS/G2IS features need them)."""
    from ..engine.grads import lora_factors
    from ..methods.adam import load_adam_state

    if not checkpoint.optimizer:
        raise RunError(f"LESS and G2IS need the warmup's Adam state, and checkpoint '{checkpoint.name}' has none. "
                       "Run with warmup (the default), or give --adapter a folder holding optimizer.safetensors or optimizer.pt.")  # fmt: skip
    named = [(n, module.weight) for n, module in lora_factors(model)]
    return load_adam_state(checkpoint.optimizer, [n for n, _ in named], [p.shape for _, p in named])
