"""Session state: widget keys and defaults, the shared sidebar settings, and their mirror in the URL query.

The sidebar's target, method, rank and budget are the single source of truth for every view. They are also
written to the URL query (``?method=gist&rank=32&budget=5%``), so a view can be shared and reloaded exactly.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import streamlit as st

from gist_backend.config import METHOD_LABELS  # noqa: F401 (re-exported for the views)

RUN_DIR = "run_dir"
TARGET = "target"
RANK = "rank"
METHOD = "method"
BUDGET_MODE = "budget_mode"
BUDGET_COUNT = "budget_count"
BUDGET_PCT = "budget_pct"
RUNS_ROOT = "runs_root"
SHOW_COMPUTE_FORM = "show_compute_form"  # the Runs page's "Compute a new run" toggle
EDIT_SCOPE = "edit_only_target"  # True: new curation edits apply to the open target only
# Widget keys whose values must survive visiting a page that does not draw them.
PERSISTENT = (RUNS_ROOT, TARGET, EDIT_SCOPE, RANK, METHOD, BUDGET_MODE, BUDGET_COUNT, BUDGET_PCT, "cap_on", "cap_mode", "cap_count", "cap_pct",
              "f_text", "f_regex", "f_sources", "f_tasks", "f_state", "f_score", "f_length", "f_map",
              "map_colour", "page_size", "compare_x", "compare_y", "detail_tab", "eval_test")  # fmt: skip
# Defaults of persistent widgets, set once per session (widgets then take no value/default argument).
WIDGET_DEFAULTS = {"map_colour": "score", "cap_on": False, "cap_mode": "% of budget", "cap_count": 100, "cap_pct": 50.0,
                   "f_text": "", "f_regex": False, "f_state": "all", "f_sources": [], "f_tasks": [], "page_size": 100,
                   "detail_tab": "Conversation", EDIT_SCOPE: False, METHOD: "gist", BUDGET_MODE: "%", BUDGET_PCT: 5.0, BUDGET_COUNT: 100}  # fmt: skip
QUERY_KEYS = {METHOD: "method", RANK: "rank", TARGET: "target"}  # session key → URL query key (the budget is "budget")


def cli_run_dir(argv: list[str] | None = None) -> str | None:
    """The run given on the command line (`-- --run-dir D`) or in GIST_RUN_DIR."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--run-dir", default=None)
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return args.run_dir or os.environ.get("GIST_RUN_DIR") or None


def init_session() -> None:
    """First-visit defaults (from the URL query where it has them); keeps widget values alive across pages."""
    ss = st.session_state
    if "_initialised" not in ss:
        ss["_initialised"] = True
        given = cli_run_dir()
        if given:
            ss[RUN_DIR] = str(Path(given).expanduser().resolve())
        ss.setdefault(RUNS_ROOT, os.environ.get("GIST_CACHE", "cache"))
        for key, value in WIDGET_DEFAULTS.items():
            ss.setdefault(key, value)
        _read_query()
    for key in PERSISTENT:  # re-assigning detaches the value from the widget's lifetime
        if key in ss:
            ss[key] = ss[key]


def _read_query() -> None:
    """Sidebar settings given in the URL (ignored when malformed; the run clamps them when it opens)."""
    ss, query = st.session_state, st.query_params
    for key, name in QUERY_KEYS.items():
        if name in query:
            ss[key] = int(query[name]) if key == RANK and query[name].isdigit() else query[name]
    if key := query.get("budget"):
        try:
            value = float(key.removesuffix("%"))
            if value != value:  # NaN
                raise ValueError
            if key.endswith("%"):  # clamped to the widgets' ranges (Streamlit would put an outside value at the minimum)
                ss[BUDGET_MODE], ss[BUDGET_PCT] = "%", min(max(value, 0.1), 100.0)
            else:
                ss[BUDGET_MODE], ss[BUDGET_COUNT] = "count", max(int(value), 1)
        except (ValueError, OverflowError):
            pass
    if RANK in ss and not isinstance(ss[RANK], int):
        del ss[RANK]
    if isinstance(ss.get(RANK), int):
        ss["_rank_from_query"] = ss[RANK]


def write_query() -> None:
    """Mirror the sidebar settings into the URL query (only when they changed, to avoid extra reruns)."""
    ss = st.session_state
    wanted = {name: str(ss[key]) for key, name in QUERY_KEYS.items() if ss.get(key) is not None}
    wanted["budget"] = f"{float(ss.get(BUDGET_PCT, 5.0)):g}%" if ss.get(BUDGET_MODE) != "count" else str(int(ss.get(BUDGET_COUNT, 100)))
    if any(st.query_params.get(k) != v for k, v in wanted.items()):
        st.query_params.update(wanted)


def set_run(path: str | Path | None) -> None:
    """Open another run (takes effect on the next rerun; target and rank reset to the run's defaults)."""
    ss = st.session_state
    if path is None:
        ss.pop(RUN_DIR, None)
    else:
        from dashboard.paths import resolve_allowed

        ss[RUN_DIR] = str(resolve_allowed(path, must_exist=True))
    for key in ("_rank_for", "_rank_from_query", "detail_id", TARGET):
        ss.pop(key, None)


def run_path() -> str | None:
    """The path of the open run, if any."""
    return st.session_state.get(RUN_DIR)


def target() -> str | None:
    """The target chosen in the sidebar (None: the run's first)."""
    return st.session_state.get(TARGET)


def sync_rank(k_max: int, run_id: str) -> None:
    """Give the rank slider the run's default (k_max, or the URL's rank) when a run is opened; clamp to 1..k_max."""
    ss = st.session_state
    if ss.get("_rank_for") != run_id or RANK not in ss:
        ss["_rank_for"] = run_id
        ss[RANK] = ss.pop("_rank_from_query", None) or k_max
    ss[RANK] = int(min(max(int(ss[RANK]), 1), k_max))


def rank() -> int:
    """The rank of the sidebar slider (scores of every view use it)."""
    return int(st.session_state[RANK])


def method_choice() -> str:
    """The method chosen in the sidebar (views check it against the run with ``backend.method``)."""
    return st.session_state.get(METHOD, "gist")


def budget(pool_size: int) -> int | str:
    """The shared budget: a count, or 'p%' of the pool."""
    ss = st.session_state
    if ss.get(BUDGET_MODE) == "count":
        return int(min(max(int(ss.get(BUDGET_COUNT, 100)), 1), pool_size))
    return f"{float(ss.get(BUDGET_PCT, 5.0)):g}%"


def per_source_cap() -> int | str | None:
    """The per-source cap of the Export view: a count, 'p%' of the budget, or None."""
    ss = st.session_state
    if not ss.get("cap_on"):
        return None
    if ss.get("cap_mode") == "count":
        return int(ss.get("cap_count", 100))
    return f"{float(ss.get('cap_pct', 50.0)):g}%"


def show_error(err: BaseException, what: str = "") -> None:
    """An error box with the reason (never a bare stack trace); user data in it is shown as text, not markdown."""
    prefix = f"{what}: " if what else ""
    st.error(escape(f"{prefix}{err}", inline=False), icon=":material/error:")


def escape(text: object, inline: bool = True) -> str:
    """Text safe to put in markdown: every markdown and HTML control character escaped (ids and sources are user data)."""
    out = "".join("\\" + ch if ch in "\\`*_{}[]()<>#|~$!" else ch for ch in str(text))
    return out.replace("\n", " ") if inline else out.replace("\n", "  \n")


def code(text: object) -> str:
    """User text as an inline code span (markdown is not interpreted inside; a backtick cannot close it)."""
    return "`" + str(text).replace("`", "ʼ").replace("\n", " ") + "`"
