"""Files of a run: atomic writes, reads that name the damaged file, and sha256 checksums.

Every writer here writes a temporary sibling and renames it into place (after an fsync), so a crash
never leaves a half-written file under a final name, and a symlink planted at the target is replaced,
never written through. Readers turn every failure into a ``RunError`` that names the file and says
what to do. Nothing is pickled: ``.npy`` files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np


class RunError(RuntimeError):
    """A run directory that cannot be used; the message names the file and what to do."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only if the block succeeds.

    The file gets the mode of the file it replaces, or the usual mode for a new file (0666 less the umask),
    not the 0600 of a temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        try:
            mode = path.stat().st_mode & 0o7777
        except OSError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def json_text(obj: Any, *, indent: int | None = 2) -> str:
    """JSON as every file of a run writes it (numpy numbers and paths allowed)."""
    return json.dumps(obj, indent=indent, ensure_ascii=False, default=json_default)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json_text(obj))


def read_json(path: str | Path) -> Any:
    """Read JSON, turning any failure into a RunError that names the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: missing. The run is incomplete; re-run `gist-curate compute` on it to resume.") from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, huge integers, deep nesting
        raise RunError(f"{path}: not valid JSON ({str(err)[:200]}). The file was truncated or edited by hand.") from None
    except OSError as err:  # a folder in its place, no permission
        raise RunError(f"{path}: cannot be read ({err}).") from None


def write_npy(path: str | Path, array: np.ndarray) -> None:
    """Write a .npy file atomically (no pickled object arrays)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def read_npy(path: str | Path, mmap: bool = True) -> np.ndarray:
    """Read a .npy file without pickle; a damaged file gives a RunError naming it."""
    path = Path(path)
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise RunError(f"{path}: missing. Re-run `gist-curate compute` on this run to finish it.") from None
    except (ValueError, OSError, EOFError) as err:
        raise RunError(f"{path}: unreadable ({err}). The file is truncated or corrupt; delete it and resume the run.") from None


def write_tensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write numpy arrays as safetensors, atomically."""
    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """Read a safetensors file; a damaged file gives a RunError naming it."""
    from safetensors.numpy import load_file

    path = Path(path)
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise RunError(f"{path}: missing. Re-run `gist-curate compute` on this run to finish it.") from None
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise RunError(f"{path}: unreadable safetensors file ({err}). Delete it and resume the run.") from None


def tensors_complete(path: Path, shapes: dict[str, tuple | None]) -> bool:
    """True if ``path`` is a whole safetensors file holding these tensors (shape None: any); a cheap header check."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:  # also checks that the data covers the whole file
            keys = set(f.keys())
            return all(k in keys and (shape is None or tuple(f.get_slice(k).get_shape()) == shape) for k, shape in shapes.items())
    except Exception:
        return False


def write_parquet(path: str | Path, frame) -> None:
    """Write a polars table as Parquet, atomically."""
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp)


def read_parquet(path: str | Path, columns: list[str] | None = None):
    """Read a Parquet table (optionally only some columns); a damaged file gives a RunError naming it."""
    import polars as pl

    path = Path(path)
    try:
        return pl.read_parquet(path, columns=columns)
    except FileNotFoundError:
        raise RunError(f"{path}: missing. Re-run `gist-curate compute` on this run to finish it.") from None
    except Exception as err:
        raise RunError(f"{path}: unreadable Parquet table ({err}).") from None


def utc_now() -> str:
    """Current UTC time, ISO-8601 to the second (manifests, edits, exports)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def tool_version() -> str:
    """Installed version of gist-curator (or 'dev' from a plain checkout)."""
    try:
        return metadata.version("gist-curator")
    except metadata.PackageNotFoundError:
        return "dev"


def file_sha256(path: str | Path) -> str:
    """sha256 hex of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def text_sha256(text: str) -> str:
    """sha256 hex of a string's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
