"""Spectrum: singular values of the validation gradients and the rank that feeds every score."""

from __future__ import annotations

import streamlit as st

from dashboard import backend, figures, session, ui


def _set_rank(value: int) -> None:
    """Callback: move the shared rank slider."""
    st.session_state[session.RANK] = int(value)


run = ui.require_run()
ui.header("Spectrum", "How much of the target task's gradient energy the first r GIST directions capture; the rank r chosen here scores every view.")
checkpoints = backend.geometry(run)["checkpoints"]
spec = checkpoints[-1]["spectrum"]
r = session.rank()

cols = st.columns(6)
cols[0].metric("Current rank r", r, help="Set with the slider in the sidebar, or jump below.")
cum = spec["cumulative"]
cols[1].metric("Energy at r", f"{cum[min(r, len(cum)) - 1]:.1%}")
for col, level in zip(cols[2:5], ("r90", "r95", "r99")):
    col.metric(level, spec[level], help=f"Smallest rank reaching {level[1:]} % of the energy.")
cols[5].metric("k_max", run.k_max, help="Coordinates stored per example: the largest usable rank.")
b = st.columns([1, 1, 1, 1, 4], vertical_alignment="center")
for col, level in zip(b, ("r90", "r95", "r99")):
    target = min(spec[level], run.k_max)
    col.button(f"Use {level} ({target})", on_click=_set_rank, args=(target,), width="stretch", key=f"jump_{level}")
b[3].button(f"Use k_max ({run.k_max})", on_click=_set_rank, args=(run.k_max,), width="stretch", key="jump_kmax")

st.plotly_chart(figures.spectrum_figure(checkpoints, r, run.k_max), key="spectrum_chart")
st.caption(
    "Left: the singular values σⱼ of the validation-gradient matrix, largest first (log scale). "
    "Right: the share of gradient energy captured by the first r directions; dotted lines mark where it reaches 90/95/99 %, "
    "the red line is the rank in use; the shaded part lies beyond the stored k_max."
    + (" One curve per warmup checkpoint." if len(checkpoints) > 1 else "")
)
