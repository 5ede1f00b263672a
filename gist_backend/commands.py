"""What each `gist-curate` command does (the parser is in ``cli``); each is a thin call into the library."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from .cli import config_from_args, json_dump
from .config import METHOD_LABELS, check_rank
from .runs.lock import RunLocked


def cmd_compute(args: argparse.Namespace) -> None:
    from .compute import compute

    run_dir = compute(config_from_args(args), args.run_dir, dump_full_grads=args.dump_full_grads, overwrite=args.overwrite)
    if not args.no_map and os.environ.get("GIST_MAP_AFTER_COMPUTE", "1") != "0":
        start_map(run_dir)
    print(f"run complete: {run_dir}\nnext: gist-curate info --run-dir {run_dir}")


def start_map(run_dir: Path) -> None:
    """Compute the Map view's UMAP (rank k_max) in a background process, so the first visit to the Map finds it ready."""
    with open(Path(run_dir) / "map.log", "ab") as log:  # the child keeps its own copy of the handle
        proc = subprocess.Popen([sys.executable, "-m", "gist_backend.cli", "map", "--run-dir", str(run_dir)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    (Path(run_dir) / "map.pid").write_text(str(proc.pid))
    print(f"computing the Map view's UMAP in the background (pid {proc.pid}; log {Path(run_dir) / 'map.log'})")


def cmd_add_target(args: argparse.Namespace) -> None:
    from .compute import Progress
    from .runs.manifest import read_manifest
    from .targets import add_target

    progress = Progress(Path(args.run_dir), file="add-target.progress.json")
    try:
        run_dir = add_target(args.run_dir, list(args.val), args.name, device=args.device, max_tokens=args.max_tokens,
                             sketch_dim=args.sketch_dim, progress=progress)  # fmt: skip
    except RunLocked:
        raise  # the progress file is the running writer's: leave it alone
    except BaseException as err:
        progress.finish("cancelled" if isinstance(err, KeyboardInterrupt) else "failed", f"{type(err).__name__}: {err}")
        raise
    progress.finish("complete", None)
    skipped = (read_manifest(run_dir).get("bad_records_by_target") or {}).get(args.name)
    if skipped:
        print(f"{skipped} validation record(s) skipped: see {run_dir / 'bad_records.jsonl'} (file, line and reason)")
    print(f"target {args.name!r} added to {run_dir}\nnext: gist-curate info --run-dir {run_dir} --target {args.name}")


def cmd_map(args: argparse.Namespace) -> None:
    from .compute import Progress
    from .curation.maps import umap_map
    from .runs.lock import run_lock
    from .runs.store import open_run

    run = open_run(args.run_dir, args.target)
    rank = check_rank(args.rank, run.k_max)
    progress = Progress(run.path / "maps", file="progress.json")
    with run_lock(run.path, "maps", "gist-curate map"):
        progress("UMAP map", 0, 1, force=True)
        try:
            umap_map(run, rank)
        except BaseException as err:
            progress.finish("cancelled" if isinstance(err, KeyboardInterrupt) else "failed", f"{type(err).__name__}: {err}")
            raise
        progress.finish("complete", None)
    print(f"map of {run.path} (target {run.target}) at rank {rank} cached in {run.path / 'maps'}")


def cmd_scores(args: argparse.Namespace) -> None:
    from .curation.export import check_output
    from .curation.scoring import scores
    from .runs.files import atomic_path
    from .runs.store import open_run

    run = open_run(args.run_dir, args.target)
    out = check_output(run, args.out, force=args.force, sidecar=False)
    values = scores(run, args.method, args.rank, seed=args.seed)
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id", "score"])
        writer.writerows(zip(run.train["id"].to_list(), (f"{v:.8g}" for v in values)))
    print(f"wrote {len(values)} {METHOD_LABELS[args.method]} scores ({run.target}) to {out}")


def cmd_select(args: argparse.Namespace) -> None:
    from .curation.export import changed_inputs, export_jsonl
    from .curation.selection import select
    from .runs.store import open_run

    run = open_run(args.run_dir, args.target)
    selection = select(run, method=args.method, rank=args.rank, budget=args.budget, per_source_cap=args.per_source_cap, seed=args.seed,
                       g2is_orientation=args.g2is_orientation)  # fmt: skip
    manifest = export_jsonl(run, selection, args.out, with_meta=args.with_meta, force=args.force)
    for warning in selection.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    shortfall = f"; G2IS shortfall {selection.shortfall} (not filled)" if selection.shortfall else ""
    print(f"selected {len(selection.ids)} of {run.train.height} examples ({args.method}, target {run.target}{shortfall}) → {args.out}\n"
          f"records copied from the run (as read at compute time); manifest {manifest}")  # fmt: skip
    for path in changed_inputs(run):
        print(f"note: {path} changed since the run was computed; the export holds its records as they were then", file=sys.stderr)


def cmd_combine(args: argparse.Namespace) -> None:
    from .curation.combine import Part, combine
    from .curation.export import export_jsonl
    from .runs.store import open_run

    parts = [Part.parse(text) for text in args.part]
    selection = combine(args.run_dir, parts, args.budget, mode=args.mode)
    manifest = export_jsonl(open_run(args.run_dir, parts[0].target), selection, args.out, with_meta=args.with_meta, force=args.force)
    for warning in selection.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    shares = ", ".join(f"{p['target']} {p['count']} ({p['method']}" + (f" r{p['rank']}" if p["rank"] else "") + ")" for p in selection.info["parts"])
    print(f"selected {len(selection.ids)} examples ({args.mode}: {shares}) → {args.out} (manifest {manifest})")


def cmd_edit(args: argparse.Namespace) -> None:
    from .curation.edits import add_edit, load_edits, undo
    from .runs.store import open_run

    if args.op == "list":
        for e in load_edits(args.run_dir):
            scope = f" [{e['target']}]" if e.get("target") else ""
            print(f"{e['time']}  {e['op']:<8} {len(e['ids']):>6} ids{scope}  from {e['origin'].get('kind')}: {e['origin'].get('detail')}")
        return
    if args.op == "undo":
        if not load_edits(args.run_dir):
            raise ValueError(f"nothing to undo: run {args.run_dir} has no curation edits")
        print(f"undone; {len(undo(args.run_dir))} edits remain")
        return
    ids = list(args.ids)
    if args.ids_file:
        ids += [line.strip() for line in Path(args.ids_file).read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError("give ids as arguments or with --ids-file")
    run = open_run(args.run_dir, args.target)  # validates the run and the ids before writing to it
    edits = add_edit(run, args.op, ids, {"kind": "cli", "detail": " ".join(sys.argv[1:])[:200]}, target=run.target if args.only_target else None)
    print(f"{args.op}: {len(ids)} ids{' for target ' + run.target if args.only_target else ''}; {len(edits)} edits in total")


def cmd_compare(args: argparse.Namespace) -> None:
    from .curation.compare import compare, compare_targets
    from .runs.store import open_run

    if args.across_targets:
        targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
        print(json_dump(compare_targets(args.run_dir, args.budget, targets, method=args.method, rank=args.rank)))
    else:
        print(json_dump(compare(open_run(args.run_dir, args.target), args.budget, rank=args.rank)))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .compute import Progress
    from .curation.selection import select
    from .curation.export import check_output
    from .evaluate import EvalRecipe, evaluate, report_table, selection_from_file
    from .runs.store import open_run

    run = open_run(args.run_dir, args.target)
    own_inputs = [p for p in (args.test, args.selection) if p]
    if args.json:
        check_output(run, args.json, force=args.force, sidecar=False, also_inputs=own_inputs)  # before hours of fine-tuning, not after
    if args.selection:
        if args.budget is not None or args.rank is not None or args.method != "gist" or args.per_source_cap is not None:
            raise ValueError("give either --selection FILE.jsonl or --method/--rank/--budget/--per-source-cap, not both")
        selection = selection_from_file(run, args.selection)
    elif args.budget is None:
        raise ValueError("give --budget (with --method and --rank) or --selection FILE.jsonl")
    else:
        selection = [select(run, method=args.method, rank=args.rank, budget=b, per_source_cap=args.per_source_cap, seed=args.seed) for b in args.budget]
    progress = Progress(run.path / "evals", file="progress.json")
    try:
        result = evaluate(run, args.test, selection, baselines=args.baselines, recipe=EvalRecipe.from_run(run, epochs=args.epochs, lr=args.lr),
                          train_seeds=args.train_seeds, device=args.device, dtype=args.dtype, progress=progress)  # fmt: skip
    except RunLocked:
        raise  # the progress file is the running evaluation's: leave it alone
    except BaseException as err:
        progress.finish("cancelled" if isinstance(err, KeyboardInterrupt) else "failed", f"{type(err).__name__}: {err}")
        raise
    progress.finish("complete", None)
    print(report_table(result))
    if result["runs_reused"]:
        print(f"{result['runs_reused']} of {result['runs_reused'] + result['runs_computed']} fine-tunes and scorings were reused from "
              f"{run.path / 'evals' / 'arms'} (same model, recipe, training examples and test file)")  # fmt: skip
    print(f"stored in {run.path / 'evals' / (result['id'] + '.json')}")
    if args.json:
        from .runs.files import write_json

        write_json(check_output(run, args.json, force=True, sidecar=False, also_inputs=own_inputs), result)


def _print_unfinished(run_dir: Path) -> bool:
    """For scripts: a run still computing, stopped, failed or cancelled as one JSON object (True), else nothing (False)."""
    from .runs.files import read_json
    from .runs.lock import holder_alive
    from .runs.manifest import read_manifest

    manifest = read_manifest(run_dir)  # not a run, or a damaged one: the usual error
    status = manifest.get("status")
    if status == "complete":
        return False
    if status == "running" and not holder_alive(run_dir, "run"):
        status = "stopped"  # its process died: the same compute command resumes it
    progress = read_json(run_dir / "progress.json") if (run_dir / "progress.json").exists() else None
    print(json_dump({"run": str(run_dir), "status": status, "error": manifest.get("error"), "created": manifest.get("created"),
                     "format_version": manifest.get("version"), "progress": progress, "timings": manifest.get("timings", {})}))  # fmt: skip
    return True


def cmd_info(args: argparse.Namespace) -> None:
    from .curation.scoring import ranking, scores
    from .runs.store import describe, open_run

    if args.json and _print_unfinished(Path(args.run_dir)):
        return
    run = open_run(args.run_dir, args.target)
    rank = check_rank(args.rank, run.k_max)
    facts = describe(run)
    if args.json:
        print(json_dump(facts))
        return
    m = run.manifest
    print(f"run {run.path}  ({m.get('status')}, created {m.get('created')}, format {facts['format_version']})")
    print(f"model {facts['model']}   d = {facts['d']}   k_max = {run.k_max}   gradient passes over the pool: {facts['gradient_passes']}")
    print(f"pool {run.train.height} examples; target {run.target!r} ({run.val.height} validation examples in {len(set(run.val_tasks))} sub-tasks)"
          + (f"; other targets: {', '.join(t for t in run.targets if t != run.target)}" if len(run.targets) > 1 else ""))  # fmt: skip
    for name, method in facts["methods"].items():
        print(f"  {METHOD_LABELS[name]:<12} checkpoints {', '.join(method['checkpoints'])}; {method['bytes_per_example']:,} B per example")
    for ckpt in run.geometry()["checkpoints"]:
        spec = ckpt["spectrum"]
        sigma = ", ".join(f"{s:.3g}" for s in spec["sigma"][:8])
        print(f"[{ckpt['name']}] σ: {sigma}{' …' if len(spec['sigma']) > 8 else ''}   r90/r95/r99 = {spec['r90']}/{spec['r95']}/{spec['r99']}   ρ = {ckpt['rho']:.3f}")
    for warning in facts["warnings"]:
        print(f"warning: {warning}")
    values = scores(run, "gist", rank)
    order = ranking(values)[: args.top]
    print(f"\ntop {len(order)} examples by GIST at rank {rank}:")
    texts = run.text.gather(order).to_list()
    for position, (row, text) in enumerate(zip(order, texts), 1):
        print(f"{position:>3}. {values[row]:+.4f}  [{run.train['source'][int(row)]}] {text.replace(chr(10), ' ')[:100]}")
    if facts["timings"]:
        print("\ntimings: " + ", ".join(f"{k} {v:.1f}s" for k, v in facts["timings"].items()))


def dashboard_dir() -> Path:
    """Folder of the dashboard package, wherever it is installed."""
    spec = importlib.util.find_spec("dashboard")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the dashboard package is not installed; run `pip install -e .` in the repository")
    return Path(list(spec.submodule_search_locations)[0])


def serve(run_dir: str | None, port: int = 8501, address: str = "127.0.0.1", allow_hosts: list[str] | None = None) -> int:
    """Run the dashboard in the foreground (Ctrl-C stops it); its settings apply wherever it is started."""
    if run_dir and not Path(run_dir).is_dir():
        raise FileNotFoundError(f"no run folder {run_dir}; give an existing --run-dir, or leave it out and open a run on the Runs page")
    _check_port_free(address, port)
    cmd = [sys.executable, "-m", "streamlit", "run", str(dashboard_dir() / "server.py"),
           "--server.address", address, "--server.port", str(port)]  # fmt: skip
    env = dict(os.environ)
    if run_dir:
        env["GIST_RUN_DIR"] = str(Path(run_dir).resolve())
    if allow_hosts:
        env["GIST_ALLOWED_HOSTS"] = ",".join(allow_hosts)
    print(f"dashboard: http://{address}:{port}  (Ctrl-C to stop)", flush=True)
    return subprocess.call(cmd, env=env)


def _check_port_free(address: str, port: int) -> None:
    """ValueError naming the port when another program listens on it (before Streamlit prints a URL that is not ours)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
        try:
            probe.bind((address, port))
        except OSError as err:
            raise ValueError(f"cannot listen on {address}:{port} ({err.strerror}); choose another --port") from None


def cmd_serve(args: argparse.Namespace) -> None:
    raise SystemExit(serve(args.run_dir, args.port, args.address, args.allow_host))


def cmd_demo(args: argparse.Namespace) -> None:
    from .devkit.demo import run_demo

    run_dir = run_demo(Path(args.run_dir), pool_size=args.pool_size, methods=args.methods)
    from .curation.maps import cached_map
    from .runs.store import open_run

    run = open_run(run_dir)
    if cached_map(run, run.k_max) is None:
        start_map(run_dir)
    cmd_info(argparse.Namespace(run_dir=str(run_dir), target=None, rank=None, top=10, json=False))
    from .devkit.demo import demo_data_dir

    test = demo_data_dir(run_dir) / "test.jsonl"
    print(f"\nDoes the selection help? Fine-tune on it and on random examples, and score held-out MMLU questions "
          f"(the dashboard's Evaluate page does the same):\n  gist-curate evaluate --run-dir {run_dir} --test {test} "
          f"--method gist-global --budget 10% --baselines random:2")  # fmt: skip
    if not args.no_serve:
        raise SystemExit(serve(str(run_dir), args.port))


COMMANDS = {
    "compute": cmd_compute, "scores": cmd_scores, "select": cmd_select, "combine": cmd_combine, "edit": cmd_edit,
    "compare": cmd_compare, "evaluate": cmd_evaluate, "map": cmd_map, "add-target": cmd_add_target, "info": cmd_info, "demo": cmd_demo, "serve": cmd_serve,
}  # fmt: skip
