"""Small page helpers: the open-run guard, consistent headers, and escaped user text."""

from __future__ import annotations

import streamlit as st

from dashboard import backend, session
from gist_backend.runs.files import RunError
from gist_backend.runs.store import Run


def require_run() -> Run:
    """The open run, or stop the page with a pointer to the Runs view."""
    try:
        run = backend.current_run()
    except RunError as err:
        session.show_error(err, "The run cannot be opened")
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
    """'GIST · rank 64 · budget 5% · target mmlu' for captions (escaped: the target name is user data)."""
    m = backend.method(run)
    target = f" · target {session.escape(run.target)}" if len(run.targets) > 1 else ""
    return f"{session.METHOD_LABELS[m]} · rank {session.rank()} · budget {backend.budget(run)}{target}"
