"""Deprecated alias of ``gist_backend.curation`` selection and export (moved in 0.2); import from ``gist_backend`` instead."""

import warnings

from .curation.budget import resolve_budget  # noqa: F401
from .curation.compare import compare  # noqa: F401
from .curation.export import export_jsonl, summary  # noqa: F401
from .curation.selection import Selection, select  # noqa: F401

warnings.warn("gist_backend.selection moved to gist_backend.curation (selection, export, compare); "
              "use `from gist_backend import select, export_jsonl`", DeprecationWarning, stacklevel=2)  # fmt: skip
