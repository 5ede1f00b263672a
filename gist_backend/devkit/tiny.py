"""Tiny random causal LMs and toy instruction data, built offline, for tests, benchmarks and smoke runs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<|end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_SUBJECTS = {
    "arithmetic": ("What is {a} plus {b}?", "{a} plus {b} is {c}."),
    "geography": ("Name a river in country number {a}.", "River {b} flows through country {a}."),
    "colors": ("Mix color {a} with color {b}.", "Mixing {a} and {b} gives shade {c}."),
    "animals": ("How many legs does animal {a} have?", "Animal {a} has {b} legs and {c} eyes."),
}


def _corpus() -> list[str]:
    words = [t.format(a=i, b=i + 1, c=i * 2) for i in range(50) for q in _SUBJECTS.values() for t in q]
    return words + ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def make_tokenizer(vocab_size: int = 400):
    """A small byte-level BPE tokenizer with a chat template, trained on the toy corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(folder: str | Path, arch: str = "llama", seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Save a randomly initialised tiny causal LM (llama or gpt2 style) plus tokenizer to ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=512,
            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"arch must be 'llama' or 'gpt2', got {arch!r}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_toy_data(folder: str | Path, n_train: int = 60, n_val: int = 12, seed: int = 0) -> tuple[Path, Path]:
    """Write pool.jsonl (chat records from four templated subjects) and val.jsonl (two subjects as sub-tasks)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(_SUBJECTS)

    def record(subject: str, i: int, **extra) -> dict:
        q, a = _SUBJECTS[subject]
        x, y = rng.randint(0, 60), rng.randint(0, 60)
        values = {"a": x, "b": y, "c": x + y}
        messages = [{"role": "user", "content": q.format(**values)}, {"role": "assistant", "content": a.format(**values)}]
        return {"id": f"{subject}-{i}", "dataset": subject, "messages": messages, **extra}

    train = [record(names[i % len(names)], i) for i in range(n_train)]
    val = [record(names[i % 2], 10_000 + i, task=names[i % 2]) for i in range(n_val)]
    pool_path, val_path = folder / "pool.jsonl", folder / "val.jsonl"
    pool_path.write_text("".join(json.dumps(r) + "\n" for r in train))
    val_path.write_text("".join(json.dumps(r) + "\n" for r in val))
    return pool_path, val_path
