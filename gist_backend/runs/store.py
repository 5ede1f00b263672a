"""The run store: ``write_run`` is the one writer of a finished run and ``open_run`` the one reader.

A run is a folder (default ``cache/<run-id>/``) that reopens without the model. Format version 2:

    manifest.json                 see below; written last, so a run is complete only once it says so
    train.parquet                 one row per usable pool record: row, id, source, task, n_tokens,
                                  n_response_tokens, text (rendered conversation), raw (the record verbatim), file, line
    bad_records.jsonl             {"split", "file", "line", "reason"} per skipped record
    grad_norms.npy                (G, N) float32: ‖g_i‖ of the whole LoRA gradient at each GIST checkpoint
    sketches/train.npy            (L, N, p) float16: Adam-preconditioned, projected gradients at each LESS checkpoint
    sketches/gist.npy             (G, N, P) float16: S g_i, projected SGD gradients at each GIST checkpoint (--reusable only)
    targets/<t>/val.parquet       the target's validation records (task = sub-task), same columns as train
    targets/<t>/gist_unit.npy     (G, N, k) float16: unit GIST coordinates z_i / ‖z_i‖, z_i = Vᵀ g_i
    targets/<t>/gist_norm.npy     (G, N) float32: ‖z_i‖
    targets/<t>/val_coords.npy    (G, m, k) float32: validation coordinates U Σ
    targets/<t>/geometry.json     {"checkpoints": [{"name", "spectrum", "rho", "rho_per_module"}]}
    targets/<t>/coupling.safetensors   heatmap blocks of the last GIST checkpoint
    targets/<t>/val_sketch.npy, less_scores.npy (N,), less_task_scores.npy (N, T)   with LESS/G2IS
    edits.json, selections/, maps/, evals/    written later by curation and evaluation
    warmup/, ckpt-<c>/            compute's own working files (resume); not artefacts

GIST scores are cosines, so a row's direction is what counts: coordinates are stored as unit vectors in
float16 plus their norm in float32 (k·2 + 8 bytes per example and checkpoint with the gradient norm), which
keeps every rank's score within about 1e-3 of float32 (bench/storage.py measures it). The manifest records
format, version, status, config and its hash, methods, n_train, d, k_max, checkpoints (the warmup's),
gist {"checkpoints", "weights"}, less {"checkpoints", "weights", "dim"}, targets [{"name", "n_val", "k",
"files", "fingerprints"}], fingerprints of the pool and model, input_stats (size and mtime of each input file,
for a cheap "changed since" note), gradient_passes, timings, files and checksum
(see ``manifest``). Version 1 runs (one fp32 coordinate array, a single target) still open.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl

from .files import RunError, read_json, read_npy, read_parquet, read_tensors, utc_now, write_json, write_npy, write_parquet, write_tensors
from ..config import SKETCH_METHODS
from .manifest import FORMAT, FORMAT_VERSION, check_files, has_sketches, read_manifest, record_file, target_dir, write_manifest

DEFAULT_ROOT = Path("cache")
TABLE_COLUMNS = ("row", "id", "source", "task", "n_tokens", "n_response_tokens", "text", "raw", "file", "line")
LIGHT_COLUMNS = ("row", "id", "source", "task", "n_tokens", "n_response_tokens")  # read on open; text and raw on demand
RESIDENT_MAX_BYTES = 2 << 30  # the largest float32 copy of the unit coordinates kept in memory (Run.resident_unit_coords)
_STRING_COLUMNS = ("id", "source", "task", "text", "raw")


@dataclass(frozen=True)
class TargetData:
    """What a run stores for one target (a validation set), as computed."""

    name: str
    val: pl.DataFrame
    files: list[str]
    fingerprints: dict[str, str]
    train_coords: np.ndarray  # (G, N, k) float32 GIST coordinates per GIST checkpoint
    val_coords: np.ndarray  # (G, m, k)
    geometry: list[dict]  # per GIST checkpoint: {"name", "spectrum", "rho", "rho_per_module"}
    coupling: dict[str, np.ndarray]  # heatmap blocks of the last GIST checkpoint
    val_sketch: np.ndarray | None = None  # (L, m, p) float16
    less_scores: np.ndarray | None = None  # (N,)
    less_task_scores: np.ndarray | None = None  # (N, T)


def unit_rows(coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unit rows, row norms), both float32, of (..., k) coordinates (norms summed in float64); all-zero rows stay zero."""
    coords = np.asarray(coords, dtype=np.float32)
    norms = np.sqrt(np.einsum("...k,...k->...", coords.astype(np.float64), coords.astype(np.float64)))
    return (coords / np.where(norms > 0, norms, 1.0)[..., None]).astype(np.float32), norms.astype(np.float32)


def compact_coords(coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unit rows in float16, row norms in float32): the stored form of GIST coordinates."""
    unit, norms = unit_rows(coords)
    return unit.astype(np.float16), norms


def write_target(run_dir: Path, manifest: dict, target: TargetData) -> None:
    """Write one target's artefacts and record them (and the target) in ``manifest``; the manifest is not saved here."""
    base = target_dir(target.name)
    unit, norms = compact_coords(target.train_coords)
    write_parquet(run_dir / base / "val.parquet", target.val)
    write_npy(run_dir / base / "gist_unit.npy", unit)
    write_npy(run_dir / base / "gist_norm.npy", norms)
    write_npy(run_dir / base / "val_coords.npy", np.asarray(target.val_coords, dtype=np.float32))
    write_json(run_dir / base / "geometry.json", {"checkpoints": target.geometry})
    write_tensors(run_dir / base / "coupling.safetensors", target.coupling)
    names = ["val.parquet", "gist_unit.npy", "gist_norm.npy", "val_coords.npy", "geometry.json", "coupling.safetensors"]
    if has_sketches(manifest):
        write_npy(run_dir / base / "val_sketch.npy", np.asarray(target.val_sketch, dtype=np.float16))
        write_npy(run_dir / base / "less_scores.npy", np.asarray(target.less_scores, dtype=np.float32))
        write_npy(run_dir / base / "less_task_scores.npy", np.asarray(target.less_task_scores, dtype=np.float32))
        names += ["val_sketch.npy", "less_scores.npy", "less_task_scores.npy"]
    for name in names:
        record_file(manifest, run_dir, f"{base}/{name}")
    entry = {"name": target.name, "n_val": target.val.height, "k": int(unit.shape[-1]), "files": list(target.files),
             "fingerprints": dict(target.fingerprints), "tasks": sorted(set(target.val["task"].to_list()))}  # fmt: skip
    targets = [t for t in manifest.get("targets", []) if t["name"] != target.name]
    manifest["targets"] = targets + [entry]


def _place(destination: Path, array: np.ndarray | Path) -> None:
    """Move a finished ``.npy`` into place, or write an array there (float16)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(array, Path):
        os.replace(array, destination)
    else:
        write_npy(destination, np.asarray(array, dtype=np.float16))


def write_run(
    run_dir: str | Path,
    manifest: dict,
    *,
    train: pl.DataFrame,
    targets: list[TargetData],
    grad_norms: np.ndarray,
    train_sketch: np.ndarray | Path | None = None,
    gist_sketch: np.ndarray | Path | None = None,
) -> Path:
    """Write every artefact of a finished run, record sizes and checksums, and save the manifest as complete.

    ``manifest`` must already hold the run's description (config, methods, gist/less checkpoints and weights, and
    ``reusable`` when ``gist_sketch`` is given); the sketches may be arrays or finished ``.npy`` files, which are moved
    into place (large sketches are built on disk). Returns the run directory.
    """
    run_dir = Path(run_dir)
    missing = [t.name for t in targets if has_sketches(manifest) and t.less_scores is None]
    if missing or (has_sketches(manifest) and train_sketch is None):
        raise ValueError(f"a run with LESS/G2IS needs the training sketch and every target's LESS scores (missing: {missing})")
    manifest.update(format=FORMAT, version=FORMAT_VERSION, files={}, targets=[], n_train=train.height)
    write_parquet(run_dir / "train.parquet", train.select(TABLE_COLUMNS))
    write_npy(run_dir / "grad_norms.npy", np.asarray(grad_norms, dtype=np.float32))
    names = ["train.parquet", "grad_norms.npy"]
    if bool(manifest.get("reusable")) != (gist_sketch is not None):
        raise ValueError("a reusable run needs its pool sketch, and only a reusable run has one")
    for name, sketch in (("sketches/train.npy", train_sketch if has_sketches(manifest) else None), ("sketches/gist.npy", gist_sketch)):
        if sketch is not None:
            _place(run_dir / name, sketch)
            names.append(name)
    for name in names:
        record_file(manifest, run_dir, name)
    for target in targets:
        write_target(run_dir, manifest, target)
    manifest["k_max"] = min(t["k"] for t in manifest["targets"])
    manifest.update(status="complete", finished=utc_now(), error=None)
    write_manifest(run_dir / "manifest.json", manifest)
    return run_dir


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Run:
    """A finished run opened on one of its targets (arrays are memory-mapped; text columns load on first use)."""

    path: Path
    manifest: dict
    target: str
    train: pl.DataFrame  # the light columns of train.parquet (LIGHT_COLUMNS)
    val: pl.DataFrame  # the target's validation table
    unit_coords: np.ndarray  # (G, N, k) unit GIST coordinates
    coord_norms: np.ndarray  # (G, N) ‖z‖
    val_coords: np.ndarray  # (G, m, k)
    gist_weights: np.ndarray  # (G,) summing to 1
    grad_norms: np.ndarray | None  # (G, N) ‖g‖; None for version 1 runs
    paths: dict[str, Path] = field(default_factory=dict)  # logical artefact name → file

    @property
    def k_max(self) -> int:
        return int(self.unit_coords.shape[2])

    @property
    def methods(self) -> list[str]:
        return list(self.manifest.get("methods", ["gist"]))

    @property
    def targets(self) -> list[str]:
        return [t["name"] for t in self.manifest.get("targets", [])] or [self.target]

    @property
    def val_tasks(self) -> list[str]:
        return self.val["task"].to_list()

    @cached_property
    def text(self) -> pl.Series:
        """The rendered conversation of every pool row (read on first use)."""
        return read_parquet(self.path / "train.parquet", columns=["text"])["text"]

    @cached_property
    def raw(self) -> pl.Series:
        """Every pool record verbatim, as read from its input file (read on first use)."""
        return read_parquet(self.path / "train.parquet", columns=["raw"])["raw"]

    @cached_property
    def row_index(self) -> dict[str, int]:
        """Pool id → row number."""
        return dict(zip(self.train["id"].to_list(), range(self.train.height)))

    @cached_property
    def source_codes(self) -> tuple[list[str], np.ndarray]:
        """(sorted source names, int64 code per pool row into them)."""
        source = self.train["source"].cast(pl.String)
        return source.unique().sort().to_list(), (source.rank("dense") - 1).to_numpy().astype(np.int64)

    @cached_property
    def resident_unit_coords(self) -> np.ndarray:
        """The unit coordinates as one float32 array in memory (the float16 memmap if that would exceed RESIDENT_MAX_BYTES):
        converted once, so scoring at another rank reads and converts nothing (about 4x faster at 270k rows)."""
        if self.unit_coords.size * 4 > RESIDENT_MAX_BYTES:
            return self.unit_coords
        return np.asarray(self.unit_coords, dtype=np.float32)

    @property
    def scoring_unit_coords(self) -> np.ndarray:
        """What scoring reads: ``resident_unit_coords`` once something (the dashboard) has made it, else the memmap."""
        return self.__dict__.get("resident_unit_coords", self.unit_coords)

    @cached_property
    def train_coords(self) -> np.ndarray:
        """(G, N, k) float32 GIST coordinates rebuilt from the unit rows and norms."""
        return np.asarray(self.unit_coords, dtype=np.float32) * np.asarray(self.coord_norms, dtype=np.float32)[..., None]

    def geometry(self) -> dict:
        """Spectrum and coupling summary of each GIST checkpoint of this target."""
        return read_json(self.paths["geometry"])

    def coupling(self) -> dict[str, np.ndarray]:
        """Heatmap blocks of the last GIST checkpoint of this target."""
        return read_tensors(self.paths["coupling"])

    def less_weights(self) -> np.ndarray:
        """Weights of the LESS checkpoints (summing to 1)."""
        weights = np.asarray((self.manifest.get("less") or {}).get("weights") or self.gist_weights, dtype=np.float64)
        return weights / weights.sum()


def _check_train_table(run_dir: Path, table: pl.DataFrame, path: Path) -> pl.DataFrame:
    """The table must have the string columns every view reads (checked on the file's schema), and unique ids."""
    schema = pl.read_parquet_schema(path)
    for column in _STRING_COLUMNS:
        if column not in schema:
            raise RunError(f"{path}: column '{column}' is missing; the table was edited or comes from another tool.")
        if schema[column] != pl.String:
            raise RunError(f"{path}: column '{column}' has type {schema[column]}, expected {pl.String}.")
    if table["id"].null_count() or table["id"].n_unique() != table.height:
        raise RunError(f"{path}: example ids are missing or not unique; the table was edited.")
    return table


def _finite(array: np.ndarray, path: Path, what: str, nonnegative: bool = False) -> np.ndarray:
    """The array, after checking it is floating point and free of NaN and infinities (in blocks: it may be memory-mapped),
    and with ``nonnegative`` (norms) that no value is below 0."""
    if array.dtype.kind != "f":
        raise RunError(f"{path}: dtype {array.dtype}, expected floating point {what}.")
    flat = np.ravel(array)
    for start in range(0, flat.size, 1 << 24):
        block = flat[start : start + (1 << 24)]
        if not np.isfinite(block).all():
            raise RunError(f"{path}: holds NaN or infinite {what}; the file was edited or the computation diverged. Recompute the run.")
        if nonnegative and (block < 0).any():
            raise RunError(f"{path}: holds negative {what}, which no computation gives; the file was edited. Recompute the run.")
    return array


def open_run(run_dir: str | Path, target: str | None = None) -> Run:
    """Open a finished run on ``target`` (default: its first); RunError with a clear message for unfinished or damaged runs."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if manifest.get("status") != "complete":
        raise RunError(f"{run_dir}: run status is '{manifest.get('status')}', not complete. "
                       f"Resume it with `gist-curate compute --run-dir {run_dir}` (same options).")  # fmt: skip
    check_files(run_dir, manifest)
    if manifest["version"] == 1:
        return _open_v1(run_dir, manifest, target)
    names = [t["name"] for t in manifest.get("targets", [])]
    if not names:
        raise RunError(f"{run_dir / 'manifest.json'}: the run lists no target; the manifest was edited.")
    target = names[0] if target is None else target
    if target not in names:
        raise RunError(f"{run_dir}: no target {target!r}; this run has {', '.join(names)}.")
    base = run_dir / target_dir(target)
    train = _check_train_table(run_dir, read_parquet(run_dir / "train.parquet", columns=list(LIGHT_COLUMNS)), run_dir / "train.parquet")
    val = read_parquet(base / "val.parquet")
    unit = _finite(read_npy(base / "gist_unit.npy"), base / "gist_unit.npy", "coordinates")
    norms = _finite(read_npy(base / "gist_norm.npy"), base / "gist_norm.npy", "coordinate norms", nonnegative=True)
    val_coords = _finite(read_npy(base / "val_coords.npy"), base / "val_coords.npy", "coordinates")
    grad_norms = _finite(read_npy(run_dir / "grad_norms.npy"), run_dir / "grad_norms.npy", "gradient norms", nonnegative=True)
    g, n = unit.shape[0], train.height
    if unit.ndim != 3 or unit.shape[1] != n or norms.shape != (g, n) or grad_norms.shape != (g, n):
        raise RunError(f"{base / 'gist_unit.npy'}: shapes {unit.shape}, {norms.shape}, {grad_norms.shape} do not match {n} pool rows.")
    if val_coords.shape != (g, val.height, unit.shape[2]):
        raise RunError(f"{base / 'val_coords.npy'}: shape {val_coords.shape} does not match the run.")
    weights = _weights((manifest.get("gist") or {}).get("weights"), g, run_dir)
    paths = {"geometry": base / "geometry.json", "coupling": base / "coupling.safetensors", "less_scores": base / "less_scores.npy",
             "less_task_scores": base / "less_task_scores.npy", "val_sketch": base / "val_sketch.npy",
             "train_sketch": run_dir / "sketches" / "train.npy", "gist_sketch": run_dir / "sketches" / "gist.npy"}  # fmt: skip
    return Run(run_dir, manifest, target, train, val, unit, norms, val_coords, weights, grad_norms, paths)


def _weights(values, count: int, run_dir: Path) -> np.ndarray:
    """Checkpoint weights from the manifest, checked and normalised."""
    try:
        weights = np.asarray(values if values is not None else [1.0] * count, dtype=np.float64)
    except (TypeError, ValueError):
        raise RunError(f"{run_dir / 'manifest.json'}: checkpoint weights must be a list of numbers.") from None
    if weights.shape != (count,):
        raise RunError(f"{run_dir / 'manifest.json'}: {weights.size} checkpoint weights for {count} checkpoints.")
    if not np.isfinite(weights).all() or (weights < 0).any() or not weights.sum() > 0:
        raise RunError(f"{run_dir / 'manifest.json'}: checkpoint weights {weights.tolist()} must be non-negative finite numbers with a positive sum.")
    return weights / weights.sum()


def _open_v1(run_dir: Path, manifest: dict, target: str | None) -> Run:
    """A version 1 run: one fp32 coordinate array, one unnamed target, no gradient norms."""
    if target not in (None, "target"):
        raise RunError(f"{run_dir}: a version 1 run has one target, named 'target'.")
    train = _check_train_table(run_dir, read_parquet(run_dir / "train.parquet", columns=list(LIGHT_COLUMNS)), run_dir / "train.parquet")
    val = read_parquet(run_dir / "val.parquet")
    coords = _finite(read_npy(run_dir / "train_coords.npy"), run_dir / "train_coords.npy", "coordinates")
    val_coords = _finite(read_npy(run_dir / "val_coords.npy"), run_dir / "val_coords.npy", "coordinates")
    if coords.ndim != 3 or coords.shape[1] != train.height or val_coords.shape != (coords.shape[0], val.height, coords.shape[2]):
        raise RunError(f"{run_dir / 'train_coords.npy'}: shape {coords.shape} does not match {train.height} training rows.")
    unit, norms = unit_rows(coords)  # version 1 stored float32 coordinates: kept at that precision
    weights = _weights(manifest.get("ckpt_weights"), coords.shape[0], run_dir)
    paths = {"geometry": run_dir / "geometry.json", "coupling": run_dir / "coupling.safetensors", "less_scores": run_dir / "less_scores.npy",
             "less_task_scores": run_dir / "less_task_scores.npy", "val_sketch": run_dir / "sketches" / "val.npy",
             "train_sketch": run_dir / "sketches" / "train.npy"}  # fmt: skip
    return Run(run_dir, manifest, "target", train, val, unit, norms, val_coords, weights, None, paths)


def describe(run: Run) -> dict:
    """What scripts rely on (``gist-curate info --json``): sizes, passes, and per method its checkpoints and store per example."""
    m = run.manifest
    g, k = run.unit_coords.shape[0], run.k_max
    gist_ckpts = (m.get("gist") or {}).get("checkpoints") or [c["name"] for c in m.get("checkpoints", [])][-g:]
    gist_bytes = g * (k * 4) if m.get("version") == 1 else g * (k * 2 + 4 + 4)  # unit fp16 + ‖z‖ + ‖g‖ (v2); fp32 coords (v1)
    methods = {"gist": {"checkpoints": gist_ckpts, "bytes_per_example": gist_bytes}}
    if run.grad_norms is not None:
        methods["gist-global"] = dict(methods["gist"])
    if has_sketches(m):
        less = m.get("less") or {"checkpoints": [c["name"] for c in m.get("checkpoints", [])]}
        sketch = np.load(run.paths["train_sketch"], mmap_mode="r", allow_pickle=False)
        per_example = int(sketch.shape[0] * sketch.shape[2] * sketch.dtype.itemsize)
        for name in SKETCH_METHODS:
            if name in run.methods:
                methods[name] = {"checkpoints": list(less["checkpoints"]), "bytes_per_example": per_example}
    return {
        "run": str(run.path), "status": m.get("status"), "created": m.get("created"), "format_version": m.get("version"),
        "model": (m.get("config") or {}).get("model"), "pool": run.train.height, "target": run.target, "targets": run.targets,
        "n_val": run.val.height, "k_max": k, "d": m.get("d"), "gradient_passes": m.get("gradient_passes", len(m.get("checkpoints", [])) or 1),
        "methods": methods, "warnings": m.get("warnings", []), "timings": m.get("timings", {}),
    }  # fmt: skip


def list_runs(root: str | Path = DEFAULT_ROOT) -> list[dict]:
    """Summaries of the run directories directly under ``root``, newest first (unreadable manifests skipped)."""
    runs = []
    for manifest_path in Path(root).glob("*/manifest.json"):
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError, RecursionError):
            continue
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            continue
        config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
        targets = manifest.get("targets") if isinstance(manifest.get("targets"), list) else []
        runs.append(
            {
                "path": str(manifest_path.parent), "id": manifest_path.parent.name, "status": manifest.get("status"),
                "created": manifest.get("created"), "model": config.get("model"), "n_train": manifest.get("n_train"),
                "targets": [t.get("name") for t in targets if isinstance(t, dict)], "methods": manifest.get("methods", ["gist"]),
            }
        )  # fmt: skip
    return sorted(runs, key=lambda r: str(r.get("created") or ""), reverse=True)
