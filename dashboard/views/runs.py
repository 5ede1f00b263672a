"""Runs: open a run from cache/ or a path, see what it stores, and start, watch or cancel a background compute."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import streamlit as st

from dashboard import backend, forms, jobs, session
from dashboard.paths import resolve_allowed
from gist_backend.runs.files import RunError
from gist_backend.runs.manifest import check_target_name
from gist_backend.runs.store import describe, list_runs, open_run

BADGES = {
    "running": ":blue[:material/progress_activity: running]",
    "complete": ":green[:material/check_circle: complete]",
    "failed": ":red[:material/error: failed]",
    "cancelled": ":orange[:material/cancel: cancelled]",
    "stopped": ":red[:material/warning: stopped]",
}
esc = session.escape


def _open(path, scope: str = "app") -> None:
    """Open a run by path (refused outside the allowed folders, with the reason)."""
    try:
        session.set_run(path)
    except (PermissionError, FileNotFoundError) as err:
        session.show_error(err, "The run cannot be opened")
        return
    st.rerun(scope=scope)


st.title("Runs")
st.caption("A run holds everything computed for one pool and its target tasks; open one to inspect and curate it.")

# ---------------------------------------------------------------- current run
try:
    run = backend.current_run()
except RunError as err:
    run = None
    session.show_error(err, "The selected run cannot be opened")
if run is not None:
    facts = describe(run)
    with st.container(border=True):
        st.subheader(f":material/folder_open: {esc(run.path.name)}", anchor=False)
        cols = st.columns(5)
        cols[0].metric("Pool examples", f"{run.train.height:,}")
        cols[1].metric("Validation", f"{run.val.height:,}", help=f"target {run.target}")
        cols[2].metric("Sub-tasks", len(set(run.val_tasks)))
        cols[3].metric("k_max", run.k_max)
        cols[4].metric("Passes over the pool", facts["gradient_passes"], help="Training-gradient passes the compute made (one per checkpoint a method uses).")
        st.dataframe(
            pl.DataFrame({"method": [session.METHOD_LABELS[m] for m in facts["methods"]],
                          "checkpoints": [", ".join(v["checkpoints"]) for v in facts["methods"].values()],
                          "bytes per example": [v["bytes_per_example"] for v in facts["methods"].values()]}),
            hide_index=True, width="stretch",
        )  # fmt: skip
        st.caption(f"Model {session.code(facts['model'] or '—')} · targets {esc(', '.join(run.targets))} · created {facts['created'] or '—'} · {session.code(run.path)}")
        for warning in facts["warnings"]:
            st.warning(esc(warning, inline=False), icon=":material/warning:")



# ---------------------------------------------------------------- add a target
def _switch_target(name: str) -> None:
    """Button callback (runs before the sidebar is drawn): make ``name`` the open target."""
    st.session_state[session.TARGET] = name


def add_target_section(run) -> None:
    """Add a target to the open run from its validation file(s), in the background; no pass over the pool."""
    st.subheader("Add a target", anchor=False)
    if not run.manifest.get("reusable"):
        st.info("This run keeps no sketch of the pool's gradients, so a new target needs its own compute. Compute with "
                "**Reusable** on (`--reusable`) to add targets later in minutes.", icon=":material/info:")  # fmt: skip
        return
    with st.form("add_target", border=True):
        c = st.columns([3, 2], vertical_alignment="bottom")
        files = c[0].text_area("Validation file(s) of the new target, one per line", key="at_val", height=68,
                               help="Records of the new task; an optional 'task' field names sub-tasks.")  # fmt: skip
        name = c[1].text_input("Target name", key="at_name", placeholder="e.g. arc_challenge")
        go = st.form_submit_button("Add the target", icon=":material/add:", help="Computes only the new target's validation gradients.")
    if go:
        try:
            paths = [str(resolve_allowed(line.strip(), must_exist=True)) for line in files.splitlines() if line.strip()]
            if not paths:
                raise ValueError("give the new target's validation file")
            check_target_name(name.strip())
            if name.strip() in run.targets:
                raise ValueError(f"the run already has a target {name.strip()!r}; choose another name")
            argv = ["--val", *(jobs.check_cli_value(p, "validation file") for p in paths), "--name", name.strip()]
            pid = jobs.launch("add-target", argv, run.path)
        except (OSError, ValueError, PermissionError) as err:
            session.show_error(err, "Could not add the target")
        else:
            st.success(f"Adding target {session.code(name.strip())} in the background (pid {pid}).")

    def panel() -> None:
        _add_target_panel(run)

    st.fragment(panel, run_every=2 if jobs.job_status(run.path, "add-target").state == "running" else None)()


def _add_target_panel(run) -> None:
    """The running or last add-target job of the open run."""
    job = jobs.job_status(run.path, "add-target")
    if job.pid is None and not job.progress:
        return
    p = job.progress
    with st.container(border=True):
        head, button = st.columns([5, 1], vertical_alignment="center")
        head.markdown(f"**Adding a target** — {BADGES[job.state]}")
        if job.state == "running":
            if button.button("Cancel", key="cancel-add-target", icon=":material/stop:"):
                jobs.cancel(run.path, "add-target")
            st.progress(job.fraction, text=f"{esc(p.get('stage', 'starting'))}: {p.get('done', 0):,} / {p.get('total', 0):,}")
        elif job.state == "complete":
            added = [t for t in open_run(run.path).targets if t not in run.targets] or run.targets[-1:]
            if button.button(f"Open {added[0]}", key="open-added-target", icon=":material/swap_horiz:", on_click=_switch_target, args=(added[0],)):
                st.rerun(scope="app")  # the panel is a fragment: redraw the sidebar and the run's facts too
        else:
            st.error(esc(job.error or job.state, inline=False), icon=":material/error:")
        with st.expander("Log (last lines)", expanded=job.state in ("failed", "stopped")):
            st.code(jobs.log_tail(run.path, "add-target") or "(empty)", language=None)


if run is not None:
    add_target_section(run)

# ---------------------------------------------------------------- open
st.subheader("Open a run", anchor=False)
left, right = st.columns([3, 2])
with left:
    root = st.text_input("Runs folder", key=session.RUNS_ROOT, help="Folder whose sub-folders are runs (default cache/).")
    try:
        runs = list_runs(resolve_allowed(root)) if Path(root).is_dir() else []
    except PermissionError as err:
        session.show_error(err, "Folder not allowed")
        runs = []
    if runs:
        table = pl.DataFrame({
            "run": [r["id"] for r in runs], "status": [r.get("status") or "—" for r in runs], "pool": [r.get("n_train") for r in runs],
            "targets": [", ".join(str(t) for t in r.get("targets") or []) for r in runs], "model": [str(r.get("model") or "—") for r in runs],
            "methods": [", ".join(r.get("methods") or []) for r in runs], "created": [r.get("created") or "—" for r in runs],
        })  # fmt: skip
        picked = st.dataframe(table, hide_index=True, on_select="rerun", selection_mode="single-row", key="runs_table", width="stretch")
        rows = picked["selection"]["rows"] if picked else []
        if rows:
            chosen = runs[rows[0]]
            if chosen.get("status") != "complete":
                st.warning(f"{session.code(chosen['id'])} is {esc(chosen.get('status'))}; it can be opened once it is complete.")
            elif st.button(f"Open {esc(chosen['id'])}", type="primary", icon=":material/open_in_new:"):
                _open(chosen["path"])
    else:
        st.info(f"No runs under {session.code(root)} yet. Start one below, or open a run folder by path.")
with right:
    with st.form("open_path", border=True):
        path = st.text_input("Run folder path", placeholder="cache/my-run")
        if st.form_submit_button("Open", icon=":material/open_in_new:") and path.strip():
            try:
                open_run(resolve_allowed(path.strip(), must_exist=True))
            except (RunError, PermissionError, FileNotFoundError) as err:
                session.show_error(err)
            else:
                session.set_run(path.strip())
                st.rerun()

# ---------------------------------------------------------------- compute
# The form (25 widgets) is drawn only when asked for: most visits open a run (no faster to paint: bench/RESULTS.md §7).
if not st.toggle("Compute a new run", value=not runs and run is None, key=session.SHOW_COMPUTE_FORM):
    config, name, problems = None, "", []
else:
    config, name, problems = forms.compute_form()
if config is not None:
    if problems:
        st.error("\n".join(f"- {esc(p)}" for p in problems), icon=":material/error:")
    else:
        try:
            run_dir = jobs.new_run_dir(resolve_allowed(root), config.model, name)
            pid = jobs.launch("compute", config.to_argv(), run_dir)
        except (OSError, FileExistsError, PermissionError) as err:
            session.show_error(err, "Could not start the compute")
        else:
            st.success(f"Started computing {session.code(run_dir)} in the background (pid {pid}). It keeps running if you close this page.")


# ---------------------------------------------------------------- background jobs
def _allowed_root() -> Path | None:
    """The runs folder typed above, if it is an allowed folder that exists (jobs are shown only from there)."""
    try:
        root = resolve_allowed(st.session_state.get(session.RUNS_ROOT, "cache"))
    except (PermissionError, OSError, ValueError):
        return None
    return root if root.is_dir() else None


def job_panel() -> None:
    """Live status of computations started from the dashboard (a fragment refreshed every 2 s while one runs)."""
    root = _allowed_root()
    found = jobs.jobs(root) if root is not None else []
    if not found:
        return
    st.subheader("Background computations", anchor=False)
    for job in found[:8]:
        with st.container(border=True):
            head, button = st.columns([5, 1], vertical_alignment="center")
            head.markdown(f"**{esc(job.run_dir.name)}** — {BADGES[job.state]}")
            if job.state == "running":
                if button.button("Cancel", key=f"cancel-{job.run_dir}", icon=":material/stop:"):
                    jobs.cancel(job.run_dir)
                    st.toast(f"Cancelling {job.run_dir.name}…")
                p = job.progress
                st.progress(job.fraction, text=f"{esc(p.get('stage', 'starting'))}: {p.get('done', 0):,} / {p.get('total', 0):,}")
                cols = st.columns(3)
                cols[0].metric("Examples/s", f"{p.get('rate', 0.0):,.1f}")
                cols[1].metric("ETA", jobs.format_eta(p.get("eta_s")))
                cols[2].metric("Last update", jobs.format_age(p.get("updated")))
            elif job.state == "complete":
                if button.button("Open", key=f"open-{job.run_dir}", icon=":material/open_in_new:"):
                    _open(job.run_dir, scope="app")
            elif job.state == "cancelled":
                st.warning(esc(job.error or "cancelled"), icon=":material/cancel:")
            else:
                st.error(esc(job.error or "no reason recorded"), icon=":material/error:")
            with st.expander("Log (last lines)", expanded=job.state in ("running", "failed", "stopped")):
                st.code(jobs.log_tail(job.run_dir) or "(empty)", language=None)


_root = _allowed_root()
_live = _root is not None and any(j.state == "running" for j in jobs.jobs(_root))
st.fragment(job_panel, run_every=2 if _live else None)()
