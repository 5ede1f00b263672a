"""GIST Curator backend: targeted instruction-data selection by gradient geometry.

The public API is small; each name lives in the module that implements it:

    compute(ComputeConfig(...), run_dir)   gradients → subspace → coordinates  (compute.py)
    open_run(run_dir) -> Run               reopen a finished run without the model (runs.py)
    scores(run, method, rank)              per-example scores from stored coordinates (scoring.py)
    select(run, method=, rank=, budget=)   budget, caps and manual edits → Selection (selection.py)
    export_jsonl(run, selection, path)     original records verbatim + manifest (selection.py)

The names are imported on first use, so ``import gist_backend.grads`` needs only torch: a GPU box
without the table and UI dependencies can still run the gradient engine and G2IS.
"""

from importlib import import_module

_EXPORTS = {
    "ComputeConfig": "compute", "compute": "compute",
    "Run": "runs", "RunError": "runs", "list_runs": "runs", "open_run": "runs",
    "scores": "scoring",
    "Selection": "selection", "select": "selection", "export_jsonl": "selection",
}  # fmt: skip
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gist_backend' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
