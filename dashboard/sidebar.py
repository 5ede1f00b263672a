"""The sidebar shared by every view: open run, target, method, rank slider, budget, edit history."""

from __future__ import annotations

import streamlit as st

from dashboard import backend, session
from gist_backend.runs.files import RunError
from gist_backend.runs.store import Run


def render_sidebar() -> Run | None:
    """Draw the shared controls; returns the open run (None when none is open or it failed)."""
    with st.sidebar:
        try:
            run = backend.current_run()
        except RunError as err:
            st.error(f"The run could not be opened: {session.escape(err)}", icon=":material/error:")
            return None
        if run is None:
            st.info("No run open. Open one on the **Runs** page.", icon=":material/info:")
            return None
        session.sync_rank(run.k_max, f"{run.path}@{run.target}")  # not the run key: a rewritten manifest must not reset the rank
        st.markdown(f"**Run** {session.code(run.path.name)}")
        if len(run.targets) > 1:
            ss = st.session_state
            if ss.get(session.TARGET) not in run.targets:
                ss[session.TARGET] = run.target
            st.selectbox("Target", run.targets, key=session.TARGET, help="The validation set (task) every view scores against.")
        st.caption(f"{run.train.height:,} pool examples · {run.val.height:,} validation ({session.escape(run.target)}) · k_max {run.k_max}")
        methods = backend.available_methods(run)
        if st.session_state.get(session.METHOD) not in methods:
            st.session_state[session.METHOD] = "gist"
        st.selectbox("Method", methods, key=session.METHOD, format_func=session.METHOD_LABELS.get,
                     help="Which method selects the subset. GIST is the published score; GIST-global weighs its alignment by the "
                          "share of the gradient the subspace holds; in our measurements at a 5 % budget it beat random in all six runs, while "
                          "GIST lost to random in two of three on MMLU, and at 10 % with 2 fine-tuning epochs neither beat random (README, selection quality). G2IS returns a set, not a ranking; views then rank by GIST. The Evaluate "
                          "page measures which helps your target.")  # fmt: skip
        st.slider("GIST rank r", 1, run.k_max, key=session.RANK,
                  help="Number of task directions used for GIST scores. Every view reads its scores from this slider.")  # fmt: skip
        _budget_controls(run)
        _edit_history(run)
        session.write_query()
    return run


def _budget_controls(run: Run) -> None:
    """Budget as a percentage of the pool or a count."""
    ss = st.session_state
    ss[session.BUDGET_COUNT] = int(min(max(int(ss.get(session.BUDGET_COUNT, 100)), 1), run.train.height))
    st.segmented_control("Budget", ["%", "count"], key=session.BUDGET_MODE, required=True, format_func=_mode_label, width="stretch",
                         help="How many examples to select: a share of the pool or a fixed count.")  # fmt: skip
    if ss.get(session.BUDGET_MODE) == "count":
        st.number_input("Examples", 1, run.train.height, step=max(1, run.train.height // 100), key=session.BUDGET_COUNT, label_visibility="collapsed")
    else:
        st.number_input("Percent of the pool", 0.1, 100.0, step=0.5, format="%.1f", key=session.BUDGET_PCT, label_visibility="collapsed")
    try:
        sel = backend.selection(run)
        shortfall = f" · G2IS shortfall **{sel.shortfall:,}** (not filled)" if sel.shortfall else ""
        st.caption(f"Selected **{len(sel.ids):,}** of {run.train.height:,} examples{shortfall}")
    except Exception as err:  # shown, not raised: the sidebar must stay usable
        st.caption(f":red[Selection failed: {session.escape(err)}]")


def _mode_label(mode: str) -> str:
    """Label of a budget mode."""
    return "% of pool" if mode == "%" else "count"


def _edit_history(run: Run) -> None:
    """Number of edits and a step-by-step undo."""
    try:
        edits = backend.edits(run)
    except Exception as err:
        st.caption(f":red[Edits unreadable: {session.escape(err)}]")
        return
    st.divider()
    last = edits[-1] if edits else None
    scope = f" (target {session.escape(last['target'])} only)" if last and last.get("target") else (" (every target)" if len(run.targets) > 1 else "")
    st.caption(f"Curation edits: **{len(edits)}**" + (f" · last: {last['op']} {len(last['ids']):,} ids{scope}" if last else ""),
               help="Undo removes the last edit of the run's log, whichever target it was made for.")  # fmt: skip
    if len(run.targets) > 1:
        st.toggle(f"New edits for {run.target} only", key=session.EDIT_SCOPE,
                  help="Off: an include or exclude applies to every target of the run. On: only to the open target.")  # fmt: skip
    if st.button("Undo last edit", icon=":material/undo:", disabled=not edits, width="stretch", key="undo"):
        backend.undo_edit(run)
        st.rerun()
