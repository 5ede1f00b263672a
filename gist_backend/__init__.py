"""GIST Curator backend: targeted instruction-data selection by gradient geometry.

The public API is small; each name lives in the module that implements it:

    compute(ComputeConfig(...), run_dir)   gradients → subspace → coordinates  (compute.py)
    open_run(run_dir) -> Run               reopen a finished run without the model (runs.py)
    scores(run, method, rank)              per-example scores from stored coordinates (scoring.py)
    select(run, method=, rank=, budget=)   budget, caps and manual edits → Selection (selection.py)
    export_jsonl(run, selection, path)     original records verbatim + manifest (selection.py)
"""

from .compute import ComputeConfig, compute
from .runs import Run, RunError, list_runs, open_run
from .scoring import scores
from .selection import Selection, export_jsonl, select

__all__ = ["ComputeConfig", "compute", "Run", "RunError", "list_runs", "open_run", "scores", "Selection", "select", "export_jsonl"]
