"""A complete synthetic run (no model): realistic tables and geometry for tests, benchmarks and dashboard work.

The gradients are simulated in a small latent space (d = 1024 "LoRA" coordinates in 8 modules):
    g = relevance · μ_task + Q (s ⊙ ε) + noise,   s_j ∝ j^-0.7   (a decaying spectrum, shared "style" directions)
with per-coordinate scales so the second moment is strongly coupled (ρ far from 0, as for LoRA). Validation
gradients are formed in full and go through the real ``gist.fit_subspace`` and ``geometry`` code, so the
spectrum, ρ values, coupling blocks and coordinates are mutually consistent. Training gradients are never formed:
their coordinates are the latent factors times Bᵀ V plus isotropic noise (Vᵀ of isotropic noise is isotropic).
Sources differ in how relevant they are to the target tasks, so caps and source mixes have something to show.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl
import torch

from ..config import COMPUTE_METHODS, needs_sketches
from ..methods import geometry
from ..methods.gist import fit_subspace
from ..runs.files import atomic_path, tool_version, utc_now, write_json
from ..runs.store import TargetData, write_run

D_LATENT = 1024
N_MODULES = 8
N_STYLE = 96  # shared "style" directions behind the decaying spectrum
SKETCH_DIM = 256
SOURCE_NAMES = ["flan_v2", "cot", "dolly", "oasst1", "sharegpt", "alpaca", "code_alpaca", "wizardlm", "lima", "gpt4all"]
TASK_NAMES = ["mmlu", "bbh", "tydiqa", "gsm8k", "arc", "boolq", "hellaswag", "piqa"]
_WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an which have not but they his "
    "we were one all their there been has more if will would can what when who about how so up out them some "
    "model data answer question explain reason step first second then therefore because number value result "
    "list write code function return python string example short long summary story poem table city river "
    "country year history science energy water light cell protein equation solve compute sum product prime "
    "café naïve résumé über déjà Zürich 東京 数据 ответ задача λ ∑ → ✓ 🙂"
).split(" ")  # none needs JSON escaping, so a record's JSON is assembled from the plain text
# The system prompt carries the characters JSON must escape (quote, backslash, tab).
SYSTEM_PROMPT = 'You are a helpful assistant. Quote with "double quotes", keep back\\slashes and\ttabs.'


def _names(pool: Sequence[str], n: int) -> list[str]:
    """The first n names of a list, numbered beyond its end."""
    return [pool[i] if i < len(pool) else f"{pool[i % len(pool)]}_{i // len(pool)}" for i in range(n)]


class _Corpus:
    """One random word stream; record texts are slices of it (no per-word Python work per record)."""

    def __init__(self, rng: np.random.Generator, n_words: int = 300_000):
        words = np.asarray(_WORDS, dtype=object)[rng.integers(0, len(_WORDS), n_words)]
        ends = rng.random(n_words) < 0.08  # sentence ends
        words[ends] = words[ends] + "."
        self.n = n_words
        self.text = " ".join(words.tolist())
        self.offsets = np.concatenate([[0], np.cumsum(np.fromiter(map(len, words.tolist()), np.int64, n_words) + 1)])

    def texts(self, rng: np.random.Generator, n: int, median_words: float, sigma: float, max_words: int) -> list[str]:
        """n pseudo-texts of lognormal word counts."""
        lengths = np.clip(rng.lognormal(np.log(median_words), sigma, n).astype(np.int64), 1, min(max_words, self.n - 1))
        starts = rng.integers(0, self.n - lengths)
        lo, hi = self.offsets[starts].tolist(), (self.offsets[starts + lengths] - 1).tolist()
        return [self.text[a:b] for a, b in zip(lo, hi)]


def _records(rng: np.random.Generator, corpus: _Corpus, ids: list[str], sources: list[str], tasks: list[str] | None, alpaca_source: str | None) -> pl.DataFrame:
    """Columns raw (JSON line), text (rendered), n_tokens, n_response_tokens of chat / Alpaca records of varied length.

    The JSON is assembled by polars (json.dumps of 50k long records is the slow part otherwise); every third
    record uses compact separators so exports can be checked for verbatim copies. Chat records have a system
    prompt (15%) or a second turn (15%).
    """
    n = len(ids)
    kind = rng.random(n)
    alpaca = np.asarray(sources, dtype=object) == alpaca_source
    system, two = (kind < 0.15) & ~alpaca, (kind > 0.85) & ~alpaca
    second_q, second_a = [""] * n, [""] * n
    rows_two = np.flatnonzero(two).tolist()
    for i, q2, a2 in zip(rows_two, corpus.texts(rng, len(rows_two), 12, 0.6, 200), corpus.texts(rng, len(rows_two), 30, 0.8, 600)):
        second_q[i], second_a[i] = q2, a2
    frame = pl.DataFrame(
        {
            "id": ids, "source": sources, "task": tasks or [""] * n,
            "q": corpus.texts(rng, n, 25, 0.9, 1000), "a": corpus.texts(rng, n, 60, 1.0, 2000), "q2": second_q, "a2": second_a,
            "alpaca": alpaca, "system": system, "two": two, "compact": np.arange(n) % 3 == 0,
        }
    )  # fmt: skip
    col, lit, when, cat = pl.col, pl.lit, pl.when, pl.concat_str
    cs = when(col("compact")).then(lit(",")).otherwise(lit(", "))
    ks = when(col("compact")).then(lit(":")).otherwise(lit(": "))
    empty = lit("")

    def field(key: str, value: pl.Expr) -> pl.Expr:
        return cat([lit(f'"{key}"'), ks, lit('"'), value, lit('"')])

    def message(role: str, content: pl.Expr) -> pl.Expr:
        return cat([lit("{"), field("role", lit(role)), cs, field("content", content), lit("}")])

    task = cat([cs, field("task", col("task"))]) if tasks is not None else empty
    body = cat(
        [
            when(col("system")).then(cat([message("system", lit(json.dumps(SYSTEM_PROMPT)[1:-1])), cs])).otherwise(empty),
            message("user", col("q")), cs, message("assistant", col("a")),
            when(col("two")).then(cat([cs, message("user", col("q2")), cs, message("assistant", col("a2"))])).otherwise(empty),
        ]
    )  # fmt: skip
    chat = cat([lit("{"), field("dataset", col("source")), cs, field("id", col("id")), cs, lit('"messages"'), ks, lit("["), body, lit("]"), task, lit("}")])
    alp = cat(
        [lit("{"), field("instruction", col("q")), cs, field("input", empty), cs, field("output", col("a")), cs,
         field("id", col("id")), cs, field("dataset", col("source")), task, lit("}")]
    )  # fmt: skip
    text = cat(
        [
            when(col("system")).then(lit(f"[system] {SYSTEM_PROMPT}\n\n")).otherwise(empty), lit("[user] "), col("q"), lit("\n\n[assistant] "), col("a"),
            when(col("two")).then(cat([lit("\n\n[user] "), col("q2"), lit("\n\n[assistant] "), col("a2")])).otherwise(empty),
        ]
    )  # fmt: skip
    # ~4.2 characters per token, plus a few template tokens per message
    n_two, n_sys = col("two").cast(pl.Int64), col("system").cast(pl.Int64)
    response = col("a").str.len_chars() + col("a2").str.len_chars()
    return frame.select(
        raw=when(col("alpaca")).then(alp).otherwise(chat),
        text=text,
        n_tokens=((col("q").str.len_chars() + col("q2").str.len_chars() + response) / 4.2).cast(pl.Int64) + 8 + 8 * n_two + 12 * n_sys,
        n_response_tokens=(response / 4.2).cast(pl.Int64) + 1 + n_two,
    )


def _table(ids: list[str], sources: list[str], tasks: list[str], records: pl.DataFrame, file: str) -> pl.DataFrame:
    """The runs-format example table (same columns as ``compute.example_table``)."""
    n = len(ids)
    return pl.DataFrame({"row": np.arange(n, dtype=np.int64), "id": ids, "source": sources, "task": tasks}).with_columns(
        records["n_tokens"], records["n_response_tokens"], records["text"], records["raw"],
        pl.lit(file).alias("file"), pl.Series("line", np.arange(1, n + 1, dtype=np.int64)),
    )  # fmt: skip


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@dataclass
class _Latent:
    """The latent gradient model shared by the checkpoints (see the module docstring)."""

    task_dirs: np.ndarray  # (T, d)
    style: np.ndarray  # (S, d)
    col_scale: np.ndarray  # (d,) uneven coordinate variances, as across LoRA A/B entries
    a_train: np.ndarray  # (N, T + S) latent factors of the pool: task membership × relevance, style
    a_val: np.ndarray  # (m, T + S)
    noise_scale: float


def _tables(rng, n_train: int, n_val: int, n_tasks: int, n_sources: int):
    """Pool and validation tables, each row's source index and each validation row's task index."""
    source_names, task_names = _names(SOURCE_NAMES, n_sources), _names(TASK_NAMES, n_tasks)
    src_idx = rng.choice(n_sources, n_train, p=rng.dirichlet(np.full(n_sources, 2.0)))
    sources = [source_names[s] for s in src_idx.tolist()]
    ids = [f"{source_names[s]}-{i:07d}" for i, s in enumerate(src_idx.tolist())]
    corpus = _Corpus(rng)
    records = _records(rng, corpus, ids, sources, None, source_names[2] if n_sources > 2 else None)
    train = _table(ids, sources, ["all"] * n_train, records, "synthetic/pool.jsonl")
    val_task_idx = np.arange(n_val) % n_tasks
    val_tasks = [task_names[t] for t in val_task_idx.tolist()]
    val_ids = [f"val-{task_names[t]}-{j:05d}" for j, t in enumerate(val_task_idx.tolist())]
    val = _table(val_ids, ["target"] * n_val, val_tasks, _records(rng, corpus, val_ids, ["target"] * n_val, val_tasks, None), "synthetic/val.jsonl")
    return train, val, src_idx, val_task_idx


def _latent(rng, src_idx: np.ndarray, val_task_idx: np.ndarray, n_tasks: int, n_sources: int) -> _Latent:
    """Task directions, style directions, and the latent factors of every pool and validation row."""
    d, n_train, n_val = D_LATENT, src_idx.size, val_task_idx.size
    common = rng.standard_normal(d)
    task_dirs = _unit(0.6 * _unit(common) + 0.8 * _unit(rng.standard_normal((n_tasks, d))))
    style = rng.standard_normal((N_STYLE, d)) / np.sqrt(d)
    style_scale = np.arange(1, N_STYLE + 1) ** -0.7
    col_scale = rng.lognormal(0.0, 0.6, d)
    relevance_mean = np.linspace(1.2, -0.2, n_sources)[rng.permutation(n_sources)]  # sources differ in relevance, some negative
    t_idx = rng.integers(0, n_tasks, n_train)
    relevance = relevance_mean[src_idx] + 0.8 * rng.standard_normal(n_train)
    a_task = np.zeros((n_train, n_tasks), np.float32)
    a_task[np.arange(n_train), t_idx] = relevance * 1.5
    a_style = rng.standard_normal((n_train, N_STYLE)).astype(np.float32) * style_scale.astype(np.float32) * 3.0
    v_task = np.zeros((n_val, n_tasks))
    v_task[np.arange(n_val), val_task_idx] = 3.0 + 0.5 * rng.standard_normal(n_val)
    a_val = np.concatenate([v_task, rng.standard_normal((n_val, N_STYLE)) * style_scale * 3.0], axis=1)
    return _Latent(task_dirs, style, col_scale, np.concatenate([a_task, a_style], axis=1), a_val, 0.05 * float(np.sqrt(np.mean(col_scale**2))))


def _checkpoint(rng, rng_sketch, lat: _Latent, c: int, n_ckpt: int, k_max: int, proj: np.ndarray | None) -> dict:
    """One checkpoint: validation gradients through the real subspace and geometry code; pool coordinates, norms, sketches."""
    d, n_tasks = D_LATENT, lat.task_dirs.shape[0]
    drift = 0.25 * c / max(n_ckpt - 1, 1)
    mu_c = _unit(lat.task_dirs + drift * rng.standard_normal((n_tasks, d)) / np.sqrt(d) * 4)
    basis_c = np.concatenate([mu_c, lat.style + 0.1 * rng.standard_normal(lat.style.shape) / np.sqrt(d)]) * lat.col_scale  # (T+S, d)
    g_val = (lat.a_val @ basis_c + 0.05 * rng.standard_normal((lat.a_val.shape[0], d)) * lat.col_scale).astype(np.float32)
    sigma, v_basis, z_val = fit_subspace(g_val, k_max)
    lat_k = (basis_c @ v_basis).astype(np.float32)  # (T+S, k): latent factor → coordinates
    z_train = lat.a_train @ lat_k + lat.noise_scale * rng.standard_normal((lat.a_train.shape[0], lat_k.shape[1]), dtype=np.float32)
    # ‖g‖² of g = a · basis + isotropic noise in all d coordinates: a (B Bᵀ) aᵀ + noise² · d, never forming g
    gram_b = (basis_c @ basis_c.T).astype(np.float32)
    grad_norm = np.sqrt(((lat.a_train @ gram_b) * lat.a_train).sum(axis=1) + lat.noise_scale**2 * d).astype(np.float32)
    per = d // N_MODULES
    slices = {f"model.layers.{i // 2}.self_attn.{'qv'[i % 2]}_proj": (i * per, (i + 1) * per) for i in range(N_MODULES)}
    summary, blocks = geometry.coupling(g_val, slices)
    blocks["gist_block"] = geometry.normalised_block(z_val[:, : geometry.MAX_BLOCK]).astype(np.float32)
    out = {"train": z_train.astype(np.float32), "val": z_val.astype(np.float32), "grad_norm": grad_norm, "blocks": blocks,
           "geometry": {"name": f"epoch-{c + 1}", "spectrum": geometry.spectrum(sigma), **summary}}  # fmt: skip
    if proj is not None:
        adam = rng_sketch.lognormal(0.0, 0.3, d)  # stands in for 1/sqrt(v): LESS features are Adam-preconditioned
        lat_s = ((basis_c * adam) @ proj).astype(np.float32)  # (T+S, p)
        noise = lat.noise_scale * rng_sketch.standard_normal((lat.a_train.shape[0], SKETCH_DIM), dtype=np.float32)
        out.update(sketch_train=(lat.a_train @ lat_s + noise).astype(np.float16), sketch_val=(g_val @ proj).astype(np.float16))
    return out


def synthetic_run(
    run_dir: Path,
    *,
    n_train: int = 50_000,
    n_val: int = 200,
    n_tasks: int = 4,
    k_max: int = 128,
    n_ckpt: int = 2,
    n_sources: int = 5,
    methods: Sequence[str] = ("gist",),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a complete run (manifest status "complete") in the ``runs`` format into ``run_dir``; returns it."""
    methods = list(dict.fromkeys(["gist", *methods]))
    bad = set(methods) - set(COMPUTE_METHODS)
    if bad:
        raise ValueError(f"unknown method(s) {', '.join(sorted(bad))}; synthetic runs support gist, less, g2is")
    if n_train < 1 or n_val < 2 or n_tasks < 1 or n_ckpt < 1 or n_sources < 1 or k_max < 1:
        raise ValueError("synthetic_run needs n_train ≥ 1, n_val ≥ 2 and n_tasks, n_ckpt, n_sources, k_max ≥ 1")
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    if (run_dir / "manifest.json").exists():
        if not overwrite:
            raise ValueError(f"{run_dir} already holds a run; use a new directory or pass overwrite=True")
        (run_dir / "manifest.json").unlink()
        (run_dir / "edits.json").unlink(missing_ok=True)
        for cache in ("maps", "selections"):  # derived from the old run's numbers
            shutil.rmtree(run_dir / cache, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sketching = needs_sketches(methods)
    train, val, src_idx, val_task_idx = _tables(rng, n_train, n_val, n_tasks, n_sources)
    lat = _latent(rng, src_idx, val_task_idx, n_tasks, n_sources)
    rng_sketch = np.random.default_rng([seed, 1])  # separate stream: coordinates do not depend on the methods asked for
    proj = rng_sketch.standard_normal((D_LATENT, SKETCH_DIM)).astype(np.float32) / np.sqrt(SKETCH_DIM) if sketching else None
    ckpts = [_checkpoint(rng, rng_sketch, lat, c, n_ckpt, k_max, proj) for c in range(n_ckpt)]
    weights = (np.linspace(1.0, 0.5, n_ckpt) / np.linspace(1.0, 0.5, n_ckpt).sum()).tolist()
    k = min(c["train"].shape[1] for c in ckpts)
    names = [c["geometry"]["name"] for c in ckpts]
    config = {
        "model": "synthetic", "train": ["synthetic/pool.jsonl"], "val": ["synthetic/val.jsonl"], "k_max": k_max,
        "methods": methods, "less_dim": SKETCH_DIM if sketching else None, "seed": seed,
        "synthetic": {"n_train": n_train, "n_val": n_val, "n_tasks": n_tasks, "n_ckpt": n_ckpt, "n_sources": n_sources, "d": D_LATENT},
    }  # fmt: skip
    manifest = {
        "created": utc_now(), "tool_version": tool_version(), "config": config,
        "config_hash": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16], "methods": methods,
        "n_val": n_val, "d": D_LATENT, "gradient_passes": n_ckpt, "checkpoints": [{"name": n, "lr": w} for n, w in zip(names, weights)],
        "gist": {"checkpoints": names, "weights": weights}, "bad_records": 0, "timings": {}, "warnings": [],
        "fingerprints": {"train": {}, "val": {}, "model": f"synthetic-seed{seed}"},
    }  # fmt: skip
    target = TargetData(
        name="synthetic", val=val, files=["synthetic/val.jsonl"], fingerprints={}, train_coords=np.stack([c["train"][:, :k] for c in ckpts]),
        val_coords=np.stack([c["val"][:, :k] for c in ckpts]), geometry=[c["geometry"] for c in ckpts], coupling=ckpts[-1]["blocks"],
    )  # fmt: skip
    if sketching:
        from ..methods.less import less_scores

        manifest["less"] = {"checkpoints": names, "weights": weights, "dim": SKETCH_DIM}
        tasks = val["task"].to_list()
        scores, _, per_task = less_scores([torch.from_numpy(c["sketch_train"]) for c in ckpts], [torch.from_numpy(c["sketch_val"]) for c in ckpts],
                                          tasks, weights)  # fmt: skip
        target = replace(target, val_sketch=np.stack([c["sketch_val"] for c in ckpts]), less_scores=scores.numpy(), less_task_scores=per_task.numpy())
    manifest["timings"]["synthetic"] = round(time.perf_counter() - t_start, 3)
    with atomic_path(run_dir / "bad_records.jsonl") as tmp:
        tmp.write_text("")
    write_json(run_dir / "progress.json", {"stage": "complete", "done": 1, "total": 1, "rate": 0.0, "eta_s": None, "updated": time.time()})
    return write_run(run_dir, manifest, train=train, targets=[target], grad_norms=np.stack([c["grad_norm"] for c in ckpts]),
                     train_sketch=np.stack([c["sketch_train"] for c in ckpts]) if sketching else None)  # fmt: skip
