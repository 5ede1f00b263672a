"""Evaluation by fine-tuning: test scoring equals full-sequence losses, arms are cached and compared with random."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from gist_backend.cli import main as cli_main
from gist_backend.compute import ComputeConfig, compute
from gist_backend.curation import select
from gist_backend.runs import open_run

torch.set_num_threads(1)


def _test_records(n: int, seed: int = 7) -> list[dict]:
    """Multiple-choice arithmetic questions unlike any toy pool or validation record (numbers above 100)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(100, 160), rng.randint(100, 160)
        choices = [f"{a} plus {b} is {a + b + d}." for d in (0, 1, -1, 10)]
        answer = rng.randrange(4)
        choices[0], choices[answer] = choices[answer], choices[0]
        messages = [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": choices[answer]}]
        out.append({"id": f"test-{i}", "messages": messages, "choices": choices, "answer_index": answer})
    out.append({"id": "test-open", "messages": [{"role": "user", "content": "Say 123."}, {"role": "assistant", "content": "123."}]})
    return out


@pytest.fixture(scope="module")
def evaluated(tiny_llama, toy_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    pool, val = toy_data
    run_dir = compute(ComputeConfig(model=str(tiny_llama), train=[str(pool)], val=[str(val)], k_max=8, warmup_epochs=1, warmup_fraction=0.2,
                                    warmup_lr=1e-3, warmup_batch=4, max_len=64, shard_size=32), root / "run")  # fmt: skip
    test = root / "test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in _test_records(12)))
    return Path(run_dir), test, root


def test_scores_equal_full_sequence_losses(tiny_llama, evaluated):
    from gist_backend.engine.grads import collate, per_example_loss
    from gist_backend.engine.likelihood import load_test_set, score
    from gist_backend.engine.model import attach_lora, load_model

    _, test, _ = evaluated
    model, tokenizer = load_model(str(tiny_llama))
    model = attach_lora(model, rank=4, alpha=8, init_b_nonzero=True, seed=3)
    test_set, records = load_test_set(test, tokenizer, 64)
    got = score(model, test_set, torch.device("cpu"))
    for q in range(len(records)):
        cands = [type("E", (), {"input_ids": i, "labels": lab})() for i, lab in test_set.candidates[q]]
        with torch.no_grad():
            full = per_example_loss(model, collate(cands, list(range(len(cands))), tokenizer.pad_token_id), torch.device("cpu")).numpy()
        assert got["loss"][q] == pytest.approx(full[test_set.response[q]], abs=1e-5)
        if test_set.answer[q] is not None:
            assert got["correct"][q] == float(np.argmin(full[: test_set.n_choices[q]]) == test_set.answer[q])
        else:
            assert np.isnan(got["correct"][q])


def _evaluate_rank4(run_dir: Path, test: Path, out: Path, *, budget: str, baselines: int) -> dict:
    """`gist-curate evaluate` of GIST at rank 4 with the tests' quick recipe; the JSON it wrote."""
    cli_main(["evaluate", "--run-dir", str(run_dir), "--test", str(test), "--budget", budget, "--rank", "4", "--baselines", f"random:{baselines}",
              "--epochs", "1", "--lr", "1e-3", "--json", str(out)])  # fmt: skip
    return json.loads(out.read_text())


def test_cli_evaluate_arms_cache_and_comparison(evaluated, monkeypatch, capsys):
    run_dir, test, root = evaluated
    out = root / "eval.json"
    result = _evaluate_rank4(run_dir, test, out, budget="10", baselines=2)
    names = [a["name"] for a in result["arms"]]
    assert names == ["gist-r4", "base", "random-s0", "random-s1"]
    arms = {a["name"]: a for a in result["arms"]}
    assert arms["gist-r4"]["n_train"] == 10 and arms["base"]["n_train"] == 0 and arms["random-s1"]["n_train"] == 10
    assert result["n_test"] == 13 and result["n_multiple_choice"] == 12
    for arm in result["arms"]:
        assert np.isfinite(arm["test_loss"]) and 0 <= arm["accuracy"] <= 1
    assert arms["base"]["test_loss"] != arms["gist-r4"]["test_loss"]  # fine-tuning changed the model
    # the difference from random, recomputed from the cached per-question scores
    cached = [json.loads(p.read_text()) for p in (run_dir / "evals" / "arms").glob("*.json")]
    gist_ids = select(open_run(run_dir), method="gist", rank=4, budget=10).ids
    gist = next(c for c in cached if c["ids"] == gist_ids)
    randoms = [c for c in cached if c["ids"] and c["ids"] != gist_ids]
    assert len(randoms) == 2
    expected = np.mean(gist["loss"]) - np.mean([np.mean(r["loss"]) for r in randoms])
    vs = arms["gist-r4"]["vs_random"]["test_loss"]
    assert vs["diff"] == pytest.approx(expected, abs=1e-9) and vs["low"] <= vs["diff"] <= vs["high"] and vs["n"] == 13
    # stored in the run, and a second evaluation reuses every arm
    assert (run_dir / "evals" / f"{result['id']}.json").exists()
    monkeypatch.setattr("gist_backend.engine.warmup.run_warmup", lambda *a, **k: pytest.fail("an arm was fine-tuned again"))
    capsys.readouterr()
    again = ["evaluate", "--run-dir", str(run_dir), "--test", str(test), "--budget", "10", "--rank", "4", "--baselines", "random:2",
             "--epochs", "1", "--lr", "1e-3", "--json", str(out)]  # fmt: skip
    with pytest.raises(SystemExit):  # the earlier report is a user's file now: not replaced without --force
        cli_main(again)
    assert "already exists; pass --force" in capsys.readouterr().err and json.loads(out.read_text()) == result
    cli_main([*again, "--force"])
    printed = capsys.readouterr().out
    assert "gist-r4" in printed and "4 of 4 fine-tunes and scorings were reused" in printed
    second = json.loads(out.read_text())
    assert (result["runs_computed"], result["runs_reused"], second["runs_computed"], second["runs_reused"]) == (4, 0, 0, 4)
    same = lambda r: {k: v for k, v in r.items() if k not in ("created", "runs_reused", "runs_computed")}  # noqa: E731
    assert same(second) == same(result)


def test_evaluate_refuses_a_test_set_overlapping_the_run(evaluated, toy_data, capsys):
    run_dir, _, root = evaluated
    leaky = root / "leaky.jsonl"
    pool_line = Path(toy_data[0]).read_text().splitlines()[5]
    renamed = json.loads(pool_line) | {"id": "a-fresh-id"}  # same conversation under another id
    near = json.loads(pool_line) | {"id": "another-id"}  # the same conversation with other case and spacing
    near["messages"] = [m | {"content": "  " + m["content"].upper().replace(" ", "   ") + " "} for m in near["messages"]]
    for leak in (renamed, near):
        leaky.write_text(json.dumps(leak) + "\n" + json.dumps(_test_records(1)[0]) + "\n")
        with pytest.raises(SystemExit) as exit_:
            cli_main(["evaluate", "--run-dir", str(run_dir), "--test", str(leaky), "--budget", "10", "--baselines", "random:1"])
        assert exit_.value.code == 2 and "1 test record(s) also appear in run" in capsys.readouterr().err


def test_evaluate_an_exported_selection_file(evaluated, capsys):
    run_dir, test, root = evaluated
    cli_main(["select", "--run-dir", str(run_dir), "--budget", "6", "--out", str(root / "sel.jsonl"), "--with-meta"])
    from gist_backend.evaluate import selection_from_file

    run = open_run(run_dir)
    sel = selection_from_file(run, root / "sel.jsonl")
    expected = select(run, budget=6)
    assert sel.ids == expected.ids and (sel.method, sel.rank) == ("gist", run.k_max)  # as its manifest says
    edited = root / "sel-edited.jsonl"  # changed after export: its manifest no longer describes it
    edited.write_text("".join((root / "sel.jsonl").read_text().splitlines(keepends=True)[:4]))
    (root / "sel-edited.jsonl.manifest.json").write_text((root / "sel.jsonl.manifest.json").read_text())
    sel = selection_from_file(run, edited)
    assert sel.ids == expected.ids[:4] and (sel.method, sel.rank) == ("file:sel-edited", None)
    with pytest.raises(SystemExit):
        cli_main(["evaluate", "--run-dir", str(run_dir), "--test", str(test), "--selection", str(edited), "--budget", "6"])
    assert "either --selection FILE.jsonl or --method/--rank/--budget" in capsys.readouterr().err


def test_train_seeds_average_fine_tunes_and_reuse_the_first_seed(evaluated, monkeypatch):
    from gist_backend.engine import warmup
    from gist_backend.evaluate import EvalRecipe, evaluate

    run_dir, test, _ = evaluated
    run = open_run(run_dir)
    selection = select(run, method="gist", rank=4, budget=10)
    recipe = EvalRecipe.from_run(run, epochs=1, lr=1e-3)
    one = evaluate(run, test, selection, baselines=2, recipe=recipe)
    real, fine_tunes = warmup.run_warmup, []
    monkeypatch.setattr(warmup, "run_warmup", lambda *a, **k: fine_tunes.append(k["seed"]) or real(*a, **k))
    two = evaluate(run, test, selection, baselines=2, recipe=recipe, train_seeds=2)
    assert sorted(fine_tunes) == [1, 1, 1]  # seed 0 of every fine-tuned arm came from the cache; the base model is not trained
    assert two["train_seeds"] == 2 and two["id"] != one["id"]
    single, double = ({a["name"]: a for a in r["arms"]} for r in (one, two))
    for name in ("gist-r4", "random-s0", "random-s1"):
        by_seed = double[name]["test_loss_by_seed"]
        assert by_seed[0] == pytest.approx(single[name]["test_loss"], abs=1e-12) and by_seed[0] != by_seed[1]
        assert double[name]["test_loss"] == pytest.approx(np.mean(by_seed), abs=1e-9)  # per-question means, then their mean
    assert double["base"]["test_loss"] == single["base"]["test_loss"] and "test_loss_by_seed" not in double["base"]
    from gist_backend.evaluate import report_table

    row = next(line for line in report_table(two).splitlines() if line.startswith("gist-r4"))
    assert row.endswith(" / ".join(f"{v:.4f}" for v in double["gist-r4"]["test_loss_by_seed"]))
    with pytest.raises(ValueError, match="train-seeds"):
        evaluate(run, test, selection, baselines=2, recipe=recipe, train_seeds=0)


def test_suggested_test_file_is_the_last_one_used_or_the_one_beside_the_validation_file(evaluated, tmp_path, monkeypatch):
    from gist_backend import evaluate as ev

    run_dir, test, _ = evaluated
    run = open_run(run_dir)
    ev.evaluate(run, test, select(run, method="gist", rank=4, budget=10), baselines=2, recipe=ev.EvalRecipe.from_run(run, epochs=1, lr=1e-3))
    assert ev.suggested_test_file(run) == test
    monkeypatch.setattr(ev, "past_evaluations", lambda run: [])
    run.manifest["config"]["val"] = [str(tmp_path / "val.jsonl")]
    assert ev.suggested_test_file(run) is None
    (tmp_path / "test.jsonl").write_text("{}\n")  # the demo's layout: pool.jsonl, val.jsonl, test.jsonl side by side
    assert ev.suggested_test_file(run) == tmp_path / "test.jsonl"


def test_damaged_arm_cache_entries_are_recomputed_to_the_same_result(evaluated):
    from gist_backend.evaluate import EvalRecipe, evaluate

    run_dir, test, _ = evaluated
    run = open_run(run_dir)
    selection = select(run, method="gist", rank=4, budget=10)
    recipe = EvalRecipe.from_run(run, epochs=1, lr=2e-3)  # a recipe of its own: its arms are cached by this test only
    before = set((run_dir / "evals" / "arms").glob("*.json"))
    first = evaluate(run, test, selection, baselines=1, recipe=recipe)
    entries = sorted(set((run_dir / "evals" / "arms").glob("*.json")) - before)
    assert first["runs_computed"] == 3 and len(entries) == 3
    not_an_object, edited, truncated = entries
    not_an_object.write_text("[]")
    doctored = json.loads(edited.read_text())
    doctored["loss"] = [0.0 for _ in doctored["loss"]]  # a better loss, not re-signed
    edited.write_text(json.dumps(doctored))
    truncated.write_bytes(truncated.read_bytes()[: len(truncated.read_bytes()) // 2])
    again = evaluate(run, test, selection, baselines=1, recipe=recipe)
    assert (again["runs_computed"], again["runs_reused"]) == (3, 0)
    losses = lambda r: {a["name"]: a["test_loss"] for a in r["arms"]}  # noqa: E731
    assert losses(again) == pytest.approx(losses(first), abs=1e-6)
    assert evaluate(run, test, selection, baselines=1, recipe=recipe)["runs_reused"] == 3  # the rewritten entries serve again


def test_evaluate_json_never_replaces_its_own_test_or_selection_file(evaluated, capsys):
    run_dir, test, root = evaluated
    cli_main(["select", "--run-dir", str(run_dir), "--budget", "6", "--out", str(root / "own-sel.jsonl")])
    before = {p: p.read_bytes() for p in (test, root / "own-sel.jsonl")}
    for args in (["--budget", "6", "--json", str(test)], ["--selection", str(root / "own-sel.jsonl"), "--json", str(root / "own-sel.jsonl")]):
        with pytest.raises(SystemExit) as exit_:
            cli_main(["evaluate", "--run-dir", str(run_dir), "--test", str(test), *args, "--baselines", "random:1", "--force"])
        assert exit_.value.code == 2 and "refusing to write" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before


def test_evaluate_at_several_budgets_compares_each_with_random_arms_of_its_size(evaluated, tmp_path, capsys):
    run_dir, test, _ = evaluated
    result = _evaluate_rank4(run_dir, test, tmp_path / "budgets.json", budget="6,10", baselines=1)
    arms = {a["name"]: a for a in result["arms"]}
    assert list(arms) == ["gist-r4-n6", "gist-r4-n10", "base", "random-s0-n6", "random-s0-n10"]
    assert [arms[n]["n_train"] for n in arms] == [6, 10, 0, 6, 10]
    for n in (6, 10):  # each size against the random arm of its own size, per question
        expected = arms[f"gist-r4-n{n}"]["test_loss"] - arms[f"random-s0-n{n}"]["test_loss"]
        assert arms[f"gist-r4-n{n}"]["vs_random"]["test_loss"]["diff"] == pytest.approx(expected, abs=1e-9)
    assert arms["gist-r4-n6"]["selection"]["budget"] == 6 and arms["gist-r4-n10"]["selection"]["budget"] == 10
    with pytest.raises(SystemExit):  # two budgets of one size would be one arm twice: refused before any fine-tune
        cli_main(["evaluate", "--run-dir", str(run_dir), "--test", str(test), "--budget", "10,10", "--baselines", "random:1"])
    assert "would be the same arm (gist-r8)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["evaluate", "--run-dir", str(run_dir), "--test", str(test), "--budget", "6,1x", "--baselines", "random:1"])
    assert "--budget" in capsys.readouterr().err
