"""Selection quality: does a selection help the target? Fine-tune on each method's subset and score held-out questions.

For one target (bench/quality_data.py: MMLU or ARC-Challenge, with a shared 2,000-example pool holding the
target's family but not its questions), one compute run (``gist-curate compute``, GIST + LESS + G2IS) serves
every method; ``gist-curate evaluate`` (``gist_backend.evaluate``) then fine-tunes a fresh LoRA on each arm and
scores the target's test split: GIST as published at k_max, r95 and r90 (the rank sweep), GIST-global at the
same ranks, LESS, G2IS, --random-seeds random selections of the same size, and the base model. Reported per
arm: test loss (mean response-token cross-entropy) and multiple-choice accuracy by option log-likelihood,
each as a difference from the mean of the random arms with a 95 % paired bootstrap interval over test
questions. Also reported, at no fine-tuning cost: in-domain retrieval, the share of the target's family in
each method's top 5 % against its share of the pool. Every stage is cached in --work-dir and in the run, so
a killed run re-run with the same options resumes. `--stage compute` stops after the gradient pass.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, result_lines, table, write_json  # noqa: E402
from bench.quality_data import FAMILY, TARGETS, build  # noqa: E402


def compute_config(args, files: dict):
    """The compute options of the benchmark run (fixed: the run is reused across invocations by their hash)."""
    from gist_backend.config import ComputeConfig
    from gist_backend.engine.model import smollm2_gguf

    model = str(smollm2_gguf()) if args.model == "smollm2" else args.model
    return ComputeConfig(
        model=model, train=[str(files["pool"])], val=[str(files["val"])], target=args.target, max_len=args.max_len,
        warmup_fraction=0.05, warmup_epochs=args.warmup_epochs, warmup_lr=1e-4, warmup_batch=8, k_max=128,
        methods=args.methods.split(","), less_dim=8192, seed=args.seed, dtype=args.dtype, device=args.device, max_tokens=args.max_tokens,
        reusable=True, sketch_dim=16384,  # the target-independent sketch serves bench/add_target.py (fidelity at P ≤ 16384)
    )  # fmt: skip


def in_domain(run, family: str, budget: str) -> dict:
    """Share of the target's family in each method's top-``budget`` selection, and in the pool."""
    from gist_backend.curation import available_methods, select

    is_family = (run.train["source"] == family).to_numpy()
    out = {"pool_share": float(is_family.mean()), "family": family}
    for method in available_methods(run):
        rows = select(run, method=method, budget=budget, edits=[]).rows
        out[method] = float(is_family[rows].mean()) if len(rows) else None
    return out


def in_domain_by_rank(run, family: str, budget: str) -> dict:
    """The same share for GIST and GIST-global at ranks 1, 2, 4, … k_max and at r90 / r95 (the slider's effect on retrieval)."""
    from gist_backend.curation import select

    spectrum = run.geometry()["checkpoints"][-1]["spectrum"]
    ranks = sorted({r for r in (1, 2, 4, 8, 16, 32, 64, spectrum["r90"], spectrum["r95"], run.k_max) if r <= run.k_max})
    is_family = (run.train["source"] == family).to_numpy()
    return {m: {r: float(is_family[select(run, method=m, rank=r, budget=budget, edits=[]).rows].mean()) for r in ranks}
            for m in ("gist", "gist-global")} | {"r90": spectrum["r90"], "r95": spectrum["r95"]}  # fmt: skip


def arms(run, budget: str, sweep: bool = True) -> list:
    """The selections evaluated: GIST and GIST-global at k_max, r95 and r90 (only k_max without ``sweep``), LESS, G2IS (if in the run)."""
    from gist_backend.curation import available_methods, select

    spectrum = run.geometry()["checkpoints"][-1]["spectrum"]
    ranks = sorted({run.k_max, *((min(spectrum["r95"], run.k_max), min(spectrum["r90"], run.k_max)) if sweep else ())}, reverse=True)
    out = [select(run, method=m, rank=r, budget=budget, edits=[]) for m in ("gist", "gist-global") for r in ranks]
    return out + [select(run, method=m, budget=budget, edits=[]) for m in ("less", "g2is") if m in available_methods(run)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's options (bench/add_target.py reads the same ones to find the runs)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="mmlu", choices=TARGETS)
    p.add_argument("--model", default="smollm2", help="'smollm2' (offline SmolLM2-135M-Instruct), a folder, .gguf or hub id")
    p.add_argument("--pool-size", type=int, default=2000)
    p.add_argument("--val-size", type=int, default=100)
    p.add_argument("--test-size", type=int, default=200)
    p.add_argument("--max-chars", type=int, default=900, help="longest record (characters of all messages) taken")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--budget", default="5%")
    p.add_argument("--random-seeds", type=int, default=3)
    p.add_argument("--warmup-epochs", type=int, default=1, help="the tool's default is 4; 1 keeps LESS to one pool pass on a CPU")
    p.add_argument("--methods", default="gist,less,g2is", help="methods computed; 'gist' alone makes one pool pass whatever --warmup-epochs")
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs per arm")
    p.add_argument("--lr", type=float, default=2e-4, help="fine-tuning learning rate per arm")
    p.add_argument("--ranks", default="sweep", choices=["sweep", "kmax"], help="GIST arms at k_max, r95 and r90 (sweep) or at k_max only")
    p.add_argument("--train-seeds", type=int, default=1, help="fine-tunes per arm (seeds 0..N-1), averaged: N× the fine-tuning cost")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--max-tokens", type=int, default=4096, help="padded tokens per gradient batch: memory, not results (about 2 GB per 1024 on a CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--stage", default="all", choices=["compute", "all"])
    p.add_argument("--work-dir", default=str(Path(__file__).resolve().parent / "out" / "quality"))
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def run_inputs(args: argparse.Namespace) -> tuple[dict, object, Path]:
    """(data files, compute config, run folder) of the benchmark run for ``args.target`` (the data is built if missing)."""
    work = Path(args.work_dir)
    files = build(work / "data", args.target, pool_size=args.pool_size, val_size=args.val_size, test_size=args.test_size,
                  seed=args.seed, max_chars=args.max_chars)  # fmt: skip
    config = compute_config(args, files)
    return files, config, work / f"run-{args.target}-{config.result_hash()[:8]}"


def main(argv: list[str] | None = None) -> dict:
    """Build data, compute the run, evaluate every arm; print tables and RESULT lines, write JSON."""
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from gist_backend.compute import compute
    from gist_backend.runs.store import open_run

    t0 = time.perf_counter()
    work = Path(args.work_dir)
    files, config, run_dir = run_inputs(args)
    cost_file = run_dir.with_name(run_dir.name + ".compute-cost.json")
    fresh, cpu0, wall0 = not (run_dir / "manifest.json").exists(), time.process_time(), time.perf_counter()
    compute(config, run_dir)
    if fresh and not cost_file.exists():  # the whole compute ran in this process: its cost is a fair reference
        write_json(cost_file, {"cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0, "machine": machine()})
    run = open_run(run_dir)
    print(f"run {run_dir}: pool {run.train.height}, validation {run.val.height}; compute stages (s): {run.manifest.get('timings')}", flush=True)
    out = {"bench": "quality", "machine": machine(), "options": vars(args), "run_dir": str(run_dir), "compute_timings": run.manifest.get("timings")}
    out["in_domain"] = retrieval = in_domain(run, FAMILY[args.target], args.budget)
    out["in_domain_by_rank"] = by_rank = in_domain_by_rank(run, FAMILY[args.target], args.budget)
    ranks = list(by_rank["gist"])
    print(table([[m, *(f"{100 * by_rank[m][r]:.0f} %" for r in ranks)] for m in ("gist", "gist-global")], ["rank", *ranks]))
    print(table([[m, f"{100 * v:.1f} %"] for m, v in retrieval.items() if isinstance(v, float)], ["method", f"{FAMILY[args.target]} share"]))
    headline = {"quality_in_domain_pool_share": retrieval["pool_share"]}
    headline |= {f"quality_in_domain_{m.replace('-', '_')}_share": v for m, v in retrieval.items() if isinstance(v, float) and m != "pool_share"}
    if args.stage == "all":
        from gist_backend.evaluate import EvalRecipe, evaluate, report_table

        result = evaluate(run, files["test"], arms(run, args.budget, args.ranks == "sweep"), baselines=args.random_seeds,
                          recipe=EvalRecipe.from_run(run, epochs=args.epochs, lr=args.lr), train_seeds=args.train_seeds, progress=print)  # fmt: skip
        out["evaluation"] = result
        print(report_table(result))
        for arm in result["arms"]:
            if arm["kind"] == "selection":
                key = arm["name"].replace("-", "_")
                headline[f"quality_{key}_minus_random_loss"] = arm["vs_random"]["test_loss"]["diff"]
                if arm["vs_random"].get("accuracy"):
                    headline[f"quality_{key}_minus_random_acc"] = arm["vs_random"]["accuracy"]["diff"]
    out["seconds"] = time.perf_counter() - t0
    out["headline"] = headline
    write_json(args.json or work / f"quality-{args.target}.json", out)
    print(result_lines(headline))
    return out


if __name__ == "__main__":
    main()
