"""Deprecated alias of ``gist_backend.curation.scoring`` (moved in 0.2); import from ``gist_backend`` instead."""

import warnings

from .curation.scoring import available_methods, check_method, nearest_validation, ranking, scores, task_scores  # noqa: F401

warnings.warn("gist_backend.scoring moved to gist_backend.curation.scoring; use `from gist_backend import scores`",
              DeprecationWarning, stacklevel=2)  # fmt: skip
