"""Examples: the ranked pool with search and filters, a detail pane, and include / exclude / reset."""

from __future__ import annotations

import numpy as np
import streamlit as st

from dashboard import backend, filters, session, ui
from dashboard.detail import detail_pane

PAGE_SIZES = (100, 250, 500, 1000)

run = ui.require_run()
method = backend.method(run)
ui.header("Examples", f"The pool ranked by {session.METHOD_LABELS[backend.score_method(method)]} at rank {session.rank()}: search, filter, inspect and override the selection.")
if method == "g2is":
    st.caption("G2IS selects a set rather than a ranking: rows are ordered by their GIST score and *included* marks the G2IS set.")

scores = backend.scores(run, backend.score_method(method))
order, positions = backend.ordering(run, method)
tasks = backend.best_task(run)
try:
    selected = backend.selected_mask(run)
except ValueError as err:  # e.g. more forced includes than the budget: keep the table usable to fix it
    session.show_error(err, "No selection at these settings")
    selected = np.zeros(run.train.height, dtype=bool)
edit_state = backend.edit_state(run)

# ---------------------------------------------------------------- filters
ss = st.session_state
lo_score, hi_score = (0.0, 1.0) if backend.score_method(method) == "random" else (-1.0, 1.0)
lengths = run.train["n_tokens"]
lo_len, hi_len = int(lengths.min()), max(int(lengths.max()), int(lengths.min()) + 1)
for key, bounds in (("f_score", (lo_score, hi_score)), ("f_length", (lo_len, hi_len))):
    if ss.get(f"{key}_bounds") != bounds:  # another method's score scale or another run: the filter starts open
        ss[key], ss[f"{key}_bounds"] = bounds, bounds
with st.container(border=True):
    c = st.columns([3, 1, 2], vertical_alignment="bottom")
    c[0].text_input("Search text", key="f_text", placeholder="Search text or id (substring, or a regular expression)", label_visibility="collapsed")
    c[1].toggle("Regex", key="f_regex")
    c[2].selectbox("Selection state", filters.STATES, key="f_state", label_visibility="collapsed", format_func=lambda s: f"Show: {s}")
    c = st.columns(4)
    c[0].multiselect("Source", sorted(run.train["source"].unique().to_list()), key="f_sources", placeholder="all sources")
    c[1].multiselect("Sub-task", sorted(set(run.val_tasks)), key="f_tasks", placeholder="all sub-tasks",
                     help="The sub-task each example aligns with most (GIST, current rank).")  # fmt: skip
    c[2].slider("Score", lo_score, hi_score, key="f_score", step=0.01)
    c[3].slider("Length (tokens)", lo_len, hi_len, key="f_length")

region = ss.get("f_map")  # a Map selection sent here ("Show them in Examples")
if region is not None and region.get("run") != backend.run_key(run):
    region = ss["f_map"] = None
if region is not None:
    c = st.columns([5, 1], vertical_alignment="center")
    c[0].markdown(f":material/scatter_plot: Showing only the {session.escape(region['label'])}.")
    if c[1].button("Clear map filter", key="f_map_clear", icon=":material/close:", width="stretch"):
        ss["f_map"] = None
        st.rerun()

flt = filters.ExampleFilter(
    text=ss.get("f_text", "").strip(),
    regex=bool(ss.get("f_regex")),
    sources=tuple(ss.get("f_sources", ())),
    tasks=tuple(ss.get("f_tasks", ())),
    score_range=None if tuple(ss["f_score"]) == (lo_score, hi_score) else tuple(ss["f_score"]),
    length_range=None if tuple(ss["f_length"]) == (lo_len, hi_len) else tuple(ss["f_length"]),
    state=ss.get("f_state", "all"),
    region=region["label"] if region else "",
)
try:
    hits = backend.text_hits(run, flt.text, flt.regex)
except ValueError as err:
    session.show_error(err)
    hits = np.zeros(run.train.height, dtype=bool)
mask = filters.filter_mask(run.train, scores, tasks, selected, edit_state, flt, hits, region["rows"] if region else None)
rows = filters.ranked_rows(order, mask)

# ---------------------------------------------------------------- bulk actions
bulk = st.columns([3, 1, 1, 1], vertical_alignment="center")
bulk[0].markdown(f"**{len(rows):,}** of {run.train.height:,} examples match ({session.escape(flt.label())}) · **{int(selected[rows].sum()):,}** of them selected")
origin = flt.describe() | {"rank": session.rank(), "method": method} | ({"map": region["origin"]} if region else {})
for col, op, icon in zip(bulk[1:], ("include", "exclude", "reset"), (":material/add_circle:", ":material/remove_circle:", ":material/restart_alt:")):
    if col.button(f"{op.capitalize()} all {len(rows):,}", key=f"bulk_{op}", icon=icon, disabled=not len(rows), width="stretch",
                  help=f"{op.capitalize()} every example matching the current filter (recorded with the filter; undo in the sidebar)."):  # fmt: skip
        n = backend.add_edit(run, op, run.train["id"].gather(rows.astype(np.int64)).to_list(), "filter", origin)
        st.toast(f"{op}: {n:,} examples")
        st.rerun()

# ---------------------------------------------------------------- table + detail


def table_and_detail() -> None:
    """The ranked page and the detail pane; a fragment, so picking a row or a page reruns only this part."""
    left, right = st.columns([5, 3], gap="medium")
    with left:
        p = st.columns([1, 1, 2], vertical_alignment="bottom")
        size = p[0].selectbox("Rows per page", PAGE_SIZES, key="page_size")
        pages = max(1, -(-len(rows) // size))
        page = p[1].number_input("Page", 1, pages, 1, key=f"page_{pages}")
        start = (page - 1) * size
        view = rows[start : start + size]
        p[2].caption(f"Ranks {start + 1:,}–{start + len(view):,} of the {len(rows):,} matching")
        table = filters.ranked_table(run.train, run.text, view, positions, scores, tasks, selected, edit_state)
        table_key = filters.table_key((flt, session.rank(), method, page, size, backend.run_key(run)), view)
        event = st.dataframe(
            table,
            key=table_key,
            hide_index=True,
            on_select="rerun",
            selection_mode="single-row",
            height=560,
            width="stretch",
            column_config={
                "position": st.column_config.NumberColumn("position", width="small", help="Position in the full ranking"),
                "score": st.column_config.ProgressColumn("score", format="%.3f", min_value=lo_score, max_value=hi_score, width="small"),
                "included": st.column_config.CheckboxColumn("included?", width="small"),
                "length": st.column_config.NumberColumn("length", width="small"),
                "edit": st.column_config.TextColumn("edit", width="small", help="Set by hand: include / exclude"),
                "source": st.column_config.TextColumn("source", width="small"),
                "task": st.column_config.TextColumn("task", width="small", help="Sub-task the example aligns with most"),
                "text": st.column_config.TextColumn("text", width="large"),
            },
        )
        picked = event["selection"]["rows"] if event else []
        if picked:
            ss["detail_id"] = table["id"][picked[0]]
        elif ss.get("detail_id") is None and table.height:
            ss["detail_id"] = table["id"][0]

    with right:
        detail = ss.get("detail_id")
        row = backend.row_of(run, detail) if detail else None
        if row is None:
            st.info("Select a row in the table to see the example.")
        else:
            detail_pane(run, detail, int(positions[row]), float(scores[row]), bool(selected[row]))


st.fragment(table_and_detail)()
