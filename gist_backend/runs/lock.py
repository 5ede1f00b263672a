"""Writer locks on a run folder: one writer per scope at a time, released by the OS when the holder dies.

Scopes, each its own lock file ``<run>/.lock-<scope>``:
    run     compute and add-target (they write the run's arrays and manifest)
    edits   the curation edit log (held for milliseconds; waiters retry briefly)
    evals   evaluations (fine-tuning arms, results under ``evals/``)
    maps    precomputed 2-D maps
The lock is an ``fcntl.flock`` on the file, so a process killed by any signal, even SIGKILL, releases
it: a stale lock never blocks a run. The holder writes who it is (pid, command, host, since) into the
file, so a second writer fails fast with a message naming it. Where ``fcntl`` does not exist
(Windows) the lock is a no-op: one writer at a time is then the user's responsibility.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .files import RunError, utc_now

SCOPES = ("run", "edits", "evals", "maps")


class RunLocked(RunError):
    """Another process holds this run's lock for the scope; the message says who and since when."""


def lock_path(run_dir: Path, scope: str) -> Path:
    """The lock file of a scope."""
    if scope not in SCOPES:
        raise ValueError(f"lock scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    return Path(run_dir) / f".lock-{scope}"


def holder(run_dir: Path, scope: str) -> dict | None:
    """Who last took the lock of a scope (it may have finished since): {"pid", "command", "host", "since"}."""
    try:
        info = json.loads(lock_path(run_dir, scope).read_text() or "null")
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _describe(info: dict | None) -> str:
    if not info:
        return "another process"
    return f"{info.get('command', 'a process')} (pid {info.get('pid')} on {info.get('host')}, since {info.get('since')})"


@contextmanager
def run_lock(run_dir: str | Path, scope: str, what: str, *, wait_s: float = 0.0) -> Iterator[None]:
    """Hold the run's lock for ``scope`` while the block runs; RunLocked at once (or after ``wait_s``) if it is held."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows)
        yield
        return
    path = lock_path(Path(run_dir), scope)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            if time.monotonic() >= deadline:
                raise RunLocked(
                    f"{Path(run_dir)} is busy: {_describe(holder(Path(run_dir), scope))} is writing its {scope}. "
                    f"Wait for it to finish (or stop it), then run {what} again."
                ) from None
            time.sleep(0.05)
            continue
        if _same_file(handle, path):
            break
        handle.close()  # the lock file was replaced meanwhile (an --overwrite swapped a new run in): lock the one there now
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "command": what, "host": socket.gethostname(), "since": utc_now(),
                                 "argv": sys.argv[:8]}))  # fmt: skip
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        handle.close()


def holder_alive(run_dir: str | Path, scope: str) -> bool:
    """Whether the process that last took the scope's lock still runs (assumed so when it is on another host).

    Read from the lock file, without taking the lock: a check must never make a starting writer fail.
    """
    info = holder(Path(run_dir), scope)
    if not info:
        return False
    if info.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return True
    return True


def _same_file(handle, path: Path) -> bool:
    """True when the open lock file is still the one at ``path`` (not unlinked or replaced since it was opened)."""
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        return False
