"""Background commands started from the dashboard: launch, progress, log tail, cancel.

A job is a `gist-curate` command (compute, evaluate, add-target) run in its own session, so it outlives the
page and the server. Everything its status needs lives in the run folder (``<kind>.pid``, ``<kind>.log``, its
progress file, the manifest), so a job survives a page reload or a dashboard restart.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dashboard.paths import check_cli_value
from gist_backend.config import ComputeConfig

# kind → progress file (relative to the run folder); each command writes {"stage", "done", "total", "rate", "eta_s",
# "updated", and "status" once it ends}.
KINDS = {"compute": "progress.json", "evaluate": "evals/progress.json", "add-target": "add-target.progress.json", "map": "maps/progress.json"}

# Popen handles of the jobs this server started, so finished children are reaped, not left as zombies.
_CHILDREN: dict[int, subprocess.Popen] = {}


def compute_problems(config: ComputeConfig) -> list[str]:
    """What is missing or wrong in the compute form, as sentences (empty when it can be launched)."""
    out = config.problems()
    # Values travel as separate arguments (never through a shell), but one starting with "-" would still be
    # read as an option by the command line.
    values = [("model", config.model), *(("pool file", p) for p in config.train), *(("validation file", p) for p in config.val),
              ("adapter", config.adapter or ""), *(("LoRA target", t) for t in config.lora_targets or [])]  # fmt: skip
    for what, value in values:
        try:
            check_cli_value(value, what)
        except ValueError as err:
            out.append(str(err))
    return out


def command(kind: str, argv: list[str], run_dir: str | Path) -> list[str]:
    """The argument list of a background `gist-curate <kind>` process."""
    return [sys.executable, "-m", "gist_backend.cli", kind, *argv, "--run-dir", str(run_dir)]


def new_run_dir(root: str | Path, model: str, name: str = "") -> Path:
    """A fresh run directory name under ``root``: the given name or <date>-<model>."""
    import re

    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name.strip() or f"{time.strftime('%Y%m%d-%H%M%S')}-{Path(model.strip()).name}")
    path = Path(root) / slug.strip("-.")
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} already exists and is not empty; choose another run name.")
    return path


def launch(kind: str, argv: list[str], run_dir: str | Path) -> int:
    """Start `gist-curate <kind> … --run-dir D` in its own session (it outlives this server); returns its pid."""
    run_dir = Path(run_dir)
    running = job_status(run_dir, kind)
    if running.state == "running":  # a second one would fail on the run's lock, and its files would hide the first one's progress
        raise ValueError(f"a {kind} job (pid {running.pid}) is still running on {run_dir}; wait for it to finish or cancel it first")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"{kind}.cancel").unlink(missing_ok=True)
    progress = run_dir / KINDS[kind]
    if kind != "compute":
        progress.unlink(missing_ok=True)  # a finished earlier job of this kind must not read as this one's result
    with open(run_dir / f"{kind}.log", "ab") as log:
        proc = subprocess.Popen(command(kind, argv, run_dir), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=os.getcwd())  # fmt: skip
    _CHILDREN[proc.pid] = proc
    (run_dir / f"{kind}.pid").write_text(str(proc.pid))
    return proc.pid


def _is_job_process(pid: int, kind: str, run_dir: Path) -> bool:
    """True when ``pid`` is alive and is a gist-curate job of this kind on ``run_dir`` (not a recycled pid)."""
    proc = _CHILDREN.get(pid)
    if proc is not None:
        proc.poll()
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        args = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True  # no /proc (macOS): trust the pid file
    if stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X"):
        return False
    if not args:  # still exec-ing (just launched): it is ours
        return True
    if "gist_backend.cli" not in args or kind not in args or "--run-dir" not in args[:-1]:
        return False
    given = args[max(i for i, a in enumerate(args[:-1]) if a == "--run-dir") + 1]  # the last one, relative to the process's folder
    try:
        return (Path(os.readlink(f"/proc/{pid}/cwd")) / given).resolve() == Path(run_dir).resolve()
    except OSError:
        return False


def read_pid(run_dir: str | Path, kind: str = "compute") -> int | None:
    """The pid recorded for the run's job of this kind, if any."""
    try:
        return int((Path(run_dir) / f"{kind}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def log_tail(run_dir: str | Path, kind: str = "compute", lines: int = 40, max_bytes: int = 64_000) -> str:
    """The last lines of a job's log (progress-bar carriage returns folded)."""
    path = Path(run_dir) / f"{kind}.log"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - max_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    folded = [line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(folded[-lines:]).strip("\n")


@dataclass
class JobStatus:
    """What a page shows for one background job."""

    run_dir: Path
    kind: str
    state: str  # running | complete | failed | cancelled | stopped
    pid: int | None
    progress: dict
    error: str | None

    @property
    def fraction(self) -> float:
        """Progress of the current stage in [0, 1]."""
        total = self.progress.get("total") or 0
        return min(1.0, max(0.0, (self.progress.get("done") or 0) / total)) if total else 0.0


def job_status(run_dir: str | Path, kind: str = "compute") -> JobStatus:
    """Status of a job from its files and whether its process is alive."""
    run_dir = Path(run_dir)
    pid = read_pid(run_dir, kind)
    alive = pid is not None and _is_job_process(pid, kind, run_dir)
    progress = _read_json(run_dir / KINDS[kind])
    final = _read_json(run_dir / "manifest.json") if kind == "compute" else progress
    status, error = final.get("status"), final.get("error")
    if alive:
        state = "running"
    elif status in ("complete", "failed", "cancelled"):
        state = status
    elif (run_dir / f"{kind}.cancel").exists():
        state, error = "cancelled", error or "cancelled by the user before it finished"
    else:  # the process is gone but never wrote a final status: it crashed or was killed
        state = "stopped"
        last = [line for line in log_tail(run_dir, kind, lines=8).splitlines() if line.strip()]
        error = error or (f"the {kind} process ended without finishing (last log line: {last[-1]!r})" if last
                          else f"the {kind} process ended without finishing and wrote no log")  # fmt: skip
    return JobStatus(run_dir, kind, state, pid if alive else None, progress, error)


def jobs(root: str | Path, kind: str = "compute") -> list[JobStatus]:
    """Every run under ``root`` with a job of this kind started from the dashboard, newest first."""
    found = sorted(Path(root).glob(f"*/{kind}.pid"), key=lambda p: p.stat().st_mtime, reverse=True)
    return [job_status(p.parent, kind) for p in found]


def cancel(run_dir: str | Path, kind: str = "compute") -> bool:
    """Ask the run's job to stop (SIGTERM to its process group); True if one was running."""
    pid = read_pid(run_dir, kind)
    if pid is None or not _is_job_process(pid, kind, Path(run_dir)):
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    (Path(run_dir) / f"{kind}.cancel").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    return True


def format_age(updated: float | None) -> str:
    """'3 s ago' for a unix time (progress 'updated')."""
    if not isinstance(updated, (int, float)):
        return "—"
    return f"{format_eta(max(0.0, time.time() - updated))} ago"


def format_eta(seconds: float | None) -> str:
    """'1 h 02 min', '3 min 05 s', '12 s' or '—'."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "—"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"
