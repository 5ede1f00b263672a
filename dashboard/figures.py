"""Plotly figures of the dashboard (drawing only: every number comes from the backend)."""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

PALETTE = ["#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#FF9DA6", "#9D755D", "#BAB0AC", "#EECA3B"]
STATE_COLOURS = {
    "selected": "#2E7D32",
    "not selected": "#B0BEC5",
    "included by hand": "#1565C0",
    "excluded by hand": "#C62828",
}
MARGIN = dict(l=10, r=10, t=40, b=10)


def _layout(fig: go.Figure, height: int, legend_below: bool = False, **kw) -> go.Figure:
    legend = dict(orientation="h", yanchor="top", y=-0.18, x=0) if legend_below else dict(orientation="h", yanchor="bottom", y=1.02, x=0)
    fig.update_layout(height=height, margin=MARGIN, legend=legend | dict(traceorder="normal"), **kw)
    return fig


def spectrum_figure(checkpoints: Sequence[dict], rank: int, k_max: int | None = None) -> go.Figure:
    """σ_j on a log scale and cumulative energy, r90/r95/r99 and the current rank marked."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Singular values σⱼ (log scale)", "Cumulative energy Σσ²"), horizontal_spacing=0.08)
    for i, ckpt in enumerate(checkpoints):
        spec = ckpt["spectrum"]
        j = np.arange(1, len(spec["sigma"]) + 1)
        colour = PALETTE[i % len(PALETTE)]
        name = ckpt.get("name", f"checkpoint {i}")
        fig.add_trace(go.Scatter(x=j, y=spec["sigma"], mode="lines+markers", marker=dict(size=4), line=dict(color=colour),
                                 name=name, legendgroup=name, hovertemplate="j=%{x}<br>σ=%{y:.4g}<extra>" + name + "</extra>"), 1, 1)  # fmt: skip
        fig.add_trace(go.Scatter(x=j, y=spec["cumulative"], mode="lines", line=dict(color=colour), name=name, legendgroup=name,
                                 showlegend=False, hovertemplate="r=%{x}<br>energy=%{y:.1%}<extra>" + name + "</extra>"), 1, 2)  # fmt: skip
    last = checkpoints[-1]["spectrum"]
    for level, dash in (("r90", "dot"), ("r95", "dash"), ("r99", "dashdot")):
        fig.add_vline(x=last[level], line=dict(color="#888", dash=dash, width=1), row=1, col=2,
                      annotation_text=f"{level} = {last[level]}", annotation_position="bottom right", annotation_font_size=11)  # fmt: skip
    k_max = len(checkpoints[-1]["spectrum"]["sigma"]) if k_max is None else k_max
    n_dirs = len(last["sigma"])
    for col in (1, 2):
        fig.add_vline(x=rank, line=dict(color="#E45756", width=2), row=1, col=col)
        if k_max < n_dirs:
            fig.add_vrect(x0=k_max + 0.5, x1=n_dirs + 0.5, fillcolor="#9E9E9E", opacity=0.12, line_width=0, row=1, col=col)
    fig.add_annotation(x=rank, y=1.0, xref="x2", yref="paper", text=f"rank {rank}", showarrow=False, font=dict(color="#E45756"), yanchor="bottom")
    fig.update_yaxes(type="log", row=1, col=1, title_text="σ", tickformat="~g")
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%", row=1, col=2)
    fig.update_xaxes(title_text="direction j", row=1, col=1)
    fig.update_xaxes(title_text="rank r", row=1, col=2)
    return _layout(fig, 440, legend_below=True, showlegend=len(checkpoints) > 1)


def short_module(name: str) -> str:
    """'base_model.model.model.layers.3.self_attn.q_proj' → 'L3 q_proj'."""
    m = re.search(r"layers?\.(\d+)\..*?([A-Za-z_0-9]+)$", name)
    if m:
        return f"L{m.group(1)} {m.group(2)}"
    return name.split(".")[-1] if len(name) > 24 else name


def rho_figure(checkpoints: Sequence[dict]) -> go.Figure:
    """Off-diagonal energy fraction ρ per LoRA module (bars) with the overall ρ (line) per checkpoint."""
    fig = go.Figure()
    for i, ckpt in enumerate(checkpoints):
        per = ckpt.get("rho_per_module", {})
        names = list(per)
        colour = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Bar(x=[short_module(n) for n in names], y=[per[n] for n in names], name=f"{ckpt.get('name', i)} per module",
                             marker_color=colour, customdata=names, hovertemplate="%{customdata}<br>ρ=%{y:.3f}<extra></extra>"))  # fmt: skip
        fig.add_trace(go.Scatter(x=[short_module(names[0]), short_module(names[-1])] if names else [], y=[ckpt["rho"]] * 2, mode="lines",
                                 line=dict(color=colour, dash="dash"), name=f"{ckpt.get('name', i)} overall ρ = {ckpt['rho']:.3f}",
                                 hoverinfo="name"))  # fmt: skip
    fig.update_yaxes(range=[0, 1.05], title_text="ρ (off-diagonal energy)")
    fig.update_layout(barmode="group", bargap=0.15)
    return _layout(fig, 380)


def heatmap_pair(block: np.ndarray, gist_block: np.ndarray | None, labels: Sequence[str] | None, title: str) -> go.Figure:
    """Normalised |M_pq| of a coordinate block beside the same-size block in the GIST basis."""
    cols = 2 if gist_block is not None else 1
    titles = (title, f"GIST basis: top {gist_block.shape[0]} directions") if cols == 2 else (title,)
    fig = make_subplots(rows=1, cols=cols, subplot_titles=titles, horizontal_spacing=0.06)
    labels = list(labels) if labels is not None else [str(i) for i in range(block.shape[0])]
    fig.add_trace(go.Heatmap(z=np.asarray(block, dtype=np.float32), x=labels, y=labels, coloraxis="coloraxis",
                             hovertemplate="p=%{y}<br>q=%{x}<br>|M|=%{z:.3f}<extra></extra>"), 1, 1)  # fmt: skip
    if gist_block is not None:
        n = gist_block.shape[0]
        names = [f"v{j + 1}" for j in range(n)]
        fig.add_trace(go.Heatmap(z=np.asarray(gist_block, dtype=np.float32), x=names, y=names, coloraxis="coloraxis",
                                 hovertemplate="%{y}, %{x}<br>|M|=%{z:.3f}<extra></extra>"), 1, 2)  # fmt: skip
    fig.update_layout(coloraxis=dict(colorscale="Viridis", cmin=0, cmax=1, colorbar=dict(title="|M|/√(MppMqq)", thickness=12)))
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    return _layout(fig, 460)


def bar_figure(labels: Sequence[str], values: Sequence[float], title: str, x_title: str = "", fmt: str = ".3f", height: int = 260) -> go.Figure:
    """A plain horizontal bar chart."""
    fig = go.Figure(go.Bar(x=list(values), y=[plain(label) for label in labels], orientation="h", marker_color=PALETTE[0],
                           texttemplate="%{x:" + fmt + "}", textposition="auto", hovertemplate="%{y}: %{x:" + fmt + "}<extra></extra>"))  # fmt: skip
    fig.update_layout(title=dict(text=title, font=dict(size=14)))
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, height)


def coords_figure(coords: np.ndarray, names: Sequence[str]) -> go.Figure:
    """An example's coordinates on the top GIST directions, one bar series per checkpoint."""
    fig = go.Figure()
    j = [f"v{i + 1}" for i in range(coords.shape[1])]
    for c, name in enumerate(names):
        fig.add_trace(go.Bar(x=j, y=coords[c], name=name, marker_color=PALETTE[c % len(PALETTE)]))
    fig.update_layout(barmode="group", title=dict(text="Coordinates zᵢ on the top directions", font=dict(size=14)))
    fig.update_yaxes(title_text="zᵢⱼ = vⱼᵀgᵢ")
    return _layout(fig, 280, showlegend=len(names) > 1)


POINTS_UP_TO = 3_000  # larger maps are drawn as a raster of bins (see map_figure): no WebGL, a figure of a few hundred kB
MAP_BINS = (200, 160)  # raster cells across and up: about 3 screen pixels each at the Map view's size


def map_figure(
    xy: np.ndarray,
    colour: str,
    values: np.ndarray,
    val_xy: np.ndarray | None = None,
    centroid_xy: np.ndarray | None = None,
    centroid_names: Sequence[str] = (),
    *,
    labels: np.ndarray | None = None,
    categories: Sequence[str] | None = None,
    points_up_to: int = POINTS_UP_TO,
    bins: tuple[int, int] = MAP_BINS,
) -> go.Figure:
    """The training map, coloured by score (``values`` numbers) or by category (``values`` labels, or integer indices into ``categories``).

    Up to ``points_up_to`` points every example is a marker whose customdata is its row number (``labels``, the ids,
    show on hover). Above, the map is aggregated into a raster of ``bins`` cells (the mean score, or the most common
    category; a selection state shows the rarest one present, so hand edits stay visible), which keeps the figure a
    few hundred kB at any pool size; a region drawn on it is resolved against every point on the server.
    Validation examples and sub-task centroids are drawn on top in both modes.
    """
    fig = go.Figure()
    if colour != "score" and categories is None:
        categories = sorted({str(v) for v in np.asarray(values).tolist()})
    if len(xy) <= points_up_to:
        _map_points(fig, np.asarray(xy, np.float32), colour, np.asarray(values), labels, categories)
    else:
        _map_raster(fig, np.asarray(xy, np.float32), colour, np.asarray(values), categories, bins)
    if val_xy is not None and len(val_xy):
        marker = go.Scattergl if len(val_xy) > 3_000 else go.Scatter  # SVG: no WebGL context (software-rendered without a GPU)
        fig.add_trace(marker(x=np.asarray(val_xy[:, 0], np.float32), y=np.asarray(val_xy[:, 1], np.float32), mode="markers", name="validation",
                             marker=dict(symbol="x", size=7, color="#212121", line=dict(width=1)), hoverinfo="name"))  # fmt: skip
    if centroid_xy is not None and len(centroid_xy):
        fig.add_trace(go.Scatter(x=np.asarray(centroid_xy[:, 0], np.float32), y=np.asarray(centroid_xy[:, 1], np.float32), mode="markers+text",
                                 name="sub-task centroids", text=[plain(n) for n in centroid_names], textposition="top center",
                                 marker=dict(symbol="star", size=16, color="#FFD600", line=dict(color="#212121", width=1)),
                                 hovertemplate="%{text}<extra>centroid</extra>"))  # fmt: skip
    fig.update_layout(dragmode="lasso", uirevision="map", legend=dict(itemsizing="constant"), plot_bgcolor="#FFFFFF")
    fig.update_xaxes(showticklabels=False, title_text="UMAP 1", showgrid=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, title_text="UMAP 2", showgrid=False, zeroline=False)
    return _layout(fig, 620)


def _category_colour(colour: str, categories: Sequence[str], i: int) -> str:
    return STATE_COLOURS.get(categories[i], PALETTE[i % len(PALETTE)]) if colour == "selection state" else PALETTE[i % len(PALETTE)]


def plain(text: object) -> str:
    """User text (ids, sources, task names) for Plotly labels: its pseudo-HTML tags shown as text, not followed."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _codes(values: np.ndarray, categories: Sequence[str]) -> np.ndarray:
    """Category index per row (-1 for a label not in ``categories``); integer ``values`` are taken as the indices."""
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    labels, inverse = np.unique(values.astype(str), return_inverse=True)
    index = {str(c): i for i, c in enumerate(categories)}
    return np.array([index.get(label, -1) for label in labels.tolist()], np.int64)[inverse.reshape(-1)]


def _map_points(fig: go.Figure, xy: np.ndarray, colour: str, values: np.ndarray, labels: np.ndarray | None, categories) -> None:
    """One marker per example; customdata is the row number."""
    n = len(xy)
    rows = np.arange(n, dtype=np.int32)
    size = 4 if n > 20_000 else 6 if n > 2_000 else 8
    scatter = go.Scattergl if n > 3_000 else go.Scatter
    hover = "%{text}" if labels is not None else "row %{customdata}"
    text = np.array([plain(label) for label in np.asarray(labels).tolist()], dtype=object) if labels is not None else None
    if colour == "score":
        fig.add_trace(scatter(x=xy[:, 0], y=xy[:, 1], mode="markers", name="training examples", customdata=rows, text=text,
                              marker=dict(size=size, color=values.astype(np.float32), colorscale="Viridis", opacity=0.8,
                                          colorbar=dict(title="score", thickness=12)),
                              hovertemplate=hover + "<br>score %{marker.color:.3f}<extra></extra>"))  # fmt: skip
        return
    codes = _codes(values, categories)
    for i, cat in enumerate(categories):
        pick = codes == i
        if not pick.any():
            continue
        fig.add_trace(scatter(x=xy[pick, 0], y=xy[pick, 1], mode="markers", name=plain(cat), customdata=rows[pick],
                              text=None if text is None else text[pick], marker=dict(size=size, color=_category_colour(colour, categories, i), opacity=0.8),
                              hovertemplate=hover + "<br>%{fullData.name}<extra></extra>"))  # fmt: skip


def _map_raster(fig: go.Figure, xy: np.ndarray, colour: str, values: np.ndarray, categories, bins: tuple[int, int]) -> None:
    """Every example binned into a raster: the mean score per cell, or one category per cell; empty cells are blank."""
    nx, ny = bins
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    ix = np.clip(((xy[:, 0] - lo[0]) / span[0] * nx).astype(np.int64), 0, nx - 1)
    iy = np.clip(((xy[:, 1] - lo[1]) / span[1] * ny).astype(np.int64), 0, ny - 1)
    cell = iy * nx + ix
    counts = np.bincount(cell, minlength=nx * ny)
    empty = counts == 0
    centres_x = (lo[0] + (np.arange(nx) + 0.5) * span[0] / nx).astype(np.float32)
    centres_y = (lo[1] + (np.arange(ny) + 0.5) * span[1] / ny).astype(np.float32)
    shown = counts.astype(np.uint16 if counts.max() < 65_536 else np.int32).reshape(ny, nx)
    common = dict(x=centres_x, y=centres_y, customdata=shown, zsmooth=False, hoverongaps=False, name="training examples", showlegend=False)
    if colour == "score":
        with np.errstate(invalid="ignore", divide="ignore"):
            z = np.bincount(cell, weights=values.astype(np.float64), minlength=nx * ny) / counts
        z[empty] = np.nan
        fig.add_trace(go.Heatmap(z=z.astype(np.float32).reshape(ny, nx), colorscale="Viridis", colorbar=dict(title="mean score", thickness=12),
                                 hovertemplate="mean score %{z:.3f}<br>%{customdata:,} examples<extra></extra>", **common))  # fmt: skip
        return
    k = len(categories)
    codes = _codes(values, categories)
    keep = codes >= 0
    cell, codes = cell[keep], codes[keep]
    per_cell = np.bincount(cell * k + codes, minlength=nx * ny * k).reshape(nx * ny, k)
    if colour == "selection state":  # the rarest state present wins, so a hand edit or a selected example shows
        rarity = np.argsort(per_cell.sum(axis=0), kind="stable")
        pick = rarity[np.argmax(per_cell[:, rarity] > 0, axis=1)]
    else:
        pick = per_cell.argmax(axis=1)
    z = pick.astype(np.float32)
    z[empty] = np.nan
    scale = [[edge, _category_colour(colour, categories, i)] for i in range(k) for edge in (i / k, (i + 1) / k)]
    fig.add_trace(go.Heatmap(z=z.reshape(ny, nx), colorscale=scale, zmin=-0.5, zmax=k - 0.5,
                             colorbar=dict(title=colour, thickness=12, tickvals=list(range(k)), ticktext=[plain(c) for c in categories]),
                             hovertemplate="%{customdata:,} examples<extra></extra>", **common))  # fmt: skip


def jaccard_figure(methods: Sequence[str], matrix: np.ndarray) -> go.Figure:
    """Overlap (Jaccard) of the methods' selections at the same budget."""
    fig = go.Figure(go.Heatmap(z=matrix, x=list(methods), y=list(methods), zmin=0, zmax=1, colorscale="Blues",
                               texttemplate="%{z:.2f}", hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>",
                               colorbar=dict(title="Jaccard", thickness=12)))  # fmt: skip
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, 340)


def scatter_figure(x: np.ndarray, y: np.ndarray, x_name: str, y_name: str, groups: np.ndarray | None = None,
                   group_names: tuple[str, str] = ("in set", "not in set"), max_points: int = 20_000, seed: int = 0) -> go.Figure:  # fmt: skip
    """Score against score (sampled), optionally split into two groups (e.g. G2IS membership)."""
    n = len(x)
    keep = np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False)) if n > max_points else np.arange(n)
    fig = go.Figure()
    if groups is None:
        fig.add_trace(go.Scattergl(x=x[keep].astype(np.float32), y=y[keep].astype(np.float32), mode="markers", name="examples",
                                   marker=dict(size=4, color=PALETTE[0], opacity=0.5)))  # fmt: skip
    else:
        for flag, name, colour in ((False, group_names[1], "#B0BEC5"), (True, group_names[0], "#E45756")):
            pick = keep[groups[keep] == flag]
            fig.add_trace(go.Scattergl(x=x[pick].astype(np.float32), y=y[pick].astype(np.float32), mode="markers", name=name,
                                       marker=dict(size=4 if not flag else 6, color=colour, opacity=0.6)))  # fmt: skip
    fig.update_xaxes(title_text=x_name)
    fig.update_yaxes(title_text=y_name)
    return _layout(fig, 420)


def source_mix_figure(mix: dict[str, dict[str, float]]) -> go.Figure:
    """Share of each source in each selection (stacked horizontal bars)."""
    sources = sorted({s for shares in mix.values() for s in shares})
    fig = go.Figure()
    for i, source in enumerate(sources):
        fig.add_trace(go.Bar(y=list(mix), x=[mix[m].get(source, 0.0) for m in mix], name=plain(source), orientation="h",
                             marker_color=PALETTE[i % len(PALETTE)], hovertemplate="%{fullData.name}: %{x:.1%}<extra>%{y}</extra>"))  # fmt: skip
    fig.update_layout(barmode="stack")
    fig.update_xaxes(tickformat=".0%", range=[0, 1])
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, 120 + 45 * len(mix))


def histogram_figure(values: np.ndarray, reference: np.ndarray | None, x_title: str) -> go.Figure:
    """Distribution of a quantity in the selection (and in the pool, for reference)."""
    fig = go.Figure()
    span = np.asarray(reference if reference is not None and len(reference) else values, dtype=np.float64)
    lo, hi = (float(span.min()), float(span.max())) if span.size else (0.0, 1.0)
    bins = dict(start=lo, end=hi + 1e-9, size=max((hi - lo) / 40, 1e-9))
    if reference is not None:
        fig.add_trace(go.Histogram(x=np.asarray(reference, dtype=np.float32), name="pool", histnorm="probability",
                                   marker_color="#B0BEC5", opacity=0.6, xbins=bins))  # fmt: skip
    fig.add_trace(go.Histogram(x=np.asarray(values, dtype=np.float32), name="selection", histnorm="probability",
                               marker_color=PALETTE[0], opacity=0.75, xbins=bins))  # fmt: skip
    fig.update_layout(barmode="overlay")
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text="share", tickformat=".0%")
    return _layout(fig, 300)


def figure_bytes(fig: go.Figure) -> int:
    """Size of the figure's JSON as sent to the browser."""
    return len(fig.to_json().encode())


def evaluation_figure(evaluations: Sequence[tuple[str, dict]]) -> go.Figure:
    """Each evaluated arm's difference from the mean of its random arms, with 95 % bootstrap whiskers:
    test loss (lower is better) and accuracy in points (higher is better), one colour per evaluation."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Test loss − random (lower is better)", "Accuracy − random, points (higher is better)"),
                        horizontal_spacing=0.1)  # fmt: skip
    for i, (label, result) in enumerate(evaluations):
        arms = [a for a in result["arms"] if a.get("vs_random")]
        colour = PALETTE[i % len(PALETTE)]
        for col, key, scale in ((1, "test_loss", 1.0), (2, "accuracy", 100.0)):
            shown = [a for a in arms if a["vs_random"].get(key)]
            if not shown:
                continue
            v = [a["vs_random"][key] for a in shown]
            fig.add_trace(go.Scatter(
                x=[d["diff"] * scale for d in v], y=[plain(f"{a['name']} · {label}") for a in shown], mode="markers", marker=dict(color=colour, size=9),
                error_x=dict(type="data", symmetric=False, array=[(d["high"] - d["diff"]) * scale for d in v],
                             arrayminus=[(d["diff"] - d["low"]) * scale for d in v]),
                name=label, legendgroup=label, showlegend=col == 1,
                hovertemplate="%{y}<br>%{x:.4f}<extra></extra>"), row=1, col=col)  # fmt: skip
    for col in (1, 2):
        fig.add_vline(x=0, line=dict(color="#888", dash="dash"), row=1, col=col)
    rows = sum(len([a for a in r["arms"] if a.get("vs_random")]) for _, r in evaluations)
    return _layout(fig, 140 + 34 * max(rows, 1), legend_below=True)
