"""Warmup: brief LoRA training on a seeded random fraction of the pool, as GIST and LESS do.

Each epoch ends with a checkpoint ``warmup/epoch-<e>/`` holding the peft adapter, the AdamW state
by parameter name (``optimizer.safetensors``: ``<name>.exp_avg``, ``<name>.exp_avg_sq``,
``<name>.step``; metadata beta1/beta2) and ``state.json`` with the epoch's mean learning rate, which
becomes that checkpoint's weight. A killed warmup resumes from its last finished epoch: shuffling
is seeded per epoch and the optimizer state is restored, so the result is the same.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..methods.adam import save_adam_state
from .grads import collate, length_buckets, per_example_loss
from ..runs.files import read_json, tensors_complete, write_json


def warmup_indices(n_pool: int, fraction: float, seed: int) -> list[int]:
    """The seeded random subset of pool rows used for warmup (at least one)."""
    count = max(1, round(n_pool * fraction))
    return sorted(random.Random(seed).sample(range(n_pool), min(count, n_pool)))


def epoch_dir(run_dir: Path, epoch: int) -> Path:
    """Folder of the checkpoint written at the end of ``epoch`` (1-based)."""
    return run_dir / "warmup" / f"epoch-{epoch}"


def finished_epochs(run_dir: Path, epochs: int) -> int:
    """How many warmup epochs already have a complete checkpoint (a damaged one is redone)."""
    done = 0
    for e in range(1, epochs + 1):
        folder = epoch_dir(run_dir, e)
        if not (folder / "state.json").exists():
            break
        if not all(tensors_complete(f, {}) for f in (folder / "adapter" / "adapter_model.safetensors", folder / "optimizer.safetensors")):
            break
        done = e
    return done


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer, named_params: Sequence[tuple[str, torch.nn.Parameter]]) -> None:
    """Restore the optimizer state ``methods.adam.save_adam_state`` wrote (for resuming a warmup)."""
    tensors = load_file(str(path))
    for name, param in named_params:
        if f"{name}.exp_avg" in tensors:
            optimizer.state[param] = {
                "step": tensors[f"{name}.step"].reshape(()).clone(),
                "exp_avg": tensors[f"{name}.exp_avg"].to(param.device),
                "exp_avg_sq": tensors[f"{name}.exp_avg_sq"].to(param.device),
            }


def run_warmup(
    model: torch.nn.Module,
    examples: Sequence,
    pad_id: int,
    run_dir: Path,
    *,
    epochs: int = 4,
    lr: float = 2e-5,
    batch_size: int = 32,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.03,
    seed: int = 0,
    device: torch.device | str = "cpu",
    max_tokens: int = 8192,
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    desc: str = "warmup",
) -> list[dict]:
    """Train the attached LoRA adapter; return one {"epoch", "dir", "mean_lr"} per checkpoint (``desc`` labels the progress bar)."""
    device = torch.device(device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-len(examples) // batch_size))
    total_steps = steps_per_epoch * epochs
    ramp = max(1, int(total_steps * warmup_ratio))

    def lr_at(step: int) -> float:  # linear warm-up then linear decay, as LESS's HF Trainer run
        return lr * (step + 1) / ramp if step < ramp else lr * max(0.0, (total_steps - step) / max(1, total_steps - ramp))

    done = finished_epochs(run_dir, epochs)
    if done:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file as load_weights

        last = epoch_dir(run_dir, done)
        set_peft_model_state_dict(model, load_weights(str(last / "adapter" / "adapter_model.safetensors")))
        load_optimizer(last / "optimizer.safetensors", optimizer, named)

    amp = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else None
    bar = tqdm(total=total_steps, initial=done * steps_per_epoch, desc=desc, unit="step", dynamic_ncols=True)
    for epoch in range(done + 1, epochs + 1):
        model.train()
        order = list(range(len(examples)))
        random.Random(seed * 1000 + epoch).shuffle(order)
        lrs = []
        for step_in_epoch in range(steps_per_epoch):
            step = (epoch - 1) * steps_per_epoch + step_in_epoch
            chunk = order[step_in_epoch * batch_size : (step_in_epoch + 1) * batch_size]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            lrs.append(lr_at(step))
            optimizer.zero_grad(set_to_none=True)
            sub_examples = [examples[i] for i in chunk]
            for micro in length_buckets([len(e.input_ids) for e in sub_examples], max_tokens):
                batch = collate(sub_examples, micro, pad_id)
                if amp:
                    with amp():
                        loss = per_example_loss(model, batch, device).sum() / len(chunk)
                else:
                    loss = per_example_loss(model, batch, device).sum() / len(chunk)
                loss.backward()
            optimizer.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item() * len(chunk) / max(1, len(micro)):.3f}", epoch=epoch)
            if progress is not None:
                progress(step + 1, total_steps, 0.0)
        out = epoch_dir(run_dir, epoch)
        model.save_pretrained(str(out / "adapter"))
        save_adam_state(out / "optimizer.safetensors", optimizer, named)
        write_json(out / "state.json", {"epoch": epoch, "mean_lr": sum(lrs) / len(lrs), "steps": len(lrs)})
    bar.close()
    model.eval()
    return [
        {"epoch": e, "dir": str(epoch_dir(run_dir, e)), "mean_lr": read_json(epoch_dir(run_dir, e) / "state.json")["mean_lr"]}
        for e in range(1, epochs + 1)
    ]
