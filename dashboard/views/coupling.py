"""Coupling: how far the gradient second moment is from diagonal, overall, per module and as a heatmap."""

from __future__ import annotations

import streamlit as st

from dashboard import backend, figures, ui

run = ui.require_run()
ui.header("Coupling", "Whether a diagonal (Adam-like) view of the gradients is enough, or the coordinates are coupled.")
checkpoints = backend.geometry(run)["checkpoints"]
last = checkpoints[-1]
per_module = last.get("rho_per_module", {})

cols = st.columns(3)
cols[0].metric("Off-diagonal energy ρ", f"{last['rho']:.3f}", help="Last checkpoint.")
if per_module:
    cols[1].metric("Lowest module ρ", f"{min(per_module.values()):.3f}", help=min(per_module, key=per_module.get))
    cols[2].metric("Highest module ρ", f"{max(per_module.values()):.3f}", help=max(per_module, key=per_module.get))
st.info(
    f"ρ = {last['rho']:.2f} means {last['rho']:.0%} of the energy of the gradient second moment lies off its diagonal: "
    "ρ near 0 would justify a per-coordinate (Adam-like) scaling, while a large ρ says the coordinates are coupled "
    "and GIST's rotated basis, where the moment is diagonal, is the better fit.",
    icon=":material/lightbulb:",
)

st.subheader("ρ per LoRA module", anchor=False)
st.plotly_chart(figures.rho_figure(checkpoints), key="rho_chart")
st.caption("Bars: off-diagonal energy fraction of each adapted module's gradient block; dashed line: ρ of all LoRA parameters together.")

st.subheader("Second-moment heatmap", anchor=False)
blocks = backend.coupling_blocks(run)
modules = [k[: -len(".block")] for k in blocks if k.endswith(".block")]
options = ["highest-variance coordinates", *modules]
choice = st.selectbox("Block", options, format_func=lambda o: o if o == options[0] else f"module {o}", key="coupling_block")
if choice == options[0]:
    block, idx = blocks["top_block"], blocks.get("top_idx")
else:
    block, idx = blocks[f"{choice}.block"], blocks.get(f"{choice}.idx")
labels = [f"#{int(i)}" for i in idx] if idx is not None else None
title = f"{block.shape[0]} LoRA coordinates"
st.plotly_chart(figures.heatmap_pair(block, blocks.get("gist_block"), labels, title), key="coupling_heatmap")
st.caption(
    "Left: normalised |M_pq| / √(M_pp M_qq) of the validation-gradient second moment over the chosen coordinates — "
    "bright off-diagonal cells are coupled pairs. Right: the same quantity in the GIST basis, where it is diagonal by construction."
)
