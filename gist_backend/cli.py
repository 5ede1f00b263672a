"""`gist-curate`: the command-line twin of every dashboard action."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path


def _budget(text: str) -> int | float | str:
    """'500' → count, '0.05' or '5%' → fraction."""
    if text.endswith("%"):
        return text
    return float(text) if "." in text or "e" in text.lower() else int(text)


def _add_run_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="run directory (e.g. cache/my-run)")


def _add_scoring(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="gist", choices=["gist", "less", "g2is", "random"])
    p.add_argument("--rank", type=int, default=None, help="GIST rank r (1..k_max; default k_max)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (kept separate so the docs and tests can inspect it)."""
    parser = argparse.ArgumentParser(prog="gist-curate", description="Targeted instruction-data selection by gradient geometry.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compute", help="compute a run: gradients, subspace, coordinates (resumable)")
    p.add_argument("--model", required=True, help="hub id, local model folder, or .gguf file")
    p.add_argument("--train", required=True, nargs="+", help="pool file(s): JSONL, JSON, Parquet or saved HF dataset folder (folder:split)")
    p.add_argument("--val", required=True, nargs="+", help="validation (target task) file(s); optional `task` field per record")
    _add_run_dir(p)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-targets", default=None, help="comma-separated module names (default q,k,v,o projections)")
    p.add_argument("--adapter", default=None, help="existing peft LoRA adapter folder to use instead of a warmup")
    p.add_argument("--no-warmup", action="store_true", help="use a fresh adapter with B ~ N(0, small) instead of warmup training")
    p.add_argument("--warmup-fraction", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=int, default=4)
    p.add_argument("--warmup-lr", type=float, default=2e-5)
    p.add_argument("--warmup-batch", type=int, default=32)
    p.add_argument("--k-max", type=int, default=128)
    p.add_argument("--methods", default="gist", help="comma-separated: gist,less,g2is")
    p.add_argument("--less-dim", type=int, default=8192, help="random projection size for LESS/G2IS sketches")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=8192, help="padded tokens per gradient batch")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=2048, help="examples per resumable shard")
    p.add_argument("--memory-budget-gb", type=float, default=2.0, help="validation gradients beyond this spill to disk")
    p.add_argument("--dump-full-grads", default=None, metavar="DIR", help="also write full gradients and examples (small d only)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing run in --run-dir")

    p = sub.add_parser("scores", help="write id,score CSV")
    _add_run_dir(p)
    _add_scoring(p)
    p.add_argument("--out", required=True)

    p = sub.add_parser("select", help="select a budget and export the original records as JSONL")
    _add_run_dir(p)
    _add_scoring(p)
    p.add_argument("--budget", required=True, type=_budget, help="count (500) or fraction (0.05 or 5%%)")
    p.add_argument("--per-source-cap", type=_budget, default=None, help="max count (or fraction of the budget) per source")
    p.add_argument("--out", required=True)
    p.add_argument("--with-meta", action="store_true", help="add a _gist field (score, rank, method) to each record")

    p = sub.add_parser("edit", help="include / exclude / reset ids, or undo the last edit")
    _add_run_dir(p)
    p.add_argument("op", choices=["include", "exclude", "reset", "undo", "list"])
    p.add_argument("ids", nargs="*", help="example ids (or --ids-file)")
    p.add_argument("--ids-file", default=None, help="file with one id per line")

    p = sub.add_parser("compare", help="overlap and correlation of methods at one budget")
    _add_run_dir(p)
    p.add_argument("--budget", required=True, type=_budget)
    p.add_argument("--rank", type=int, default=None)

    p = sub.add_parser("info", help="human summary of a run: spectrum, coupling, top examples")
    _add_run_dir(p)
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--top", type=int, default=10)

    p = sub.add_parser("demo", help="build the offline demo data, compute a run with SmolLM2-135M, open the dashboard")
    p.add_argument("--run-dir", default="cache/demo")
    p.add_argument("--no-serve", action="store_true", help="stop after the run instead of opening the dashboard")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--pool-size", type=int, default=200, help="demo pool size (about 1 s per example on a 2-core CPU)")
    p.add_argument("--methods", default="gist,less,g2is")

    p = sub.add_parser("serve", help="open the dashboard (127.0.0.1) on a run")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--address", default="127.0.0.1", help="bind address (default loopback only)")
    return parser


def cmd_compute(args: argparse.Namespace) -> None:
    from .compute import ComputeConfig, compute

    config = ComputeConfig(
        model=args.model, train=list(args.train), val=list(args.val), max_len=args.max_len,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_targets=args.lora_targets.split(",") if args.lora_targets else None, adapter=args.adapter,
        warmup=not args.no_warmup, warmup_fraction=args.warmup_fraction, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, warmup_batch=args.warmup_batch, k_max=args.k_max,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()], less_dim=args.less_dim, seed=args.seed,
        dtype=args.dtype, device=args.device, max_tokens=args.max_tokens, max_batch=args.max_batch,
        shard_size=args.shard_size, memory_budget_gb=args.memory_budget_gb,
    )  # fmt: skip
    run_dir = compute(config, args.run_dir, dump_full_grads=args.dump_full_grads, overwrite=args.overwrite)
    print(f"run complete: {run_dir}\nnext: gist-curate info --run-dir {run_dir}")


def cmd_scores(args: argparse.Namespace) -> None:
    from .runs import open_run
    from .scoring import scores

    run = open_run(args.run_dir)
    values = scores(run, args.method, args.rank, seed=args.seed)
    with open(args.out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "score"])
        writer.writerows(zip(run.train["id"].to_list(), (f"{v:.8g}" for v in values)))
    print(f"wrote {len(values)} scores to {args.out}")


def cmd_select(args: argparse.Namespace) -> None:
    from .runs import open_run
    from .selection import export_jsonl, select

    run = open_run(args.run_dir)
    selection = select(run, method=args.method, rank=args.rank, budget=args.budget, per_source_cap=args.per_source_cap, seed=args.seed)
    manifest = export_jsonl(run, selection, args.out, with_meta=args.with_meta)
    print(f"selected {len(selection.ids)} of {run.train.height} examples ({args.method}) → {args.out} (manifest {manifest})")


def cmd_edit(args: argparse.Namespace) -> None:
    from .curation import add_edit, load_edits, undo
    from .runs import open_run

    if args.op == "list":
        for e in load_edits(args.run_dir):
            print(f"{e['time']}  {e['op']:<8} {len(e['ids']):>6} ids  from {e['origin'].get('kind')}: {e['origin'].get('detail')}")
        return
    if args.op == "undo":
        edits = undo(args.run_dir)
        print(f"undone; {len(edits)} edits remain")
        return
    ids = list(args.ids)
    if args.ids_file:
        ids += [line.strip() for line in Path(args.ids_file).read_text().splitlines() if line.strip()]
    if not ids:
        raise SystemExit("give ids as arguments or with --ids-file")
    open_run(args.run_dir)  # validates the run before writing to it
    edits = add_edit(args.run_dir, args.op, ids, {"kind": "cli", "detail": " ".join(sys.argv[1:])[:200]})
    print(f"{args.op}: {len(ids)} ids; {len(edits)} edits in total")


def cmd_compare(args: argparse.Namespace) -> None:
    from .runs import open_run
    from .selection import compare

    report = compare(open_run(args.run_dir), args.budget, rank=args.rank)
    print(json.dumps(report, indent=2, default=str))


def cmd_info(args: argparse.Namespace) -> None:
    from .runs import open_run
    from .scoring import ranking, scores

    run = open_run(args.run_dir)
    m = run.manifest
    geometry = run.geometry()["checkpoints"]
    print(f"run {run.path}  ({m.get('status')}, created {m.get('created')})")
    print(f"model {m['config']['model']}   methods {', '.join(run.methods)}   d = {m.get('d')}   k_max = {run.k_max}")
    print(f"pool {run.train.height} examples, validation {run.val.height} in {len(set(run.val_tasks))} sub-tasks, {m.get('bad_records', 0)} bad records skipped")
    print("checkpoints: " + ", ".join(f"{c['name']} (w={c['weight']:.3f})" for c in m.get("checkpoints", [])))
    for ckpt in geometry:
        spec = ckpt["spectrum"]
        sigma = ", ".join(f"{s:.3g}" for s in spec["sigma"][:8])
        print(f"[{ckpt['name']}] σ: {sigma}{' …' if len(spec['sigma']) > 8 else ''}   r90/r95/r99 = {spec['r90']}/{spec['r95']}/{spec['r99']}   ρ = {ckpt['rho']:.3f}")
    worst = sorted(geometry[-1]["rho_per_module"].items(), key=lambda kv: kv[1])
    if worst:
        print(f"per-module ρ (last checkpoint): min {worst[0][1]:.3f} ({worst[0][0]}), max {worst[-1][1]:.3f} ({worst[-1][0]})")
    rank = args.rank or run.k_max
    values = scores(run, "gist", rank)
    order = ranking(values)[: args.top]
    print(f"\ntop {len(order)} examples by GIST at rank {rank}:")
    for position, row in enumerate(order, 1):
        text = run.train["text"][int(row)].replace("\n", " ")
        print(f"{position:>3}. {values[row]:+.4f}  [{run.train['source'][int(row)]}] {text[:100]}")
    timings = m.get("timings", {})
    if timings:
        print("\ntimings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))


def dashboard_app() -> Path:
    """Path of the Streamlit entry script, wherever the package is installed."""
    spec = importlib.util.find_spec("dashboard")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the dashboard package is not installed; run `pip install -e .` in the repository")
    return Path(list(spec.submodule_search_locations)[0]) / "app.py"


def serve(run_dir: str | None, port: int = 8501, address: str = "127.0.0.1") -> int:
    """Run the dashboard in the foreground (Ctrl-C stops it)."""
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(dashboard_app()),
        "--server.headless", "true", "--server.address", address, "--server.port", str(port),
        "--browser.gatherUsageStats", "false",
    ]  # fmt: skip
    if run_dir:
        cmd += ["--", "--run-dir", str(Path(run_dir).resolve())]
    print(f"dashboard: http://{address}:{port}  (Ctrl-C to stop)")
    return subprocess.call(cmd)


def cmd_serve(args: argparse.Namespace) -> None:
    raise SystemExit(serve(args.run_dir, args.port, args.address))


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_dir = run_demo(Path(args.run_dir), pool_size=args.pool_size, methods=args.methods.split(","))
    cmd_info(argparse.Namespace(run_dir=str(run_dir), rank=None, top=10))
    if not args.no_serve:
        raise SystemExit(serve(str(run_dir), args.port))


COMMANDS = {
    "compute": cmd_compute, "scores": cmd_scores, "select": cmd_select, "edit": cmd_edit,
    "compare": cmd_compare, "info": cmd_info, "demo": cmd_demo, "serve": cmd_serve,
}  # fmt: skip


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Entry point of `gist-curate`."""
    from .data import DataError
    from .runs import RunError

    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a cancel from the dashboard ends like Ctrl-C
    torch_threads = os.environ.get("GIST_TORCH_THREADS")
    if torch_threads:
        import torch

        torch.set_num_threads(int(torch_threads))
    try:
        COMMANDS[args.command](args)
    except (DataError, RunError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
