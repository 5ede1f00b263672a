"""GIST Curator dashboard: start it with `gist-curate serve --run-dir cache/<run>`, which also checks the Host header and the allowed folders."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # running the script directly, without the package installed
    sys.path.insert(0, str(ROOT))

import time  # noqa: E402

import streamlit as st  # noqa: E402

from dashboard import session  # noqa: E402
from dashboard.sidebar import render_sidebar  # noqa: E402

_started, _cpu = time.perf_counter(), time.thread_time()
st.set_page_config(page_title="GIST Curator", page_icon=":material/scatter_plot:", layout="wide")
session.init_session()

PAGES = {
    "Runs": [st.Page("views/runs.py", title="Runs", icon=":material/folder_open:", url_path="runs", default=True)],
    "Inspect": [
        st.Page("views/spectrum.py", title="Spectrum", icon=":material/show_chart:", url_path="spectrum"),
        st.Page("views/coupling.py", title="Coupling", icon=":material/grid_on:", url_path="coupling"),
    ],
    "Curate": [
        st.Page("views/examples.py", title="Examples", icon=":material/table_rows:", url_path="examples"),
        st.Page("views/map.py", title="Map", icon=":material/scatter_plot:", url_path="map"),
        st.Page("views/compare.py", title="Compare", icon=":material/compare_arrows:", url_path="compare"),
        st.Page("views/evaluate.py", title="Evaluate", icon=":material/science:", url_path="evaluate"),
        st.Page("views/export.py", title="Export", icon=":material/download:", url_path="export"),
    ],
}

page = st.navigation(PAGES)
run = render_sidebar()
try:
    page.run()
except Exception as err:  # a view failed: say why, keep the trace out of the way
    session.show_error(err, f"{page.title} could not be drawn")
    with st.expander("Technical details"):
        st.exception(err)
if run is not None:  # once per run, after its first page: load in the background what later clicks read
    from dashboard.warmup import prefetch

    prefetch(run)
# server-side wall and CPU time of this run (read by bench/dashboard_server.py)
st.session_state["_script_seconds"] = (time.perf_counter() - _started, time.thread_time() - _cpu)
if os.environ.get("GIST_DASH_TIMING"):  # one line per script run on stderr, for profiling a live server
    print(f"[gist-dashboard] {page.title}: {st.session_state['_script_seconds'][0]:.3f} s wall, "
          f"{st.session_state['_script_seconds'][1]:.3f} s CPU", file=sys.stderr, flush=True)  # fmt: skip
