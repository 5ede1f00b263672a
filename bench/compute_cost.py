"""Compute cost of GIST as published against GIST + LESS, on the same pool, in one script run.

Two computes with the tool's defaults (4 warmup epochs on 5 % of the pool): `--methods gist` makes one pass
over the pool (GIST uses the final checkpoint), `--methods gist,less` one per warmup epoch (LESS uses every
checkpoint, and GIST's coordinates come from the last pass). Reported: wall time of each, their ratio
(`RESULT compute_gist_vs_gist_less`, GIST claims 25 %), the pool-pass time ratio, and gradient_passes.

    python bench/compute_cost.py                         # tiny random Llama, seconds on a CPU
    python bench/compute_cost.py --model smollm2 --pool-size 64   # SmolLM2-135M-Instruct (offline)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, result_lines, table, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    """Run both computes and print the ratios."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="'tiny' (random Llama), 'smollm2', or a model folder / hub id")
    p.add_argument("--pool-size", type=int, default=200)
    p.add_argument("--val-size", type=int, default=20)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--warmup-epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="alternating rounds of the two arms (medians reported)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import torch

    from gist_backend.compute import compute
    from gist_backend.config import ComputeConfig
    from gist_backend.devkit.tiny import make_tiny_model, make_toy_data
    from gist_backend.runs.store import open_run

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="gist-cost-"))
    try:
        if args.model == "tiny":
            model = str(make_tiny_model(work / "model", hidden=64, layers=2))
        elif args.model == "smollm2":
            from gist_backend.engine.model import smollm2_gguf

            model = str(smollm2_gguf())
        else:
            model = args.model
        pool, val = make_toy_data(work / "data", n_train=args.pool_size, n_val=args.val_size)
        out = {"bench": "compute_cost", "machine": machine(), "options": vars(args), "rounds": []}
        for r in range(args.repeats):
            for methods in (["gist"], ["gist", "less"]):
                config = ComputeConfig(model=model, train=[str(pool)], val=[str(val)], methods=methods, warmup_epochs=args.warmup_epochs,
                                       warmup_batch=8, max_len=args.max_len, less_dim=1024)  # fmt: skip
                t0, c0 = time.perf_counter(), time.process_time()
                run = open_run(compute(config, work / f"{'-'.join(methods)}-{r}"))
                out["rounds"].append({"methods": ",".join(methods), "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                                      "timings": run.manifest["timings"], "gradient_passes": run.manifest["gradient_passes"]})  # fmt: skip
        med = {m: {k: statistics.median(x[k] if k != "pool_s" else x["timings"]["pool"] for x in out["rounds"] if x["methods"] == m)
                   for k in ("wall_s", "cpu_s", "pool_s")} for m in ("gist", "gist,less")}  # fmt: skip
        passes = {x["methods"]: x["gradient_passes"] for x in out["rounds"]}
        print(table([[m, passes[m], f"{v['cpu_s']:.1f}", f"{v['wall_s']:.1f}", f"{v['pool_s']:.1f}"] for m, v in med.items()],
                    ["methods", "pool passes", "CPU s", "wall s", "pool passes s (wall)"]))  # fmt: skip
        gist, both = med["gist"], med["gist,less"]
        out["median"] = med
        headline = {"compute_gist_vs_gist_less": gist["cpu_s"] / both["cpu_s"], "compute_gist_vs_gist_less_wall": gist["wall_s"] / both["wall_s"],
                    "compute_pool_pass_gist_vs_gist_less": gist["pool_s"] / both["pool_s"], "compute_gist_gradient_passes": passes["gist"]}  # fmt: skip
        out["headline"] = headline
        if args.json:
            write_json(args.json, out)
        print(result_lines(headline))
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
