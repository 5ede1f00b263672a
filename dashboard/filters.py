"""Example filters of the Examples view: text search, facets and ranges turned into a row mask."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import polars as pl

STATES = ("all", "selected", "not selected", "included by hand", "excluded by hand")


@dataclass(frozen=True)
class ExampleFilter:
    """What the curator asked to see; every field empty means every row."""

    text: str = ""
    regex: bool = False
    sources: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    score_range: tuple[float, float] | None = None
    length_range: tuple[int, int] | None = None
    state: str = "all"
    region: str = ""  # a Map selection kept as a filter, described (its rows are passed to filter_mask)

    def describe(self) -> dict:
        """JSON-able description, recorded as the origin of a bulk edit."""
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
        return {k: v for k, v in out.items() if v not in ("", (), [], None, False, "all")}

    def label(self) -> str:
        """Short human summary of the active conditions."""
        parts = []
        if self.text:
            parts.append(f"{'regex' if self.regex else 'text'} “{self.text}”")
        if self.sources:
            parts.append("source ∈ {" + ", ".join(self.sources) + "}")
        if self.tasks:
            parts.append("task ∈ {" + ", ".join(self.tasks) + "}")
        if self.score_range:
            parts.append(f"score {self.score_range[0]:.3f}…{self.score_range[1]:.3f}")
        if self.length_range:
            parts.append(f"length {self.length_range[0]}…{self.length_range[1]}")
        if self.state != "all":
            parts.append(self.state)
        if self.region:
            parts.append(self.region)
        return "; ".join(parts) or "no filter"


def text_mask(texts: pl.Series, query: str, regex: bool = False) -> np.ndarray:
    """Case-insensitive substring or regex match per row; ValueError for an invalid pattern."""
    if not query:
        return np.ones(texts.len(), dtype=bool)
    texts = texts.fill_null("")
    if regex:
        try:
            hits = texts.str.contains(f"(?i){query}", literal=False, strict=True)
        except Exception as err:  # polars raises ComputeError for a bad pattern
            raise ValueError(f"invalid regular expression “{query}”: {str(err).splitlines()[0]}") from None
    else:
        hits = texts.str.to_lowercase().str.contains(query.lower(), literal=True)
    return hits.fill_null(False).to_numpy().astype(bool)


def filter_mask(
    train: pl.DataFrame,
    scores: np.ndarray,
    tasks: np.ndarray,
    selected: np.ndarray,
    edit_state: dict[str, str],
    flt: ExampleFilter,
    text_hits: np.ndarray | None = None,
    region_rows: np.ndarray | None = None,
) -> np.ndarray:
    """Boolean row mask for ``flt`` (``text_hits`` is the cached text-search mask, ``region_rows`` the rows of a Map selection)."""
    mask = np.ones(train.height, dtype=bool) if text_hits is None else text_hits.copy()
    if region_rows is not None:
        in_region = np.zeros(train.height, dtype=bool)
        in_region[np.asarray(region_rows, dtype=np.int64)] = True
        mask &= in_region
    if flt.sources:
        mask &= train["source"].is_in(list(flt.sources)).to_numpy()
    if flt.tasks:
        mask &= np.isin(tasks, list(flt.tasks))
    if flt.score_range:
        lo, hi = flt.score_range
        mask &= (scores >= lo) & (scores <= hi)
    if flt.length_range:
        lo, hi = flt.length_range
        lengths = train["n_tokens"].to_numpy()
        mask &= (lengths >= lo) & (lengths <= hi)
    if flt.state == "selected":
        mask &= selected
    elif flt.state == "not selected":
        mask &= ~selected
    elif flt.state in ("included by hand", "excluded by hand"):
        wanted = "include" if flt.state == "included by hand" else "exclude"
        ids = [i for i, op in edit_state.items() if op == wanted]
        mask &= train["id"].is_in(ids).to_numpy()
    return mask


def ranked_rows(order: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Rows of the ranking that pass the mask, best first."""
    return order[mask[order]]


def table_key(settings: tuple, view: np.ndarray) -> str:
    """Widget key of the ranked table: new whenever the settings or the rows shown change.

    Streamlit keeps a keyed table's row selection by position, so a key that outlived a change of rows (an
    edit, another target) would re-apply the picked position to another example.
    """
    import hashlib

    return "tbl_" + hashlib.sha1(repr(settings).encode() + np.asarray(view, dtype=np.int64).tobytes()).hexdigest()[:10]


def ranked_table(
    train: pl.DataFrame,
    texts: pl.Series,
    rows: np.ndarray,
    positions: np.ndarray,
    scores: np.ndarray,
    tasks: np.ndarray | None,
    selected: np.ndarray,
    edit_state: dict[str, str],
    preview_chars: int = 160,
) -> pl.DataFrame:
    """The table shown for a page of ranked rows (rank is the position in the full ranking; no task column without ``tasks``)."""
    idx = pl.Series(rows.astype(np.int64))
    ids = train["id"].gather(idx)
    columns = {
        "position": positions[rows] + 1,
        "score": scores[rows],
        "included": selected[rows],
        "edit": [edit_state.get(i, "") for i in ids.to_list()],
        "source": train["source"].gather(idx),
        "task": None if tasks is None else tasks[rows],
        "length": train["n_tokens"].gather(idx),
        "id": ids,
        "text": texts.gather(idx).fill_null("").str.replace_all(r"\s+", " ").str.slice(0, preview_chars),
    }
    return pl.DataFrame({name: values for name, values in columns.items() if values is not None})


def points_in_region(xy: np.ndarray, region: dict, y_order: np.ndarray | None = None) -> np.ndarray:
    """Mask of 2-D points inside a plotly box ({x: [x0, x1], y: [y0, y1]}) or lasso ({x: [...], y: [...]}).

    A lasso is tested by the even-odd rule, one polygon edge at a time, on only the points whose y lies in the
    edge's span (found by binary search in ``y_order``, the points sorted by y, computed when not given): the work
    is about N times the number of edges a horizontal line crosses, not N times the number of edges.
    """
    xs, ys = np.asarray(region.get("x", []), float), np.asarray(region.get("y", []), float)
    if xs.size == 2 and ys.size == 2 and region.get("kind") != "lasso":
        return (xy[:, 0] >= xs.min()) & (xy[:, 0] <= xs.max()) & (xy[:, 1] >= ys.min()) & (xy[:, 1] <= ys.max())
    inside = np.zeros(len(xy), dtype=bool)
    if xs.size < 3 or xs.size != ys.size:
        return inside
    px, py = xy[:, 0], xy[:, 1]
    order = np.argsort(py, kind="stable") if y_order is None else y_order
    sorted_y = py[order]
    for x0, y0, x1, y1 in zip(xs, ys, np.roll(xs, -1), np.roll(ys, -1)):
        if y0 == y1:  # a horizontal edge is crossed by no horizontal ray
            continue
        # the edge crosses the ray of a point when min(y0, y1) <= y < max(y0, y1)
        start, stop = np.searchsorted(sorted_y, [min(y0, y1), max(y0, y1)], side="left")
        if start == stop:
            continue
        rows = order[start:stop]
        x_at = (x1 - x0) * (py[rows] - y0) / (y1 - y0) + x0
        inside[rows] ^= px[rows] < x_at
    return inside


def region_mask(xy: np.ndarray, regions: list[dict], y_order: np.ndarray | None = None) -> np.ndarray:
    """Mask of the points inside any of the regions (a selection drawn with shift held has several)."""
    mask = np.zeros(len(xy), dtype=bool)
    for region in regions:
        mask |= points_in_region(xy, region, y_order)
    return mask
