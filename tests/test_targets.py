"""Many targets from one pool pass: add-target ranks the pool like a fresh compute for that target."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from gist_backend.cli import main as cli_main
from gist_backend.compute import ComputeConfig, compute
from gist_backend.curation import scores
from gist_backend.runs import RunError, open_run

torch.set_num_threads(1)
COMMON = dict(warmup_epochs=2, warmup_batch=4, warmup_fraction=0.2, warmup_lr=1e-3, methods=["gist", "less"], less_dim=256, max_len=64, k_max=8)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(pl.Series(a).rank().to_numpy(), pl.Series(b).rank().to_numpy())[0, 1])


@pytest.fixture(scope="module")
def two_targets(tiny_llama, tmp_path_factory):
    from gist_backend.devkit.tiny import make_toy_data

    root = tmp_path_factory.mktemp("targets")
    pool, val = make_toy_data(root / "data", n_train=48, n_val=12, seed=3)
    other = root / "animals.jsonl"  # a second target: another subject, as its own sub-task
    other.write_text("".join(json.dumps({"id": f"a{i}", "task": "animals", "messages": [
        {"role": "user", "content": f"How many legs does animal {i} have?"},
        {"role": "assistant", "content": f"Animal {i} has {i % 5} legs and {i % 3} eyes."}]}) + "\n" for i in range(12)))  # fmt: skip
    run = compute(ComputeConfig(model=str(tiny_llama), train=[str(pool)], val=[str(val)], reusable=True, sketch_dim=2048, **COMMON), root / "run")
    fresh = compute(ComputeConfig(model=str(tiny_llama), train=[str(pool)], val=[str(other)], **COMMON), root / "fresh")
    return {"root": root, "run": run, "fresh": fresh, "other": other, "pool": pool, "val": val, "model": tiny_llama}


def test_add_target_ranks_like_a_fresh_compute(two_targets, capsys):
    run_dir, other = two_targets["run"], two_targets["other"]
    d = open_run(run_dir).manifest["d"]
    assert d > 2048  # the sketch is smaller than the gradient: the coordinates are an approximation
    cli_main(["add-target", "--run-dir", str(run_dir), "--val", str(other), "--name", "animals"])
    assert "target 'animals' added" in capsys.readouterr().out
    added, fresh = open_run(run_dir, "animals"), open_run(two_targets["fresh"])
    assert added.targets == ["val", "animals"] and added.val.height == 12
    for method in ("gist", "gist-global"):
        a, b = scores(added, method), scores(fresh, method)
        assert _spearman(a, b) >= 0.95, method
        top_a, top_b = set(np.argsort(-a)[:8].tolist()), set(np.argsort(-b)[:8].tolist())
        assert len(top_a & top_b) >= 7, method  # the top 8 of 48 agree up to one example
    np.testing.assert_allclose(scores(added, "less"), scores(fresh, "less"), atol=1e-6)  # LESS from the same sketches: exact
    np.testing.assert_allclose(added.geometry()["checkpoints"][-1]["spectrum"]["sigma"], fresh.geometry()["checkpoints"][-1]["spectrum"]["sigma"], rtol=1e-4)
    assert not (run_dir / "targets" / ".animals.work").exists()
    # every per-target command takes --target; info --json lists the targets
    capsys.readouterr()
    cli_main(["info", "--run-dir", str(run_dir), "--target", "animals", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["targets"] == ["val", "animals"] and info["target"] == "animals"
    cli_main(["select", "--run-dir", str(run_dir), "--target", "animals", "--budget", "8", "--out", str(two_targets["root"] / "animals.jsonl.out.jsonl")])
    manifest = json.loads((two_targets["root"] / "animals.jsonl.out.jsonl.manifest.json").read_text())
    assert manifest["target"] == "animals"
    open_run(run_dir, "val")  # the first target is untouched


def test_add_target_refusals(two_targets, capsys):
    fresh, other = two_targets["fresh"], two_targets["other"]
    with pytest.raises(SystemExit):
        cli_main(["add-target", "--run-dir", str(fresh), "--val", str(other), "--name", "x"])
    assert "computed without --reusable" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["add-target", "--run-dir", str(two_targets["run"]), "--val", str(other), "--name", "../bad"])
    assert "target name" in capsys.readouterr().err
    with pytest.raises(RunError, match="no target 'nope'"):
        open_run(two_targets["run"], "nope")


def test_add_target_resumes_and_lists_the_target_only_when_complete(two_targets, monkeypatch, tmp_path):
    import shutil

    from gist_backend import targets

    run_dir = tmp_path / "run"
    shutil.copytree(two_targets["run"], run_dir)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed after the validation gradients, before the target is written

    monkeypatch.setattr(targets, "_target_data", crash)
    with pytest.raises(KeyboardInterrupt):
        targets.add_target(run_dir, [str(two_targets["other"])], "again")
    assert "again" not in open_run(run_dir).targets and list((run_dir / "targets" / ".again.work").glob("ckpt-*.safetensors"))
    monkeypatch.undo()
    monkeypatch.setattr(targets, "_validation", lambda *a, **k: pytest.fail("finished validation work was redone"))
    targets.add_target(run_dir, [str(two_targets["other"])], "again")
    assert "again" in open_run(run_dir).targets


def test_interrupted_add_target_rerun_with_other_files_starts_afresh(two_targets, monkeypatch, tmp_path, capsys):
    """Work left by an interrupted add-target is reused only for the same validation files; skipped records are listed."""
    import shutil

    from gist_backend import targets

    run_dir, clean = tmp_path / "run", tmp_path / "clean"
    shutil.copytree(two_targets["run"], run_dir)
    shutil.copytree(two_targets["run"], clean)
    other = tmp_path / "birds.jsonl"  # as many records as the first file, other content, and one unusable line
    other.write_text("".join(json.dumps({"id": f"b{i}", "messages": [
        {"role": "user", "content": f"What colour is bird {i}?"},
        {"role": "assistant", "content": f"Bird {i} is {'red blue green'.split()[i % 3]}."}]}) + "\n" for i in range(12)) + "{not json\n")  # fmt: skip
    monkeypatch.setattr(targets, "_target_data", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        targets.add_target(run_dir, [str(two_targets["other"])], "t")
    monkeypatch.undo()
    cli_main(["add-target", "--run-dir", str(run_dir), "--val", str(other), "--name", "t"])
    assert "1 validation record(s) skipped" in capsys.readouterr().out
    targets.add_target(clean, [str(other)], "t")
    np.testing.assert_array_equal(open_run(run_dir, "t").train_coords, open_run(clean, "t").train_coords)
    bad = [json.loads(line) for line in (run_dir / "bad_records.jsonl").read_text().splitlines()]
    assert [(b["target"], b["file"], b["line"]) for b in bad if b.get("target")] == [("t", str(other), 13)]


def test_add_target_on_a_subset_of_the_sketch(two_targets, tmp_path):
    """--sketch-dim P' uses a seeded uniform subset of the stored sketch: all of it is the default; fewer is coarser."""
    import shutil

    from gist_backend.targets import add_target, subsample_columns

    run_dir = tmp_path / "run"
    shutil.copytree(two_targets["run"], run_dir)
    columns, scale = subsample_columns(2048, 512, 0)
    assert len(set(columns.tolist())) == 512 and np.all(np.diff(columns) > 0) and scale == 2.0
    assert np.array_equal(subsample_columns(2048, 512, 0)[0], columns) and not np.array_equal(subsample_columns(2048, 512, 1)[0], columns)
    other = [str(two_targets["other"])]
    for name, dim in (("whole", None), ("all-columns", 2048), ("quarter", 512)):
        add_target(run_dir, other, name, sketch_dim=dim)
    whole = open_run(run_dir, "whole")
    np.testing.assert_allclose(open_run(run_dir, "all-columns").train_coords, whole.train_coords, rtol=1e-5, atol=1e-6)
    quarter, fresh = open_run(run_dir, "quarter"), open_run(two_targets["fresh"])
    assert quarter.manifest["target_sketch_dims"] == {"all-columns": 2048, "quarter": 512}
    rho_quarter, rho_whole = _spearman(scores(quarter, "gist"), scores(fresh, "gist")), _spearman(scores(whole, "gist"), scores(fresh, "gist"))
    assert 0.6 < rho_quarter <= rho_whole + 0.02, (rho_quarter, rho_whole)
    with pytest.raises(ValueError, match="sketch-dim"):
        add_target(run_dir, other, "too-big", sketch_dim=4096)


def test_combined_selection_across_targets(two_targets, tmp_path, capsys):
    from gist_backend.curation import Part, combine, select

    run_dir = tmp_path / "run"
    import shutil

    shutil.copytree(two_targets["run"], run_dir)
    if not (run_dir / "targets" / "animals").exists():  # the module's run may already hold it
        cli_main(["add-target", "--run-dir", str(run_dir), "--val", str(two_targets["other"]), "--name", "animals"])
    a, b = open_run(run_dir, "val"), open_run(run_dir, "animals")
    top_a = select(a, method="gist", rank=4, budget=48, edits=[]).ids
    top_b = select(b, method="less", budget=48, edits=[]).ids
    quotas = combine(run_dir, [Part("val", "gist", 4, 3), Part("animals", "less", None, 1)], 12, edits=[])
    assert len(quotas.ids) == len(set(quotas.ids)) == 12
    assert quotas.ids[:9] == top_a[:9]  # the first part's share (9 of 12) in its own order
    assert quotas.ids[9:] == [i for i in top_b if i not in quotas.ids[:9]][:3]
    assert [p["count"] for p in quotas.info["parts"]] == [9, 3] and quotas.info["parts"][0]["share"] == 0.75
    rr = combine(run_dir, [Part("val", "gist", 4), Part("animals", "less")], 6, mode="round-robin", edits=[])
    assert rr.ids[0] == top_a[0] and rr.ids[1] == next(i for i in top_b if i != top_a[0])  # alternate, best first
    # edits: a run-wide exclude applies to every part; a scoped one only to its target's part
    from gist_backend.curation.edits import add_edit, load_edits

    add_edit(run_dir, "exclude", [top_a[0]], "api")
    add_edit(run_dir, "exclude", [top_b[0]], "api", target="val")
    again = combine(run_dir, [Part("val", "gist", 4, 1), Part("animals", "less", None, 1)], 4, edits=load_edits(run_dir))
    assert top_a[0] not in again.ids and (top_b[0] in again.ids or top_b[0] == top_a[0])
    # a part that runs out (every other example excluded for its target) leaves its share to the others
    ids = a.train["id"].to_list()
    scoped = [{"op": "exclude", "ids": ids[2:], "time": "2025-01-01T00:00:00+00:00", "origin": {"kind": "api", "detail": ""}, "target": "animals"}]
    short = combine(run_dir, [Part("val", "gist", 4, 1), Part("animals", "less", None, 1)], 12, edits=scoped)
    assert len(short.ids) == 12 and not short.warnings and short.info["parts"][1]["count"] <= 2
    assert set(ids[:2]) - set(top_a[:10]) <= set(short.ids)  # the second part's two examples, unless the first took them
    forced = [{"op": "include", "ids": ids[:5], "time": "2025-01-01T00:00:00+00:00", "origin": {"kind": "api", "detail": ""}}]
    with pytest.raises(ValueError, match="5 examples are force-included but the budget is 4"):
        combine(run_dir, [Part("val", "gist", 4)], 4, edits=forced)
    for bad in ("val:gist:x", "val=abc", "val=0", "val:gist:4:9", ":gist"):
        with pytest.raises(ValueError, match=r"TARGET\[:METHOD"):
            Part.parse(bad)
    assert Part.parse("val:less=25%") == Part("val", "less", None, 0.25)
    # across targets: each target's own selection and scores, compared with one method
    from gist_backend.curation import compare_targets

    across = compare_targets(run_dir, 12, method="gist", rank=4)
    assert across["targets"] == ["val", "animals"] and across["jaccard"]["val"]["val"] == 1.0
    own = {t: set(select(r, method="gist", rank=4, budget=12, edits=[]).ids) for t, r in (("val", a), ("animals", b))}
    assert across["intersection"]["val"]["animals"] == len(own["val"] & own["animals"])
    assert across["spearman"]["val"]["animals"] == pytest.approx(_spearman(scores(a, "gist", 4), scores(b, "gist", 4)), abs=1e-9)
    capsys.readouterr()
    cli_main(["compare", "--run-dir", str(run_dir), "--budget", "12", "--rank", "4", "--across-targets", "--method", "less"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == "less" and printed["counts"] == {"val": 12, "animals": 12}
    out = tmp_path / "combined.jsonl"
    capsys.readouterr()
    cli_main(["combine", "--run-dir", str(run_dir), "--part", "val:gist:4=75%", "--part", "animals:less=25%", "--budget", "8", "--out", str(out)])
    manifest = json.loads(out.with_name(out.name + ".manifest.json").read_text())
    assert manifest["method"] == "combined" and manifest["target"] == "val+animals"
    assert [(p["target"], p["method"], p["rank"], p["share"]) for p in manifest["method_info"]["parts"]] == [("val", "gist", 4, 0.75), ("animals", "less", None, 0.25)]
    assert len(out.read_text().splitlines()) == 8
    # the export guards hold for a combined selection too: never over an input (the pool, or the validation file of a
    # target added later, even with --force), never over a file without --force
    inputs = {p: p.read_bytes() for p in (two_targets["pool"], two_targets["other"])}
    for dest, force in ((two_targets["pool"], ["--force"]), (two_targets["other"], ["--force"]), (out, [])):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            cli_main(["combine", "--run-dir", str(run_dir), "--part", "val", "--budget", "4", "--out", str(dest), *force])
        assert ("it is an input of run" if force else "already exists") in capsys.readouterr().err
    assert {p: p.read_bytes() for p in inputs} == inputs and len(out.read_text().splitlines()) == 8


def test_a_sketch_wider_than_the_gradient_is_the_gradient(two_targets, tmp_path):
    """--sketch-dim above d stores d columns (the gradient itself, no padding), and add-target is then exact."""
    from gist_backend.runs.files import read_npy

    run_dir = compute(ComputeConfig(model=str(two_targets["model"]), train=[str(two_targets["pool"])], val=[str(two_targets["val"])],
                                    reusable=True, sketch_dim=1 << 20, **COMMON), tmp_path / "wide")  # fmt: skip
    run = open_run(run_dir)
    d = run.manifest["d"]
    assert run.manifest["reusable"]["dim"] == d and read_npy(run.paths["gist_sketch"]).shape[-1] == d
    cli_main(["add-target", "--run-dir", str(run_dir), "--val", str(two_targets["other"]), "--name", "animals"])
    added, fresh = open_run(run_dir, "animals"), open_run(two_targets["fresh"])
    for method in ("gist", "gist-global"):  # fp16 storage of the exact gradient: equal up to rounding
        np.testing.assert_allclose(scores(added, method), scores(fresh, method), atol=5e-3)
