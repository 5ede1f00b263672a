"""Run directories: the on-disk format every stage writes and every view reads (DESIGN §5).

A run is a folder (default ``cache/<run-id>/``) that reopens without the model:

    manifest.json            format "gist-curator-run", version, status ("running" | "complete"),
                             created, tool_version, config, n_train, n_val, d, k_max, methods,
                             checkpoints [{"name", "weight"}], ckpt_weights, fingerprints,
                             bad_records (count), timings {stage: s}, files {name: {"bytes", "sha256"}},
                             checksum (sha256 of the rest, see ``manifest_checksum``)
    progress.json            live progress of a running compute: stage, done, total, rate, eta_s, updated
    train.parquet            one row per usable pool record: row, id, source, task, n_tokens,
                             n_response_tokens, text (rendered conversation), raw (the record verbatim)
    val.parquet              the same for the validation records (task = sub-task)
    bad_records.jsonl        {"split", "file", "line", "reason"} per skipped record
    warmup/epoch-<e>/        adapter/ (peft), optimizer.safetensors (AdamW m, v by name), state.json
    ckpt-<c>/subspace.safetensors   sigma (k,), basis V (d, k), val_coords (m, k) of checkpoint c
    ckpt-<c>/train/shard-<s>.safetensors   coords (n, k) [and sketch (n, p) fp16] for one shard
    train_coords.npy         (C, N, k) float32, merged from the shards
    val_coords.npy           (C, m, k) float32
    geometry.json            {"checkpoints": [{"name", "spectrum": {sigma, energy, cumulative, r90,
                             r95, r99}, "rho", "rho_per_module": {module: rho}}]}
    coupling.safetensors     last checkpoint's heatmap blocks: top_idx, top_block, gist_block,
                             "<module>.idx", "<module>.block"
    less_scores.npy, less_task_scores.npy, sketches/{train,val}.npy   only when LESS/G2IS were asked for
    edits.json               curation edits (see ``curation``)
    maps/                    cached 2-D maps per rank

Nothing here is pickled; every file is written to a temporary name and renamed into place, so a
crash never leaves a half-written file under a final name. The manifest lists the final artefacts
with their sizes and sha256, and carries a checksum of itself, so a truncated or edited run is
reported by file name instead of failing in numpy. Opening a run checks every size, and the sha256
of every file up to ``GIST_VERIFY_MAX_MB`` (default 2048; 0 turns hashing off; larger files, such as
big LESS sketches, get the size check only); a file already verified in this process and unchanged
since (same inode, size, mtime and ctime) is not hashed again.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from importlib import metadata
import json
import math
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import polars as pl
from safetensors.numpy import load_file, save_file

FORMAT_VERSION = 1
DEFAULT_ROOT = Path("cache")


class RunError(RuntimeError):
    """A run directory that cannot be used; the message names the file and what to do."""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


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
    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """Read a safetensors file; a damaged file gives a RunError naming it."""
    path = Path(path)
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise RunError(f"{path}: missing. Re-run `gist-curate compute` on this run to finish it.") from None
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise RunError(f"{path}: unreadable safetensors file ({err}). Delete it and resume the run.") from None


def write_parquet(path: str | Path, frame: pl.DataFrame) -> None:
    """Write a Parquet table atomically."""
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp)


def read_parquet(path: str | Path) -> pl.DataFrame:
    """Read a Parquet table; a damaged file gives a RunError naming it."""
    path = Path(path)
    try:
        return pl.read_parquet(path)
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


def record_file(manifest: dict, run_dir: Path, name: str) -> None:
    """Note a finished artefact's size and sha256 in the manifest so truncation or editing is detected on open."""
    path = run_dir / name
    manifest.setdefault("files", {})[name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


_VERIFIED: dict[tuple, str] = {}  # (path, dev, inode, size, mtime_ns, ctime_ns) → sha256 already checked


def _verify_limit() -> int:
    try:
        return int(float(os.environ.get("GIST_VERIFY_MAX_MB", "2048")) * 2**20)
    except ValueError:
        return 2048 * 2**20


def check_files(run_dir: Path, manifest: dict) -> None:
    """Raise RunError naming the first artefact whose size or checksum differs from the manifest's record."""
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise RunError(f"{run_dir / 'manifest.json'}: 'files' must be an object of {{name: {{bytes, sha256}}}}; the manifest was edited.")
    limit = _verify_limit()
    for name, info in files.items():
        bad_entry = not isinstance(info, dict) or not isinstance(info.get("bytes"), int) or isinstance(info.get("bytes"), bool)
        if bad_entry or not isinstance(info.get("sha256", ""), str):
            raise RunError(f"{run_dir / 'manifest.json'}: malformed entry for {name!r} in 'files'; the manifest was edited.")
        path = run_dir / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise RunError(f"{run_dir / 'manifest.json'}: file entry {name!r} points outside the run directory.")
        if not path.is_file():
            raise RunError(f"{path}: listed in the manifest but missing. Re-run `gist-curate compute` to rebuild it.")
        stat = path.stat()
        if stat.st_size != info["bytes"]:
            raise RunError(
                f"{path}: {stat.st_size} bytes, the manifest recorded {info['bytes']}. "
                "The file was truncated or changed after the run finished; recompute the run."
            )
        expected = info.get("sha256")
        if not expected or stat.st_size > limit:
            continue  # runs written before checksums were recorded, or above the hashing limit: size only
        key = (str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        if _VERIFIED.get(key) == expected:
            continue
        actual = file_sha256(path)
        if actual != expected:
            raise RunError(
                f"{path}: checksum differs from the manifest's record (sha256 {actual[:12]}…, recorded {expected[:12]}…). "
                "The file was corrupted or edited after the run finished; recompute the run."
            )
        _VERIFIED[key] = expected


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own ``checksum`` field."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_manifest(path: str | Path, manifest: dict) -> None:
    """Write a run manifest atomically with its own checksum, so a hand edit or a flipped bit is caught on open."""
    manifest["checksum"] = manifest_checksum(manifest)
    write_json(path, manifest)


def read_manifest(run_dir: str | Path) -> dict:
    """Read and version-check a run's manifest."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory. List runs with `gist-curate info --run-dir cache/<id>`.")
    manifest = read_json(run_dir / "manifest.json")
    if not isinstance(manifest, dict) or manifest.get("format") != "gist-curator-run":
        raise RunError(f"{run_dir / 'manifest.json'}: not a GIST Curator run manifest.")
    version = manifest.get("version")
    if version != FORMAT_VERSION:
        raise RunError(
            f"{run_dir / 'manifest.json'}: run format version {version}, this tool reads version {FORMAT_VERSION}. "
            "Recompute the run with this version of gist-curator."
        )
    if "checksum" in manifest and manifest["checksum"] != manifest_checksum(manifest):  # runs written without one: not checked
        raise RunError(
            f"{run_dir / 'manifest.json'}: its content does not match its checksum; the manifest was edited or corrupted. "
            "Recompute the run (or resume it with the same options)."
        )
    shapes = {"config": dict, "methods": list, "checkpoints": list, "timings": dict, "fingerprints": dict}
    for key, kind in shapes.items():
        if key in manifest and manifest[key] is not None and not isinstance(manifest[key], kind):
            raise RunError(f"{run_dir / 'manifest.json'}: '{key}' must be a JSON {kind.__name__.replace('dict', 'object')}; the manifest was edited.")
    if not all(isinstance(m, str) for m in manifest.get("methods") or []):
        raise RunError(f"{run_dir / 'manifest.json'}: 'methods' must list method names; the manifest was edited.")
    if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in manifest.get("checkpoints") or []):
        raise RunError(f"{run_dir / 'manifest.json'}: 'checkpoints' must be objects with a name; the manifest was edited.")
    return manifest


@dataclass(frozen=True)
class Run:
    """A finished run, loaded for scoring and curation (arrays are memory-mapped)."""

    path: Path
    manifest: dict
    train: pl.DataFrame
    val: pl.DataFrame
    train_coords: np.ndarray  # (C, N, k) float32, C checkpoints
    val_coords: np.ndarray  # (C, m, k)
    ckpt_weights: np.ndarray  # (C,) summing to 1

    @property
    def k_max(self) -> int:
        return int(self.train_coords.shape[2])

    @property
    def methods(self) -> list[str]:
        return list(self.manifest.get("methods", ["gist"]))

    @property
    def val_tasks(self) -> list[str]:
        return self.val["task"].to_list()

    def geometry(self) -> dict:
        return read_json(self.path / "geometry.json")


def open_run(run_dir: str | Path) -> Run:
    """Open a finished run; raises RunError with a clear message for unfinished or damaged runs."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if manifest.get("status") != "complete":
        raise RunError(
            f"{run_dir}: run status is '{manifest.get('status')}', not complete. "
            f"Resume it with `gist-curate compute --run-dir {run_dir}` (same options)."
        )
    check_files(run_dir, manifest)
    train = _check_table(read_parquet(run_dir / "train.parquet"), run_dir / "train.parquet")
    val = _check_table(read_parquet(run_dir / "val.parquet"), run_dir / "val.parquet")
    train_coords = read_npy(run_dir / "train_coords.npy")
    val_coords = read_npy(run_dir / "val_coords.npy")
    for name, coords in (("train_coords.npy", train_coords), ("val_coords.npy", val_coords)):
        if coords.dtype.kind != "f":
            raise RunError(f"{run_dir / name}: dtype {coords.dtype}, expected floating point coordinates.")
    if train_coords.ndim != 3 or train_coords.shape[1] != train.height or train_coords.shape[2] < 1:
        raise RunError(f"{run_dir / 'train_coords.npy'}: shape {train_coords.shape} does not match {train.height} training rows.")
    if val_coords.ndim != 3 or val_coords.shape[1] != val.height or val_coords.shape[0] != train_coords.shape[0] or val_coords.shape[2] != train_coords.shape[2]:
        raise RunError(f"{run_dir / 'val_coords.npy'}: shape {val_coords.shape} does not match the run.")
    try:
        weights = np.asarray(manifest.get("ckpt_weights") or [1.0] * train_coords.shape[0], dtype=np.float64)
    except (TypeError, ValueError):
        raise RunError(f"{run_dir / 'manifest.json'}: ckpt_weights must be a list of numbers.") from None
    if weights.shape != (train_coords.shape[0],):
        raise RunError(f"{run_dir / 'manifest.json'}: ckpt_weights has {weights.size} entries for {train_coords.shape[0]} checkpoints.")
    if not np.isfinite(weights).all() or (weights < 0).any() or not math.isfinite(weights.sum()) or weights.sum() <= 0:
        raise RunError(f"{run_dir / 'manifest.json'}: ckpt_weights {weights.tolist()} must be non-negative finite numbers with a positive sum.")
    return Run(run_dir, manifest, train, val, train_coords, val_coords, weights / weights.sum())


_TABLE_COLUMNS = {"id": pl.String, "source": pl.String, "task": pl.String, "text": pl.String, "raw": pl.String}


def _check_table(table: pl.DataFrame, path: Path) -> pl.DataFrame:
    """The example table must have the string columns every view reads, and unique ids."""
    for column, dtype in _TABLE_COLUMNS.items():
        if column not in table.columns:
            raise RunError(f"{path}: column '{column}' is missing; the table was edited or comes from another tool.")
        if table.schema[column] != dtype:
            raise RunError(f"{path}: column '{column}' has type {table.schema[column]}, expected {dtype}.")
    if table["id"].null_count() or table["id"].n_unique() != table.height:
        raise RunError(f"{path}: example ids are missing or not unique; the table was edited.")
    return table


def list_runs(root: str | Path = DEFAULT_ROOT) -> list[dict]:
    """Summaries of the run directories directly under ``root``, newest first."""
    root = Path(root)
    runs = []
    for manifest_path in root.glob("*/manifest.json"):
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError, RecursionError):  # unreadable, not UTF-8, not JSON
            continue
        if not isinstance(manifest, dict) or manifest.get("format") != "gist-curator-run":
            continue
        if not isinstance(manifest.get("config"), dict):
            manifest["config"] = {}
        runs.append(
            {
                "path": str(manifest_path.parent),
                "id": manifest_path.parent.name,
                "status": manifest.get("status"),
                "created": manifest.get("created"),
                "model": manifest.get("config", {}).get("model"),
                "n_train": manifest.get("n_train"),
                "n_val": manifest.get("n_val"),
                "methods": manifest.get("methods", ["gist"]),
            }
        )
    return sorted(runs, key=lambda r: str(r.get("created") or ""), reverse=True)
