"""`gist-curate`: the command-line twin of every dashboard action. Flags of `compute` come from ``config.ComputeConfig``."""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
from dataclasses import MISSING, fields

from .config import G2IS_ORIENTATIONS, METHODS, RECIPES, SCORED_METHODS, ComputeConfig

RESUMABLE = ("compute", "demo", "evaluate", "map", "add-target")  # commands whose interruption leaves work that the same command resumes


def _budget(text: str) -> str:
    """A budget as given ('500' a count, '0.05' or '5%' a fraction of the pool), checked now so a typo fails before any work."""
    from .curation.budget import resolve_budget_note

    try:
        resolve_budget_note(text, sys.maxsize)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _budgets(text: str) -> list[str]:
    """One budget or several, comma-separated ('2.5%,5%,10%'), each checked as ``_budget`` checks one."""
    return [_budget(part.strip()) for part in text.split(",")]


def _cap(text: str) -> str:
    """A per-source cap as given ('50' a count, '0.3' or '30%' a fraction of the budget), checked now."""
    from .curation.budget import cap_count

    try:
        cap_count(text, 1)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _baselines(text: str) -> int:
    """'random:3' (or '3') → 3."""
    count = text.removeprefix("random:")
    if not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"--baselines takes random:N with N ≥ 1, got {text!r}")
    return int(count)


def _port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 1 and 65535, got {port}")
    return port


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_compute_flags(p: argparse.ArgumentParser) -> None:
    """One flag per ComputeConfig field, with its default and help text."""
    for f in fields(ComputeConfig):
        flag, required = "--" + f.name.replace("_", "-"), f.default is MISSING and f.default_factory is MISSING
        default = None if required else (f.default if f.default is not MISSING else f.default_factory())
        help_text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
        shown = ",".join(default) if isinstance(default, list) else default
        kw = {"help": help_text + ("" if required or default in (None, "") else f" (default: {shown})")}
        if isinstance(default, bool):
            negated = "--no-" + f.name.replace("_", "-")
            off_help = f.metadata.get("off_help", f"turn off: {f.metadata['help']}").replace("%", "%%")
            p.add_argument(negated if default else flag, dest=f.name, action="store_false" if default else "store_true",
                           help=off_help if default else help_text)  # fmt: skip
        elif f.name in ("train", "val"):
            p.add_argument(flag, nargs="+", required=True, **kw)
        elif f.name in ("methods", "lora_targets"):
            p.add_argument(flag, type=_comma_list, default=default, **kw)
        else:
            kind = str if default is None else type(default)
            p.add_argument(flag, type=kind, default=default, required=required, choices=f.metadata.get("choices"), **kw)


def config_from_args(args: argparse.Namespace) -> ComputeConfig:
    """The ComputeConfig the compute flags describe."""
    return ComputeConfig(**{f.name: getattr(args, f.name) for f in fields(ComputeConfig)})


def _add_run(p: argparse.ArgumentParser, target: bool = True) -> None:
    p.add_argument("--run-dir", required=True, help="run directory (e.g. cache/my-run)")
    if target:
        p.add_argument("--target", default=None, help="the run's target to use (default: its first)")


def _add_scoring(p: argparse.ArgumentParser, methods: tuple[str, ...] = METHODS) -> None:
    p.add_argument("--method", default="gist", choices=methods, help="default: gist, as published (see the README for which to prefer)"
                   + ("; g2is gives a set, not scores" if "g2is" in methods else ""))  # fmt: skip
    p.add_argument("--rank", type=int, default=None, help="subspace rank r of the GIST methods (1..k_max; default k_max)")
    p.add_argument("--seed", type=int, default=0, help="seed of --method random (evaluate's random:N baselines use seeds 0…N-1)")


def build_parser(recipe: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``recipe`` sets the compute defaults of a published recipe (explicit flags still win)."""
    parser = argparse.ArgumentParser(prog="gist-curate", description="Targeted instruction-data selection by gradient geometry.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compute_commands(sub, recipe)
    _add_curation_commands(sub)
    _add_report_commands(sub)
    return parser


def _add_compute_commands(sub, recipe: str | None) -> None:
    """compute, add-target and map: the commands that run the model or fit maps (all resumable)."""
    p = sub.add_parser("compute", help="compute a run: gradients, subspace, coordinates (resumable)")
    add_compute_flags(p)
    p.add_argument("--recipe", choices=list(RECIPES), default=None,
                   help="a published recipe: paper = LoRA r 128, α 512, dropout 0.1, max length 2048, 4 warmup epochs on 5%%, lr 2e-5")  # fmt: skip
    p.add_argument("--run-dir", required=True, help="run directory (e.g. cache/my-run)")
    p.add_argument("--dump-full-grads", default=None, metavar="DIR", help="also write full gradients and examples (small d only)")
    p.add_argument("--overwrite", action="store_true", help="recompute from scratch; the old run stays readable (and editable) until the new one is complete, then its curation edits carry over and its evaluations, added targets and maps are discarded")
    p.add_argument("--no-map", action="store_true", help="do not start the Map view's UMAP in the background when the run is complete")
    if recipe:
        p.set_defaults(**RECIPES[recipe])

    p = sub.add_parser("add-target", help="add a target to a --reusable run without another pass over the pool (resumable)")
    p.add_argument("--run-dir", required=True, help="a finished run computed with --reusable")
    p.add_argument("--val", required=True, nargs="+", help="the new target's validation file(s); an optional 'task' field names sub-tasks")
    p.add_argument("--name", required=True, help="the target's name (letters, digits, '.', '_', '-')")
    p.add_argument("--device", default="auto", help="cuda, cpu, … (default: CUDA when available)")
    p.add_argument("--max-tokens", type=int, default=None, help="padded tokens per gradient batch (default: the run's)")
    p.add_argument("--sketch-dim", type=int, default=None,
                   help="use only this many of the run's sketch coordinates: what a run computed with a smaller --sketch-dim would give")

    p = sub.add_parser("map", help="compute (and cache) the UMAP map of a run's coordinates at a rank, for the Map view")
    _add_run(p)
    p.add_argument("--rank", type=int, default=None, help="subspace rank (default k_max)")


def _add_curation_commands(sub) -> None:
    """scores, select, combine, edit and compare: everything read from a finished run without the model."""
    p = sub.add_parser("scores", help="write id,score CSV")
    _add_run(p)
    _add_scoring(p, SCORED_METHODS)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")

    p = sub.add_parser("select", help="select a budget and export the original records as JSONL")
    _add_run(p)
    _add_scoring(p)
    p.add_argument("--budget", required=True, type=_budget, help="a count (500; 1.0 is one example) or a fraction of the pool (0.05 or 5%%)")
    p.add_argument("--per-source-cap", type=_cap, default=None, help="most examples per source: a count (50) or a fraction of the budget (0.3 or 30%%; 1.0 is the whole budget)")
    p.add_argument("--g2is-orientation", choices=G2IS_ORIENTATIONS, default="sklearn",
                   help="sign of G2IS's PCA components: sklearn's (as its authors run it) or along the mean validation feature")  # fmt: skip
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--with-meta", action="store_true", help="add a _gist field (score, position, method, rank) to each record")

    p = sub.add_parser("combine", help="one selection for several targets of a run (quotas or round-robin), exported as JSONL")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--part", required=True, action="append", metavar="TARGET[:METHOD[:RANK]][=SHARE]",
                   help="a target's method, rank and share of the budget, e.g. mmlu:gist:32=60%% (repeat for each target)")  # fmt: skip
    p.add_argument("--budget", required=True, type=_budget, help="the whole selection: a count (500) or a fraction of the pool (5%%)")
    p.add_argument("--mode", choices=["quotas", "round-robin"], default="quotas",
                   help="quotas: each part fills its share in turn; round-robin: one at a time from the part furthest behind (default quotas)")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--with-meta", action="store_true", help="add a _gist field (position, method; no score for a combined selection) to every exported record")

    p = sub.add_parser("edit", help="include / exclude / reset ids, undo the last edit, or list the edits")
    _add_run(p)
    p.add_argument("op", choices=["include", "exclude", "reset", "undo", "list"])
    p.add_argument("ids", nargs="*", help="example ids (or --ids-file)")
    p.add_argument("--ids-file", default=None, help="file with one id per line")
    p.add_argument("--only-target", action="store_true", help="apply the edit to --target only (default: every target)")

    p = sub.add_parser("compare", help="overlap and correlation of methods at one budget (or of targets, --across-targets)")
    _add_run(p)
    p.add_argument("--budget", required=True, type=_budget, help="a count (500) or a fraction of the pool (5%%)")
    p.add_argument("--rank", type=int, default=None, help="rank of the GIST methods (default k_max)")
    p.add_argument("--across-targets", action="store_true", help="compare the run's targets (or those given with --targets) with one --method")
    p.add_argument("--targets", default=None, help="comma-separated targets for --across-targets (default: all)")
    p.add_argument("--method", default="gist", choices=METHODS, help="the method of --across-targets")


def _add_report_commands(sub) -> None:
    """evaluate, info, demo and serve."""
    p = sub.add_parser("evaluate", help="fine-tune on a selection, random selections and none; score a held-out test set")
    _add_run(p)
    p.add_argument("--test", required=True, help="held-out target records (JSONL etc.); 'choices' + 'answer_index' give accuracy")
    _add_scoring(p)
    p.add_argument("--budget", type=_budgets, default=None,
                   help="count or fraction, as for select (curation edits apply); several, comma-separated (2.5%%,5%%,10%%), "
                        "evaluate the selection at each budget against random selections of each size")  # fmt: skip
    p.add_argument("--per-source-cap", type=_cap, default=None, help="as for select: most examples per source (a count or a fraction of the budget)")
    p.add_argument("--selection", default=None, metavar="FILE.jsonl", help="evaluate an exported selection instead of --method/--budget")
    p.add_argument("--baselines", type=_baselines, default=3, metavar="random:N", help="N random selections of the same size (default random:3)")
    p.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: the run's warmup epochs)")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (default: the run's warmup lr)")
    p.add_argument("--train-seeds", type=int, default=1, metavar="N",
                   help="fine-tune every arm N times (seeds of LoRA init and data order) and average: N× the cost, less training noise")  # fmt: skip
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--json", default=None, metavar="OUT", help="also write the result here (never over an input or an existing file without --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --json file")

    p = sub.add_parser("info", help="summary of a run: spectrum, coupling, stores, top examples (--json for scripts)")
    _add_run(p)
    p.add_argument("--rank", type=int, default=None, help="rank of the top examples shown (default k_max)")
    p.add_argument("--top", type=int, default=10, help="how many top examples to show (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object (see the README for its keys)")

    p = sub.add_parser("demo", help="build the offline demo data, compute a run with SmolLM2-135M, open the dashboard")
    p.add_argument("--run-dir", default="cache/demo", help="where the demo run goes (default cache/demo)")
    p.add_argument("--no-serve", action="store_true", help="stop after the run instead of opening the dashboard")
    p.add_argument("--port", type=_port, default=8501, help="dashboard port (default 8501)")
    p.add_argument("--pool-size", type=int, default=200, help="demo pool size (default 200; about 1 s per example on a 2-core CPU)")
    p.add_argument("--methods", type=_comma_list, default=["gist", "less", "g2is"])

    p = sub.add_parser("serve", help="open the dashboard (127.0.0.1) on a run")
    p.add_argument("--run-dir", default=None, help="the run to open (default: choose on the Runs page)")
    p.add_argument("--port", type=_port, default=8501, help="default 8501")
    p.add_argument("--address", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--allow-host", action="append", default=[], help="also accept this Host header (default: loopback names only)")


def main(argv: list[str] | None = None) -> None:
    """Entry point of `gist-curate`."""
    from .commands import COMMANDS
    from .engine.records import DataError
    from .runs.files import RunError

    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", choices=list(RECIPES), default=None)
    known, _ = pre.parse_known_args(argv)
    args = build_parser(known.recipe).parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a cancel from the dashboard ends like Ctrl-C
    threads = os.environ.get("GIST_TORCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    try:
        COMMANDS[args.command](args)
    except (DataError, RunError, FileNotFoundError, FileExistsError, ValueError, PermissionError) as err:
        _fail(str(err))
    except OSError as err:
        _fail(_os_error(err))
    except Exception as err:  # libraries that wrap OS errors in their own types (safetensors: SafetensorError)
        if "No space left on device" not in str(err):
            raise
        _fail(_os_error(OSError(errno.ENOSPC, "No space left on device")))
    except KeyboardInterrupt:
        print("interrupted" + ("; re-run the same command to resume" if args.command in RESUMABLE else ""), file=sys.stderr)
        raise SystemExit(130) from None


def _os_error(err: OSError) -> str:
    """An OSError as a sentence that says what to do."""
    where = f" ({err.filename})" if err.filename else ""
    if err.errno == errno.ENOSPC:
        return f"the disk is full{where}. Free some space and re-run the same command (a compute resumes where it stopped)."
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write{where}: the folder is read-only or not yours. Choose a writable --run-dir / --out, or fix its permissions."
    return f"{err.strerror or err}{where}"


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def json_dump(obj) -> str:
    """JSON for the terminal (numpy values and paths allowed)."""
    from .runs.files import json_default

    return json.dumps(obj, indent=2, default=json_default, ensure_ascii=False)


if __name__ == "__main__":
    main()
