"""Small page helpers: the open-run guard and consistent headers."""

from __future__ import annotations

import streamlit as st

from dashboard import state
from gist_backend.runs import Run, RunError


def require_run() -> Run:
    """The open run, or stop the page with a pointer to the Runs view."""
    try:
        run = state.current_run()
    except RunError as err:
        state.show_error(err, "The run cannot be opened")
        st.page_link("views/runs.py", label="Choose another run", icon=":material/folder_open:")
        st.stop()
    if run is None:
        st.info("No run is open yet. Open or compute one first.", icon=":material/info:")
        st.page_link("views/runs.py", label="Go to Runs", icon=":material/folder_open:")
        st.stop()
    return run


def header(title: str, caption: str) -> None:
    """Page title with a one-sentence explanation."""
    st.title(title)
    st.caption(caption)


def settings_line(run: Run) -> str:
    """'GIST · rank 64 · budget 5%' for captions."""
    m = state.method(run)
    return f"{state.METHOD_LABELS.get(m, m)} · rank {state.rank()} · budget {state.budget(run)}"
