"""Compare: overlap, score agreement and source mix of the methods' selections at the same budget, and of the targets'."""

from __future__ import annotations

import numpy as np
import polars as pl
import streamlit as st

from dashboard import backend, figures, session, ui

run = ui.require_run()
ui.header("Compare", f"How the methods' selections differ at the same budget ({backend.budget(run)}) and rank ({session.rank()}).")
methods = backend.available_methods(run)
if "less" not in methods:
    st.info("This run was computed with GIST only, so it is compared with the seeded random baseline. "
            "Recompute with `--methods gist,less,g2is` to compare LESS and G2IS.", icon=":material/info:")  # fmt: skip

with st.spinner("Selecting with every method…"):
    report = backend.comparison(run)
names = report["methods"]
labels = [session.METHOD_LABELS[m] for m in names]

left, right = st.columns(2)
with left:
    st.subheader("Overlap", anchor=False)
    st.plotly_chart(figures.jaccard_figure(labels, report["jaccard"]), key="cmp_jaccard")
    st.caption(f"Jaccard overlap |A∩B| / |A∪B| of the methods' own selections of {report['budget']:,} examples (no caps, no curation edits); 1 means the same examples.")
with right:
    st.subheader("Source mix", anchor=False)
    st.plotly_chart(figures.source_mix_figure({session.METHOD_LABELS.get(m, m): mix for m, mix in report["source_mix"].items()}), key="cmp_mix")
    st.caption("Share of each source in the pool and in each method's selection.")

if report.get("correlations") is not None and report["correlations"].height:
    st.subheader("Score agreement", anchor=False)
    st.dataframe(report["correlations"], hide_index=True, width="stretch",
                 column_config={c: st.column_config.NumberColumn(format="%.3f") for c in ("spearman", "pearson")})  # fmt: skip
    st.caption("Rank (Spearman) and linear (Pearson) correlation of the scores over the whole pool; G2IS has no scores and is left out.")

st.subheader("Score scatter", anchor=False)
scored = [m for m in names if m != "g2is"]
c = st.columns([1, 1, 2], vertical_alignment="bottom")
ss = st.session_state
if ss.get("compare_x") not in scored:
    ss["compare_x"] = scored[0]
if ss.get("compare_y") not in scored:
    ss["compare_y"] = scored[1] if len(scored) > 1 else scored[0]
x_m = c[0].selectbox("x", scored, key="compare_x", format_func=session.METHOD_LABELS.get)
y_m = c[1].selectbox("y", scored, key="compare_y", format_func=session.METHOD_LABELS.get)
g2is_set = report.get("g2is_rows")
groups = None
if g2is_set is not None:
    groups = np.zeros(run.train.height, dtype=bool)
    groups[np.asarray(g2is_set, dtype=np.int64)] = True
    c[2].caption("Red: the G2IS set (a set, not a ranking, so it has no axis of its own).")
fig = figures.scatter_figure(backend.scores(run, x_m), backend.scores(run, y_m), session.METHOD_LABELS[x_m], session.METHOD_LABELS[y_m], groups, ("G2IS set", "not in G2IS set"))
st.plotly_chart(fig, key="cmp_scatter")
st.caption("Each point is a pool example placed by its two scores (at most 20,000 drawn); agreement shows as a thin diagonal band.")

st.subheader("Selections side by side", anchor=False)
st.dataframe(pl.DataFrame(report["table"]), hide_index=True, width="stretch")

if len(run.targets) > 1:
    method = backend.method(run)
    st.subheader("Across targets", anchor=False)
    with st.spinner("Selecting for every target…"):
        across = backend.target_comparison(run)
    targets = across["targets"]
    left, right = st.columns(2)
    with left:
        jaccard = np.array([[across["jaccard"][a][b] for b in targets] for a in targets], dtype=np.float64)
        st.plotly_chart(figures.jaccard_figure(targets, jaccard), key="cmp_targets_jaccard")
        st.caption(f"Jaccard overlap of each target's own {session.METHOD_LABELS[method]} selection of {across['budget']:,} examples "
                   "(no caps, no edits): how much one selection could serve both targets.")  # fmt: skip
    with right:
        rows = [{"target": t, "rank": across["ranks"][t], "selected": across["counts"][t],
                 **{f"shared with {u}": across["intersection"][t][u] for u in targets if u != t}} for t in targets]  # fmt: skip
        st.dataframe(pl.DataFrame(rows), hide_index=True, width="stretch")
        pairs = [{"a": a, "b": b, "spearman": across["spearman"][a][b], "pearson": across["pearson"][a][b]}
                 for i, a in enumerate(targets) for b in targets[i + 1 :] if a in across["spearman"]]  # fmt: skip
        if pairs:
            st.dataframe(pl.DataFrame(pairs), hide_index=True, width="stretch",
                         column_config={c: st.column_config.NumberColumn(format="%.3f") for c in ("spearman", "pearson")})  # fmt: skip
            st.caption("Correlation of the targets' scores over the whole pool: near 1, the targets want the same examples.")
        else:
            st.caption("G2IS returns sets without scores, so only the overlaps compare.")
