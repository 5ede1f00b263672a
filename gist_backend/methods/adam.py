"""Adam preconditioning of per-example gradients from a saved optimizer state (LESS / G2IS training features).

Math (LESS, no bias correction): with the warmup optimizer's moments (m, v) at a checkpoint,

    Γ(g) = m′ / sqrt(v′ + eps),   m′ = β1·m + (1−β1)·g,   v′ = β2·v + (1−β2)·g².

State files accepted by `load_adam_state`:
  (a) ours: safetensors with tensors "<param name>.exp_avg" / "<param name>.exp_avg_sq" and metadata
      {"format": "gist-adam-v1", "beta1", "beta2"} (written by `save_adam_state`);
  (b) a torch `optimizer.pt`/`optimizer.bin` = `optimizer.state_dict()` (plain loop or HF Trainer), loaded with
      weights_only=True. Its state is keyed by integer position over the concatenated param groups; it is
      mapped to the given names by position (or by the `param_names` torch ≥ 2.6 stores when the optimizer was
      built from named parameters), with shapes checked;
  (c) either, given a directory: ADAM_STATE_FILENAME, optimizer.pt or optimizer.bin inside it.
Names are matched after normalisation (peft "base_model.model." / DDP "module." / torch.compile "_orig_mod."
prefixes removed, adapter segments such as ".default." removed), so peft and plain names match each other.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..runs.files import atomic_path

ADAM_STATE_FILENAME = "adam_state.safetensors"
_FORMAT = "gist-adam-v1"
_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")
_LORA_LINEAR = re.compile(r"(^|\.)(lora_A|lora_B|lora_magnitude_vector)\.[^.]+\.(weight|bias)$")
_LORA_EMB = re.compile(r"(^|\.)(lora_embedding_A|lora_embedding_B)\.[^.]+$")


def adam_precondition(
    grads: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Γ(g) = (β1·m + (1−β1)·g) / sqrt(β2·v + (1−β2)·g² + eps) for grads (B, d) (or (d,)) and state (d,); fp32 on grads' device."""
    d = grads.shape[-1]
    if exp_avg.shape != (d,) or exp_avg_sq.shape != (d,):
        raise ValueError(
            f"Adam state must be flat vectors of length {d} matching the gradients; got exp_avg {tuple(exp_avg.shape)}, "
            f"exp_avg_sq {tuple(exp_avg_sq.shape)} (use load_adam_state with the same parameter order as the gradients)"
        )
    g = grads.to(torch.float32)
    m = exp_avg.to(device=g.device, dtype=torch.float32)
    v = exp_avg_sq.to(device=g.device, dtype=torch.float32)
    num = (g * (1.0 - beta1)).add_(m, alpha=beta1)
    den = g.square().mul_(1.0 - beta2).add_(v, alpha=beta2).add_(eps).sqrt_()
    return num.div_(den)


def normalize_param_name(name: str) -> str:
    """Canonical parameter name: wrapper prefixes and peft adapter-name segments removed."""
    changed = True
    while changed:
        changed = False
        for pre in _PREFIXES:
            if name.startswith(pre):
                name, changed = name[len(pre) :], True
    name = _LORA_LINEAR.sub(r"\1\2.\3", name)
    name = _LORA_EMB.sub(r"\1\2", name)
    return name.replace(".default.", ".").removesuffix(".default")


def _match_names(wanted: Sequence[str], available: Sequence[str], where: str) -> list[str]:
    """For each wanted name, the available name equal to it, else the one with the same normalised form."""
    avail_set = set(available)
    by_norm: dict[str, list[str]] = {}
    for a in available:
        by_norm.setdefault(normalize_param_name(a), []).append(a)
    out, missing = [], []
    for w in wanted:
        if w in avail_set:
            out.append(w)
            continue
        cands = by_norm.get(normalize_param_name(w), [])
        if len(cands) == 1:
            out.append(cands[0])
        elif len(cands) > 1:
            raise ValueError(f"parameter {w!r} matches several entries in {where}: {cands}; pass exact names")
        else:
            missing.append(w)
    if missing:
        raise KeyError(
            f"{len(missing)} of {len(wanted)} parameters have no Adam state in {where}: {missing[:5]}"
            f"{' …' if len(missing) > 5 else ''}. Available (first 5): {list(available)[:5]}. Check that the "
            "state was saved from the same (LoRA) model and that the names refer to its trainable parameters."
        )
    return out


def _check_shape(name: str, got: torch.Size, want: torch.Size, hint: str = "") -> None:
    """Raise if a stored state tensor does not have its parameter's shape."""
    if tuple(got) != tuple(want):
        raise ValueError(f"Adam state for {name!r} has shape {tuple(got)} but the parameter has shape {tuple(want)}{hint}")


def _resolve_file(path: Path) -> Path:
    """A state file, or the conventional state file inside a checkpoint directory."""
    if path.is_dir():
        for fname in (ADAM_STATE_FILENAME, "optimizer.pt", "optimizer.bin"):
            if (path / fname).is_file():
                return path / fname
        raise FileNotFoundError(f"no {ADAM_STATE_FILENAME}, optimizer.pt or optimizer.bin in {path}; pass the state file itself")
    if not path.is_file():
        raise FileNotFoundError(f"Adam state file not found: {path}")
    return path


def _is_safetensors(path: Path) -> bool:
    """Sniff the safetensors header (8-byte little-endian length, then '{')."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < os.path.getsize(path)


def load_adam_state(
    path: str | Path, param_names: Sequence[str], param_shapes: Sequence[torch.Size]
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Flattened fp32 (exp_avg, exp_avg_sq) in the order of param_names, plus (beta1, beta2), from any accepted format."""
    if len(param_names) != len(param_shapes):
        raise ValueError(f"got {len(param_names)} names but {len(param_shapes)} shapes")
    path = _resolve_file(Path(path))
    if _is_safetensors(path):
        avgs, sqs, b1, b2 = _load_safetensors(path, param_names, param_shapes)
    else:
        avgs, sqs, b1, b2 = _load_torch(path, param_names, param_shapes)
    flat = lambda ts: torch.cat([t.reshape(-1).to(torch.float32) for t in ts]) if ts else torch.zeros(0)  # noqa: E731
    return flat(avgs), flat(sqs), b1, b2


def _load_safetensors(path: Path, names: Sequence[str], shapes: Sequence[torch.Size]):
    """Format (a): per-name tensors and betas in the metadata."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if "beta1" not in meta or "beta2" not in meta:
            raise ValueError(f"{path} is a safetensors file without beta1/beta2 metadata; write it with gist_backend.methods.adam.save_adam_state")
        keys = set(f.keys())
        stored = sorted(k[: -len(".exp_avg")] for k in keys if k.endswith(".exp_avg"))
        matched = _match_names(names, stored, str(path))
        avgs, sqs = [], []
        for want, key, shape in zip(names, matched, shapes):
            if f"{key}.exp_avg_sq" not in keys:
                raise ValueError(f"{path} has {key}.exp_avg but no {key}.exp_avg_sq; the file is incomplete, re-save it")
            a, s = f.get_tensor(f"{key}.exp_avg"), f.get_tensor(f"{key}.exp_avg_sq")
            _check_shape(want, a.shape, shape)
            _check_shape(want, s.shape, shape)
            avgs.append(a)
            sqs.append(s)
    return avgs, sqs, float(meta["beta1"]), float(meta["beta2"])


def _load_torch(path: Path, names: Sequence[str], shapes: Sequence[torch.Size]):
    """Format (b): torch optimizer.state_dict(), mapped by position (or by stored param_names)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with guidance
        raise ValueError(f"could not read {path} as a torch optimizer state (weights_only=True): {e}") from e
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise ValueError(f"{path} is not an optimizer.state_dict() (expected keys 'state' and 'param_groups')")
    state, groups = sd["state"], sd["param_groups"]
    betas = {tuple(float(b) for b in g["betas"]) for g in groups if "betas" in g}
    if not betas:
        raise ValueError(f"{path} has no 'betas' in its param groups: not an Adam/AdamW state")
    if len(betas) > 1:
        raise ValueError(f"{path} has param groups with different betas {sorted(betas)}; preconditioning needs one (beta1, beta2)")
    (b1, b2), = betas
    ids = [i for g in groups for i in g["params"]]
    stored_names = [n for g in groups for n in g.get("param_names", [])]
    if len(stored_names) == len(ids) and stored_names:
        pos = {n: i for n, i in zip(stored_names, ids)}
        chosen_ids = [pos[m] for m in _match_names(names, stored_names, str(path))]
        hint = ""
    else:
        if len(ids) != len(names):
            raise ValueError(
                f"{path} holds state for {len(ids)} parameters but {len(names)} names were given; a torch optimizer state has "
                "no names, so param_names must list every parameter the optimizer was built with, in its order "
                "(concatenated param groups; for HF Trainer: weight-decay parameters first, then the rest)"
            )
        chosen_ids = ids
        hint = " (state is mapped by position: param_names must follow the optimizer's parameter order)"
    avgs, sqs = [], []
    for want, pid, shape in zip(names, chosen_ids, shapes):
        st = state.get(pid, state.get(str(pid)))
        if st is None or "exp_avg" not in st or "exp_avg_sq" not in st:
            raise ValueError(f"{path} has no exp_avg/exp_avg_sq for parameter {want!r} (index {pid}): it never received a gradient")
        _check_shape(want, st["exp_avg"].shape, shape, hint)
        _check_shape(want, st["exp_avg_sq"].shape, shape, hint)
        avgs.append(st["exp_avg"])
        sqs.append(st["exp_avg_sq"])
    return avgs, sqs, b1, b2


def save_adam_state(path: str | Path, optimizer: torch.optim.Optimizer, named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> Path:
    """Write the Adam moments and step of the optimizer's parameters (by name) as safetensors + betas metadata, atomically."""
    path = Path(path)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    tensors: dict[str, torch.Tensor] = {}
    betas: set[tuple[float, float]] = set()
    for name, p in named_params:
        g = group_of.get(id(p))
        if g is None:
            continue  # not optimised (frozen)
        if "betas" not in g:
            raise ValueError(f"optimizer group of {name!r} has no 'betas': save_adam_state needs Adam/AdamW")
        st = optimizer.state.get(p, {})
        if "exp_avg" not in st or "exp_avg_sq" not in st:
            raise ValueError(f"no Adam state for {name!r}: run at least one optimizer.step() with a gradient for it before saving")
        betas.add((float(g["betas"][0]), float(g["betas"][1])))
        tensors[f"{name}.exp_avg"] = st["exp_avg"].detach().to("cpu").contiguous()
        tensors[f"{name}.exp_avg_sq"] = st["exp_avg_sq"].detach().to("cpu").contiguous()
        tensors[f"{name}.step"] = torch.as_tensor(st.get("step", 0), dtype=torch.float32).reshape(1).cpu()
    if not tensors:
        raise ValueError("none of the named parameters is in the optimizer; pass model.named_parameters() of the optimised model")
    if len(betas) > 1:
        raise ValueError(f"parameter groups use different betas {sorted(betas)}; one (beta1, beta2) is required")
    (b1, b2), = betas
    meta = {"format": _FORMAT, "beta1": repr(b1), "beta2": repr(b2)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path
