"""Evaluate: fine-tune on the current selection and on random selections, score held-out questions, compare."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import streamlit as st

from dashboard import backend, figures, jobs, session, ui
from dashboard.paths import resolve_allowed

run = ui.require_run()
esc = session.escape
ui.header("Evaluate", f"Does the selection ({ui.settings_line(run)}) help the target more than random examples do? "
          "Each arm is fine-tuned on its examples and scored on held-out questions.")  # fmt: skip
recipe = backend.eval_recipe(run)
if st.session_state.get("eval_test_target") != f"{run.path}@{run.target}":  # first visit, another run or target: offer its test file
    st.session_state["eval_test"] = backend.suggested_test_file(run)
    st.session_state["eval_test_target"] = f"{run.path}@{run.target}"

with st.form("evaluate", border=True):
    c = st.columns([4, 1, 1, 1, 1], vertical_alignment="bottom")
    test = c[0].text_input("Held-out test file", key="eval_test", placeholder="data/target_test.jsonl",
                           help="Target records not in the pool or the validation set; 'choices' + 'answer_index' give accuracy.")  # fmt: skip
    baselines = c[1].number_input("Random arms", 1, 10, 3, key="eval_baselines")
    epochs = c[2].number_input("Epochs", 1, 50, recipe.epochs, key="eval_epochs")
    lr = c[3].number_input("Learning rate", 1e-7, 1e-1, recipe.lr, format="%.1e", key="eval_lr")
    train_seeds = c[4].number_input("Training seeds", 1, 10, 1, key="eval_train_seeds",
                                    help="Fine-tune every arm this many times and average: the cost grows with it, training noise shrinks.")  # fmt: skip
    start = st.form_submit_button("Evaluate the current selection", type="primary", icon=":material/science:")
if start:
    try:
        path = resolve_allowed(test.strip(), must_exist=True) if test.strip() else None
        if path is None:
            raise ValueError("give the held-out test file")
        argv = ["--target", run.target, "--test", str(path), "--method", backend.method(run), "--rank", str(session.rank()),
                "--budget", str(backend.budget(run)), "--baselines", f"random:{int(baselines)}", "--epochs", str(int(epochs)), "--lr", str(lr),
                "--train-seeds", str(int(train_seeds))]  # fmt: skip
        if session.per_source_cap() is not None:  # the Export view's cap shapes the selection every view shows
            argv += ["--per-source-cap", str(session.per_source_cap())]
        pid = jobs.launch("evaluate", argv, run.path)
    except (OSError, ValueError, PermissionError) as err:
        session.show_error(err, "Could not start the evaluation")
    else:
        st.success(f"Evaluating in the background (pid {pid}); the curation edits as they are now are included.")


def job_panel() -> None:
    """The running or last evaluation of this run (refreshed every 2 s while it runs)."""
    job = jobs.job_status(run.path, "evaluate")
    was_running = st.session_state.get("eval_running") == str(run.path)
    st.session_state["eval_running"] = str(run.path) if job.state == "running" else None
    if was_running and job.state != "running":  # it just ended: redraw the whole page so its result joins the past evaluations
        st.rerun(scope="app")
    if job.pid is None and not job.progress:
        return
    with st.container(border=True):
        head, button = st.columns([5, 1], vertical_alignment="center")
        head.markdown(f"**Evaluation** — {job.state}")
        p = job.progress
        if job.state == "running":
            if button.button("Cancel", key="cancel-eval", icon=":material/stop:"):
                jobs.cancel(run.path, "evaluate")
            st.progress(job.fraction, text=f"{esc(p.get('stage', 'starting'))}: {p.get('done', 0):,} / {p.get('total', 0):,}")
        elif job.state in ("failed", "stopped", "cancelled"):
            st.error(esc(job.error or job.state, inline=False), icon=":material/error:")
        with st.expander("Log (last lines)", expanded=job.state in ("failed", "stopped")):
            st.code(jobs.log_tail(run.path, "evaluate") or "(empty)", language=None)


st.fragment(job_panel, run_every=2 if jobs.job_status(run.path, "evaluate").state == "running" else None)()

st.subheader("Past evaluations", anchor=False)
every = backend.past_evaluations(run)
past = [r for r in every if r.get("target", run.targets[0]) == run.target]
if len(every) > len(past):
    st.caption(f"{len(every) - len(past)} evaluation(s) of the run's other targets: switch the target in the sidebar to see them.")
if not past:
    st.info(f"No evaluation for target {session.code(run.target)} yet. Give a held-out test file above; "
            "`gist-curate evaluate` does the same from a terminal.")  # fmt: skip
    st.stop()
labels = {r["id"]: f"{r['created'][:16].replace('T', ' ')} · {', '.join(a['name'] for a in r['arms'] if a['kind'] == 'selection')}" for r in past}
chosen = st.multiselect("Evaluations side by side", list(labels), default=list(labels)[:2], format_func=labels.get, key="eval_shown",
                        help="Compare, say, the selection before and after an edit, or two ranks.")  # fmt: skip
shown = [(labels[r["id"]].split(" · ")[0], r) for r in past if r["id"] in chosen]
if shown:
    st.plotly_chart(figures.evaluation_figure(shown), key="eval_chart")
    st.caption("Dots: the mean per-question difference from the mean of the random arms of the same size; whiskers: 95 % paired "
               "bootstrap intervals over the test questions. An interval that crosses the dashed line is not a measurable difference.")  # fmt: skip
    rows = [{"evaluation": label, "arm": a["name"], "examples": a["n_train"], "test loss": a["test_loss"], "accuracy": a["accuracy"],
             "loss − random": (a.get("vs_random") or {}).get("test_loss", {}).get("diff"),
             "accuracy − random": (a.get("vs_random") or {}).get("accuracy", {}).get("diff")} for label, r in shown for a in r["arms"]]  # fmt: skip
    st.dataframe(pl.DataFrame(rows), hide_index=True, width="stretch",
                 column_config={k: st.column_config.NumberColumn(format="%.4f") for k in ("test loss", "accuracy", "loss − random", "accuracy − random")})  # fmt: skip
    for label, r in shown:
        st.caption(f"{label}: {r['n_test']} test questions ({r['n_multiple_choice']} multiple-choice) from {session.code(Path(r['test']).name)}; "
                   f"{r['recipe']['epochs']} epoch(s) at lr {r['recipe']['lr']:g}; {r['baselines']} random arms; "
                   f"{r.get('train_seeds', 1)} training seed(s) per arm.")  # fmt: skip
