"""The detail pane of one pool example (Examples and Map views): conversation, sub-task scores, nearest
validation examples, coordinates, the raw record, and include / exclude / reset. User text is never markdown."""

from __future__ import annotations

import numpy as np
import streamlit as st

from dashboard import backend, events, figures, session
from gist_backend.runs.store import Run

DETAIL_TABS = ("Conversation", "Sub-tasks", "Nearest", "Coordinates", "Raw")


def detail_pane(run: Run, example_id: str, position: int, score: float, selected: bool, key: str = "detail") -> None:
    """Everything about one example, with its edit buttons (``key`` keeps two panes' widgets apart)."""
    row = backend.row_of(run, example_id)
    if row is None:
        st.info("Select a row to see the example.")
        return
    status = backend.edit_state(run).get(example_id)
    with st.container(border=True):
        st.markdown(f"#### {session.code(example_id)}")
        st.caption(
            f"position {position + 1:,} · score {score:.4f} · source {session.escape(run.train['source'][row])} · "
            f"{run.train['n_tokens'][row]} tokens · {'**selected**' if selected else 'not selected'}"
            + (f" · {status}d by hand" if status else "")
        )
        for col, op in zip(st.columns(3), ("include", "exclude", "reset")):
            if col.button(op.capitalize(), key=f"{key}_{op}", width="stretch", type="primary" if op == "include" else "secondary",
                          disabled=(op == "reset" and not status)):  # fmt: skip
                backend.add_edit(run, op, [example_id], "row", example_id)
                st.toast(f"{op}: {session.escape(example_id)}")
                st.rerun(scope="app")
        tab = st.segmented_control("Show", DETAIL_TABS, key=f"{key}_tab", required=True, label_visibility="collapsed", width="stretch",
                                   default=None if f"{key}_tab" in st.session_state else DETAIL_TABS[0])  # fmt: skip
        _tab(run, row, tab or DETAIL_TABS[0], key)


def _tab(run: Run, row: int, tab: str, key: str) -> None:
    if tab == "Conversation":
        with st.container(height=420, border=False, autoscroll=False):
            for role, content in events.conversation(run.text[row]):
                with st.chat_message("assistant" if role == "assistant" else "user", avatar=":material/settings:" if role == "system" else None):
                    st.caption(role)
                    st.text(content)
    elif tab == "Sub-tasks":
        names, per_task = backend.task_scores(run)
        st.plotly_chart(figures.bar_figure(names, per_task[row], "Alignment with each sub-task direction", "value"), key=f"{key}_tasks")
        st.caption("The GIST score is the largest of these values (checkpoint-weighted, first r coordinates).")
    elif tab == "Nearest":
        st.dataframe(backend.nearest_validation(run, row, session.rank()), hide_index=True, width="stretch",
                     column_config={"cosine": st.column_config.NumberColumn(format="%.3f")})  # fmt: skip
        st.caption("Validation examples whose coordinates point the same way as this example's (cosine over the first r directions).")
    elif tab == "Coordinates":
        k = min(session.rank(), 24)
        names = (run.manifest.get("gist") or {}).get("checkpoints") or [f"ckpt {i}" for i in range(run.unit_coords.shape[0])]
        coords = np.asarray(run.unit_coords[:, row, :k], dtype=np.float32) * np.asarray(run.coord_norms[:, row], dtype=np.float32)[:, None]
        st.plotly_chart(figures.coords_figure(coords, names), key=f"{key}_coords")
        st.caption(f"The example's gradient projected on the first {k} GIST directions (ordered by singular value).")
    else:
        st.code(run.raw[row], language="json", wrap_lines=True)
