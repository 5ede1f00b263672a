"""Curation: scores, selections, exports, comparisons, the curator's edits and 2-D maps, all from a run (no model).

    scoring.py    per-example scores of each method at any subspace rank
    budget.py     budgets, per-source caps and the greedy fill
    selection.py  select(): a budget by one method, honouring caps and edits; G2IS sets cached in the run
    export.py     export_jsonl(): the original records verbatim plus a manifest; guards against overwriting inputs
    compare.py    overlaps and score correlations of the methods' selections (and of the targets' scores)
    combine.py    one selection for several targets: per-target quotas or a round-robin by rank
    edits.py      include / exclude / reset / undo, an append-only log in the run
    maps.py       UMAP maps of the coordinates, cached per rank
"""

from .budget import resolve_budget
from .combine import Part, combine
from .compare import compare, compare_targets
from .edits import add_edit, edit_state, load_edits, undo
from .export import export_jsonl, summary
from .scoring import available_methods, ranking, scores, task_scores
from .selection import Selection, select

__all__ = [
    "scores", "task_scores", "ranking", "available_methods", "select", "Selection", "resolve_budget", "export_jsonl",
    "summary", "compare", "compare_targets", "combine", "Part", "add_edit", "load_edits", "undo", "edit_state",
]  # fmt: skip
