"""Export: budget and per-source caps, a summary and preview of the selection, JSONL download or write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import streamlit as st

from dashboard import backend, figures, session, ui
from gist_backend.curation.export import changed_inputs


def combine_form():
    """The parts of a combined selection (target, method, rank, share) and its mode; returns the selection or None."""
    from gist_backend.curation.combine import MODES, Part

    ranks, sidebar_rank = backend.target_ranks(run), session.rank()
    table = pl.DataFrame({"use": [True] * len(run.targets), "target": run.targets, "method": [backend.method(run)] * len(run.targets),
                          "rank": [min(sidebar_rank, ranks[t]) for t in run.targets], "share %": [round(100 / len(run.targets), 1)] * len(run.targets)})  # fmt: skip
    with st.container(border=True):
        edited = st.data_editor(table, hide_index=True, width="stretch", key="combine_parts", disabled=["target"], column_config={
            "method": st.column_config.SelectboxColumn(options=backend.available_methods(run), required=True),
            "rank": st.column_config.NumberColumn(min_value=1, step=1, help="GIST rank of this target (at most its k_max)"),
            "share %": st.column_config.NumberColumn(min_value=0.1, max_value=100.0, help="Share of the budget; shares are normalised to 100 %")})  # fmt: skip
        mode = st.segmented_control("Fill", list(MODES), key="combine_mode", default="quotas", required=True,
                                    help="quotas: each target's share of its best examples, in turn. round-robin: one at a time, best first.")  # fmt: skip
        rows = [r for r in edited.iter_rows(named=True) if r["use"]]
        problems = [f"{r['target']}: rank {r['rank']} is above its k_max {ranks[r['target']]}" for r in rows if r["rank"] and r["rank"] > ranks[r["target"]]]
        if not rows or problems:
            st.info("Tick at least one target." if not rows else "\n".join(f"- {session.escape(p)}" for p in problems), icon=":material/info:")
            return None
        parts = [Part(r["target"], r["method"], int(r["rank"]) if r["rank"] and r["method"] != "less" else None, float(r["share %"] or 0) or 1.0) for r in rows]
        try:
            sel = backend.combined_selection(run, parts, mode or "quotas")
        except (ValueError, OSError) as err:
            session.show_error(err, "The combined selection failed")
            return None
        st.caption(" · ".join(f"**{session.escape(p['target'])}** {p['count']:,} ({session.METHOD_LABELS[p['method']]}"
                              + (f" r{p['rank']}" if p["rank"] else "") + f", {p['share']:.0%})" for p in sel.info["parts"]))  # fmt: skip
    return sel


run = ui.require_run()
method = backend.method(run)
if len(run.targets) > 1 and st.session_state.get("combine_on"):
    ui.header("Export", f"One selection for several targets of the run (budget {backend.budget(run)}), with every curation edit applied — ready to train on.")
else:
    ui.header("Export", f"The final selection — {ui.settings_line(run)}, with every curation edit applied — ready to train on.")

combining = len(run.targets) > 1 and st.toggle("Serve several targets", key="combine_on",
                                               help="One selection for several targets of this run: each target gets a share of the budget.")  # fmt: skip
with st.container(border=True):
    c = st.columns([1, 1, 2, 2], vertical_alignment="bottom")
    c[0].markdown(f"**Budget** {backend.budget(run)}", help="Set in the sidebar (count or % of the pool).")
    c[1].toggle("Per-source cap", key="cap_on", help="Limit how many examples one source may contribute.", disabled=combining)
    st.session_state["cap_count"] = int(min(st.session_state.get("cap_count", 100), run.train.height))
    if st.session_state.get("cap_on"):
        c[2].segmented_control("Cap as", ["% of budget", "count"], key="cap_mode", required=True)
        if st.session_state.get("cap_mode") == "count":
            c[3].number_input("Max examples per source", 1, run.train.height, key="cap_count")
        else:
            c[3].number_input("Max share of the budget per source (%)", 1.0, 100.0, step=5.0, key="cap_pct")

if combining:
    sel = combine_form()
    if sel is None:
        st.stop()
else:
    sel = backend.selection(run)
info = backend.summary(run, sel)
for warning in info.get("warnings", []):
    st.warning(session.escape(warning, inline=False), icon=":material/warning:")
if sel.topups:
    st.caption(f"Top-ups (G2IS picks from a larger budget, replacing picks that edits or caps removed): {session.escape(', '.join(sel.topups[:20]))}"
               + (" …" if len(sel.topups) > 20 else ""))  # fmt: skip
cols = st.columns(5)
cols[0].metric("Selected", f"{info['count']:,}", help=f"of {run.train.height:,} pool examples; budget {sel.budget:,}")
mean_score = info.get("mean_score")
cols[1].metric("Mean score", "—" if mean_score is None else f"{mean_score:.3f}",
               help="G2IS returns a set without scores." if sel.scores is None else f"{session.METHOD_LABELS[sel.method]} score of the selected examples.")  # fmt: skip
cols[2].metric("Forced in / out by edits", f"{info['forced_in']:,} / {info['forced_out']:,}")
cols[3].metric("Skipped by source caps", f"{sum(info.get('capped', {}).values()):,}",
               help=", ".join(f"{session.escape(k)}: {v}" for k, v in info.get("capped", {}).items()) or "No source reached its cap.")  # fmt: skip
cols[4].metric("G2IS shortfall", f"{sel.shortfall:,}", help="Picks G2IS's walk could not make under its rules; reported, never filled.")

left, right = st.columns(2)
with left:
    st.subheader("Source mix", anchor=False)
    st.plotly_chart(figures.source_mix_figure({"pool": info["pool_source_share"], "selection": info["source_share"]}), key="export_mix")
    st.caption("Share of each source in the whole pool and in the selection.")
with right:
    st.subheader("Length", anchor=False)
    lengths = run.train["n_tokens"].to_numpy()
    st.plotly_chart(figures.histogram_figure(lengths[np.asarray(sel.rows, dtype=np.int64)], lengths, "tokens"), key="export_len")
    q = info.get("n_tokens") or {}
    if q:
        st.caption(f"Tokens per example in the selection against the pool: median {q['median']:,.0f}, p10–p90 {q['p10']:,.0f}–{q['p90']:,.0f}, "
                   f"{q['total']:,} tokens in all.")  # fmt: skip

st.subheader("Preview", anchor=False)
st.dataframe(backend.selection_preview(run, sel, 200), hide_index=True, width="stretch", height=300,
             column_config={"score": st.column_config.NumberColumn(format="%.4f")})  # fmt: skip
st.caption("The first 200 selected examples, best first.")

st.subheader("Save", anchor=False)
for changed in changed_inputs(run):
    st.info(f"{session.code(changed)} changed since this run was computed: exports hold its records as the run read them then.",
            icon=":material/info:")  # fmt: skip
with_meta = st.toggle("Add a `_gist` field (score, position, method, rank) to each record", key="with_meta")
c = st.columns([2, 3], vertical_alignment="bottom")
name = f"{run.path.name}-{sel.target or run.target}-{sel.method}-{len(sel.ids)}.jsonl"
c[0].download_button("Download JSONL", data=lambda: backend.export_bytes(run, sel, with_meta), file_name=name, mime="application/jsonl",
                     icon=":material/download:", type="primary", on_click="ignore", key="download_jsonl")  # fmt: skip
default_path = str(Path("exports") / name)
if st.session_state.get("export_path") in (None, st.session_state.get("export_path_default")):  # not typed by the user:
    st.session_state["export_path"] = default_path  # follow the selection (its method, target and size name the file)
st.session_state["export_path_default"] = default_path
with c[1].form("write_path", border=False):
    f = st.columns([3, 1, 1], vertical_alignment="bottom")
    target = f[0].text_input("Write to path", key="export_path",
                             help="A .jsonl file inside the allowed folders, outside any run folder; never one of the run's inputs.")  # fmt: skip
    force = f[1].checkbox("Replace", key="export_force", help="Replace the file if it exists.")
    if f[2].form_submit_button("Write", icon=":material/save:"):
        try:
            manifest = backend.export_to(run, sel, target, with_meta, force)
        except (OSError, ValueError) as err:
            session.show_error(err, "Export failed")
        else:
            written = str(manifest).removesuffix(".manifest.json")
            st.success(f"Wrote {len(sel.ids):,} records to {session.code(written)} (manifest {session.code(Path(manifest).name)}).",
                       icon=":material/check_circle:")  # fmt: skip
