"""Curation edits: a curator's include / exclude / reset decisions on a run, persisted in ``<run>/edits.json``.

    {"version": 1, "edits": [{"op": "include" | "exclude" | "reset", "ids": [...], "time": ISO-8601 UTC,
                              "origin": {"kind": "row" | "filter" | "map" | "cli" | "api", "detail": str | dict},
                              "target": name (optional: the edit applies to that target only)}]}

The file is an append-only log (undo drops the last entry), so every decision stays explainable: which
filter expression or map selection it came from, and when. The state an edit log implies is computed by
``edit_state``: later edits win, "reset" forgets earlier decisions on those ids. Every change rewrites the
whole file atomically (temporary file + rename), so a crash between or during edits never loses or corrupts
the earlier ones; the run's "edits" lock serialises concurrent writers (dashboard and CLI on the same run).
Edits apply to every target of the run unless one is scoped to a target.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from ..runs.files import RunError, read_json, write_json
from ..runs.lock import run_lock
from ..runs.store import Run

EDITS_FILE = "edits.json"
EDITS_VERSION = 1
OPS = ("include", "exclude", "reset")
ORIGIN_KINDS = ("row", "filter", "map", "cli", "api")


def _run_dir(run: Run | str | Path) -> Path:
    """The run directory of a Run or a path; it must exist (edits never create a run)."""
    path = run.path if isinstance(run, Run) else Path(run)
    if not path.is_dir():
        raise RunError(f"{path}: no such run directory; edits are stored inside an existing run.")
    return path


def _check_edit(edit: object, where: str) -> dict:
    """Raise RunError unless ``edit`` is a well-formed edit record."""
    ok = (
        isinstance(edit, dict)
        and edit.get("op") in OPS
        and isinstance(edit.get("ids"), list)
        and all(isinstance(i, str) for i in edit["ids"])
        and isinstance(edit.get("origin"), dict)
        and isinstance(edit.get("target", ""), str)
    )
    if not ok:
        raise RunError(f"{where}: malformed edit {str(edit)[:200]}. Fix or delete the entry (the file is plain JSON).")
    return edit


def load_edits(run: Run | str | Path) -> list[dict]:
    """The run's edit log, oldest first ([] when the curator has not edited yet)."""
    path = _run_dir(run) / EDITS_FILE
    if not path.exists():
        return []
    data = read_json(path)
    if not isinstance(data, dict) or data.get("version") != EDITS_VERSION or not isinstance(data.get("edits"), list):
        raise RunError(f"{path}: not a version-{EDITS_VERSION} edit log. Move it aside to start a fresh one.")
    return [_check_edit(e, str(path)) for e in data["edits"]]


def _normalise_ids(ids: Iterable[str]) -> list[str]:
    if isinstance(ids, (str, bytes)):
        raise TypeError("ids must be a list of example ids, not a single string; wrap it: [id]")
    out = list(dict.fromkeys(str(i) for i in ids))
    if not out:
        raise ValueError("an edit needs at least one example id")
    return out


def _normalise_origin(origin: dict | str) -> dict:
    """{"kind", "detail"} from a dict or a bare kind string; detail must be JSON (str or dict)."""
    origin = {"kind": origin} if isinstance(origin, str) else dict(origin)
    if origin.get("kind") not in ORIGIN_KINDS:
        raise ValueError(f"origin kind must be one of {', '.join(ORIGIN_KINDS)}, got {origin.get('kind')!r}")
    origin.setdefault("detail", "")
    if not isinstance(origin["detail"], (str, dict)):
        raise ValueError(f"origin detail must be a string or a dict, got {type(origin['detail']).__name__}")
    try:
        json.dumps(origin)
    except (TypeError, ValueError) as err:
        raise ValueError(f"origin must be JSON-serialisable ({err}); describe the selection with plain strings and numbers") from None
    return origin


def check_ids(run: Run, ids: Iterable[str]) -> None:
    """Raise ValueError naming the ids that are not examples of this run."""
    known = run.row_index
    unknown = [i for i in ids if i not in known]
    if unknown:
        shown = ", ".join(repr(i) for i in unknown[:5]) + (" …" if len(unknown) > 5 else "")
        raise ValueError(
            f"{len(unknown)} id(s) are not in run {run.path}: {shown}. "
            "Use the ids of the run's table (`gist-curate scores --run-dir … --out ids.csv` lists them)."
        )


def add_edit(run: Run | str | Path, op: str, ids: Iterable[str], origin: dict | str, target: str | None = None) -> list[dict]:
    """Append one edit (for every target, or only ``target``) and persist the log atomically; returns the whole log.

    Ids are checked when given a Run.
    """
    if op not in OPS:
        raise ValueError(f"edit op must be one of {', '.join(OPS)}, got {op!r} (undo is `undo(run)`)")
    ids = _normalise_ids(ids)
    origin = _normalise_origin(origin)
    if isinstance(run, Run):
        check_ids(run, ids)
    run_dir = _run_dir(run)
    edit = {"op": op, "ids": ids, "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "origin": origin}
    if target:
        edit["target"] = target
    with run_lock(run_dir, "edits", f"an edit ({op})", wait_s=10):
        edits = load_edits(run_dir) + [edit]
        write_json(run_dir / EDITS_FILE, {"version": EDITS_VERSION, "edits": edits})
    return edits


def undo(run: Run | str | Path) -> list[dict]:
    """Drop the most recent edit (one step; call again to go further back); returns the remaining log."""
    run_dir = _run_dir(run)
    with run_lock(run_dir, "edits", "undo", wait_s=10):
        edits = load_edits(run_dir)
        if edits:
            edits = edits[:-1]
            write_json(run_dir / EDITS_FILE, {"version": EDITS_VERSION, "edits": edits})
    return edits


def edit_state(edits: Iterable[dict], target: str | None = None) -> dict[str, str]:
    """id → "include" | "exclude" implied by an edit log for ``target``: later edits win, "reset" removes the id.

    Edits scoped to another target are skipped; with ``target`` None only run-wide edits count.
    """
    state: dict[str, str] = {}
    for edit in edits:
        if edit.get("target") and edit["target"] != target:
            continue
        op = edit["op"]
        for i in edit["ids"]:
            if op == "reset":
                state.pop(i, None)
            else:
                state[i] = op
    return state
