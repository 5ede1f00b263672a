"""Background computations started from the Runs view: launch, progress, log tail, cancel.

Everything a job's status needs lives in its run directory (``compute.pid``, ``compute.log``,
``progress.json``, ``manifest.json``), so a job survives a page reload or a dashboard restart.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from gist_backend.compute import ComputeConfig
from gist_backend.safety import check_cli_value

PID_FILE = "compute.pid"
LOG_FILE = "compute.log"
PROGRESS_FILE = "progress.json"
CANCEL_FILE = "compute.cancel"  # written when the curator cancels, so a run stopped early reads "cancelled"
METHODS = ("gist", "less", "g2is")

# Popen handles of the jobs this server started, so finished children are reaped, not left as zombies.
_CHILDREN: dict[int, subprocess.Popen] = {}


@dataclass
class ComputeOptions:
    """The compute form: one field per `gist-curate compute` flag the dashboard exposes."""

    model: str
    train: list[str]
    val: list[str]
    # Defaults come from the backend's ComputeConfig, so the form and `gist-curate compute` never disagree.
    max_len: int = ComputeConfig.max_len
    lora_rank: int = ComputeConfig.lora_rank
    lora_alpha: int = ComputeConfig.lora_alpha
    lora_targets: str = ""
    adapter: str = ""
    warmup: bool = ComputeConfig.warmup
    warmup_fraction: float = ComputeConfig.warmup_fraction
    warmup_epochs: int = ComputeConfig.warmup_epochs
    warmup_lr: float = ComputeConfig.warmup_lr
    k_max: int = ComputeConfig.k_max
    methods: list[str] = field(default_factory=lambda: ["gist"])
    device: str = ComputeConfig.device
    seed: int = ComputeConfig.seed

    def problems(self) -> list[str]:
        """What is missing or wrong in the form, as sentences (empty when it can be launched)."""
        out = []
        if not self.model.strip():
            out.append("Give a model: a Hugging Face id, a local folder or a .gguf file.")
        if not self.train:
            out.append("Give at least one pool file (JSONL, JSON, Parquet or a saved dataset folder).")
        if not self.val:
            out.append("Give at least one validation file for the target task.")
        if not self.methods:
            out.append("Choose at least one method.")
        if self.methods and "gist" not in self.methods:
            out.append("GIST is always computed; keep it among the methods.")
        # Values travel as separate arguments (never through a shell), but one starting with "-" would still be
        # read as an option by the compute command line.
        for what, values in (("model", [self.model]), ("pool file", self.train), ("validation file", self.val),
                             ("adapter", [self.adapter]), ("LoRA targets", [self.lora_targets])):  # fmt: skip
            for value in values:
                try:
                    check_cli_value(value, what)
                except ValueError as err:
                    out.append(str(err))
        return out


def compute_command(opts: ComputeOptions, run_dir: str | Path) -> list[str]:
    """The argument list of the background `gist_backend.cli compute` process."""
    cmd = [sys.executable, "-m", "gist_backend.cli", "compute", "--model", opts.model.strip()]
    cmd += ["--train", *opts.train, "--val", *opts.val, "--run-dir", str(run_dir)]
    cmd += ["--max-len", str(opts.max_len), "--lora-rank", str(opts.lora_rank), "--lora-alpha", str(opts.lora_alpha)]
    if opts.lora_targets.strip():
        cmd += ["--lora-targets", opts.lora_targets.strip()]
    if opts.adapter.strip():
        cmd += ["--adapter", opts.adapter.strip()]
    if opts.warmup:
        cmd += ["--warmup-fraction", str(opts.warmup_fraction), "--warmup-epochs", str(opts.warmup_epochs)]
        cmd += ["--warmup-lr", str(opts.warmup_lr)]
    else:
        cmd.append("--no-warmup")
    cmd += ["--k-max", str(opts.k_max), "--methods", ",".join(opts.methods), "--device", opts.device, "--seed", str(opts.seed)]
    return cmd


def new_run_dir(root: str | Path, model: str, name: str = "") -> Path:
    """A fresh run directory name under ``root``: the given name or <date>-<model>."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name.strip() or f"{time.strftime('%Y%m%d-%H%M%S')}-{Path(model.strip()).name}")
    path = Path(root) / slug.strip("-.")
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} already exists and is not empty; choose another run name.")
    return path


def launch(opts: ComputeOptions, run_dir: str | Path) -> int:
    """Start the compute in its own session (it outlives this server); returns its pid."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CANCEL_FILE).unlink(missing_ok=True)
    with open(run_dir / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(
            compute_command(opts, run_dir),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=os.getcwd(),
        )
    _CHILDREN[proc.pid] = proc
    (run_dir / PID_FILE).write_text(str(proc.pid))
    return proc.pid


def _reap(pid: int) -> None:
    proc = _CHILDREN.get(pid)
    if proc is not None:
        proc.poll()


def _is_compute_process(pid: int) -> bool:
    """True when ``pid`` is alive and is a gist-curate compute (not a recycled pid)."""
    _reap(pid)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True  # no /proc (macOS): trust the pid file
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state in ("Z", "X"):
        return False
    # An empty command line means the child is still exec-ing (just launched): it is ours.
    return not cmdline.strip() or ("gist_backend.cli" in cmdline and "compute" in cmdline)


def read_pid(run_dir: str | Path) -> int | None:
    """The pid recorded for the run's compute, if any."""
    try:
        return int((Path(run_dir) / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def log_tail(run_dir: str | Path, lines: int = 40, max_bytes: int = 64_000) -> str:
    """The last lines of the compute log (progress-bar carriage returns folded)."""
    path = Path(run_dir) / LOG_FILE
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
    """What the Runs view shows for one background computation."""

    run_dir: Path
    state: str  # running | complete | failed | cancelled | stopped
    pid: int | None
    progress: dict
    error: str | None

    @property
    def fraction(self) -> float:
        """Progress of the current stage in [0, 1]."""
        total = self.progress.get("total") or 0
        return min(1.0, max(0.0, (self.progress.get("done") or 0) / total)) if total else 0.0


def job_status(run_dir: str | Path) -> JobStatus:
    """Status of the compute in ``run_dir`` from its files and whether its process is alive."""
    run_dir = Path(run_dir)
    pid = read_pid(run_dir)
    alive = pid is not None and _is_compute_process(pid)
    manifest = _read_json(run_dir / "manifest.json")
    progress = _read_json(run_dir / PROGRESS_FILE)
    status = manifest.get("status")
    error = manifest.get("error")
    if alive:
        state = "running"
    elif status in ("complete", "failed", "cancelled"):
        state = status
    elif (run_dir / CANCEL_FILE).exists():
        state, error = "cancelled", error or "cancelled by the user before the run wrote its manifest"
    else:  # the process is gone but never wrote a final status: it crashed or was killed
        state = "stopped"
        tail = log_tail(run_dir, lines=8)
        last = [line for line in tail.splitlines() if line.strip()]
        error = error or (
            f"the compute process ended without finishing (last log line: {last[-1]!r})" if last else "the compute process ended without finishing and wrote no log"
        )
    return JobStatus(run_dir, state, pid if alive else None, progress, error)


def jobs(root: str | Path) -> list[JobStatus]:
    """Every run under ``root`` started from the dashboard (has a pid file), newest first."""
    root = Path(root)
    found = sorted(root.glob(f"*/{PID_FILE}"), key=lambda p: p.stat().st_mtime, reverse=True)
    return [job_status(p.parent) for p in found]


def cancel(run_dir: str | Path) -> bool:
    """Ask the run's compute to stop (SIGTERM to its process group); True if one was running."""
    pid = read_pid(run_dir)
    if pid is None or not _is_compute_process(pid):
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    (Path(run_dir) / CANCEL_FILE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    return True


def format_age(updated: float | None) -> str:
    """'3 s ago' for a unix time (progress.json 'updated')."""
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
