"""The compute form, built from ``ComputeConfig``'s fields (defaults, help texts and choices), like the CLI's flags.

Every path the form names (model folder, pool and validation files, the runs folder) must lie inside the
dashboard's allowed folders; a hub id is not a path and needs no check.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import streamlit as st

from dashboard.jobs import compute_problems
from dashboard.paths import resolve_allowed
from gist_backend.config import COMPUTE_METHODS, METHOD_LABELS, RECIPES, ComputeConfig, with_recipe

# Fields the form leaves at their defaults: only how the work is batched and stored (the CLI has them).
HIDDEN = ("max_tokens", "max_batch", "shard_size", "memory_budget_gb", "model_cache_dir")
LEFT = ("model", "train", "val", "target", "adapter", "methods", "gist_checkpoints", "k_max")


def _widget(f, value, key: str):
    """One input for a config field; returns the value it holds."""
    help_text, label = f.metadata["help"], f.name.replace("_", " ").capitalize()
    if f.name in ("train", "val"):
        text = st.text_area(f"{label} file(s), one per line", key=key, help=help_text, height=80)
        return [line.strip() for line in text.splitlines() if line.strip()]
    if f.name == "methods":
        return st.multiselect(label, list(COMPUTE_METHODS), default=value, key=key, help=help_text, format_func=METHOD_LABELS.get)
    if f.name == "lora_targets":
        text = st.text_input(label, key=key, help=help_text, placeholder="default: q_proj,k_proj,v_proj,o_proj")
        return [t.strip() for t in text.split(",") if t.strip()] or None
    if f.metadata.get("choices"):
        choices = list(f.metadata["choices"])
        return st.selectbox(label, choices, index=choices.index(value), key=key, help=help_text)
    if isinstance(value, bool):
        return st.toggle(label, value=value, key=key, help=help_text)
    if isinstance(value, int):
        return int(st.number_input(label, value=value, min_value=0, step=1, key=key, help=help_text))
    if isinstance(value, float):
        return float(st.number_input(label, value=value, min_value=0.0, format="%g", key=key, help=help_text))
    return st.text_input(label, value=value or "", key=key, help=help_text).strip() or (None if value is None else "")


def compute_form() -> tuple[ComputeConfig | None, str, list[str]]:
    """Draw the form; on submit returns (config, run name, problems), else (None, "", [])."""
    recipe = st.selectbox("Recipe", ["tool defaults", *RECIPES], key="compute_recipe",
                          help="paper: the GIST/LESS papers' LoRA r 128, α 512, dropout 0.1, max length 2048, 4 warmup epochs on 5 %, lr 2e-5")  # fmt: skip
    base = with_recipe(ComputeConfig(model="", train=[], val=[]), None if recipe == "tool defaults" else recipe)
    shown = [f for f in fields(ComputeConfig) if f.name not in HIDDEN]
    values = {}
    with st.form(f"compute-{recipe}", border=True):
        left, right = st.columns(2)
        for f in shown:
            with left if f.name in LEFT else right:
                values[f.name] = _widget(f, getattr(base, f.name), key=f"cf_{recipe}_{f.name}")
        name = st.text_input("Run name (optional)", placeholder="default: <date>-<model>", key=f"cf_{recipe}_name")
        if not st.form_submit_button("Start computing", type="primary", icon=":material/play_arrow:"):
            return None, "", []
    for f in fields(ComputeConfig):
        if f.name in HIDDEN:
            values[f.name] = getattr(base, f.name)
    config = ComputeConfig(**values)
    return config, name, compute_problems(config) + path_problems(config)


def path_problems(config: ComputeConfig) -> list[str]:
    """Paths of the config outside the allowed folders, as sentences."""
    out = []
    from gist_backend.engine.model import looks_local

    named = [("model", config.model)] if config.model and looks_local(config.model) else []
    named += [("pool file", p) for p in config.train] + [("validation file", p) for p in config.val]
    named += [("adapter", config.adapter)] if config.adapter else []
    for what, path in named:
        try:
            resolve_allowed(path.rsplit(":", 1)[0] if ":" in path and not Path(path).exists() else path)
        except PermissionError as err:
            out.append(f"The {what} is not allowed: {err}")
    return out
