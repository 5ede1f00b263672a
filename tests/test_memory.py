"""The memory model: the basis streamed in row blocks gives the same coordinates, batches respect the gradient
budget, and the per-example gradient buffer the model predicts is what a real batch allocates."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from gist_backend.engine.memory import GIB, activation_bytes, llama_lora_params, plan
from gist_backend.methods.gist import Projector


def test_streamed_basis_equals_the_resident_one():
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((1000, 16)).astype(np.float32)
    grads = torch.from_numpy(rng.standard_normal((7, 1000)).astype(np.float32))
    resident = Projector(basis, "cpu")
    streamed = Projector(basis, "cpu", memory_bytes=16 * 4 * 130)  # 130 rows at a time: 8 blocks, the last short
    assert resident.resident and not streamed.resident and streamed.rows == 130
    expected = grads.double().numpy() @ basis.astype(np.float64)
    np.testing.assert_allclose(resident(grads).numpy(), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(streamed(grads).numpy(), expected, rtol=1e-5, atol=1e-4)
    half = Projector(basis, "cpu", dtype=torch.bfloat16)
    rel = np.abs(half(grads).numpy() - expected).max() / np.abs(expected).max()
    assert 0 < rel < 2e-2  # bfloat16 keeps about three significant digits


def test_plan_of_an_8b_model_at_the_papers_recipe():
    d = llama_lora_params(hidden=4096, kv_dim=1024, layers=32, rank=128)
    assert d == 109_051_904
    p = plan(n_params=8_030_261_248, weight_bytes=2, d=d, k=128, m=300, batch=64, grad_memory=28 * GIB, basis_memory=40 * GIB)
    assert p.weights / 1e9 == pytest.approx(16.06, abs=0.01) and p.batch == 64 and p.batch_grads / 1e9 == pytest.approx(27.9, abs=0.1)
    assert p.basis / 1e9 == pytest.approx(55.8, abs=0.1) and not p.basis_on_device  # fp32 basis does not fit 40 GB: streamed
    assert plan(n_params=1, weight_bytes=2, d=d, k=128, m=300, batch=64, basis_bytes=2, basis_memory=40 * GIB).basis_on_device
    assert p.val_grads / 1e9 == pytest.approx(130.9, abs=0.1) and p.val_grads_on_disk
    assert plan(n_params=1, weight_bytes=2, d=d, k=128, m=300, batch=64, grad_memory=8 * GIB).batch == 19  # the budget bounds the batch


CHILD = textwrap.dedent(
    """
    import json, sys, torch
    from gist_backend.devkit.tiny import make_tiny_model, make_toy_data
    from gist_backend.engine.grads import iter_gradients, lora_factors
    from gist_backend.engine.model import attach_lora, load_model
    from gist_backend.engine.records import load_records
    from gist_backend.engine.tokenize import tokenize_records
    torch.set_num_threads(1)
    folder, batch = sys.argv[1], int(sys.argv[2])
    model, tok = load_model(str(make_tiny_model(folder + "/m", hidden=128, layers=4)))
    model = attach_lora(model, rank=512, alpha=512, init_b_nonzero=True)
    pool, _ = make_toy_data(folder + "/d", n_train=batch, n_val=2)
    examples, _ = tokenize_records(load_records(pool)[0], tok, 48)
    d = sum(m.weight.numel() for _, m in lora_factors(model))
    status = lambda field: int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
    for _ in iter_gradients(model, examples[:1], tok.pad_token_id, show_bar=False):
        pass
    # measure from now: reset the high-water mark to the current RSS, so no earlier transient peak hides the batch
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    sizes = [len(i) for i, _, _ in iter_gradients(model, examples, tok.pad_token_id, max_batch=batch, show_bar=False)]
    tokens = len(examples) * max(len(e.input_ids) for e in examples)
    print(json.dumps({"d": d, "sizes": sizes, "growth": status("VmHWM:") - before, "tokens": tokens}))
    """
)


@pytest.mark.slow
def test_measured_peak_of_a_batch_matches_the_model(tmp_path):
    """A batch of B examples grows the process by the model's per-example buffer, B × d × 4 bytes (one example was warm)."""
    out = json.loads(subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), "48"], capture_output=True, text=True, check=True).stdout)
    assert out["sizes"] == [48]
    buffer = plan(n_params=0, weight_bytes=4, d=out["d"], k=1, m=1, batch=48).batch_grads
    acts = activation_bytes(out["tokens"], hidden=128, layers=4, modules=4, rank=512, act_bytes=4)
    predicted = buffer + acts - (buffer + acts) // 48  # one example's worth was allocated already (the warm-up batch)
    assert buffer > 2 * acts  # the per-example buffer dominates
    assert 0.8 * predicted <= out["growth"] <= 1.3 * predicted, (out, buffer, acts)
