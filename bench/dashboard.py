"""Interactivity: what the dashboard's actions cost on synthetic runs of 50k and 270k examples.

For each pool size a complete synthetic run (``synthetic.synthetic_run``: real run format, k_max coordinates
per checkpoint) is written once (reused when the same one is already there), then in this process:
  open       ``runs.open_run`` (manifest, tables, memory-mapped coordinates)
  rescore    ``scoring.scores(run, "gist", rank)`` at a new rank + ``scoring.ranking`` (the rank slider)
  edit       ``curation.add_edit`` (persist one exclude of 10 ids) and then ``selection.select`` with
             the edit log at a 5% budget (what the curator sees after clicking)
  select     ``selection.select`` GIST at a 5% budget with a per-source cap (no new edit)
  umap       ``maps.umap_map`` at one rank: first (computed: UMAP fitted on at most ``maps.FIT_SAMPLE`` points, the rest
             placed from their fitted neighbours; the numba JIT is warmed up beforehand on a 5k-point run and reported
             separately) and cached (read back)
What the browser shows for these actions is timed by ``bench/dashboard_browser.py``.
Times are medians over --repeats (first call reported separately where it differs: cold caches).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, median, result_lines, table, write_json
from gist_backend.curation.edits import add_edit, load_edits
from gist_backend.runs import open_run
from gist_backend.curation.scoring import ranking, scores
from gist_backend.curation import select
from gist_backend.devkit.synthetic import synthetic_run


def clock(fn, repeats: int) -> tuple[float, float, object]:
    """(first call s, median of the next `repeats` calls s, last result)."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    rest = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        rest.append(time.perf_counter() - t0)
    return first, median(rest) if rest else first, out


def ensure_run(run_dir: Path, n: int, n_val: int, k_max: int, n_ckpt: int) -> tuple[float | None, bool]:
    """(seconds to build, reused?) of a synthetic run with these parameters at run_dir."""
    manifest = run_dir / "manifest.json"
    if manifest.exists():
        syn = json.loads(manifest.read_text()).get("config", {}).get("synthetic", {})
        if syn.get("n_train") == n and syn.get("n_val") == n_val and syn.get("n_ckpt") == n_ckpt and json.loads(manifest.read_text()).get("k_max") == k_max:
            return None, True
    t0 = time.perf_counter()
    synthetic_run(run_dir, n_train=n, n_val=n_val, k_max=k_max, n_ckpt=n_ckpt, seed=0, overwrite=True)
    return time.perf_counter() - t0, False


def bench_size(run_dir: Path, n: int, args) -> dict:
    """All timings for one pool size."""
    build_s, reused = ensure_run(run_dir, n, args.n_val, args.k_max, args.n_ckpt)
    (run_dir / "edits.json").unlink(missing_ok=True)
    shutil.rmtree(run_dir / "maps", ignore_errors=True)
    out: dict = {"n": n, "k_max": args.k_max, "n_ckpt": args.n_ckpt, "build_s": build_s, "reused_run": reused}
    out["open_first_s"], out["open_s"], run = clock(lambda: open_run(run_dir), args.repeats)
    ranks = [r for r in (args.k_max // 2, args.k_max // 4, 16, args.k_max) if 1 <= r <= run.k_max]
    first = []
    for r in ranks:  # each rank once: a new rank each time, as when dragging the slider
        t0 = time.perf_counter()
        ranking(scores(run, "gist", r))
        first.append(time.perf_counter() - t0)
    out["rescore_first_s"] = first[0]
    out["rescore_s"] = median(first[1:] or first)
    out["rescore_ranks"] = ranks
    budget = "5%"
    out["select_first_s"], out["select_s"], sel = clock(lambda: select(run, method="gist", rank=ranks[0], budget=budget, per_source_cap=0.5, edits=[]), args.repeats)
    victims = iter(sel.ids)
    add_times, apply_times = [], []
    for _ in range(max(1, args.repeats)):
        batch = [next(victims) for _ in range(10)]
        t0 = time.perf_counter()
        add_edit(run, "exclude", batch, {"kind": "api", "detail": "bench"})
        t1 = time.perf_counter()
        after = select(run, method="gist", rank=ranks[0], budget=budget, per_source_cap=0.5, edits=load_edits(run))
        t2 = time.perf_counter()
        add_times.append(t1 - t0)
        apply_times.append(t2 - t1)
        assert not set(batch) & set(after.ids)
    out["add_edit_s"] = median(add_times)
    out["select_with_edits_s"] = median(apply_times)
    out["edit_total_s"] = out["add_edit_s"] + out["select_with_edits_s"]
    out["n_selected"] = len(sel.ids)
    if args.skip_umap_above is not None and n > args.skip_umap_above:
        out["umap"] = f"skipped (n {n:,} > --skip-umap-above {args.skip_umap_above:,})"
        out["umap_first_s"] = out["umap_cached_s"] = None
    else:
        from gist_backend.curation.maps import umap_map

        t0 = time.perf_counter()
        umap_map(run, args.umap_rank)
        out["umap_first_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        umap_map(run, args.umap_rank)
        out["umap_cached_s"] = time.perf_counter() - t0
        from gist_backend.curation.maps import FIT_SAMPLE

        out["umap"] = f"rank {args.umap_rank}, fitted on min(n, {FIT_SAMPLE:,}) points, the rest placed from their fitted neighbours"
    return out


def umap_jit_warmup(work: Path) -> float:
    """Seconds for a first UMAP on a 5k run (numba compilation of the NN-descent path), so the per-size figures exclude it."""
    from gist_backend.curation.maps import umap_map

    run_dir = work / "jit-warmup"
    synthetic_run(run_dir, n_train=5000, n_val=20, k_max=16, n_ckpt=1, overwrite=True)
    shutil.rmtree(run_dir / "maps", ignore_errors=True)
    t0 = time.perf_counter()
    umap_map(open_run(run_dir), 8)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    """Run the interactivity benchmark; prints the table, JSON and RESULT lines."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="50000,270000", help="comma-separated pool sizes")
    p.add_argument("--k-max", type=int, default=128)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--n-ckpt", type=int, default=2, help="checkpoints per run (coordinates are C × N × k_max fp32)")
    p.add_argument("--umap-rank", type=int, default=32)
    p.add_argument("--skip-umap-above", type=int, default=None, help="skip UMAP for pools larger than this")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work-dir", help="where the synthetic runs live (kept and reused); default a temporary folder, removed")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gist-bench-dashboard-"))
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    jit = None
    try:
        if args.skip_umap_above is None or any(n <= args.skip_umap_above for n in sizes):
            jit = umap_jit_warmup(work)
        for n in sizes:
            r = bench_size(work / f"synthetic-{n}-k{args.k_max}-c{args.n_ckpt}", n, args)
            results.append(r)
            built = "reused run" if r["reused_run"] else f"built in {r['build_s']:.1f} s"
            print(f"n={n:,}: done ({built})", flush=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    rows = []
    for r in results:
        rows.append([f"{r['n']:,}", r["open_s"], r["rescore_s"], r["select_s"], r["add_edit_s"], r["select_with_edits_s"], r["umap_first_s"], r["umap_cached_s"]])
    print(f"runs: k_max {args.k_max}, {args.n_ckpt} checkpoint(s), {args.n_val} validation examples; medians in seconds")
    print(table(rows, ["pool", "open run", "rescore@new rank", "select 5%", "add edit", "select w/ edits", "UMAP first", "UMAP cached"]))
    for r in results:
        if isinstance(r["umap"], str) and r["umap"].startswith("skipped"):
            print(f"UMAP {r['umap']}")
    if jit is not None:
        print(f"UMAP warm-up (numba JIT + a 5k-point map, once per process): {jit:.1f} s, not included above")
    out = {"bench": "dashboard", "machine": machine(), "sizes": results, "umap_jit_warmup_s": jit, "k_max": args.k_max, "n_ckpt": args.n_ckpt}
    write_json(args.json, out)
    headline = {}
    for r in results:
        tag = f"{r['n'] // 1000}k"
        headline[f"dashboard_rescore_s_{tag}"] = r["rescore_s"]
        headline[f"dashboard_edit_s_{tag}"] = r["edit_total_s"]
        headline[f"dashboard_open_s_{tag}"] = r["open_s"]
        if r["umap_first_s"] is not None:
            headline[f"dashboard_umap_first_s_{tag}"] = r["umap_first_s"]
            headline[f"dashboard_umap_cached_s_{tag}"] = r["umap_cached_s"]
    print(result_lines(headline))
    return out


if __name__ == "__main__":
    main()
