"""Export a selection as JSONL (the original records, verbatim) plus a manifest, without ever destroying a user's file.

The records are copied from the run (``train.parquet``'s ``raw`` column, the bytes read at compute time), not
re-read from the input files, so an input edited since the compute cannot slip other records into an export.
``check_output`` refuses, before anything is written, to write over any input file of the run (symlinks
resolved), into a run folder, over a folder, or over an existing file unless ``force`` is given.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..runs.files import atomic_path, tool_version, utc_now, write_json
from ..runs.manifest import FORMAT
from ..runs.store import Run
from .selection import Selection

EXPORT_VERSION = 2  # version 2: `_gist` fields "position" (1 = first) and "rank" (the subspace rank)


def input_paths(run: Run) -> list[Path]:
    """Every input file or folder of the run (pool, every target, a local model, adapter or model cache), resolved."""
    config = run.manifest.get("config") or {}
    given = list(config.get("train") or []) + list(config.get("val") or [])
    given += [config[k] for k in ("model", "adapter", "model_cache_dir") if config.get(k) and Path(str(config[k])).expanduser().exists()]
    for target in run.manifest.get("targets") or []:
        given += list(target.get("files") or [])
    given += list(run.manifest.get("inputs") or [])
    out = []
    for text in given:
        path = Path(str(text)).expanduser()
        if not path.exists() and ":" in str(text):  # a saved dataset's "folder:split"
            path = Path(str(text).rsplit(":", 1)[0]).expanduser()
        out.append(path.resolve())
    return list(dict.fromkeys(out))


def _run_folder_of(path: Path) -> Path | None:
    """The run folder that ``path`` lies in (or is), if any."""
    for folder in [path, *path.parents]:
        manifest = folder / "manifest.json"
        if manifest.is_file():
            try:
                if json.loads(manifest.read_text()).get("format") == FORMAT:
                    return folder
            except (OSError, ValueError, AttributeError):
                continue
    return None


def check_output(run: Run, out: str | Path, *, force: bool = False, sidecar: bool = True, also_inputs: Sequence[str | Path] = ()) -> Path:
    """The resolved file to write an export to, or ValueError saying why writing there could destroy data.

    With ``sidecar`` the ``<out>.manifest.json`` written beside it is checked the same way; ``also_inputs`` are
    the command's own input files (a test set, a selection), refused like the run's.
    """
    if not str(out).strip():
        raise ValueError("the output path is empty; give a file name such as selected.jsonl")
    resolved = Path(out).expanduser().resolve()
    paths = [resolved, resolved.with_name(resolved.name + ".manifest.json")] if sidecar else [resolved]
    if resolved.is_dir():
        raise ValueError(f"{out} is a folder; give a file name inside it, e.g. {Path(out) / 'selected.jsonl'}")
    for path in paths:
        own = [Path(p).expanduser().resolve() for p in also_inputs]
        for source in [*input_paths(run), *own]:
            if path == source or (source.is_dir() and path.is_relative_to(source)):
                whose = "this command" if source in own else f"run {run.path}"
                raise ValueError(f"refusing to write {path}: it is an input of {whose} ({source}). Choose another output file.")
        folder = _run_folder_of(path.parent)
        if folder is not None:
            raise ValueError(f"refusing to write {path} inside run folder {folder}: that would mix user files with the run's "
                             "artefacts. Write the export elsewhere, e.g. exports/.")  # fmt: skip
        if path.is_dir():
            raise ValueError(f"{path} is a folder; choose another output file name.")
        if path.exists() and not force:
            raise ValueError(f"{path} already exists; pass --force (force=True) to replace it, or choose another name.")
    return resolved


def changed_inputs(run: Run) -> list[str]:
    """Input files whose size or modification time differ from compute time, or that are gone (exports still hold the run's copy)."""
    out = []
    for path, (size, mtime_ns) in (run.manifest.get("input_stats") or {}).items():
        try:
            stat = Path(path).stat()
        except OSError:
            out.append(path)
            continue
        if (stat.st_size, stat.st_mtime_ns) != (size, mtime_ns):
            out.append(path)
    return out


def export_jsonl(run: Run, selection: Selection, out_path: str | Path, *, with_meta: bool = False, force: bool = False) -> Path:
    """Write the selected records verbatim as JSONL (selection order) plus ``<out>.manifest.json``; returns the manifest path.

    Each line is the record's ``raw`` text exactly as read from the input. With ``with_meta`` each record is
    re-serialised with a ``_gist`` field {"score", "position" (1 = first in the selection), "method", "rank"}.
    A raw record spanning several lines (possible only from pretty-printed JSON input) is re-serialised compactly.
    """
    out = check_output(run, out_path, force=force)
    if run.train["id"].gather(selection.rows).to_list() != selection.ids:
        raise ValueError(f"this selection was not made on run {run.path}; select again on this run before exporting")
    raws = run.raw.gather(selection.rows).to_list()
    lines, reserialised = [], 0
    for position, raw in enumerate(raws):
        if with_meta:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError(f"record {selection.ids[position]!r} is not a JSON object; export it without --with-meta")
            score = None if selection.scores is None else float(selection.scores[position])
            record["_gist"] = {"score": score, "position": position + 1, "method": selection.method, "rank": selection.rank}
            raw = json.dumps(record, ensure_ascii=False)
        elif "\n" in raw or "\r" in raw:
            raw = json.dumps(json.loads(raw), ensure_ascii=False)
            reserialised += 1
        lines.append(raw)
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    manifest_path = out.with_name(out.name + ".manifest.json")
    manifest = export_manifest(run, selection, out, hashlib.sha256(data).hexdigest(), with_meta, reserialised, len(lines))
    with atomic_path(out) as tmp:  # the records are written (the step a full disk fails) before either file is renamed into place
        tmp.write_bytes(data)
        write_json(manifest_path, manifest)
    return manifest_path


def export_manifest(run: Run, selection: Selection, out: Path, sha256: str, with_meta: bool, reserialised: int, count: int) -> dict:
    """What an export holds and how it was made: method, rank, budget, edits, shortfall, top-ups and the run's identity."""
    m = run.manifest
    return {
        "format": "gist-curator-export", "version": EXPORT_VERSION, "created": utc_now(), "tool_version": tool_version(),
        "output": str(out), "output_sha256": sha256, "count": count, "with_meta": with_meta,
        "records": "copied verbatim from the run (the bytes read at compute time), not re-read from the input files",
        "reserialised": reserialised, "method": selection.method, "rank": selection.rank, "budget": selection.budget,
        "target": selection.target, "shortfall": selection.shortfall, "topups": selection.topups,
        "per_source_cap": selection.per_source_cap, "per_source_cap_count": selection.cap, "capped": selection.capped,
        "source_mix": source_mix(run, selection.rows),
        "edits": {"n_edits": selection.n_edits, "forced_in": selection.forced_in, "forced_out": selection.forced_out},
        "warnings": selection.warnings, "method_info": selection.info,
        "run": {
            "path": str(run.path.resolve()), "id": run.path.name, "created": m.get("created"), "config_hash": m.get("config_hash"),
            "n_train": run.train.height, "fingerprints": m.get("fingerprints"), "manifest_checksum": m.get("checksum"),
        },
    }  # fmt: skip


def source_mix(run: Run, rows: np.ndarray) -> dict[str, int]:
    """Source → number of the given rows, largest first."""
    counts = run.train["source"].gather(rows).value_counts(sort=True)
    return {str(s): int(c) for s, c in counts.iter_rows()}


def _quantiles(values: np.ndarray) -> dict:
    if values.size == 0:
        return {}
    q = np.quantile(values, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    names = ("min", "p10", "p25", "median", "p75", "p90", "max")
    return {**{k: float(v) for k, v in zip(names, q)}, "mean": float(values.mean()), "total": int(values.sum())}


def summary(run: Run, selection: Selection) -> dict:
    """Count, source mix (vs the pool), token-length distribution and score statistics of a selection."""
    rows = selection.rows
    mix = source_mix(run, rows)
    pool = source_mix(run, np.arange(run.train.height))
    count = int(rows.size)
    sc = selection.scores
    has_scores = sc is not None and sc.size > 0
    return {
        "method": selection.method, "rank": selection.rank, "budget": selection.budget, "count": count,
        "source_mix": mix, "source_share": {s: c / count for s, c in mix.items()} if count else {},
        "pool_source_share": {s: c / run.train.height for s, c in pool.items()},
        "n_tokens": _quantiles(run.train["n_tokens"].to_numpy()[rows]),
        "n_response_tokens": _quantiles(run.train["n_response_tokens"].to_numpy()[rows]),
        "mean_score": float(np.mean(sc)) if has_scores else None, "min_score": float(np.min(sc)) if has_scores else None,
        "max_score": float(np.max(sc)) if has_scores else None, "forced_in": len(selection.forced_in),
        "forced_out": len(selection.forced_out), "capped": selection.capped, "shortfall": selection.shortfall,
        "topups": len(selection.topups), "warnings": selection.warnings,
    }  # fmt: skip
