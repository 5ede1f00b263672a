"""End to end: compute a run with a tiny model, check it against the dumped full gradients, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gist_backend.cli import main as cli_main
from gist_backend.compute import ComputeConfig, compute
from gist_backend.runs import RunError, open_run
from gist_backend.curation.scoring import scores

from test_gist import svd_global_scores, svd_scores

SMALL = dict(k_max=8, warmup_epochs=2, warmup_fraction=0.2, warmup_lr=1e-3, warmup_batch=4, shard_size=16, max_len=64)


def test_scores_equal_independent_computation_from_dumped_gradients(tiny_llama, toy_data, tmp_path):
    pool, val = toy_data
    config = ComputeConfig(model=str(tiny_llama), train=[str(pool)], val=[str(val)], warmup=False, **{k: v for k, v in SMALL.items() if not k.startswith("warmup")})
    compute(config, tmp_path / "run", dump_full_grads=tmp_path / "dump")
    run = open_run(tmp_path / "run")
    val_grads = np.load(tmp_path / "dump" / "val_grads.npy")
    train_grads = np.load(tmp_path / "dump" / "train_grads.npy")
    assert val_grads.shape == (run.val.height, run.manifest["d"]) and train_grads.shape[0] == run.train.height
    examples = [json.loads(line) for line in (tmp_path / "dump" / "train_examples.jsonl").read_text().splitlines()]
    assert [e["id"] for e in examples] == run.train["id"].to_list()
    for rank in (1, 4, run.k_max):  # the compact store (unit fp16 + fp32 norms) keeps every score within 1e-3
        np.testing.assert_allclose(scores(run, "gist", rank), svd_scores(val_grads, train_grads, run.val_tasks, rank), atol=1e-3)
        np.testing.assert_allclose(scores(run, "gist-global", rank), svd_global_scores(val_grads, train_grads, run.val_tasks, rank), atol=1e-3)
    np.testing.assert_allclose(run.grad_norms[0], np.linalg.norm(train_grads, axis=1), rtol=1e-5)

    # The dump is self-contained: the adapter and token ids reproduce one gradient by plain autograd.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "dump" / "adapter", is_trainable=True)
    model.eval()
    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    loss = model(input_ids=torch.tensor([examples[3]["input_ids"]]), labels=torch.tensor([examples[3]["labels"]])).loss
    flat = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).numpy()
    np.testing.assert_allclose(flat, train_grads[3], atol=1e-5)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gist_backend.cli", *args]


def _compute_args(model: Path, pool: Path, val: Path, run_dir: Path) -> list[str]:
    return [
        "compute", "--model", str(model), "--train", str(pool), "--val", str(val), "--run-dir", str(run_dir),
        "--k-max", "8", "--warmup-epochs", "2", "--warmup-fraction", "0.2", "--warmup-lr", "1e-3", "--warmup-batch", "4",
        "--shard-size", "8", "--max-len", "64", "--max-batch", "4",
    ]  # fmt: skip


@pytest.mark.slow
def test_killed_compute_resumes_to_the_same_result(tiny_llama, tmp_path):
    from gist_backend.devkit.tiny import make_toy_data

    pool, val = make_toy_data(tmp_path / "data", n_train=160, n_val=10)
    env = {**os.environ, "GIST_TORCH_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(_cli(*_compute_args(tiny_llama, pool, val, reference)), check=True, env=env, capture_output=True)

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*_compute_args(tiny_llama, pool, val, run_dir)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = run_dir / "ckpt-1" / "pool" / "shard-00002.safetensors"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "running"
    with pytest.raises(RunError, match="not complete"):
        open_run(run_dir)
    done_before = sorted(p.name for p in (run_dir / "ckpt-1" / "pool").glob("shard-*"))
    assert 0 < len(done_before) < 20  # killed mid-way through the last checkpoint's shards

    subprocess.run(_cli(*_compute_args(tiny_llama, pool, val, run_dir)), check=True, env=env, capture_output=True)
    resumed, fresh = open_run(run_dir), open_run(reference)
    np.testing.assert_array_equal(resumed.train_coords, fresh.train_coords)
    np.testing.assert_array_equal(resumed.val_coords, fresh.val_coords)
    np.testing.assert_array_equal(scores(resumed, "gist", 3), scores(fresh, "gist", 3))


def test_cli_scores_info_and_option_mismatch(tiny_llama, toy_data, tmp_path, capsys):
    pool, val = toy_data
    run_dir = tmp_path / "run"
    cli_main(_compute_args(tiny_llama, pool, val, run_dir))
    cli_main(["scores", "--run-dir", str(run_dir), "--rank", "3", "--out", str(tmp_path / "s.csv")])
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0] == "id,score" and len(lines) == 61 and b"\r" not in (tmp_path / "s.csv").read_bytes()  # plain \n lines
    run = open_run(run_dir)
    written = np.array([float(line.split(",")[1]) for line in lines[1:]])
    np.testing.assert_allclose(written, scores(run, "gist", 3), rtol=1e-6)
    cli_main(["info", "--run-dir", str(run_dir), "--top", "3"])
    out = capsys.readouterr().out
    assert "r90/r95/r99" in out and "ρ =" in out and "top 3 examples" in out
    with pytest.raises(SystemExit):  # same run dir, different options: refuse rather than mix results
        cli_main(_compute_args(tiny_llama, pool, val, run_dir) + ["--lora-rank", "4"])
    err = capsys.readouterr().err
    assert "different options (lora_rank: " in err and " → 4)" in err  # names what differs, not the whole config


@pytest.mark.slow
def test_torchrun_two_processes_gives_the_single_process_run(tiny_llama, tmp_path):
    from gist_backend.devkit.tiny import make_toy_data

    pool, val = make_toy_data(tmp_path / "data", n_train=40, n_val=8)
    env = {**os.environ, "GIST_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1"}
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run(_cli(*_compute_args(tiny_llama, pool, val, single)), check=True, env=env, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", "-m", "gist_backend.cli"]
    result = subprocess.run(torchrun + _compute_args(tiny_llama, pool, val, multi), env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = open_run(single), open_run(multi)
    assert two.manifest["world_size"] == 2
    np.testing.assert_allclose(two.train_coords, one.train_coords, atol=1e-5)
    np.testing.assert_allclose(scores(two, "gist", 4), scores(one, "gist", 4), atol=1e-5)


def test_less_scores_equal_independent_computation_from_dumped_gradients(tiny_llama, toy_data, tmp_path):
    from safetensors import safe_open

    from gist_backend.methods.projection import make_projection, project

    pool, val = toy_data
    config = ComputeConfig(model=str(tiny_llama), train=[str(pool)], val=[str(val)], methods=["gist", "less"], less_dim=256, **{**SMALL, "warmup_epochs": 1})
    compute(config, tmp_path / "run", dump_full_grads=tmp_path / "dump")
    run = open_run(tmp_path / "run")
    val_grads = torch.from_numpy(np.load(tmp_path / "dump" / "val_grads.npy"))
    train_grads = torch.from_numpy(np.load(tmp_path / "dump" / "train_grads.npy"))
    with safe_open(str(tmp_path / "run" / "warmup" / "epoch-1" / "optimizer.safetensors"), "pt") as f:
        beta1, beta2 = float(f.metadata()["beta1"]), float(f.metadata()["beta2"])
        keys = [k[: -len(".exp_avg")] for k in f.keys() if k.endswith(".exp_avg")]
        from peft import PeftModel  # parameter order = model.named_parameters(), as in the dump
        from transformers import AutoModelForCausalLM

        order = [n for n, _ in PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "dump" / "adapter").named_parameters() if ".lora_" in n]
        assert sorted(order) == sorted(keys)
        m = torch.cat([f.get_tensor(f"{n}.exp_avg").reshape(-1) for n in order])
        v = torch.cat([f.get_tensor(f"{n}.exp_avg_sq").reshape(-1) for n in order])
    gamma = (beta1 * m + (1 - beta1) * train_grads) / torch.sqrt(beta2 * v + (1 - beta2) * train_grads**2 + 1e-8)
    proj = make_projection(val_grads.shape[1], 256, config.seed)
    x = torch.nn.functional.normalize(project(proj, gamma), dim=1)
    y = torch.nn.functional.normalize(project(proj, val_grads), dim=1)
    tasks = np.asarray(run.val_tasks)
    expected = np.max([(x @ y[torch.from_numpy(tasks == t)].T).mean(1).numpy() for t in sorted(set(tasks))], axis=0)
    np.testing.assert_allclose(scores(run, "less"), expected, atol=3e-3)  # sketches are stored in fp16


@pytest.mark.slow
def test_real_smollm2_run_end_to_end(tmp_path):
    """The real offline model: a small run completes and its scores are finite and not all equal."""
    pytest.importorskip("gguf", reason="gguf missing: pip install gguf")
    from gist_backend.engine.model import smollm2_gguf
    from gist_backend.devkit.tiny import make_toy_data

    try:
        gguf = smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    pool, val = make_toy_data(tmp_path / "data", n_train=12, n_val=4)
    config = ComputeConfig(model=str(gguf), train=[str(pool)], val=[str(val)], warmup=False, k_max=4, max_len=64, shard_size=8)
    compute(config, tmp_path / "run")
    run = open_run(tmp_path / "run")
    assert run.manifest["d"] == 921_600  # rank-8 LoRA on q/k/v/o of the 30-layer SmolLM2-135M
    values = scores(run, "gist", 2)
    assert np.isfinite(values).all() and values.std() > 0
    assert run.geometry()["checkpoints"][0]["rho"] > 0.1  # LoRA gradients are strongly coupled


def test_gist_alone_makes_one_pass_and_info_json_says_so(tiny_llama, toy_data, tmp_path, capsys):
    pool, val = toy_data
    run_dir = tmp_path / "run"
    cli_main(["compute", "--model", str(tiny_llama), "--train", str(pool), "--val", str(val), "--run-dir", str(run_dir), "--methods", "gist",
              "--warmup-epochs", "2", "--warmup-fraction", "0.2", "--warmup-batch", "4", "--k-max", "8", "--max-len", "64"])  # fmt: skip
    capsys.readouterr()
    cli_main(["info", "--run-dir", str(run_dir), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["pool"] == 60 and info["k_max"] == 8 and info["gradient_passes"] == 1 and info["targets"] == ["val"]
    assert info["methods"]["gist"]["checkpoints"] == ["epoch-2"] and set(info["methods"]) == {"gist", "gist-global"}
    assert info["methods"]["gist"]["bytes_per_example"] <= 2.56 * info["k_max"] + 16
    assert not (run_dir / "ckpt-0").exists()  # no pass at the first epoch: GIST uses the final checkpoint only
    cli_main(["compute", "--model", str(tiny_llama), "--train", str(pool), "--val", str(val), "--run-dir", str(tmp_path / "both"),
              "--methods", "gist,less", "--less-dim", "64", "--warmup-epochs", "2", "--warmup-fraction", "0.2", "--warmup-batch", "4",
              "--k-max", "8", "--max-len", "64", "--gist-checkpoints", "all"])  # fmt: skip
    capsys.readouterr()
    cli_main(["info", "--run-dir", str(tmp_path / "both"), "--json"])
    both = json.loads(capsys.readouterr().out)
    assert both["gradient_passes"] == 2 and both["methods"]["less"]["checkpoints"] == ["epoch-1", "epoch-2"]
    assert both["methods"]["gist"]["checkpoints"] == ["epoch-1", "epoch-2"] and both["methods"]["less"]["bytes_per_example"] == 2 * 64 * 2


def test_paper_recipe_and_explicit_flags(tmp_path):
    from gist_backend.cli import build_parser, config_from_args

    base = ["compute", "--model", "m", "--train", "p", "--val", "v", "--run-dir", "r"]
    paper = config_from_args(build_parser("paper").parse_args([*base, "--recipe", "paper"]))
    assert (paper.lora_rank, paper.lora_alpha, paper.lora_dropout, paper.max_len) == (128, 512, 0.1, 2048)
    assert (paper.warmup_epochs, paper.warmup_fraction, paper.warmup_lr) == (4, 0.05, 2e-5)
    mine = config_from_args(build_parser("paper").parse_args([*base, "--recipe", "paper", "--lora-rank", "64", "--lora-dropout", "0.05"]))
    assert (mine.lora_rank, mine.lora_dropout, mine.lora_alpha) == (64, 0.05, 512)  # explicit flags win over the recipe
    default = config_from_args(build_parser().parse_args(base))
    assert (default.lora_rank, default.lora_dropout, default.gist_checkpoints) == (8, 0.0, "final")


def test_lora_dropout_reaches_the_adapter_and_not_the_gradients(tiny_llama, toy_data, tmp_path):
    pool, val = toy_data
    config = ComputeConfig(model=str(tiny_llama), train=[str(pool)], val=[str(val)], lora_dropout=0.5, **SMALL)
    run = open_run(compute(config, tmp_path / "run", dump_full_grads=tmp_path / "dump"))
    adapter = json.loads((tmp_path / "dump" / "adapter" / "adapter_config.json").read_text())
    assert adapter["lora_dropout"] == 0.5
    val_grads, train_grads = np.load(tmp_path / "dump" / "val_grads.npy"), np.load(tmp_path / "dump" / "train_grads.npy")
    np.testing.assert_allclose(scores(run, "gist", 4), svd_scores(val_grads, train_grads, run.val_tasks, 4), atol=1e-3)
    # Independently of the dump's own pass: plain autograd on the saved adapter in eval mode (no dropout) gives the
    # stored gradients; with dropout 0.5 active they would differ by far more than 1e-5.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gist_backend.stages.prepare import prepare_targets

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "dump" / "adapter", is_trainable=True).eval()
    params = [p for n, p in model.named_parameters() if ".lora_" in n]

    def grad(input_ids: list[int], labels: list[int]) -> np.ndarray:
        loss = model(input_ids=torch.tensor([input_ids]), labels=torch.tensor([labels])).loss
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).numpy()

    train_example = json.loads((tmp_path / "dump" / "train_examples.jsonl").read_text().splitlines()[2])
    np.testing.assert_allclose(grad(train_example["input_ids"], train_example["labels"]), train_grads[2], atol=1e-5)
    val_examples, _, _ = prepare_targets([str(val)], AutoTokenizer.from_pretrained(tiny_llama), SMALL["max_len"])
    np.testing.assert_allclose(grad(val_examples[1].input_ids, val_examples[1].labels), val_grads[1], atol=1e-5)
