"""Per-example LoRA gradients from one batched forward+backward per batch (docs/design.md, "Speed").

Every LoRA factor is a bias-free ``nn.Linear`` (peft's ``lora_A`` / ``lora_B``). For a linear map
y = W x applied at every token t, the gradient of example b's loss is Σ_t (∂L_b/∂y_bt) x_btᵀ. A
forward hook keeps each factor's input x and a tensor hook on its output catches ∂L/∂y during the
one backward pass, so the batch yields B exact per-example gradients at the cost of a training step
plus one small einsum per factor. Each example's loss is its own mean token cross-entropy over
response tokens; summing (not averaging) them over the batch keeps the per-example gradients exact.
Logits are computed only at supervised positions, and right padding keeps real tokens unaffected.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .tokenize import IGNORE_INDEX


@dataclass(frozen=True)
class Batch:
    """Indices into the example list plus the padded tensors for them."""

    indices: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def length_buckets(lengths: Sequence[int], max_tokens: int = 8192, max_batch: int = 64) -> list[list[int]]:
    """Batches of example indices of similar length, longest first, each at most ``max_tokens`` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * width > max_tokens or len(current) == max_batch:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def collate(examples: Sequence, indices: list[int], pad_id: int) -> Batch:
    """Right-pad the chosen tokenised examples (objects with ``input_ids`` and ``labels``)."""
    width = max(len(examples[i].input_ids) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    labels = torch.full((len(indices), width), IGNORE_INDEX, dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(examples[i].input_ids)
        ids[row, :n] = torch.tensor(examples[i].input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(examples[i].labels)
    return Batch(indices, ids, mask, labels)


def causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder returning hidden states, LM head) of a transformers causal LM, peft-wrapped or not."""
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(hf_model, hf_model.base_model_prefix, None)
    head = hf_model.get_output_embeddings()
    if decoder is None or head is None:
        raise ValueError(
            f"{type(hf_model).__name__} does not expose a decoder and an LM head; use a transformers causal LM."
        )
    return decoder, head


def per_example_loss(model: torch.nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """Each example's mean cross-entropy over its response tokens, logits only where supervised."""
    decoder, head = causal_lm_parts(model)
    ids = batch.input_ids.to(device)
    mask = batch.attention_mask.to(device)
    labels = batch.labels.to(device)
    hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    rows = supervised.nonzero(as_tuple=True)[0]
    logits = head(hidden[:, :-1][supervised]).float()
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    token_loss = F.cross_entropy(logits, targets[supervised], reduction="none")
    counts = supervised.sum(1).clamp_min(1)
    return torch.zeros(ids.shape[0], device=device, dtype=token_loss.dtype).index_add(0, rows, token_loss) / counts


def lora_factors(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """(parameter name, module) for every trainable LoRA weight, in ``named_parameters`` order."""
    owners = {}
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".lora_" in f".{module_name}":
            owners[f"{module_name}.weight"] = module
    factors = [(name, owners[name]) for name, p in model.named_parameters() if p.requires_grad and name in owners]
    if not factors:
        raise ValueError("the model has no trainable LoRA weights; attach an adapter first (gist_backend.engine.model.attach_lora)")
    if any(module.bias is not None for _, module in factors):
        raise ValueError("LoRA factors with a bias are not supported")
    return factors


def lora_dim(model: torch.nn.Module) -> int:
    """d, the number of coordinates of one example's LoRA gradient."""
    return sum(module.weight.numel() for _, module in lora_factors(model))


class _Capture:
    """Forward/tensor hooks that turn one backward pass into per-example weight gradients."""

    def __init__(self, factors: list[tuple[str, torch.nn.Linear]], out: torch.Tensor):
        self.out = out
        self.handles = []
        offset = 0
        for _, module in factors:
            size = module.weight.numel()
            self.handles.append(module.register_forward_hook(self._hook(offset, size)))
            offset += size

    def _hook(self, offset: int, size: int) -> Callable:
        def forward_hook(module, inputs, output):
            if not torch.is_grad_enabled():
                return
            x = inputs[0].detach()

            def grad_hook(grad_out: torch.Tensor) -> None:
                per_example = torch.einsum("bto,bti->boi", grad_out.float(), x.float())
                self.out[:, offset : offset + size] = per_example.reshape(per_example.shape[0], size)

            output.register_hook(grad_hook)

        return forward_hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def batch_gradients(model: torch.nn.Module, batch: Batch, device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-example flattened LoRA gradients (B, d) float32, per-example losses (B,)) for one batch."""
    device = torch.device(device)
    factors = lora_factors(model)
    d = sum(module.weight.numel() for _, module in factors)
    out = torch.zeros(len(batch.indices), d, device=device, dtype=torch.float32)
    capture = _Capture(factors, out)
    params = [module.weight for _, module in factors]
    try:
        amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
        with torch.enable_grad(), amp:
            losses = per_example_loss(model, batch, device)
            torch.autograd.grad(losses.sum(), params)
    finally:
        capture.close()
    return out, losses.detach().float()


def iter_gradients(
    model: torch.nn.Module,
    examples: Sequence,
    pad_id: int,
    *,
    device: torch.device | str = "cpu",
    max_tokens: int = 8192,
    max_batch: int = 64,
    autocast_dtype: torch.dtype | None = None,
    desc: str = "gradients",
    progress: Callable[[int, int, float], None] | None = None,
    show_bar: bool = True,
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Yield (example indices, gradients (B, d), losses (B,)) batch by batch, length-bucketed.

    ``progress(done, total, examples_per_second)`` is called after every batch (for run logs and
    the dashboard); the terminal gets a tqdm bar with examples/s and ETA.
    """
    model.eval()
    batches = length_buckets([len(e.input_ids) for e in examples], max_tokens, max_batch)
    start, done = time.perf_counter(), 0
    with tqdm(total=len(examples), desc=desc, unit="ex", disable=not show_bar, dynamic_ncols=True) as bar:
        for indices in batches:
            grads, losses = batch_gradients(model, collate(examples, indices, pad_id), device, autocast_dtype)
            done += len(indices)
            bar.update(len(indices))
            if progress is not None:
                progress(done, len(examples), done / max(time.perf_counter() - start, 1e-9))
            yield indices, grads, losses
