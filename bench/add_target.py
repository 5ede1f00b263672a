"""Adding a target to a run against computing a fresh run for it: fidelity, speed and store size.

bench/quality.py computes one run per target over the same pool with the same warmup (seed, pool and recipe
give the same adapter: checked below by comparing the target-independent LESS sketches byte for byte), each
with ``--reusable --sketch-dim 16384``. This bench copies the base target's run (--base, MMLU) and adds the
other target (--added, ARC-Challenge) to the copy with `add-target`, once with the whole sketch and once per
smaller P through ``--sketch-dim P`` (a seeded uniform subset of the stored coordinates, which is what a run
computed with that P holds, in distribution). Against the fresh run for the added target it reports:

* fidelity: Spearman of the GIST and GIST-global scores over the pool, Jaccard of the top 5 %, and LESS's
  largest difference (exact: the same pool sketches);
* speed: CPU seconds of add-target against those of a fresh compute (written by bench/quality.py as
  ``<run>.compute-cost.json``; the added target's run, else the base run's, which did the same work on the
  same pool); CPU time, because the machine is shared;
* store: bytes per pool example of the base run with and without the reusable sketch.

Run bench/quality.py --stage compute for both targets first (options this script does not know, such as
--model or --pool-size, are passed on to bench/quality.py to find the same runs). Prints a table, RESULT
lines, and --json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import quality  # noqa: E402
from bench.common import machine, result_lines, table, write_json  # noqa: E402


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (ties averaged)."""
    from gist_backend.curation.compare import average_ranks, pearson

    return float(pearson(average_ranks(np.asarray(a, np.float64)), average_ranks(np.asarray(b, np.float64))))


def top_jaccard(a: np.ndarray, b: np.ndarray, fraction: float) -> float:
    """Jaccard overlap of the top ``fraction`` of two score vectors."""
    k = max(1, int(round(fraction * len(a))))
    top_a, top_b = set(np.argsort(-a, kind="stable")[:k].tolist()), set(np.argsort(-b, kind="stable")[:k].tolist())
    return len(top_a & top_b) / len(top_a | top_b)


def store_bytes(run_dir: Path) -> dict:
    """Bytes of the run's files per pool example, in all and for the reusable sketch alone."""
    from gist_backend.runs.store import open_run

    n = open_run(run_dir).train.height
    total = sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file())
    sketch = (run_dir / "sketches" / "gist.npy").stat().st_size
    return {"n": n, "with_reusable": total / n, "without_reusable": (total - sketch) / n, "sketch": sketch / n}


def main(argv: list[str] | None = None) -> dict:
    """Add the target at every sketch size, compare with the fresh run, print and return the figures."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="mmlu", choices=quality.TARGETS, help="the run the target is added to")
    p.add_argument("--added", default="arc_challenge", choices=quality.TARGETS, help="the target added (and computed fresh)")
    p.add_argument("--dims", default="2048,4096,8192,16384", help="sketch sizes P to try (at most the runs' --sketch-dim)")
    p.add_argument("--top", type=float, default=0.05, help="share of the pool compared by Jaccard")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work-dir", default=str(Path(__file__).resolve().parent / "out" / "quality"))
    p.add_argument("--json", default=None)
    args, quality_args = p.parse_known_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from gist_backend.curation import scores
    from gist_backend.runs.files import read_npy
    from gist_backend.runs.store import open_run
    from gist_backend.targets import add_target

    runs = {}
    for target in (args.base, args.added):
        files, _, run_dir = quality.run_inputs(quality.parse_args([*quality_args, "--target", target, "--work-dir", args.work_dir]))
        if not (run_dir / "manifest.json").exists() or open_run(run_dir).manifest.get("status") != "complete":
            raise SystemExit(f"{run_dir} is not computed: run `python bench/quality.py --target {target} --stage compute "
                             f"{' '.join(quality_args)}` first")  # fmt: skip
        runs[target] = (files, run_dir)
    (_, base_dir), (added_files, fresh_dir) = runs[args.base], runs[args.added]
    fresh, base = open_run(fresh_dir), open_run(base_dir)
    if not base.manifest.get("reusable"):
        raise SystemExit(f"{base_dir} was computed without --reusable: recompute it, or add to the other run (--base {args.added} --added {args.base})")
    full_dim = int(base.manifest["reusable"]["dim"])
    same_adapter = bool(np.array_equal(read_npy(base.paths["train_sketch"]), read_npy(fresh.paths["train_sketch"])))
    work = Path(args.work_dir) / f"add-target-{args.base}+{args.added}"
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(base_dir, work)
    rows, out = [], {"bench": "add_target", "machine": machine(), "options": vars(args), "same_adapter": same_adapter, "by_dim": {},
                     "stored_sketch_dim": full_dim}  # fmt: skip
    for dim in sorted({int(x) for x in args.dims.split(",")}, reverse=True):
        name = f"{args.added}-p{dim}"
        cpu0, wall0 = time.process_time(), time.perf_counter()
        add_target(work, [str(added_files["val"])], name, sketch_dim=None if dim >= full_dim else dim)  # all stored columns at P ≥ the store's
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        added = open_run(work, name)
        figures = {"cpu_s": cpu, "wall_s": wall}
        for method in ("gist", "gist-global"):
            a, b = np.asarray(scores(added, method), np.float64), np.asarray(scores(fresh, method), np.float64)
            figures[f"{method}_spearman"], figures[f"{method}_top_jaccard"] = spearman(a, b), top_jaccard(a, b, args.top)
        figures["less_max_abs_diff"] = float(np.max(np.abs(np.asarray(scores(added, "less")) - np.asarray(scores(fresh, "less")))))
        out["by_dim"][dim] = figures
        rows.append([dim, figures["gist_spearman"], figures["gist_top_jaccard"], figures["gist-global_spearman"],
                     figures["gist-global_top_jaccard"], figures["less_max_abs_diff"], cpu, wall])  # fmt: skip
        print(f"P={dim}: {json.dumps(figures)}", flush=True)
    # the fresh compute's own cost, else the base run's: the same pool, recipe and validation size, so the same work
    costs = [d.with_name(d.name + ".compute-cost.json") for d in (fresh_dir, base_dir)]
    cost_file = next((c for c in costs if c.exists()), costs[0])
    fresh_cost = json.loads(cost_file.read_text()) | {"file": cost_file.name} if cost_file.exists() else None
    out["fresh_compute"] = fresh_cost
    out["store"] = store = store_bytes(base_dir)
    print(table(rows, ["P", "GIST spearman", f"GIST top {args.top:.0%} jaccard", "GIST-global spearman", "GIST-global jaccard",
                       "LESS max |diff|", "add-target cpu s", "wall s"]))  # fmt: skip
    full = out["by_dim"][max(out["by_dim"])]
    headline = {f"add_target_spearman_p{d}": f["gist_spearman"] for d, f in out["by_dim"].items()}
    headline |= {f"add_target_top5_jaccard_p{d}": f["gist_top_jaccard"] for d, f in out["by_dim"].items()}
    if fresh_cost:
        headline["add_target_vs_fresh_cpu_ratio"] = full["cpu_s"] / fresh_cost["cpu_s"]
        print(f"add-target {full['cpu_s']:.0f} CPU s against a fresh compute's {fresh_cost['cpu_s']:.0f} CPU s ({cost_file.name})")
    else:
        print("no <run>.compute-cost.json: neither run was computed by bench/quality.py in one go, so there is no speed reference")
    headline |= {"store_bytes_per_example_reusable": store["with_reusable"], "store_bytes_per_example_plain": store["without_reusable"]}
    if not same_adapter:
        print("warning: the two runs' LESS sketches differ, so their adapters differ and the fidelity figures mix both effects")
    out["headline"] = headline
    write_json(args.json, out)
    print(result_lines(headline))
    return out


if __name__ == "__main__":
    main()
