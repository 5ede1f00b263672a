"""Runs: open a run from cache/ or a path, and start, watch or cancel a background compute."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import streamlit as st

from dashboard import jobs, state
from gist_backend.runs import RunError, list_runs

BADGES = {
    "running": ":blue[:material/progress_activity: running]",
    "complete": ":green[:material/check_circle: complete]",
    "failed": ":red[:material/error: failed]",
    "cancelled": ":orange[:material/cancel: cancelled]",
    "stopped": ":red[:material/warning: stopped]",
}

st.title("Runs")
st.caption("A run holds everything computed for one pool and one target task; open one to inspect and curate it.")

# ---------------------------------------------------------------- current run
try:
    run = state.current_run()
except RunError as err:
    run = None
    state.show_error(err, "The selected run cannot be opened")
if run is not None:
    m = run.manifest
    with st.container(border=True):
        st.subheader(f":material/folder_open: {run.path.name}", anchor=False)
        cols = st.columns(5)
        cols[0].metric("Pool examples", f"{run.train.height:,}")
        cols[1].metric("Validation", f"{run.val.height:,}")
        cols[2].metric("Sub-tasks", len(set(run.val_tasks)))
        cols[3].metric("k_max", run.k_max)
        cols[4].metric("Checkpoints", run.train_coords.shape[0])
        methods = ", ".join(state.METHOD_LABELS.get(x, x) for x in run.methods)
        st.caption(f"Model `{m.get('config', {}).get('model', '—')}` · methods {methods} · created {m.get('created', '—')} · `{run.path}`")

# ---------------------------------------------------------------- open
st.subheader("Open a run", anchor=False)
left, right = st.columns([3, 2])
with left:
    root = st.text_input("Runs folder", key=state.RUNS_ROOT, help="Folder whose sub-folders are runs (default cache/).")
    try:
        runs = list_runs(state.allowed_path(root)) if Path(root).is_dir() else []
    except PermissionError as err:
        state.show_error(err, "Folder not allowed")
        runs = []
    if runs:
        table = pl.DataFrame(
            {
                "run": [r["id"] for r in runs],
                "status": [r.get("status") or "—" for r in runs],
                "pool": [r.get("n_train") for r in runs],
                "validation": [r.get("n_val") for r in runs],
                "model": [str(r.get("model") or "—") for r in runs],
                "methods": [", ".join(r.get("methods") or []) for r in runs],
                "created": [r.get("created") or "—" for r in runs],
            }
        )
        picked = st.dataframe(table, hide_index=True, on_select="rerun", selection_mode="single-row", key="runs_table", width="stretch")
        rows = picked["selection"]["rows"] if picked else []
        if rows:
            chosen = runs[rows[0]]
            if chosen.get("status") != "complete":
                st.warning(f"`{chosen['id']}` is {chosen.get('status')}; it can be opened once it is complete.")
            elif st.button(f"Open {chosen['id']}", type="primary", icon=":material/open_in_new:"):
                state.set_run(chosen["path"])
                st.rerun()
    else:
        st.info(f"No runs under `{root}` yet. Start one below, or open a run folder by path.")
with right:
    with st.form("open_path", border=True):
        path = st.text_input("Run folder path", placeholder="cache/my-run")
        if st.form_submit_button("Open", icon=":material/open_in_new:") and path.strip():
            try:
                from gist_backend.runs import open_run

                open_run(state.allowed_path(path.strip(), must_exist=True))
            except (RunError, PermissionError) as err:
                state.show_error(err)
            else:
                state.set_run(path.strip())
                st.rerun()

# ---------------------------------------------------------------- compute
st.subheader("Compute a new run", anchor=False)
with st.form("compute", border=True):
    c1, c2 = st.columns(2)
    with c1:
        model = st.text_input("Model", placeholder="HuggingFaceTB/SmolLM2-135M-Instruct or a local folder / .gguf")
        pool = st.text_area("Pool file(s), one per line", placeholder="data/pool.jsonl", height=80)
        val = st.text_area("Validation file(s), one per line", placeholder="data/target.jsonl", height=80)
        name = st.text_input("Run name (optional)", placeholder="default: <date>-<model>")
    with c2:
        a, b, c = st.columns(3)
        max_len = a.number_input("Max length", 32, 32768, 1024, step=64)
        lora_rank = b.number_input("LoRA rank", 1, 256, 8)
        lora_alpha = c.number_input("LoRA alpha", 1, 512, 16)
        lora_targets = st.text_input("LoRA targets", placeholder="default: q_proj,k_proj,v_proj,o_proj")
        warmup = st.toggle("Warmup training", value=True, help="Short LoRA warmup on a fraction of the pool before gradients (LESS protocol).")
        a, b, c = st.columns(3)
        warmup_fraction = a.number_input("Warmup fraction", 0.001, 1.0, 0.05, step=0.01, format="%.3f")
        warmup_epochs = b.number_input("Warmup epochs", 1, 20, 4)
        warmup_lr = c.number_input("Warmup LR", 1e-7, 1e-2, 2e-5, format="%.1e")
        a, b, c = st.columns(3)
        k_max = a.number_input("k_max", 1, 1024, 128)
        device = b.selectbox("Device", ["auto", "cpu", "cuda"])
        seed = c.number_input("Seed", 0, 2**31 - 1, 0)
        methods = st.multiselect("Methods", list(jobs.METHODS), default=["gist"], format_func=state.METHOD_LABELS.get)
    submitted = st.form_submit_button("Start computing", type="primary", icon=":material/play_arrow:")
if submitted:
    opts = jobs.ComputeOptions(
        model=model, train=[p.strip() for p in pool.splitlines() if p.strip()], val=[p.strip() for p in val.splitlines() if p.strip()],
        max_len=int(max_len), lora_rank=int(lora_rank), lora_alpha=int(lora_alpha), lora_targets=lora_targets, warmup=warmup,
        warmup_fraction=float(warmup_fraction), warmup_epochs=int(warmup_epochs), warmup_lr=float(warmup_lr), k_max=int(k_max),
        methods=list(methods), device=device, seed=int(seed),
    )  # fmt: skip
    problems = opts.problems()
    if problems:
        st.error("\n".join(f"- {p}" for p in problems), icon=":material/error:")
    else:
        try:
            run_dir = jobs.new_run_dir(root, model, name)
            pid = jobs.launch(opts, run_dir)
        except (OSError, FileExistsError) as err:
            state.show_error(err, "Could not start the compute")
        else:
            st.success(f"Started computing `{run_dir}` in the background (pid {pid}). It keeps running if you close this page.")


# ---------------------------------------------------------------- background jobs
def job_panel() -> None:
    """Live status of computations started from the dashboard (a fragment refreshed every 2 s while one runs)."""
    found = jobs.jobs(st.session_state.get(state.RUNS_ROOT, "cache"))
    if not found:
        return
    st.subheader("Background computations", anchor=False)
    for job in found[:8]:
        with st.container(border=True):
            head, button = st.columns([5, 1], vertical_alignment="center")
            badge = BADGES[job.state]
            head.markdown(f"**{job.run_dir.name}** — {badge}")
            if job.state == "running":
                if button.button("Cancel", key=f"cancel-{job.run_dir}", icon=":material/stop:"):
                    jobs.cancel(job.run_dir)
                    st.toast(f"Cancelling {job.run_dir.name}…")
                p = job.progress
                st.progress(job.fraction, text=f"{p.get('stage', 'starting')}: {p.get('done', 0):,} / {p.get('total', 0):,}")
                cols = st.columns(3)
                cols[0].metric("Examples/s", f"{p.get('rate', 0.0):,.1f}")
                cols[1].metric("ETA", jobs.format_eta(p.get("eta_s")))
                cols[2].metric("Last update", jobs.format_age(p.get("updated")))
            elif job.state == "complete":
                if button.button("Open", key=f"open-{job.run_dir}", icon=":material/open_in_new:"):
                    state.set_run(job.run_dir)
                    st.rerun(scope="app")
            elif job.state == "cancelled":
                st.warning(job.error or "cancelled", icon=":material/cancel:")
            else:
                st.error(f"{job.error or 'no reason recorded'}", icon=":material/error:")
            with st.expander("Log (last lines)", expanded=job.state in ("running", "failed", "stopped")):
                st.code(jobs.log_tail(job.run_dir) or "(empty)", language=None)


_root = st.session_state.get(state.RUNS_ROOT, "cache")
_live = any(j.state == "running" for j in jobs.jobs(_root)) if Path(_root).is_dir() else False
st.fragment(job_panel, run_every=2 if _live else None)()
