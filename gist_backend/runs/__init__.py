"""The run store: the on-disk format of a run, its one writer and one reader, and writer locks.

    files.py     atomic writes and damage-naming reads of JSON, .npy, safetensors and Parquet
    manifest.py  the manifest, the artefacts the format requires, and their checksums
    store.py     write_run (the only writer of a finished run) and open_run (the only reader)
    lock.py      one writer per scope (run, edits, evals, maps), released when the holder dies

Names are imported on first use, so ``gist_backend.runs.files`` needs only numpy (a bare GPU box has no polars).
"""

from gist_backend.lazy import lazy_exports

_EXPORTS = {
    "RunError": "files", "atomic_path": "files", "file_sha256": "files", "read_json": "files", "read_npy": "files",
    "read_parquet": "files", "read_tensors": "files", "tool_version": "files", "utc_now": "files", "write_json": "files",
    "write_npy": "files", "write_parquet": "files", "write_tensors": "files",
    "RunLocked": "lock", "run_lock": "lock",
    "FORMAT_VERSION": "manifest", "check_files": "manifest", "read_manifest": "manifest", "write_manifest": "manifest",
    "DEFAULT_ROOT": "store", "Run": "store", "TargetData": "store", "compact_coords": "store", "list_runs": "store",
    "open_run": "store", "write_run": "store", "write_target": "store",
}  # fmt: skip
__all__ = list(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
