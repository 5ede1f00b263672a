"""GIST Curator: targeted instruction-data selection by gradient geometry.

The public API is small; each name lives in the module that implements it:

    compute(ComputeConfig(...), run_dir)        gradients → subspace → coordinates       (compute.py, config.py)
    open_run(run_dir, target=None) -> Run       reopen a finished run without the model  (runs/store.py)
    scores(run, method, rank)                   per-example scores from stored data      (curation/scoring.py)
    select(run, method=, rank=, budget=)        budget, caps and edits → Selection       (curation/selection.py)
    export_jsonl(run, selection, path)          original records verbatim + manifest     (curation/export.py)
    compare(run, budget)                        overlaps and correlations of the methods (curation/compare.py)
    add_target(run_dir, val_files, name)        a new target from a --reusable run, no pool pass (targets.py)
    combine(run_dir, parts, budget)             one selection serving several targets    (curation/combine.py)
    gist_backend.evaluate.evaluate(run, test, selections)   fine-tune on them and on random selections, compare

The layout (engine/, methods/, stages/, runs/, curation/, devkit/) is described in docs/design.md. Names are
imported on first use, so ``import gist_backend.engine.grads`` needs only torch: a GPU box without the table
and UI dependencies can still run the gradient engine and G2IS.
"""

from .lazy import lazy_exports

_EXPORTS = {
    "ComputeConfig": "config", "compute": "compute",
    "Run": "runs.store", "RunError": "runs.files", "list_runs": "runs.store", "open_run": "runs.store",
    "scores": "curation.scoring", "Selection": "curation.selection", "select": "curation.selection",
    "export_jsonl": "curation.export", "compare": "curation.compare", "add_target": "targets", "combine": "curation.combine",
}  # fmt: skip
__all__ = list(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
