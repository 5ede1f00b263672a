"""The run manifest: what a run holds, which files it must have, and the checks that make a damaged run fail loudly.

A complete run's manifest carries ``files`` (bytes and sha256 of every artefact) and ``checksum`` (the
sha256 of the manifest's own canonical JSON). Both are required: a manifest stripped of them is refused.
The list of artefacts a run must have comes from the format (``expected_files``: from the format version,
the methods and the targets), never from the ``files`` entry being checked, so deleting an entry cannot
hide a file from the checks. Sizes are always checked; sha256 up to ``GIST_VERIFY_MAX_MB`` per file
(default 2048; larger files such as big LESS sketches get the size check only). A file already verified in
this process and unchanged since (same inode, size, mtime, ctime) is not hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ..config import needs_sketches
from .files import RunError, json_default, file_sha256, read_json, write_json

FORMAT = "gist-curator-run"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
TARGET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_target_name(name: str) -> str:
    """A target name usable as a folder name (letters, digits, '.', '_', '-'; up to 64), else ValueError."""
    if not isinstance(name, str) or not TARGET_NAME.match(name):
        raise ValueError(f"target name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def target_dir(name: str) -> str:
    """Folder of a target's artefacts inside a run (v2)."""
    return f"targets/{check_target_name(name)}"


def target_files(name: str, sketches: bool) -> list[str]:
    """The artefacts of one target (v2)."""
    base = target_dir(name)
    names = ["val.parquet", "gist_unit.npy", "gist_norm.npy", "val_coords.npy", "geometry.json", "coupling.safetensors"]
    if sketches:
        names += ["val_sketch.npy", "less_scores.npy", "less_task_scores.npy"]
    return [f"{base}/{n}" for n in names]


def has_sketches(manifest: dict) -> bool:
    """True when the run stored LESS/G2IS sketches."""
    return needs_sketches(manifest.get("methods") or [])


def expected_files(manifest: dict) -> list[str]:
    """Every artefact a complete run of this manifest's version, methods and targets must have."""
    sketches = has_sketches(manifest)
    if manifest.get("version") == 1:
        names = ["train.parquet", "val.parquet", "train_coords.npy", "val_coords.npy", "geometry.json", "coupling.safetensors"]
        return names + (["sketches/train.npy", "sketches/val.npy", "less_scores.npy", "less_task_scores.npy"] if sketches else [])
    names = ["train.parquet", "grad_norms.npy"] + (["sketches/train.npy"] if sketches else []) + (["sketches/gist.npy"] if manifest.get("reusable") else [])
    for target in manifest.get("targets") or []:
        names += target_files(target["name"], sketches)
    return names


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own ``checksum`` field."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_manifest(path: str | Path, manifest: dict) -> None:
    """Write a run manifest atomically with its own checksum, so a hand edit or a flipped bit is caught on open."""
    manifest["checksum"] = manifest_checksum(manifest)
    write_json(path, manifest)


def record_file(manifest: dict, run_dir: Path, name: str) -> None:
    """Note a finished artefact's size and sha256 in the manifest."""
    path = run_dir / name
    manifest.setdefault("files", {})[name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


_SHAPES = {"config": dict, "methods": list, "checkpoints": list, "timings": dict, "fingerprints": dict, "targets": list,
           "gist": dict, "less": dict, "files": dict, "reusable": dict}  # fmt: skip


def read_manifest(run_dir: str | Path) -> dict:
    """Read a run's manifest and check its format, version, checksum and the types of its keys."""
    run_dir = Path(run_dir)
    where = run_dir / "manifest.json"
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory. Give the folder `gist-curate compute --run-dir` wrote "
                       "(the dashboard's Runs page lists the runs under a folder).")  # fmt: skip
    if not where.exists():  # compute writes the manifest before anything else
        raise RunError(f"{run_dir}: not a run (no manifest.json). Give the folder `gist-curate compute --run-dir` wrote, or compute a run into it.")
    manifest = read_json(where)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RunError(f"{where}: not a GIST Curator run manifest.")
    version = manifest.get("version")
    if version not in READABLE_VERSIONS:
        raise RunError(f"{where}: run format version {version}; this tool reads versions {READABLE_VERSIONS}. "
                       "Recompute the run with this version of gist-curator.")  # fmt: skip
    complete = manifest.get("status") == "complete"
    if complete and ("checksum" not in manifest or "files" not in manifest):
        raise RunError(f"{where}: a complete run must record 'files' and 'checksum'; they were removed. Recompute the run.")
    if "checksum" in manifest and manifest["checksum"] != manifest_checksum(manifest):
        raise RunError(f"{where}: its content does not match its checksum; the manifest was edited or corrupted. "
                       "Recompute the run (or resume it with the same options).")  # fmt: skip
    for key, kind in _SHAPES.items():
        if key in manifest and manifest[key] is not None and not isinstance(manifest[key], kind):
            raise RunError(f"{where}: '{key}' must be a JSON {kind.__name__.replace('dict', 'object')}; the manifest was edited.")
    if not all(isinstance(m, str) for m in manifest.get("methods") or []):
        raise RunError(f"{where}: 'methods' must list method names; the manifest was edited.")
    for key in ("checkpoints", "targets"):
        if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in manifest.get(key) or []):
            raise RunError(f"{where}: '{key}' must be objects with a name; the manifest was edited.")
    for target in manifest.get("targets") or []:
        try:
            check_target_name(target["name"])
        except ValueError as err:
            raise RunError(f"{where}: {err}; the manifest was edited.") from None
    return manifest


_VERIFIED: dict[tuple, str] = {}  # (path, dev, inode, size, mtime_ns, ctime_ns) → sha256 already checked


def _verify_limit() -> int:
    try:
        return int(float(os.environ.get("GIST_VERIFY_MAX_MB", "2048")) * 2**20)
    except ValueError:
        return 2048 * 2**20


def check_files(run_dir: Path, manifest: dict) -> None:
    """Raise RunError naming the first expected artefact that is unlisted, missing, or differs from its record."""
    files = manifest.get("files")
    where = run_dir / "manifest.json"
    if not isinstance(files, dict):
        raise RunError(f"{where}: 'files' must be an object of {{name: {{bytes, sha256}}}}; the manifest was edited.")
    limit = _verify_limit()
    for name in expected_files(manifest):
        info = files.get(name)
        if info is None:
            raise RunError(f"{where}: the run format requires {name}, and the manifest does not record it; the manifest was edited.")
        size = info.get("bytes") if isinstance(info, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or not isinstance(info.get("sha256"), str) or not info["sha256"]:
            raise RunError(f"{where}: malformed entry for {name!r} in 'files'; the manifest was edited.")
        path = run_dir / name
        if not path.is_file():
            raise RunError(f"{path}: listed in the manifest but missing. Recompute the run (or resume it) to rebuild it.")
        stat = path.stat()
        if stat.st_size != size:
            raise RunError(f"{path}: {stat.st_size} bytes, the manifest recorded {size}. "
                           "The file was truncated or changed after the run finished; recompute the run.")  # fmt: skip
        if stat.st_size > limit:
            continue
        key = (str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        if _VERIFIED.get(key) == info["sha256"]:
            continue
        actual = file_sha256(path)
        if actual != info["sha256"]:
            raise RunError(f"{path}: checksum differs from the manifest's record (sha256 {actual[:12]}…, recorded {info['sha256'][:12]}…). "
                           "The file was corrupted or edited after the run finished; recompute the run.")  # fmt: skip
        _VERIFIED[key] = info["sha256"]
