"""Evaluate selections by fine-tuning: does a selection help the target more than random examples do?

``evaluate(run, test, selections)`` fine-tunes a fresh LoRA on each arm, with the run's model and its warmup's
recipe (LoRA rank, alpha, dropout, targets, learning rate, batch, max length; epochs and lr can be overridden):
    selection arms   the given selections (curation edits included, as ``select`` applied them)
    random arms      ``baselines`` seeded random selections of the same size
    base             the model without fine-tuning
and scores every arm on the held-out test records (``engine/likelihood.py``: response loss, and accuracy by
option log-likelihood when records carry ``choices`` and ``answer_index``). With ``train_seeds`` N > 1 every
fine-tuned arm is trained N times (LoRA init and data order seeded recipe.seed … recipe.seed + N − 1) and its
per-question scores are the mean over those runs, so that training noise averages out and can be read off
(``test_loss_by_seed``). Each arm is compared with the
mean of the random arms of its size: the mean per-question difference and its 95 % paired bootstrap interval
(questions resampled with replacement, 2,000 times, seeded). Arms are cached in ``<run>/evals/arms/`` by what
determines them (model, recipe, training ids in order, test file), so re-running an evaluation, or another one
sharing its random arms, reuses them; results are stored in ``<run>/evals/<id>.json``. A test set that
shares an id or a conversation with the run's pool or validation records is refused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .curation.selection import Selection, select
from .engine.normalise import Unusable, normalise
from .engine.records import Record, fingerprint, render_text
from .runs.files import RunError, read_json, utc_now, write_json
from .runs.lock import run_lock
from .runs.manifest import manifest_checksum
from .runs.store import Run

BOOTSTRAP = 2000


@dataclass(frozen=True)
class EvalRecipe:
    """How each arm is fine-tuned (by default the run's warmup recipe)."""

    epochs: int
    lr: float
    batch: int
    lora_rank: int
    lora_alpha: int
    lora_dropout: float
    lora_targets: list[str] | None
    max_len: int
    seed: int = 0

    @classmethod
    def from_run(cls, run: Run, **overrides) -> "EvalRecipe":
        """The run's warmup recipe, with ``overrides`` (None values ignored)."""
        c = run.manifest.get("config") or {}
        recipe = cls(c.get("warmup_epochs", 4), c.get("warmup_lr", 2e-5), c.get("warmup_batch", 32), c.get("lora_rank", 8),
                     c.get("lora_alpha", 16), c.get("lora_dropout", 0.0), c.get("lora_targets"), c.get("max_len", 1024), c.get("seed", 0))  # fmt: skip
        return replace(recipe, **{k: v for k, v in overrides.items() if v is not None})


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def arm_name(selection: Selection) -> str:
    """'gist-r23', 'gist-global-r64', 'less', 'g2is', with '+edits' when curation edits acted on it."""
    name = selection.method + (f"-r{selection.rank}" if selection.rank is not None else "")
    return name + ("+edits" if selection.forced_in or selection.forced_out else "")


def _records(run: Run, rows: np.ndarray) -> list[Record]:
    """The run's own copies of pool records (as read at compute time), normalised again for tokenising."""
    out = []
    for row, raw in zip(rows.tolist(), run.raw.gather(rows).to_list()):
        try:
            messages = normalise(json.loads(raw))
        except (ValueError, Unusable) as err:
            raise RunError(f"{run.path}: pool row {row} cannot be re-read ({err}); recompute the run.") from None
        out.append(Record(run.train["id"][row], run.train["source"][row], run.train["task"][row], messages, raw, "", row))
    return out


def selection_from_file(run: Run, path: str | Path) -> Selection:
    """An exported selection (``select``'s JSONL, with or without ``--with-meta``) as a Selection of the run's rows.

    When the export's manifest (``FILE.manifest.json``) is beside it and the file is unchanged since (same
    sha256), the selection keeps the method, rank, budget and edits the manifest records; otherwise it is
    named after the file (``file:<name>``).
    """
    def canonical(text: str) -> str:
        record = json.loads(text)
        if isinstance(record, dict):
            record.pop("_gist", None)
        return json.dumps(record, sort_keys=True, ensure_ascii=False)

    index = {canonical(raw): row for row, raw in enumerate(run.raw.to_list())}
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(index[canonical(line)])
        except (ValueError, KeyError):
            raise ValueError(f"{path} line {number}: not a record of run {run.path}'s pool; evaluate selections exported from this run") from None
    if not rows:
        raise ValueError(f"{path} holds no records")
    rows = np.asarray(list(dict.fromkeys(rows)), dtype=np.int64)
    ids = run.train["id"].gather(rows).to_list()
    made = _export_manifest(run, Path(path))
    edits = made.get("edits") or {}
    return Selection(method=made.get("method") or f"file:{Path(path).stem}", rank=made.get("rank"), budget=len(rows), ids=ids, rows=rows,
                     scores=None, forced_in=list(edits.get("forced_in") or []), forced_out=list(edits.get("forced_out") or []), capped={},
                     n_edits=int(edits.get("n_edits") or 0), target=made.get("target") or run.target)  # fmt: skip


def _export_manifest(run: Run, path: Path) -> dict:
    """The manifest ``select`` wrote beside an export of this run, if the export is unchanged since; else {}."""
    from .runs.files import file_sha256

    try:
        made = read_json(path.with_name(path.name + ".manifest.json"))
    except (RunError, FileNotFoundError):
        return {}
    if not isinstance(made, dict) or not isinstance(made.get("run"), dict):
        return {}
    same_run = made["run"].get("config_hash") == run.manifest.get("config_hash")
    if made.get("format") != "gist-curator-export" or not same_run or made.get("output_sha256") != file_sha256(path):
        return {}
    return made


def _loose(text: str) -> str:
    """A conversation's text with case and runs of whitespace ignored (so near-copies count as copies)."""
    return " ".join(text.split()).casefold()


def check_disjoint(run: Run, records: list[Record]) -> None:
    """Refuse a test set that shares an id or a conversation (up to case and whitespace) with the run's pool or any target's validation set."""
    from .runs.files import read_parquet
    from .runs.manifest import target_dir

    texts = {_loose(t) for t in run.text.to_list()}
    ids = set(run.row_index)
    for target in run.targets:
        val = run.val if target == run.target or run.manifest.get("version") == 1 else read_parquet(run.path / target_dir(target) / "val.parquet")
        texts |= {_loose(t) for t in val["text"].to_list()}
        ids |= set(val["id"].to_list())
    clashes = [r for r in records if r.id in ids or _loose(render_text(r)) in texts]
    if clashes:
        shown = ", ".join(f"{r.id!r} (line {r.line})" for r in clashes[:3])
        raise ValueError(f"{len(clashes)} test record(s) also appear in run {run.path}'s pool or validation data (by id or content), "
                         f"e.g. {shown}. Evaluate on held-out records only.")  # fmt: skip


def _bootstrap(diff: np.ndarray, seed: int) -> dict:
    """Mean of per-question differences with a 95 % percentile bootstrap interval."""
    diff = diff[~np.isnan(diff)]
    if diff.size == 0:
        return {}
    means = diff[np.random.default_rng(seed).integers(0, diff.size, (BOOTSTRAP, diff.size))].mean(axis=1)
    return {"diff": float(diff.mean()), "low": float(np.quantile(means, 0.025)), "high": float(np.quantile(means, 0.975)), "n": int(diff.size)}


class _Arms:
    """Fine-tunes and scores arms, each cached in the run by what determines it."""

    def __init__(self, run: Run, test_path: Path, recipe: EvalRecipe, train_seeds: int, device: str, dtype: str, progress):
        from .engine.device import resolve_device, resolve_dtypes
        from .engine.likelihood import load_test_set
        from .engine.model import load_model, model_fingerprint

        config = run.manifest.get("config") or {}
        self.run, self.recipe, self.train_seeds, self.progress = run, recipe, train_seeds, progress
        self.reused = self.computed = 0  # fine-tunes (and base scorings) read from the cache / run now
        self.device = resolve_device(device)
        self.weight_dtype, self.autocast = resolve_dtypes(dtype, self.device)
        cache_dir = Path(config["model_cache_dir"]) if config.get("model_cache_dir") else None
        self.load = lambda: load_model(config["model"], dtype=self.weight_dtype, device=str(self.device), cache_dir=cache_dir)
        _, self.tokenizer = self.load()
        self.test, records = load_test_set(test_path, self.tokenizer, recipe.max_len)
        check_disjoint(run, records)
        self.identity = {"model": model_fingerprint(config["model"]), "recipe": asdict(recipe), "test": fingerprint(test_path), "dtype": dtype}

    def result(self, name: str, kind: str, rows: np.ndarray | None) -> dict:
        """The arm's per-question scores (the mean over ``train_seeds`` fine-tunes), each run cached or computed now."""
        if rows is None or self.train_seeds == 1:
            return self._one(name, kind, rows, self.recipe)
        runs = [self._one(name, kind, rows, replace(self.recipe, seed=self.recipe.seed + j)) for j in range(self.train_seeds)]
        merged = {k: v for k, v in runs[0].items() if k not in ("checksum", "identity")} | {"seconds": round(sum(r.get("seconds") or 0 for r in runs), 1)}
        for field in ("loss", "correct", "correct_sum"):
            merged[field] = np.mean([np.asarray(r[field], dtype=float) for r in runs], axis=0).tolist()
        merged["test_loss_by_seed"] = [float(np.mean(r["loss"])) for r in runs]
        return merged

    def _one(self, name: str, kind: str, rows: np.ndarray | None, recipe: EvalRecipe) -> dict:
        """One fine-tune (or the base model) scored, from the cache or computed now."""
        ids = None if rows is None else self.run.train["id"].gather(rows).to_list()
        identity = {**self.identity, "recipe": asdict(recipe)}
        path = self.run.path / "evals" / "arms" / f"{_key(identity, ids)}.json"
        if path.exists():
            try:
                cached = read_json(path)
                if isinstance(cached, dict) and cached.get("checksum") == manifest_checksum(cached) and cached.get("ids") == ids:
                    self.reused += 1
                    return {**cached, "name": name, "kind": kind}
            except RunError:
                pass  # a damaged cache entry is recomputed
        t0 = time.perf_counter()
        label = name if recipe.seed == self.recipe.seed else f"{name} (training seed {recipe.seed})"
        model = self._finetuned(rows, label, recipe) if rows is not None else self.load()[0]
        from .engine.likelihood import score

        scores = score(model, self.test, self.device, self.autocast, lambda d, t: self.progress(f"scoring {label}", d, t))
        entry = {"ids": ids, "identity": identity, "seconds": round(time.perf_counter() - t0, 1), "created": utc_now(),
                 **{k: v.tolist() for k, v in scores.items()}}  # fmt: skip
        entry["checksum"] = manifest_checksum(entry)
        write_json(path, entry)
        self.computed += 1
        return {**entry, "name": name, "kind": kind}

    def _finetuned(self, rows: np.ndarray, name: str, r: EvalRecipe):
        from .engine.model import attach_lora
        from .engine.tokenize import tokenize_records
        from .engine.warmup import run_warmup

        examples, _ = tokenize_records(_records(self.run, rows), self.tokenizer, r.max_len)
        model = attach_lora(self.load()[0], rank=r.lora_rank, alpha=r.lora_alpha, dropout=r.lora_dropout, target_modules=r.lora_targets, seed=r.seed)
        model.to(self.device)
        work = Path(tempfile.mkdtemp(prefix="gist-eval-"))
        try:
            run_warmup(model, examples, self.tokenizer.pad_token_id, work, epochs=r.epochs, lr=r.lr, batch_size=r.batch, seed=r.seed,
                       device=self.device, autocast_dtype=self.autocast, desc=f"fine-tune {name}",
                       progress=lambda d, t, _: self.progress(f"fine-tuning {name}", d, t))  # fmt: skip
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return model


def _summary(arm: dict) -> dict:
    correct = np.asarray(arm["correct"], dtype=float)
    mc = ~np.isnan(correct)
    return {"name": arm["name"], "kind": arm["kind"], "n_train": len(arm["ids"] or []), "test_loss": float(np.mean(arm["loss"])),
            "accuracy": float(correct[mc].mean()) if mc.any() else None,
            "accuracy_sum": float(np.asarray(arm["correct_sum"], dtype=float)[mc].mean()) if mc.any() else None,
            "seconds": arm.get("seconds"), **({"test_loss_by_seed": arm["test_loss_by_seed"]} if "test_loss_by_seed" in arm else {})}  # fmt: skip


def evaluate(run: Run, test: str | Path, selections: Selection | list[Selection], *, baselines: int = 3, recipe: EvalRecipe | None = None,
             train_seeds: int = 1, device: str = "auto", dtype: str = "auto", progress: Callable | None = None) -> dict:  # fmt: skip
    """Fine-tune and score every arm, compare each with the random arms of its size; the stored result (see module docstring)."""
    selections = [selections] if isinstance(selections, Selection) else list(selections)
    if not selections or baselines < 1:
        raise ValueError("evaluate needs at least one selection and one random baseline (--baselines random:N, N ≥ 1)")
    if train_seeds < 1:
        raise ValueError("--train-seeds must be at least 1")
    recipe = recipe or EvalRecipe.from_run(run)
    report = progress or (lambda *a: None)
    sizes = sorted({len(s.rows) for s in selections})
    names = [arm_name(s) + (f"-n{len(s.rows)}" if len(sizes) > 1 else "") for s in selections]
    if len(set(names)) < len(names):
        raise ValueError(f"two selections would be the same arm ({', '.join(sorted({n for n in names if names.count(n) > 1}))}): "
                         "give each one once (budgets that resolve to the same size count as one)")  # fmt: skip
    with run_lock(run.path, "evals", "gist-curate evaluate"):
        arms = _Arms(run, Path(test), recipe, train_seeds, device, dtype, lambda stage, done, total: report(stage, done, total))
        randoms = {n: [arms.result(f"random-s{s}" + (f"-n{n}" if len(sizes) > 1 else ""), "random",
                                   select(run, method="random", budget=n, seed=s, edits=[]).rows) for s in range(baselines)] for n in sizes}  # fmt: skip
        chosen = [arms.result(name, "selection", np.asarray(s.rows, dtype=np.int64)) for name, s in zip(names, selections)]
        base = arms.result("base", "base", None)
        out = []
        for arm, sel in [(a, s) for a, s in zip(chosen, selections)] + [(base, None)] + [(r, None) for n in sizes for r in randoms[n]]:
            group = randoms[len(sel.rows) if sel is not None else sizes[0]]
            entry = _summary(arm)
            if sel is not None:
                entry["selection"] = {"method": sel.method, "rank": sel.rank, "budget": sel.budget, "target": sel.target,
                                      "per_source_cap": sel.per_source_cap, "edits_hash": _key(sel.forced_in, sel.forced_out),
                                      "n_edits": sel.n_edits}  # fmt: skip
            if arm["kind"] != "random":
                mean_loss = np.mean([r["loss"] for r in group], axis=0)
                mean_acc = np.mean([r["correct"] for r in group], axis=0)
                entry["vs_random"] = {"test_loss": _bootstrap(np.asarray(arm["loss"]) - mean_loss, recipe.seed),
                                      "accuracy": _bootstrap(np.asarray(arm["correct"], dtype=float) - mean_acc, recipe.seed)}  # fmt: skip
            out.append(entry)
        result = {"format": "gist-curator-eval", "created": utc_now(), "run": str(run.path), "target": run.target, "test": str(test),
                  "test_sha256": arms.identity["test"], "n_test": len(arms.test.ids), "n_multiple_choice": int(arms.test.multiple_choice.sum()),
                  "recipe": asdict(recipe), "baselines": baselines, "train_seeds": train_seeds, "bootstrap": BOOTSTRAP, "arms": out}  # fmt: skip
        result["id"] = _key([a.get("selection") for a in out], arms.identity, baselines, *([train_seeds] if train_seeds > 1 else []))
        write_json(run.path / "evals" / f"{result['id']}.json", result)
    return result | {"runs_reused": arms.reused, "runs_computed": arms.computed}  # this call's cache use (not stored)


def past_evaluations(run: Run) -> list[dict]:
    """Every stored evaluation of the run, newest first (unreadable files are skipped)."""
    out = []
    for path in sorted((run.path / "evals").glob("*.json")):
        try:
            result = read_json(path)
        except RunError:
            continue
        if isinstance(result, dict) and result.get("format") == "gist-curator-eval":
            out.append(result)
    return sorted(out, key=lambda r: r.get("created", ""), reverse=True)


def suggested_test_file(run: Run) -> Path | None:
    """The test file of the target's latest evaluation, else a test.jsonl beside the run's validation file (as the demo writes)."""
    for result in past_evaluations(run):
        if result.get("target") == run.target and Path(result["test"]).is_file():
            return Path(result["test"])
    val = (run.manifest.get("config") or {}).get("val") or []
    candidate = Path(val[0]).parent / "test.jsonl" if val and run.target == run.targets[0] else None
    return candidate if candidate is not None and candidate.is_file() else None


def report_table(result: dict) -> str:
    """A plain-text table of an evaluation: each arm's loss and accuracy, and its difference from random."""

    def ci(d: dict | None, scale: float = 1.0, digits: int = 4) -> str:
        if not d:
            return "—"
        return f"{d['diff'] * scale:+.{digits}f} [{d['low'] * scale:+.{digits}f}, {d['high'] * scale:+.{digits}f}]"

    seeds = result.get("train_seeds", 1) > 1
    lines = [f"{'arm':<22} {'n':>5} {'test loss':>10} {'acc':>7}  {'loss − random [95 % CI]':>32}  {'acc − random (pts) [95 % CI]':>30}"
             + ("  loss by training seed" if seeds else "")]  # fmt: skip
    for a in result["arms"]:
        acc = "—" if a["accuracy"] is None else f"{a['accuracy']:.3f}"
        vs = a.get("vs_random", {})
        by_seed = "  " + " / ".join(f"{v:.4f}" for v in a.get("test_loss_by_seed", [])) if seeds else ""
        lines.append(f"{a['name']:<22} {a['n_train']:>5} {a['test_loss']:>10.4f} {acc:>7}  {ci(vs.get('test_loss')):>32}  {ci(vs.get('accuracy'), 100, 1):>30}{by_seed}")
    return "\n".join(lines)
