"""Selections: budgets, caps, forced edits, export round trip and manifest, comparison numbers, G2IS caching."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from gist_backend.curation.compare import average_ranks, pearson
from gist_backend.curation.edits import add_edit
from gist_backend.methods.gist import gist_scores
from gist_backend.runs import open_run
from gist_backend.curation.scoring import scores
from gist_backend.curation import compare, export_jsonl, resolve_budget, select, summary
from gist_backend.devkit.synthetic import synthetic_run

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = synthetic_run(
        tmp_path_factory.mktemp("sel") / "run", n_train=300, n_val=24, n_tasks=3, k_max=16, n_ckpt=2, n_sources=4,
        methods=("gist", "less", "g2is"), seed=3,
    )  # fmt: skip
    return open_run(path)


def edit(op: str, ids: list[str]) -> dict:
    return {"op": op, "ids": list(ids), "time": "2025-01-01T00:00:00+00:00", "origin": {"kind": "api", "detail": ""}}


def reference_select(row_scores, sources, budget, cap, include, exclude):
    """Plain-loop reading of the rules: forced in, then greedy by (score desc, row) under the cap."""
    order = sorted(range(len(row_scores)), key=lambda r: (-row_scores[r], r))
    chosen = list(include)
    used: dict[str, int] = {}
    for r in include:
        used[sources[r]] = used.get(sources[r], 0) + 1
    capped: dict[str, int] = {}
    for r in order:
        if len(chosen) == budget:
            break
        if r in exclude or r in include:
            continue
        if cap is not None and used.get(sources[r], 0) >= cap:
            capped[sources[r]] = capped.get(sources[r], 0) + 1
            continue
        chosen.append(r)
        used[sources[r]] = used.get(sources[r], 0) + 1
    return sorted(chosen, key=lambda r: (-row_scores[r], r)), capped


# ----------------------------------------------------------------------------- budgets


def test_resolve_budget():
    assert resolve_budget(10, 300) == 10
    assert resolve_budget(0.05, 300) == 15
    assert resolve_budget("5%", 300) == 15
    assert resolve_budget("0.05", 300) == 15
    assert resolve_budget("12", 300) == 12
    assert resolve_budget(12.0, 300) == 12
    assert resolve_budget(np.int64(7), 300) == 7
    assert resolve_budget("100%", 300) == 300
    with pytest.warns(UserWarning, match="pool smaller than the budget"):
        assert resolve_budget(1000, 300) == 300
    for bad in (0, -3, 0.0001, "0%", "abc", 2.5, "150%", float("nan")):
        with pytest.raises(ValueError):
            resolve_budget(bad, 300)
    with pytest.raises(TypeError):
        resolve_budget(True, 300)


# ----------------------------------------------------------------------------- select


@pytest.mark.parametrize("method", ["gist", "less", "random"])
def test_select_exact_budget_in_score_order(run, method):
    sel = select(run, method=method, budget=37, edits=[])
    row_scores = scores(run, method, None)
    expected, _ = reference_select(row_scores, run.train["source"].to_list(), 37, None, [], set())
    assert sel.budget == 37 and len(sel.ids) == 37 and sel.rows.tolist() == expected
    assert sel.ids == run.train["id"].gather(sel.rows).to_list()
    np.testing.assert_allclose(sel.scores, row_scores[sel.rows])
    assert np.all(np.diff(sel.scores) <= 0)
    assert sel.rank == (run.k_max if method == "gist" else None) and sel.warnings == [] and sel.capped == {}


def test_select_rank_uses_truncated_coordinates(run):
    sel = select(run, rank=3, budget=20, edits=[])
    ref = gist_scores(run.train_coords, run.val_coords, run.val_tasks, run.gist_weights, 3)
    assert sel.rank == 3 and set(sel.rows.tolist()) == set(np.argsort(-ref, kind="stable")[:20].tolist())
    for bad in (run.k_max + 1, 0, -1):  # 0 is not "k_max"
        with pytest.raises(ValueError, match="rank must be a whole number from 1"):
            select(run, rank=bad, budget=20, edits=[])


@pytest.mark.parametrize("cap", [5, 0.2, "30%"])
def test_per_source_caps(run, cap):
    sel = select(run, budget=40, per_source_cap=cap, edits=[])
    cap_n = {5: 5, 0.2: 8, "30%": 12}[cap]
    sources = run.train["source"].to_list()
    expected, capped = reference_select(scores(run, "gist"), sources, 40, cap_n, [], set())
    assert sel.cap == cap_n and sel.rows.tolist() == expected and sel.capped == capped
    counts = {s: sum(sources[r] == s for r in sel.rows) for s in set(sources)}
    assert max(counts.values()) <= cap_n
    assert len(sel.rows) == min(40, sum(min(cap_n, sources.count(s)) for s in set(sources)))


def test_cap_too_tight_returns_fewer_with_a_warning(run):
    sel = select(run, budget=40, per_source_cap=2, edits=[])
    assert len(sel.rows) == 2 * len(set(run.train["source"].to_list())) and "per-source cap" in sel.warnings[-1]


def test_ties_at_the_budget_edge_are_reported(run):
    """Equal scores across the budget's edge are taken in pool order, and the selection says so; no warning without ties."""
    n = run.train.height
    tied = np.zeros(n)
    tied[:10] = 2.0
    tied[50:250] = 1.0  # 200 examples share the score at the edge of a budget of 20
    sel = select(run, method="gist", rank=3, budget=20, edits=[], row_scores=tied)
    assert sel.rows.tolist() == list(range(10)) + list(range(50, 60))  # pool order among the tied
    assert any("200 examples tie at the last score selected (1)" in w for w in sel.warnings)
    assert not any("tie" in w for w in select(run, method="gist", rank=3, budget=20, edits=[]).warnings)
    exact = select(run, method="gist", rank=3, budget=210, edits=[], row_scores=tied)  # every tied example fits
    assert not any("tie" in w for w in exact.warnings)
    ids = run.train["id"].to_list()
    forced = [edit("include", [ids[60]])]  # a tied example forced in: the other 199 tied still fit the budget of 210
    assert not any("tie" in w for w in select(run, method="gist", rank=3, budget=210, edits=forced, row_scores=tied).warnings)


def test_forced_include_and_exclude(run):
    ids = run.train["id"].to_list()
    row_scores = scores(run, "gist")
    order = np.argsort(-row_scores, kind="stable")
    low = [int(r) for r in order[-3:]]  # the three worst examples
    top = [int(r) for r in order[:4]]  # the four best
    edits = [edit("include", [ids[r] for r in low]), edit("exclude", [ids[r] for r in top]), edit("include", [ids[top[0]]])]
    sel = select(run, budget=25, edits=edits)
    # later edits win: top[0] was excluded, then included again
    include, exclude = low + [top[0]], set(top[1:])
    expected, _ = reference_select(row_scores, run.train["source"].to_list(), 25, None, include, exclude)
    assert sel.rows.tolist() == expected and len(sel.rows) == 25
    assert set(sel.forced_in) == {ids[r] for r in include} and set(sel.forced_out) == {ids[r] for r in top[1:]}
    assert sel.ids[-3:] == [ids[r] for r in low]  # placed by their (lowest) scores
    assert all(ids[r] not in sel.ids for r in top[1:]) and sel.n_edits == 3
    with pytest.raises(ValueError, match="force-included but the budget is 2"):
        select(run, budget=2, edits=edits)


def test_forced_with_caps_and_unknown_ids(run):
    ids, sources = run.train["id"].to_list(), run.train["source"].to_list()
    row_scores = scores(run, "gist")
    rng = np.random.default_rng(0)
    for trial in range(5):
        inc = rng.choice(300, 6, replace=False).tolist()
        exc = set(rng.choice(300, 30, replace=False).tolist()) - set(inc)
        edits = [edit("exclude", [ids[r] for r in exc]), edit("include", [ids[r] for r in inc] + ["ghost-id"])]
        sel = select(run, budget=50, per_source_cap=0.3, edits=edits)
        expected, capped = reference_select(row_scores, sources, 50, 15, inc, exc)
        assert sel.rows.tolist() == expected and sel.capped == capped
        assert any("not in this run" in w for w in sel.warnings)


def test_edits_default_to_the_run_log(run):
    (run.path / "edits.json").unlink(missing_ok=True)
    best = select(run, budget=10, edits=[]).ids
    try:
        add_edit(run, "exclude", best[:2], {"kind": "row", "detail": "bad answers"})
        sel = select(run, budget=10)
        assert set(best[:2]).isdisjoint(sel.ids) and len(sel.ids) == 10 and sel.forced_out == best[:2]
    finally:
        (run.path / "edits.json").unlink(missing_ok=True)


def test_budget_above_pool_is_clamped(run):
    sel = select(run, method="random", budget=1000, edits=[])
    assert sel.budget == 300 and len(sel.rows) == 300 and "pool smaller than the budget" in sel.warnings[0]


# ----------------------------------------------------------------------------- export


def test_export_round_trip_and_manifest(run, tmp_path):
    ids = run.train["id"].to_list()
    edits = [edit("include", [ids[7]]), edit("exclude", [ids[int(np.argmax(scores(run, "gist")))]])]
    sel = select(run, budget=30, per_source_cap=12, edits=edits)
    out = tmp_path / "sub" / "selected.jsonl"
    manifest_path = export_jsonl(run, sel, out)
    assert manifest_path == tmp_path / "sub" / "selected.jsonl.manifest.json"

    data = out.read_bytes()
    raws = run.raw.to_list()
    assert data == b"".join(raws[r].encode("utf-8") + b"\n" for r in sel.rows)  # verbatim, one per line, in order
    lines = data.split(b"\n")
    assert lines[-1] == b"" and len(lines) == 31
    line_scores = [scores(run, "gist")[ids.index(json.loads(line)["id"])] for line in lines[:-1]]
    assert line_scores == sorted(line_scores, reverse=True)  # score order

    m = json.loads(manifest_path.read_text())
    assert m["count"] == 30 and m["method"] == "gist" and m["rank"] == run.k_max and m["budget"] == 30
    assert m["per_source_cap"] == 12 and m["per_source_cap_count"] == 12
    assert sum(m["source_mix"].values()) == 30 and m["source_mix"] == summary(run, sel)["source_mix"]
    assert m["edits"] == {"n_edits": 2, "forced_in": [ids[7]], "forced_out": sel.forced_out}
    assert m["run"]["path"] == str(run.path.resolve()) and m["run"]["fingerprints"] == run.manifest["fingerprints"]
    assert m["run"]["config_hash"] == run.manifest["config_hash"] and m["run"]["manifest_checksum"] == run.manifest["checksum"]
    assert m["records"].startswith("copied verbatim from the run") and m["shortfall"] == 0 and m["topups"] == []
    assert m["tool_version"] and m["created"].endswith("+00:00") and len(m["output_sha256"]) == 64
    assert not list(out.parent.glob(".*.tmp"))


def test_export_with_meta(run, tmp_path):
    sel = select(run, method="less", budget=12, edits=[])
    export_jsonl(run, sel, tmp_path / "meta.jsonl", with_meta=True)
    raws = run.raw.to_list()
    for position, (line, row) in enumerate(zip((tmp_path / "meta.jsonl").read_text().splitlines(), sel.rows)):
        record = json.loads(line)
        meta = record.pop("_gist")
        assert record == json.loads(raws[row])
        assert meta == {"score": pytest.approx(float(sel.scores[position])), "position": position + 1, "method": "less", "rank": None}


# ----------------------------------------------------------------------------- summary and compare


def test_summary(run):
    sel = select(run, budget=40, edits=[])
    s = summary(run, sel)
    lengths = run.train["n_tokens"].to_numpy()[sel.rows]
    sources = run.train["source"].to_list()
    assert s["count"] == 40 and sum(s["source_mix"].values()) == 40
    assert s["source_mix"] == {k: sum(sources[r] == k for r in sel.rows) for k in s["source_mix"]}
    assert s["n_tokens"]["median"] == pytest.approx(float(np.median(lengths)))
    assert s["n_tokens"]["max"] == lengths.max() and s["n_tokens"]["total"] == lengths.sum()
    assert s["mean_score"] == pytest.approx(float(sel.scores.mean()))


def test_compare_matches_independent_computation(run):
    report = compare(run, 30, methods=["gist", "less", "random"], rank=6)
    json.dumps(report)  # JSON-ready for the CLI and the dashboard
    vec = {"gist": scores(run, "gist", 6), "less": scores(run, "less"), "random": scores(run, "random")}
    top = {m: set(np.argsort(-v, kind="stable")[:30].tolist()) for m, v in vec.items()}
    for a in vec:
        for b in vec:
            assert report["intersection"][a][b] == len(top[a] & top[b])
            assert report["jaccard"][a][b] == pytest.approx(len(top[a] & top[b]) / len(top[a] | top[b]))
            assert report["spearman"][a][b] == pytest.approx(spearmanr(vec[a], vec[b]).statistic, abs=1e-9)
            assert report["pearson"][a][b] == pytest.approx(np.corrcoef(vec[a], vec[b])[0, 1], abs=1e-9)
    sources = run.train["source"].to_list()
    for m in vec:
        mix = report["source_mix"][m]
        assert mix == {s: sum(sources[r] == s for r in top[m]) for s in mix} and sum(mix.values()) == 30
    assert report["budget"] == 30 and report["rank"] == 6 and report["counts"] == {m: 30 for m in vec}


def test_spearman_ties_match_scipy():
    x = np.array([1.0, 2.0, 2.0, 3.0, 3.0, 3.0, 0.5])
    y = np.array([0.1, 0.3, 0.2, 0.2, 0.9, 0.9, 0.0])
    ours = pearson(average_ranks(x), average_ranks(y))
    assert ours == pytest.approx(spearmanr(x, y).statistic)


# ----------------------------------------------------------------------------- G2IS


def test_g2is_selection_cached_and_edited(run, monkeypatch):
    from gist_backend.methods.g2is import g2is_select
    from gist_backend.methods.less import normalize_rows

    # independent features: per checkpoint normalise, scale by sqrt(weight), concatenate
    train = np.load(run.paths["train_sketch"]).astype(np.float32)
    val = np.load(run.paths["val_sketch"]).astype(np.float32)
    w = run.less_weights()
    x = torch.cat([normalize_rows(torch.from_numpy(train[c])) * math.sqrt(w[c]) for c in range(len(w))], dim=1)
    v = torch.cat([normalize_rows(torch.from_numpy(val[c])) * math.sqrt(w[c]) for c in range(len(w))], dim=1)
    expected = g2is_select(x, v, 20, knn_k=10, progress=False).selected
    assert len(expected) == 20

    cache = run.path / "selections" / f"g2is-{run.target}-20-k10-sklearn.json"
    cache.unlink(missing_ok=True)
    sel = select(run, method="g2is", budget=20, knn_k=10, edits=[])
    assert sel.rows.tolist() == expected and sel.scores is None and sel.rank is None and len(sel.ids) == 20
    assert cache.exists() and json.loads(cache.read_text())["selected"] == expected
    assert sel.shortfall == 0 and sel.topups == []

    def boom(*args, **kwargs):
        raise AssertionError("G2IS recomputed despite the cache")

    monkeypatch.setattr("gist_backend.methods.g2is.g2is_select", boom)
    assert select(run, method="g2is", budget=20, knn_k=10, edits=[]).rows.tolist() == expected
    monkeypatch.undo()

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    cache.unlink()
    monkeypatch.setattr("gist_backend.curation.selection.write_json", read_only)  # a run folder mounted read-only still selects
    with pytest.warns(UserWarning, match="not cached"):
        assert select(run, method="g2is", budget=20, knn_k=10, edits=[]).rows.tolist() == expected
    monkeypatch.undo()
    assert not cache.exists()

    ids = run.train["id"].to_list()
    outside = next(r for r in range(300) if r not in expected)
    edits = [edit("exclude", [ids[expected[0]], ids[expected[5]]]), edit("include", [ids[outside]])]
    sel = select(run, method="g2is", budget=20, knn_k=10, edits=edits)
    assert len(sel.rows) == 20 and ids[expected[0]] not in sel.ids and ids[outside] in sel.ids
    kept = [r for r in expected if r not in (expected[0], expected[5])]
    assert set(kept) <= set(sel.rows.tolist())  # excluding two swaps two (one forced include, one top-up pick)
    assert len(sel.topups) == 1 and sel.topups[0] not in [ids[r] for r in expected] and "top-ups" in " ".join(sel.warnings)
    sel = select(run, method="g2is", budget=20, knn_k=10, per_source_cap=6, edits=[])
    sources = run.train["source"].to_list()
    assert max(sum(sources[r] == s for r in sel.rows) for s in set(sources)) <= 6
