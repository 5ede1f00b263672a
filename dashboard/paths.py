"""Path safety for the dashboard: it reads runs and inputs, and writes runs and exports, only under allowed folders.

The dashboard turns text typed into a browser into file paths (a runs folder, a run to open, an
export target). Every such path goes through ``resolve_allowed`` (or ``resolve_export_path`` for
a file to write) before it is used, so ``../../etc``, an absolute path elsewhere, or a symlink that
leads out of the allowed folders is refused with a ``PermissionError`` that says why.

Allowed folders (``allowed_roots``):
- ``GIST_ALLOWED_DIRS``, when set: the folders it lists, separated by ``os.pathsep`` (":" on Linux
  and macOS, ";" on Windows). It replaces the default.
- otherwise the current working directory (where ``gist-curate serve`` was started; ``cache/`` is
  under it) and, when set, ``GIST_CACHE`` (the dashboard's runs folder).
plus the run the person who started the server named (``gist-curate serve --run-dir``, passed as
``GIST_RUN_DIR``), which they allowed by naming it.

Paths are resolved the way the OS will open them — ``~`` expanded, relative to the working
directory, every symlink and ``..`` followed — and the result must be one of the roots or inside one.
The check is on the resolved path, which is also what callers should use afterwards (not the text).
Writers in ``gist_backend.runs`` replace a file by renaming a temporary file onto it, so a symlink
planted at the target after the check is replaced, never written through.

``check_cli_value`` refuses text that a command-line parser would read as an option ("--overwrite"),
for values that are passed as separate arguments to a child process (no shell is ever used).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

ENV_ALLOWED = "GIST_ALLOWED_DIRS"
ENV_CACHE = "GIST_CACHE"
ENV_RUN = "GIST_RUN_DIR"
EXPORT_SUFFIXES = (".jsonl",)


def _absolute(path: str | os.PathLike) -> Path:
    """``~``-expanded, absolute and fully resolved (symlinks and ``..``); PermissionError if that is impossible."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text.strip():
        raise PermissionError("empty path: give a folder or file path")
    if "\x00" in text:
        raise PermissionError(f"{text!r}: a path cannot contain a NUL character")
    try:
        return Path(text).expanduser().absolute().resolve(strict=False)
    except (OSError, RuntimeError, ValueError) as err:  # symlink loop, unreadable component, unknown ~user
        raise PermissionError(f"{text}: cannot be resolved ({err})") from None


def allowed_roots(extra: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """The folders the dashboard may read and write (resolved, without duplicates)."""
    listed = os.environ.get(ENV_ALLOWED, "")
    if listed.strip():
        raw = [p for p in listed.split(os.pathsep) if p.strip()]
    else:
        raw = [os.getcwd()]
        if os.environ.get(ENV_CACHE, "").strip():
            raw.append(os.environ[ENV_CACHE])
    if os.environ.get(ENV_RUN, "").strip():
        raw.append(os.environ[ENV_RUN])
    raw += list(extra)
    roots: list[Path] = []
    for item in raw:
        root = _absolute(item)
        if root not in roots:
            roots.append(root)
    return roots


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def resolve_allowed(path: str | os.PathLike, roots: Sequence[str | os.PathLike] | None = None, *, must_exist: bool = False) -> Path:
    """The resolved ``path`` if it lies inside one of ``roots`` (default ``allowed_roots()``), else PermissionError.

    ``must_exist``: also raise FileNotFoundError when nothing is there.
    """
    resolved = _absolute(path)
    root_list = allowed_roots() if roots is None else [_absolute(r) for r in roots]
    if not any(_inside(resolved, root) for root in root_list):
        shown = ", ".join(str(r) for r in root_list) or "none"
        raise PermissionError(
            f"{os.fspath(path)} resolves to {resolved}, outside the allowed folders ({shown}). "
            f"To allow another folder, start the dashboard with {ENV_ALLOWED} listing it."
        )
    if must_exist and not resolved.exists():
        raise FileNotFoundError(f"{os.fspath(path)}: no such file or folder ({resolved}).")
    return resolved


def resolve_export_path(path: str | os.PathLike, roots: Sequence[str | os.PathLike] | None = None) -> Path:
    """A JSONL file to write an export to: allowed (as ``resolve_allowed``) and a .jsonl name. The exporter then
    refuses inputs of the run, run folders and existing files (``gist_backend.curation.export.check_output``)."""
    resolved = resolve_allowed(path, roots)
    if resolved.suffix.lower() not in EXPORT_SUFFIXES:
        raise PermissionError(f"{os.fspath(path)}: an export must be a {' or '.join(EXPORT_SUFFIXES)} file.")
    return resolved


def check_cli_value(value: str, what: str) -> str:
    """``value`` unchanged, or ValueError if a command-line parser would take it for an option (leading '-')."""
    if value.strip().startswith("-"):
        raise ValueError(f"{what} {value!r} starts with '-', which the command line would read as an option; use ./{value.strip()} for a path.")
    return value
