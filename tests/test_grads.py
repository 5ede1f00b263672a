"""The batched per-example gradient engine equals a plain per-example autograd loop."""

from __future__ import annotations

import pytest
import torch

from gist_backend.engine.records import load_records
from gist_backend.engine.tokenize import tokenize_records
from gist_backend.engine.grads import iter_gradients, length_buckets, lora_factors
from gist_backend.engine.model import attach_lora, load_model


def reference_gradients(model, examples) -> torch.Tensor:
    """One HF forward with labels per example (the model's own loss), autograd, flatten."""
    params = [module.weight for _, module in lora_factors(model)]
    rows = []
    for ex in examples:
        loss = model(input_ids=torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels])).loss
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_batched_gradients_equal_per_example_loop(arch, toy_data, request):
    model_dir = request.getfixturevalue(arch)
    model, tokenizer = load_model(str(model_dir))
    model = attach_lora(model, rank=4, alpha=8, init_b_nonzero=True, seed=1)
    records, _ = load_records(toy_data[0])
    examples, bad = tokenize_records(records[:24], tokenizer, max_len=64)
    assert not bad and len({len(e.input_ids) for e in examples}) > 1  # padding is exercised
    batched = torch.zeros(len(examples), sum(m.weight.numel() for _, m in lora_factors(model)))
    for indices, grads, _ in iter_gradients(model, examples, tokenizer.pad_token_id, max_tokens=200, show_bar=False):
        batched[indices] = grads
    reference = reference_gradients(model, examples)
    assert reference.abs().max() > 1e-3  # A and B both receive gradient
    assert (batched - reference).abs().max().item() <= 1e-5


def test_length_buckets_cover_every_index_once_within_token_budget():
    lengths = [5, 17, 3, 17, 9, 30, 1, 12]
    batches = length_buckets(lengths, max_tokens=40, max_batch=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 40
