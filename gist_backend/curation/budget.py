"""Budgets and per-source caps, and the greedy fill every selection method shares.

- A budget is a count (int, or a float ≥ 1 with no fraction, or "500") or a fraction of the pool (float < 1,
  or "5%"). Above the pool size it is clamped, with a warning.
- A per-source cap is a count (int) or a fraction of the budget (float in (0, 1], or "30%", floored, ≥ 1).
- ``fill`` takes the forced includes, then the first allowed candidates of an order, skipping excluded rows and
  rows whose source reached its cap. Forced includes count towards their source's cap but are never dropped by it.
"""

from __future__ import annotations

import math
import warnings as _warnings

import numpy as np


def resolve_budget_note(budget: int | float | str, n: int) -> tuple[int, str | None]:
    """(count, warning or None); see ``resolve_budget``."""
    given = budget
    if isinstance(budget, bool) or not isinstance(budget, (int, float, str, np.integer, np.floating)):
        raise TypeError(f"budget must be a count, a fraction or a percentage string, got {budget!r}")
    if isinstance(budget, str):
        text = budget.strip()
        try:
            if text.endswith("%"):
                budget = float(text[:-1]) / 100.0
                if not 0 < budget <= 1:
                    raise ValueError
            else:
                budget = float(text) if any(c in text for c in ".eE") else int(text)
        except ValueError:
            raise ValueError(f"budget {given!r} is not a count (500), a fraction (0.05) or a percentage (5%) in (0, 100]") from None
    if isinstance(budget, (float, np.floating)):
        if not math.isfinite(budget) or budget <= 0:
            raise ValueError(f"budget must be positive, got {given!r}")
        if budget < 1 or (isinstance(given, str) and given.strip().endswith("%")):
            count = int(math.floor(budget * n + 0.5))
        elif float(budget).is_integer():
            count = int(budget)
        else:
            raise ValueError(f"budget {given!r}: a float is a fraction (< 1) or a whole count; use 0.05, 5% or 500")
    else:
        count = int(budget)
    if count < 1:
        raise ValueError(f"budget {given!r} selects no example from a pool of {n}; use a count ≥ 1 or a larger fraction")
    if count > n:
        return n, f"pool smaller than the budget: {count} asked, the pool has {n} examples; selecting all {n}"
    return count, None


def resolve_budget(budget: int | float | str, n: int) -> int:
    """Budget → count: an int (or whole float ≥ 1, or "500") is a count; a float < 1 or "5%" a fraction of ``n``
    (rounded half up). Above ``n`` it is clamped to ``n`` with a warning (``warnings.warn``; ``select`` records it)."""
    count, warning = resolve_budget_note(budget, n)
    if warning:
        _warnings.warn(warning, stacklevel=2)
    return count


def cap_count(cap: int | float | str | None, budget: int) -> int | None:
    """Per-source cap as a count: an int is a count, a float in (0, 1] (or "30%") a fraction of the budget (floor, ≥ 1)."""
    if cap is None:
        return None
    if isinstance(cap, bool) or not isinstance(cap, (int, float, str, np.integer, np.floating)):
        raise TypeError(f"per_source_cap must be a count or a fraction of the budget, got {cap!r}")
    if isinstance(cap, str):
        text = cap.strip()
        try:
            cap = float(text[:-1]) / 100 if text.endswith("%") else (float(text) if any(c in text for c in ".eE") else int(text))
        except ValueError:
            raise ValueError(f"per_source_cap {text!r} is not a count (50), a fraction (0.3) or a percentage (30%)") from None
    if isinstance(cap, (float, np.floating)):
        if not 0 < cap <= 1:
            raise ValueError(f"per_source_cap {cap}: a float cap is a fraction of the budget in (0, 1]; use an int for a count")
        return max(1, int(math.floor(cap * budget + 1e-9)))
    if int(cap) < 1:
        raise ValueError(f"per_source_cap must be ≥ 1 (or a fraction of the budget), got {cap}")
    return int(cap)


def _within_group_rank(groups: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions share its group (0-based running count)."""
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    counts = np.diff(np.r_[starts, groups.size])
    out = np.empty(groups.size, np.int64)
    out[order] = np.arange(groups.size) - np.repeat(starts, counts)
    return out


def fill(
    order: np.ndarray, count: int, forced_in: np.ndarray, excluded: np.ndarray, codes: np.ndarray, n_sources: int, cap: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy fill: forced rows plus the first allowed candidates of ``order``; returns (rows, capped per source)."""
    is_forced = np.zeros(codes.size, bool)
    is_forced[forced_in] = True
    cand = order[~excluded[order] & ~is_forced[order]]
    need = max(0, count - forced_in.size)
    capped = np.zeros(n_sources, np.int64)
    if cap is None:
        take = cand[:need]
    else:
        src = codes[cand]
        room = np.maximum(cap - np.bincount(codes[forced_in], minlength=n_sources), 0)
        allowed = _within_group_rank(src) < room[src]
        positions = np.flatnonzero(allowed)[:need]
        take = cand[positions]
        horizon = 0 if need <= 0 else (positions[-1] + 1 if positions.size == need else cand.size)
        capped = np.bincount(src[:horizon][~allowed[:horizon]], minlength=n_sources)
    return np.concatenate([forced_in, take]).astype(np.int64), capped
