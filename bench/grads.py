"""Gradient throughput: the tool's per-example LoRA gradient engine vs a training step (floor) and LESS's loop.

Three arms, timed side by side in one process on the same model, the same examples (same token
sequences and lengths), the same dtype and device, and, for engine and floor, the same length-bucketed
batches (``grads.length_buckets`` with the same max_tokens / max_batch as a compute run):

  engine  ``grads.batch_gradients``: one forward (logits only at supervised positions) + one backward
          per batch, with the hooks that turn it into B exact per-example LoRA gradients (B, d) fp32.
  floor   what one ordinary training step costs on that batch: the same forward/loss
          (``grads.per_example_loss``, summed over the batch) + ``.backward()`` into the LoRA
          parameters' ``.grad``. No per-example work; the optimizer step is not counted.
  less    LESS's way (collect_grads): batch size 1, for each example ``loss.backward()``, then
          flatten ``p.grad`` of every LoRA parameter and copy it into a preallocated (n, d) fp32 row.
          Same loss as the engine (logits at supervised positions only) unless --less-full-logits,
          which uses the model's own loss over full-vocabulary logits at every position as LESS does.

Batches are collated and moved to the device before timing (all arms alike). Every arm is warmed up,
then the three arms run in rotating order for --repeats rounds; CUDA is synchronised around each arm.
Figures are examples/s (examples / median seconds per round) and the ratios engine/floor and
engine/less (median of the per-round paired ratios). On a shared CPU machine use --threads 1 --clock cpu:
process CPU time is far less disturbed by other processes than wall-clock time. Runs on CUDA when available (bf16 weights + bf16 autocast, as compute
does), else CPU fp32.

Models: default a random Llama (hidden 256, 4 layers) built by ``testing.make_tiny_model``;
--random-config builds a random Llama of a realistic size from its config alone (no download);
--model loads a real one (folder, .gguf, hub id, or "smollm2" for the offline SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    machine,
    median,
    result_lines,
    sync,
    table,
    timed,
    write_json,
)


from gist_backend.engine.grads import (
    IGNORE_INDEX,
    Batch,
    batch_gradients,
    collate,
    length_buckets,
    lora_factors,
    per_example_loss,
)

# Llama-shaped random configs (hidden, layers, heads, kv heads, intermediate, vocab): sizes of known models.
RANDOM_CONFIGS: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny": (256, 4, 4, 2, 512, 512),
    "135m": (576, 30, 9, 3, 1536, 49152),  # SmolLM2-135M
    "1b": (2048, 16, 32, 8, 8192, 128256),  # Llama-3.2-1B
    "3b": (3072, 28, 24, 8, 8192, 128256),  # Llama-3.2-3B
    "8b": (4096, 32, 32, 8, 14336, 128256),  # Llama-3.1-8B
}


@dataclass(frozen=True)
class Example:
    """A tokenised example as ``grads.collate`` expects it."""

    input_ids: list[int]
    labels: list[int]


def make_examples(n: int, seq_len: int, vocab: int, response_frac: float = 0.4, seed: int = 0) -> list[Example]:
    """n random token sequences, lengths uniform in [seq_len/2, seq_len], the last response_frac supervised."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(max(2, seq_len // 2), max(2, seq_len))
        ids = [rng.randrange(min(10, vocab - 1), vocab) for _ in range(length)]
        start = max(1, int(length * (1 - response_frac)))
        out.append(Example(ids, [IGNORE_INDEX] * start + ids[start:]))
    return out


def resolve_dtypes(dtype: str, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(weight dtype, autocast dtype), as compute.resolve_dtypes: bf16 + bf16 autocast on CUDA, fp32 on CPU."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    return (torch.float32, None) if dtype == "float32" else (torch.bfloat16, torch.bfloat16)


def random_llama(size: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised Llama of a preset size, built from its config alone (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab = RANDOM_CONFIGS[size]
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
        tie_word_embeddings=size in ("tiny", "135m", "1b", "3b"), pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype=dtype).eval()


def build_model(args, device: torch.device, weight_dtype: torch.dtype) -> tuple[torch.nn.Module, int, str]:
    """(model with a seeded LoRA adapter on device, vocab size, description)."""
    from gist_backend.engine.model import attach_lora, load_model, smollm2_gguf

    if args.model:
        spec = str(smollm2_gguf()) if args.model == "smollm2" else args.model
        model, _ = load_model(spec, dtype=weight_dtype, device=str(device))
        what = f"model {args.model}"
    elif args.random_config:
        model = random_llama(args.random_config, weight_dtype, device, args.seed)
        what = f"random Llama config {args.random_config} {RANDOM_CONFIGS[args.random_config][:2]}"
    else:
        from gist_backend.devkit.tiny import make_tiny_model

        folder = make_tiny_model(Path(tempfile.mkdtemp(prefix="bench-grads-")) / "llama", "llama", hidden=args.hidden, layers=args.layers)
        model, _ = load_model(str(folder), dtype=weight_dtype, device=str(device))
        what = f"random Llama (make_tiny_model, hidden {args.hidden}, {args.layers} layers)"
    vocab = model.get_output_embeddings().weight.shape[0]
    model = attach_lora(model, rank=args.lora_rank, alpha=2 * args.lora_rank, init_b_nonzero=True, seed=args.seed)
    model.to(device)
    model.eval()
    return model, vocab, what


def on_device(batch: Batch, device: torch.device) -> Batch:
    """The same batch with its tensors on device."""
    return Batch(batch.indices, batch.input_ids.to(device), batch.attention_mask.to(device), batch.labels.to(device))


def main(argv: list[str] | None = None) -> dict:
    """Run the three arms and print the table, JSON and RESULT lines; returns the result dict."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder, .gguf, hub id, or 'smollm2' (offline SmolLM2-135M-Instruct)")
    p.add_argument("--random-config", "--config-size", dest="random_config", choices=sorted(RANDOM_CONFIGS), help="random Llama of this size (no download)")
    p.add_argument("--hidden", type=int, default=256, help="default tiny model: hidden size")
    p.add_argument("--layers", type=int, default=4, help="default tiny model: layers")
    p.add_argument("--n", type=int, default=64, help="examples per round")
    p.add_argument("--less-n", type=int, default=None, help="examples in the LESS arm per round (default: all n; a prefix)")
    p.add_argument("--seq-len", type=int, default=256, help="max tokens per example (lengths uniform in [seq_len/2, seq_len])")
    p.add_argument("--max-tokens", type=int, default=8192, help="padded tokens per batch (compute's default)")
    p.add_argument("--max-batch", type=int, default=64, help="examples per batch at most (compute's default)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 + autocast on CUDA, fp32 on CPU")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="cpu: process CPU time (shared CPU machines, with --threads 1)")
    p.add_argument("--less-full-logits", action="store_true", help="LESS arm: the model's own loss (full-vocab logits everywhere)")
    p.add_argument("--skip-less", action="store_true", help="time only engine and floor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.clock == "cpu" and device.type == "cuda":
        p.error("--clock cpu measures CPU time; use wall-clock time on CUDA")
    weight_dtype, autocast = resolve_dtypes(args.dtype, device)
    model, vocab, what = build_model(args, device, weight_dtype)
    params = [module.weight for _, module in lora_factors(model)]
    d = sum(w.numel() for w in params)
    examples = make_examples(args.n, args.seq_len, vocab, seed=args.seed)
    buckets = length_buckets([len(e.input_ids) for e in examples], args.max_tokens, args.max_batch)
    batches = [on_device(collate(examples, idx, 0), device) for idx in buckets]
    less_n = min(args.less_n or args.n, args.n)
    singles = [on_device(collate(examples, [i], 0), device) for i in range(less_n)]
    amp = (lambda: torch.autocast(device.type, dtype=autocast)) if autocast is not None else nullcontext
    n_tokens = sum(len(e.input_ids) for e in examples)
    padded = sum(b.input_ids.numel() for b in batches)

    def zero_grads() -> None:
        for w in params:
            w.grad = None

    def engine() -> torch.Tensor:
        out = torch.empty(args.n, d, device=device, dtype=torch.float32)
        for b in batches:
            grads, _ = batch_gradients(model, b, device, autocast)
            out[b.indices] = grads
        return out

    def floor() -> None:
        for b in batches:
            zero_grads()
            with torch.enable_grad(), amp():
                per_example_loss(model, b, device).sum().backward()
        zero_grads()

    def less() -> torch.Tensor:
        out = torch.empty(less_n, d, device=device, dtype=torch.float32)
        for i, b in enumerate(singles):
            zero_grads()
            with torch.enable_grad(), amp():
                if args.less_full_logits:
                    loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
                else:
                    loss = per_example_loss(model, b, device)[0]
                loss.backward()
            out[i] = torch.cat([w.grad.reshape(-1) for w in params])  # flatten + copy, as LESS's collect_grads
        zero_grads()
        return out

    arms = {"engine": (engine, args.n), "floor": (floor, args.n)}
    if not args.skip_less:
        arms["less"] = (less, less_n)
    # warm-up round (also gives the equality check engine vs loop)
    check = {}
    eng_rows = engine()
    if not args.skip_less:
        ref = less()  # with --less-full-logits too: the model's own loss is the same mean over response tokens
        diff, top = (eng_rows[:less_n] - ref).abs().max().item(), ref.abs().max().item()
        check = {"max_abs_diff": diff, "max_abs_grad": top, "rel_diff": diff / max(top, 1e-30)}
        del ref
    floor()
    del eng_rows
    sync(device)

    seconds: dict[str, list[float]] = {k: [] for k in arms}
    names = list(arms)
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate which arm goes first
        for name in order:
            fn, _ = arms[name]
            t, _ = timed(fn, device, args.clock)
            seconds[name].append(t)
    rate = {k: [arms[k][1] / t for t in ts] for k, ts in seconds.items()}
    paired = {k: median([e / a for e, a in zip(rate["engine"], rate[k])]) for k in arms}  # engine speed-up per round
    ratio_floor, ratio_less = paired["floor"], paired.get("less")
    rows = [[k, arms[k][1], arms[k][1] / median(seconds[k]), median(seconds[k]), paired[k]] for k in arms]
    print(f"model: {what}; d = {d:,} LoRA coordinates (rank {args.lora_rank}); device {device}, weights {weight_dtype}, autocast {autocast}")
    print(f"data: {args.n} examples, {n_tokens:,} tokens ({padded:,} padded) in {len(batches)} batches (max_tokens {args.max_tokens}); "
          f"{args.repeats} rounds, {args.clock} clock, {torch.get_num_threads()} CPU threads")
    print(table(rows, ["arm", "examples", "examples/s", f"s/round ({args.clock}, median)", "engine speed-up (median of rounds)"]))
    if check:
        expect = "equal up to fp32 rounding" if autocast is None and weight_dtype == torch.float32 else "close: bf16 rounding differs with padding"
        print(f"check engine vs batch-size-1 loop ({expect}): max |diff| {check['max_abs_diff']:.3g} of max |g| {check['max_abs_grad']:.3g}")
    print(f"engine / floor throughput {ratio_floor:.3f} (target >= 0.8)" + (f"; engine / LESS loop {ratio_less:.2f}x (target >= 5x on GPU)" if ratio_less else ""))
    result = {
        "bench": "grads", "machine": machine(), "model": what, "d": d, "device": str(device), "weight_dtype": str(weight_dtype),
        "autocast": str(autocast), "n": args.n, "less_n": less_n, "seq_len": args.seq_len, "tokens": n_tokens, "padded_tokens": padded,
        "batches": len(batches), "max_tokens": args.max_tokens, "repeats": args.repeats, "less_full_logits": args.less_full_logits,
        "clock": args.clock, "threads": torch.get_num_threads(),
        "seconds": seconds, "examples_per_s": {k: arms[k][1] / median(seconds[k]) for k in arms}, "check": check,
        "grads_vs_floor": ratio_floor, "grads_vs_less": ratio_less,
    }  # fmt: skip
    write_json(args.json, result)
    headline = {"grads_vs_floor": ratio_floor}
    if ratio_less is not None:
        headline["grads_vs_less"] = ratio_less
    print(result_lines(headline))
    return result


if __name__ == "__main__":
    main()
