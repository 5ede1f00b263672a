"""Storage: bytes per example of GIST's store against LESS's, and the fidelity of GIST's compact store.

Reference: LESS's store, 8192 dims × 4 checkpoints × fp16 = 65,536 bytes per example (17.7 GB for 270k).
GIST's store per example and GIST checkpoint is k_max unit coordinates in fp16, their norm (fp32) and the
norm of the whole gradient (fp32, for gist-global): k·2 + 8 bytes. Defaults: 1 checkpoint (the final one, as
published), k_max 128 → 264 bytes (0.40 %). With --run-dir the bytes are measured on disk.

Fidelity (--fidelity-rows N, default 50,000): a synthetic run's float32 coordinates are scored at every rank
1..k_max from float32 and from the compact store; reported are the largest absolute score difference
(goal ≤ 1e-3) and whether the top-5 % sets agree up to examples whose scores are within 1e-3 of the cut-off.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, result_lines, table, write_json  # noqa: E402

LESS_DIM, LESS_CKPTS, LESS_BYTES = 8192, 4, 2
LESS_PER_EXAMPLE = LESS_DIM * LESS_CKPTS * LESS_BYTES
TIE = 1e-3


def formula(k_max: int, checkpoints: int) -> int:
    """Bytes per example of the GIST store: per checkpoint k unit coordinates (fp16) and two fp32 norms."""
    return checkpoints * (k_max * 2 + 4 + 4)


def measured(run_dir: Path) -> dict:
    """Bytes per example of a run's GIST and LESS stores, from the files on disk."""
    from gist_backend.runs.store import describe, open_run

    run = open_run(run_dir)
    n = run.train.height
    gist_files = [run_dir / "grad_norms.npy"] + [run_dir / f"targets/{t}/{name}" for t in run.targets for name in ("gist_unit.npy", "gist_norm.npy")]
    sketch = run_dir / "sketches" / "train.npy"
    return {
        "run": str(run_dir), "pool": n, "targets": run.targets, "described": describe(run)["methods"],
        "gist_bytes_per_example": sum(p.stat().st_size for p in gist_files if p.exists()) / n,
        "less_bytes_per_example": sketch.stat().st_size / n if sketch.exists() else None,
    }  # fmt: skip


def fidelity(rows: int, k_max: int = 128, seed: int = 0) -> dict:
    """Score error and top-5 % agreement of the compact store against float32, at every rank, on a synthetic run."""
    from gist_backend.devkit.synthetic import synthetic_run
    from gist_backend.methods.gist import gist_scores
    from gist_backend.runs.store import compact_coords, open_run

    with tempfile.TemporaryDirectory(prefix="gist-storage-") as tmp:
        run = open_run(synthetic_run(Path(tmp) / "run", n_train=rows, n_val=200, k_max=k_max, n_ckpt=1, seed=seed))
        exact = np.asarray(run.train_coords, dtype=np.float32)  # the synthetic coordinates, rebuilt
        coords = exact + np.random.default_rng(seed).normal(0, 1e-3, exact.shape).astype(np.float32)  # off the fp16 grid
        unit, norms = compact_coords(coords)
        worst, mismatched, top = 0.0, [], max(1, int(round(0.05 * rows)))
        for rank in range(1, run.k_max + 1):
            full = gist_scores(coords, run.val_coords, run.val_tasks, [1.0], rank)
            compact = gist_scores(unit, run.val_coords, run.val_tasks, [1.0], rank)
            worst = max(worst, float(np.abs(full - compact).max()))
            cut = np.sort(full)[-top]
            a, b = set(np.argsort(-full, kind="stable")[:top]), set(np.argsort(-compact, kind="stable")[:top])
            if any(abs(full[i] - cut) > TIE for i in a ^ b):
                mismatched.append(rank)
    return {"rows": rows, "k_max": run.k_max, "max_abs_score_error": worst, "ranks_with_top5_mismatch_beyond_ties": mismatched}


def main(argv: list[str] | None = None) -> dict:
    """Print the table and RESULT lines; write JSON with --json."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k-max", type=int, default=128)
    p.add_argument("--checkpoints", type=int, default=1, help="GIST checkpoints (1 = the final one, the default)")
    p.add_argument("--run-dir", default=None, help="measure a finished run on disk")
    p.add_argument("--fidelity-rows", type=int, default=50_000, help="synthetic rows for the fidelity check (0: skip)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    per_example = formula(args.k_max, args.checkpoints)
    out: dict = {"bench": "storage", "machine": machine(), "less_bytes_per_example": LESS_PER_EXAMPLE,
                 "formula": {"k_max": args.k_max, "checkpoints": args.checkpoints, "bytes_per_example": per_example}}  # fmt: skip
    rows = [["formula", f"{args.checkpoints} × ({args.k_max} × fp16 + 2 × fp32)", per_example, f"{100 * per_example / LESS_PER_EXAMPLE:.3f} %",
             f"{per_example * 270_000 / 1e9:.3f}"]]  # fmt: skip
    headline = {"storage_vs_less_pct": 100 * per_example / LESS_PER_EXAMPLE}
    if args.run_dir:
        out["measured"] = measured(Path(args.run_dir))
        bpe = out["measured"]["gist_bytes_per_example"]
        rows.append([f"run {Path(args.run_dir).name}", "GIST files on disk / pool size", round(bpe, 1), f"{100 * bpe / LESS_PER_EXAMPLE:.3f} %",
                     f"{bpe * 270_000 / 1e9:.3f}"])  # fmt: skip
        headline["storage_vs_less_pct"] = 100 * bpe / LESS_PER_EXAMPLE
    print(table(rows, ["store", "what", "bytes / example", "of LESS's 65,536 B", "GB at 270k"]))
    if args.fidelity_rows:
        out["fidelity"] = fid = fidelity(args.fidelity_rows, args.k_max)
        print(f"compact store vs float32 on {fid['rows']:,} synthetic rows, ranks 1..{fid['k_max']}: max |score error| "
              f"{fid['max_abs_score_error']:.2e} (goal ≤ 1e-3); top-5 % sets differ beyond ties of {TIE} at ranks: "
              f"{fid['ranks_with_top5_mismatch_beyond_ties'] or 'none'}")  # fmt: skip
        headline["compact_max_score_error"] = fid["max_abs_score_error"]
        headline["compact_top5_mismatched_ranks"] = len(fid["ranks_with_top5_mismatch_beyond_ties"])
    out["headline"] = headline
    if args.json:
        write_json(args.json, out)
    print(result_lines(headline))
    return out


if __name__ == "__main__":
    main()
