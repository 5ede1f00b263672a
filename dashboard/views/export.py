"""Export: budget and per-source caps, a summary and preview of the selection, JSONL download or write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from dashboard import figures, state, ui

run = ui.require_run()
method = state.method(run)
ui.header("Export", f"The final selection — {ui.settings_line(run)}, with every curation edit applied — ready to train on.")

with st.container(border=True):
    c = st.columns([1, 1, 2, 2], vertical_alignment="bottom")
    c[0].markdown(f"**Budget** {state.budget(run)}", help="Set in the sidebar (count or % of the pool).")
    c[1].toggle("Per-source cap", key="cap_on", help="Limit how many examples one source may contribute.")
    st.session_state["cap_count"] = int(min(st.session_state.get("cap_count", 100), run.train.height))
    if st.session_state.get("cap_on"):
        c[2].segmented_control("Cap as", ["% of budget", "count"], key="cap_mode", required=True)
        if st.session_state.get("cap_mode") == "count":
            c[3].number_input("Max examples per source", 1, run.train.height, key="cap_count")
        else:
            c[3].number_input("Max share of the budget per source (%)", 1.0, 100.0, step=5.0, key="cap_pct")

from gist_backend.selection import export_jsonl, summary  # noqa: E402

sel = state.selection(run)
info = summary(run, sel)
for warning in info.get("warnings", []):
    st.warning(warning, icon=":material/warning:")
cols = st.columns(4)
cols[0].metric("Selected", f"{info['count']:,}", help=f"of {run.train.height:,} pool examples; budget {sel.budget:,}")
mean_score = info.get("mean_score")
cols[1].metric("Mean score", "—" if mean_score is None else f"{mean_score:.3f}",
               help="G2IS returns a set without scores." if sel.scores is None else f"{state.METHOD_LABELS[sel.method]} score of the selected examples.")  # fmt: skip
cols[2].metric("Forced in / out by edits", f"{info['forced_in']:,} / {info['forced_out']:,}")
cols[3].metric("Skipped by source caps", f"{sum(info.get('capped', {}).values()):,}",
               help=", ".join(f"{k}: {v}" for k, v in info.get("capped", {}).items()) or "No source reached its cap.")  # fmt: skip

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
st.dataframe(state.selection_preview(run, sel, 200), hide_index=True, width="stretch", height=300,
             column_config={"score": st.column_config.NumberColumn(format="%.4f")})  # fmt: skip
st.caption("The first 200 selected examples, best first.")

st.subheader("Save", anchor=False)
with_meta = st.toggle("Add a `_gist` field (score, rank, method) to each record", key="with_meta")
c = st.columns([2, 3], vertical_alignment="bottom")
name = f"{run.path.name}-{method}-{len(sel.ids)}.jsonl"
c[0].download_button("Download JSONL", data=lambda: state.export_bytes(run, sel, with_meta), file_name=name, mime="application/jsonl",
                     icon=":material/download:", type="primary", on_click="ignore", key="download_jsonl")  # fmt: skip
with c[1].form("write_path", border=False):
    f = st.columns([3, 1], vertical_alignment="bottom")
    target = f[0].text_input("Write to path", value=str(Path(run.path) / "exports" / name), key="export_path")
    if f[1].form_submit_button("Write", icon=":material/save:"):
        try:
            manifest = export_jsonl(run, sel, state.allowed_export_path(target), with_meta=with_meta)
        except (OSError, ValueError) as err:
            state.show_error(err, "Export failed")
        else:
            st.success(f"Wrote {len(sel.ids):,} records to `{target}` (manifest `{manifest}`).", icon=":material/check_circle:")
