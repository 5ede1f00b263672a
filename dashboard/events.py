"""Parsing what the browser sends back: Plotly selection events, and rendered conversations split into turns."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

_TURN = re.compile(r"(?:^|\n\n)\[(system|user|assistant)\] ")


def selection_ids(event: Any) -> list[str]:
    """Example ids of a plotly selection event, read dict-style from each point's customdata."""
    try:
        points = event["selection"]["points"]
    except (KeyError, TypeError):
        return []
    ids: list[str] = []
    for point in points or []:
        data = point.get("customdata") if isinstance(point, dict) else None
        if isinstance(data, (list, tuple)):
            data = data[0] if data else None
        if data is not None:
            ids.append(str(data))
    return list(dict.fromkeys(ids))


def selection_rows(event: Any, n_rows: int) -> np.ndarray:
    """Row numbers (sorted, unique) of a plotly selection event whose points carry their row in customdata."""
    try:
        points = event["selection"]["points"]
    except (KeyError, TypeError):
        return np.zeros(0, dtype=np.int64)
    rows = []
    for point in points or []:
        data = point.get("customdata") if isinstance(point, dict) else None
        if isinstance(data, (list, tuple)):
            data = data[0] if data else None
        if isinstance(data, (int, float)) and not isinstance(data, bool) and float(data).is_integer() and 0 <= data < n_rows:
            rows.append(int(data))
    return np.unique(np.asarray(rows, dtype=np.int64))


def selection_regions(event: Any) -> list[dict]:
    """Box and lasso regions of a plotly selection event ({'kind', 'x', 'y'})."""
    try:
        sel = event["selection"]
    except (KeyError, TypeError):
        return []
    regions = []
    for kind in ("box", "lasso"):
        for shape in sel.get(kind, []) or []:
            regions.append({"kind": kind, "x": list(shape.get("x", [])), "y": list(shape.get("y", []))})
    return regions


def conversation(text: str) -> list[tuple[str, str]]:
    """Split a rendered conversation ('[role] content' blocks) into (role, content) turns."""
    pieces = _TURN.split(text or "")
    if len(pieces) < 3:
        return [("user", text or "")]
    return [(pieces[i], pieces[i + 1]) for i in range(1, len(pieces) - 1, 2)]
