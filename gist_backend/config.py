"""Every default and vocabulary of GIST Curator: compute options, method names, recipes and subspace ranks.

The CLI flags of ``gist-curate compute`` and the dashboard's compute form are built from ``ComputeConfig``
(its fields, defaults and help texts), so the three never disagree.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Iterable

# Methods a selection can be made with. GIST scores every example by the cosine, inside the task subspace,
# with each sub-task's direction (as published); gist-global measures the same directions against the whole
# gradient; LESS scores by cosine of Adam-preconditioned sketches; G2IS returns a set; random is the baseline.
METHODS = ("gist", "gist-global", "less", "g2is", "random")
SCORED_METHODS = ("gist", "gist-global", "less", "random")  # a score per example (G2IS is a set)
COMPUTE_METHODS = ("gist", "less", "g2is")  # what a compute can be asked for (GIST always)
SKETCH_METHODS = ("less", "g2is")  # need the Adam-preconditioned, projected training sketches
METHOD_LABELS = {"gist": "GIST", "gist-global": "GIST-global", "less": "LESS", "g2is": "G2IS", "random": "Random"}
GIST_CHECKPOINTS = ("final", "all")
G2IS_ORIENTATIONS = ("sklearn", "mean")


def needs_sketches(methods: Iterable[str]) -> bool:
    """True when any of ``methods`` needs the LESS/G2IS training sketches."""
    return any(m in SKETCH_METHODS for m in methods)


def pool_sketch_dim(sketch_dim: int, d: int) -> int:
    """Width of the reusable pool sketch: ``sketch_dim``, but never wider than the gradient (then it is the gradient itself)."""
    return min(int(sketch_dim), int(d))


def check_rank(rank: int | None, k_max: int) -> int:
    """The subspace rank to use: None means k_max; anything outside 1..k_max is a ValueError (0 is not k_max)."""
    if rank is None:
        return int(k_max)
    if isinstance(rank, bool) or int(rank) != rank or not 1 <= int(rank) <= k_max:
        raise ValueError(f"rank must be a whole number from 1 to k_max={k_max}, got {rank!r}")
    return int(rank)


def _opt(default, help: str, execution: bool = False, **kw):
    """A ComputeConfig field: its default, CLI help, and whether it only affects how (not what) is computed."""
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return field(**factory, metadata={"help": help, "execution": execution, **kw})


@dataclass
class ComputeConfig:
    """Everything that defines a run. Fields marked ``execution`` never change the numbers (beyond float rounding); they
    are left out of the result hash, so a run can be resumed with other ones."""

    model: str = _opt(MISSING, "Hugging Face hub id, local model folder, or .gguf file")
    train: list[str] = _opt(MISSING, "pool file(s): JSONL, JSON, Parquet, or a saved HF dataset folder (folder:split)")
    val: list[str] = _opt(MISSING, "validation (target task) file(s); an optional 'task' field per record names sub-tasks")
    target: str = _opt("", "name of the target (default: the first validation file's name)")
    max_len: int = _opt(1024, "tokens per example; longer ones are truncated")
    lora_rank: int = _opt(8, "LoRA rank of the adapter whose gradients are taken")
    lora_alpha: int = _opt(16, "LoRA alpha")
    lora_dropout: float = _opt(0.0, "LoRA dropout during the warmup (gradients are taken without dropout)")
    lora_targets: list[str] | None = _opt(None, "comma-separated module names (default: q,k,v,o projections)")
    adapter: str | None = _opt(None, "an existing peft LoRA adapter folder to use instead of a warmup")
    warmup: bool = _opt(True, "warmup LoRA training on a seeded part of the pool (off: a fresh adapter, B ~ N(0, small))",
                        off_help="skip the warmup: take the gradients of a fresh adapter (B ~ N(0, small))")  # fmt: skip
    warmup_fraction: float = _opt(0.05, "share of the pool used for the warmup")
    warmup_epochs: int = _opt(4, "warmup epochs; one checkpoint per epoch")
    warmup_lr: float = _opt(2e-5, "peak learning rate of the warmup")
    warmup_batch: int = _opt(32, "examples per warmup step")
    k_max: int = _opt(128, "subspace dimensions stored per example; every rank r ≤ k_max is then exact")
    methods: list[str] = _opt(lambda: ["gist"], "comma-separated: gist, less, g2is (GIST is always computed)")
    gist_checkpoints: str = _opt("final", "GIST at the final warmup checkpoint (as published) or at all (an lr-weighted ensemble)",
                                 choices=GIST_CHECKPOINTS)  # fmt: skip
    less_dim: int = _opt(8192, "random projection size of the LESS/G2IS sketches")
    reusable: bool = _opt(False, "also keep a target-independent sketch of every pool gradient (sketch_dim × 2 bytes per example), so "
                                 "`gist-curate add-target` adds targets without another pass over the pool", execution=True)
    sketch_dim: int = _opt(16384, "size of the reusable sketch (--reusable; at most the gradient's size d); 16384 keeps add-target's top 5 % within the goal (bench/RESULTS.md)",
                           execution=True)  # fmt: skip
    seed: int = _opt(0, "seed of the warmup subset, LoRA init, projection and shuffling")
    dtype: str = _opt("auto", "weights and autocast: auto (bf16 on CUDA, fp32 on CPU), float32 or bfloat16",
                      choices=("auto", "float32", "bfloat16"))  # fmt: skip
    basis_dtype: str = _opt("float32", "dtype of the d × k subspace basis while projecting (bfloat16 halves its memory)",
                            choices=("float32", "bfloat16"))  # fmt: skip
    device: str = _opt("auto", "auto, cpu, cuda, cuda:1 …", execution=True)
    max_tokens: int = _opt(8192, "padded tokens per gradient batch (the knob for GPU memory)", execution=True)
    max_batch: int = _opt(64, "examples per gradient batch at most", execution=True)
    shard_size: int = _opt(2048, "examples per resumable shard", execution=True)
    memory_budget_gb: float = _opt(2.0, "host memory for the validation gradients; beyond it they go to a disk memmap", execution=True)
    grad_memory_gb: float = _opt(4.0, "device memory for a batch's per-example gradients (B × d × 4 bytes): bounds the batch size", execution=True)
    basis_memory_gb: float = _opt(16.0, "device memory for the GIST basis; a larger basis stays on the host and is streamed in row blocks",
                                  execution=True)  # fmt: skip
    model_cache_dir: str | None = _opt(None, "where converted .gguf models are kept (default ~/.cache/gist-curator/models)", execution=True)

    def result_hash(self) -> str:
        """Hash of the options that determine the result: a resumed run must match it."""
        keys = [f.name for f in fields(self) if not f.metadata.get("execution")]
        return hashlib.sha256(json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, recorded: dict) -> list[str]:
        """The result-determining options that differ from a recorded config, as 'name: recorded → this'."""
        keys = [f.name for f in fields(self) if not f.metadata.get("execution")]
        return [f"{k}: {recorded.get(k)!r} → {getattr(self, k)!r}" for k in keys if recorded.get(k) != getattr(self, k)]

    def target_name(self) -> str:
        """The target's name: as given, or the first validation file's stem made folder-safe."""
        import re

        if self.target:
            return self.target
        stem = Path(self.val[0].split(":")[0]).name.split(".")[0] if self.val else "target"
        return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.")[:64] or "target"

    def problems(self) -> list[str]:
        """What is missing or inconsistent, as sentences a user can act on (empty when the config can run)."""
        out = []
        if not str(self.model).strip():
            out.append("Give a model: a Hugging Face id, a local folder or a .gguf file.")
        if not self.train:
            out.append("Give at least one pool file (JSONL, JSON, Parquet or a saved dataset folder).")
        if not self.val:
            out.append("Give at least one validation file for the target task.")
        for what, files in (("pool", self.train), ("validation", self.val)):
            twice = sorted({f for f in files if files.count(f) > 1})
            if twice:
                out.append(f"The {what} file(s) {', '.join(twice)} are given more than once: each would count twice. Give each file once.")
        unknown = [m for m in self.methods if m not in COMPUTE_METHODS]
        if unknown or "gist" not in self.methods:
            out.append(f"Methods must include gist and be among {', '.join(COMPUTE_METHODS)}; got {', '.join(self.methods) or 'none'}.")
        if self.gist_checkpoints not in GIST_CHECKPOINTS:
            out.append(f"gist_checkpoints must be one of {', '.join(GIST_CHECKPOINTS)}.")
        for name in ("max_len", "lora_rank", "lora_alpha", "warmup_epochs", "warmup_batch", "k_max", "less_dim", "sketch_dim", "max_tokens", "max_batch",
                     "shard_size"):  # fmt: skip
            if int(getattr(self, name)) < 1:
                out.append(f"{name} must be at least 1.")
        if not 0 < self.warmup_fraction <= 1:
            out.append("warmup_fraction must be in (0, 1].")
        if not 0 <= self.lora_dropout < 1:
            out.append("lora_dropout must be in [0, 1).")
        if self.target:
            from .runs.manifest import check_target_name

            try:
                check_target_name(self.target)
            except ValueError as err:
                out.append(str(err))
        return out

    def to_argv(self) -> list[str]:
        """The `gist-curate compute` arguments that rebuild this config (no run dir); values are never shell-parsed."""
        argv: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                argv += ([] if value else ["--no-" + f.name.replace("_", "-")]) if f.default is True else ([flag] if value else [])
            elif f.name in ("train", "val"):
                argv += [flag, *(_not_an_option(v) for v in value)]
            elif isinstance(value, list):
                argv += [flag, ",".join(value)]
            elif value is not None and value != "":
                argv += [flag, _not_an_option(value) if f.name in ("model", "adapter", "model_cache_dir") else str(value)]
        return argv


def _not_an_option(path) -> str:
    """A relative path that starts with '-' written './-…', so that a command line never reads a file name as an option."""
    text = str(path)
    return "./" + text if text.startswith("-") else text


# Published recipes: the LoRA and warmup settings of the GIST and LESS papers (Llama-class models on GPUs).
RECIPES: dict[str, dict] = {
    "paper": {"lora_rank": 128, "lora_alpha": 512, "lora_dropout": 0.1, "max_len": 2048, "warmup_epochs": 4,
              "warmup_fraction": 0.05, "warmup_lr": 2e-5},  # fmt: skip
}


def with_recipe(config: ComputeConfig, recipe: str | None) -> ComputeConfig:
    """``config`` with a recipe's settings applied (None: unchanged); ValueError for an unknown recipe."""
    if recipe is None:
        return config
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    return replace(config, **RECIPES[recipe])
