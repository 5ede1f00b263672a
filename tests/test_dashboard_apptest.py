"""Dashboard views under Streamlit's AppTest (no browser), on a tiny synthetic run."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from gist_backend.curation import scoring  # noqa: E402
from gist_backend.curation.selection import select  # noqa: E402
from gist_backend.runs import open_run  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"
VIEWS = ("runs", "spectrum", "coupling", "examples", "map", "compare", "evaluate", "export")
TIMEOUT = 120


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A tiny complete run with every method (built once per module)."""
    from gist_backend.devkit.synthetic import synthetic_run

    root = tmp_path_factory.mktemp("dash-runs")
    return Path(synthetic_run(root / "tiny", n_train=240, n_val=30, n_tasks=3, k_max=16, n_ckpt=2, n_sources=4,
                              methods=("gist", "less", "g2is"), seed=3))  # fmt: skip


@pytest.fixture
def run_dir(base_run: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny run (edits write into it)."""
    target = tmp_path / "run"
    shutil.copytree(base_run, target)
    return target


def app(run_dir: Path | None, monkeypatch: pytest.MonkeyPatch, view: str = "runs") -> AppTest:
    """An AppTest of the dashboard with ``run_dir`` open, showing ``view`` (the test's temp folders allowed)."""
    monkeypatch.delenv("GIST_RUN_DIR", raising=False)
    if run_dir is not None:
        monkeypatch.setenv("GIST_ALLOWED_DIRS", os.pathsep.join([str(Path(run_dir).parent), os.getcwd()]))
    monkeypatch.setattr(sys, "argv", ["app.py"])
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    if run_dir is not None:
        at.session_state["run_dir"] = str(run_dir)
    at.run()
    if view != "runs":
        at.switch_page(f"views/{view}.py").run()
    assert_clean(at)
    return at


def assert_clean(at: AppTest) -> None:
    """No uncaught exception and no error box."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def plain(markdown: str) -> str:
    """Markdown shown by the app with its escapes removed (user text in messages is escaped)."""
    return markdown.replace("\\", "")


def table_ids(at: AppTest) -> list[str]:
    """Ids of the Examples table, top first."""
    return list(at.dataframe[0].value["id"])


def button(at: AppTest, label_start: str):
    """The first button whose label starts with ``label_start``."""
    for b in at.button:
        if b.label.startswith(label_start):
            return b
    raise AssertionError(f"no button {label_start!r} in {[b.label for b in at.button]}")


def wait_for_map(at: AppTest, timeout: float = 240) -> None:
    """Rerun until the background UMAP has finished and the map is drawn."""
    deadline = time.time() + timeout
    while not at.get("plotly_chart"):
        assert time.time() < deadline, "the map was not drawn in time"
        assert_clean(at)
        time.sleep(1)
        at.run()


def export_ids(at: AppTest, path: Path) -> list[str]:
    """Write the selection from the Export view to ``path`` and return the exported ids."""
    at.switch_page("views/export.py").run()
    at.text_input(key="export_path").set_value(str(path))
    button(at, "Write").click().run()
    assert_clean(at)
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- every view


def test_every_view_renders(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = app(run_dir, monkeypatch)
    titles = []
    for view in VIEWS[1:]:
        at.switch_page(f"views/{view}.py").run()
        assert_clean(at)
        if view == "map":
            wait_for_map(at)
        titles.append(at.title[0].value)
    assert titles == ["Spectrum", "Coupling", "Examples", "Map", "Compare", "Evaluate", "Export"]
    assert sorted(p.stem for p in (APP.parent / "views").glob("*.py") if p.stem != "__init__") == sorted(VIEWS)  # every page is loaded
    assert "G2IS" in " ".join(c.value for c in at.switch_page("views/compare.py").run().caption)


def test_no_run_open_points_to_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    at = app(None, monkeypatch, "spectrum")
    assert any("No run is open" in i.value for i in at.info)


def test_runs_page_offers_the_compute_form_when_there_is_nothing_to_open(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GIST_RUN_DIR", raising=False)
    monkeypatch.setenv("GIST_ALLOWED_DIRS", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["app.py"])
    (tmp_path / "runs").mkdir()
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.session_state["runs_root"] = str(tmp_path / "runs")
    at.run()
    assert_clean(at)
    assert at.toggle(key="show_compute_form").value and [b for b in at.button if b.label == "Start computing"]


def test_broken_run_shows_reason_not_trace(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = run_dir / "targets" / "synthetic" / "gist_unit.npy"
    path.write_bytes(path.read_bytes()[:100])
    monkeypatch.delenv("GIST_RUN_DIR", raising=False)
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.session_state["run_dir"] = str(run_dir)
    at.run()
    at.switch_page("views/examples.py").run()
    assert not at.exception
    assert any("gist_unit.npy" in plain(e.value) for e in at.error)


# ---------------------------------------------------------------- rank slider


def test_rank_slider_changes_top_order_as_backend(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = open_run(run_dir)
    at = app(run_dir, monkeypatch, "examples")
    ids = run.train["id"].to_numpy()
    seen = []
    for rank in (1, 4, run.k_max):
        at.sidebar.slider(key="rank").set_value(rank).run()
        assert_clean(at)
        expected = ids[scoring.ranking(scoring.scores(run, "gist", rank))][:20].tolist()
        assert table_ids(at)[:20] == expected
        seen.append(tuple(expected))
    assert len(set(seen)) > 1, "fixture too easy: the rank does not change the order"
    at.switch_page("views/spectrum.py").run()
    assert at.metric[0].value == str(run.k_max)  # the slider is shared by every view


def test_rank_survives_a_rewritten_manifest_and_the_url_budget_is_clamped(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = run_dir
    at = app(run, monkeypatch, "examples")
    at.sidebar.slider(key="rank").set_value(2).run()
    manifest = run / "manifest.json"  # another process (add-target, say) rewrites the manifest
    os.utime(manifest, (manifest.stat().st_atime, manifest.stat().st_mtime + 5))
    at.run()
    assert_clean(at)
    assert at.sidebar.slider(key="rank").value == 2
    for given, mode, key, expected in (("150%", "%", "budget_pct", 100.0), ("-3%", "%", "budget_pct", 0.1), ("7.0", "count", "budget_count", 7),
                                       ("nan%", "%", "budget_pct", 5.0)):  # fmt: skip
        monkeypatch.setattr(sys, "argv", ["app.py"])
        at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
        at.session_state["run_dir"] = str(run)
        at.query_params["budget"] = given
        at.run()
        assert_clean(at)
        assert at.session_state["budget_mode"] == mode and at.session_state[key] == expected, given


# ---------------------------------------------------------------- filters


def test_filters(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = open_run(run_dir)
    at = app(run_dir, monkeypatch, "examples")
    texts = run.text.to_list()
    word = "python"
    at.text_input(key="f_text").set_value(word).run()
    expected = sum(word in t.lower() for t in texts)
    assert 0 < expected < run.train.height
    assert len(table_ids(at)) == min(expected, 100)
    assert f"**{expected:,}** of" in at.markdown[0].value or any(f"**{expected:,}** of" in m.value for m in at.markdown)
    # regex, case-insensitive
    at.text_input(key="f_text").set_value(r"pyth(on|ons)\b").run()
    at.toggle(key="f_regex").set_value(True).run()
    assert_clean(at)
    import re

    matching = sum(bool(re.search(r"pyth(on|ons)\b", t, re.IGNORECASE)) for t in texts)
    assert 0 < matching and len(table_ids(at)) == min(matching, 100)
    # invalid regex: an error message, no exception
    at.text_input(key="f_text").set_value("(unclosed").run()
    assert not at.exception and any("invalid regular expression" in plain(e.value) for e in at.error)
    at.text_input(key="f_text").set_value("").run()
    at.toggle(key="f_regex").set_value(False).run()
    # source facet
    source = run.train["source"][0]
    at.multiselect(key="f_sources").set_value([source]).run()
    shown = at.dataframe[0].value
    assert set(shown["source"]) == {source}
    assert len(shown) == min(int((run.train["source"] == source).sum()), 100)
    # score and length ranges
    at.multiselect(key="f_sources").set_value([]).run()
    at.slider(key="f_score").set_value((0.2, 1.0)).run()
    scores = at.dataframe[0].value["score"]
    assert (scores >= 0.2).all()
    lengths = run.train["n_tokens"].to_numpy()
    lo, hi = int(np.percentile(lengths, 25)), int(np.percentile(lengths, 75))
    at.selectbox(key="method").set_value("random").run()  # another score scale: the score filter starts open again
    assert at.slider(key="f_score").value == (0.0, 1.0) and len(at.dataframe[0].value) == min(run.train.height, 100)
    at.selectbox(key="method").set_value("gist").run()
    assert at.slider(key="f_score").value == (-1.0, 1.0)
    at.slider(key="f_length").set_value((lo, hi)).run()
    shown = at.dataframe[0].value
    assert ((shown["length"] >= lo) & (shown["length"] <= hi)).all()
    assert len(shown) == min(int(((lengths >= lo) & (lengths <= hi)).sum()), 100)


# ---------------------------------------------------------------- edits, export, undo


def test_include_exclude_change_the_export(run_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from gist_backend.curation.edits import load_edits

    run = open_run(run_dir)
    at = app(run_dir, monkeypatch, "examples")
    before = export_ids(at, tmp_path / "before.jsonl")
    assert len(before) == round(0.05 * run.train.height)
    at.switch_page("views/examples.py").run()
    top = table_ids(at)[0]
    assert top in before
    # one row: the detail pane shows the top row; exclude it
    at.button(key="detail_exclude").click().run()
    assert_clean(at)
    # every row matching a filter: include the last-ranked example by searching its id text
    last = run.train["id"][int(scoring.ranking(scoring.scores(run, "gist", run.k_max))[-1])]
    assert last not in before
    at.text_input(key="f_text").set_value(run.text[run.row_index[last]][:60]).run()
    assert last in table_ids(at)
    button(at, "Include all").click().run()
    assert_clean(at)
    edits = load_edits(run_dir)
    assert [e["op"] for e in edits] == ["exclude", "include"]
    assert edits[0]["ids"] == [top] and edits[0]["origin"]["kind"] == "row"
    assert last in edits[1]["ids"] and edits[1]["origin"]["kind"] == "filter" and edits[1]["origin"]["detail"]["text"]
    after = export_ids(at, tmp_path / "after.jsonl")
    assert top not in after and last in after


def test_edits_persist_and_undo_step_by_step(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gist_backend.curation.edits import load_edits

    at = app(run_dir, monkeypatch, "examples")
    first = table_ids(at)[:2]
    at.button(key="detail_exclude").click().run()  # top row
    at.text_input(key="f_text").set_value(first[1]).run()
    button(at, "Exclude all").click().run()
    assert len(load_edits(run_dir)) == 2
    # a new session (browser reload / server restart) sees the same edits
    again = app(run_dir, monkeypatch, "examples")
    assert "Curation edits: **2**" in " ".join(c.value for c in again.sidebar.caption)
    shown = again.dataframe[0].value.set_index("id")
    assert shown.loc[first[0], "edit"] == "exclude" and not shown.loc[first[0], "included"]
    button(again, "Undo last edit").click().run()
    assert [e["ids"] for e in load_edits(run_dir)] == [[first[0]]]
    button(again, "Undo last edit").click().run()
    assert load_edits(run_dir) == []
    assert button(again, "Undo last edit").disabled


# ---------------------------------------------------------------- map selection


def map_region(run) -> tuple[dict, np.ndarray]:
    """A box over the middle of the run's cached map at k_max and the rows inside it."""
    from dashboard.filters import points_in_region
    from gist_backend.curation.maps import cached_map

    xy = cached_map(run, run.k_max)["train_xy"]
    (x0, y0), (x1, y1) = np.percentile(xy, 25, axis=0), np.percentile(xy, 75, axis=0)
    region = {"kind": "box", "x": [float(x0), float(x1)], "y": [float(y0), float(y1)]}
    return region, np.flatnonzero(points_in_region(xy, region))


def select_region(at: AppTest, region: dict) -> None:
    """Send the Map a box selection, as the browser does after a drag."""
    at.session_state["map_chart"] = {"selection": {"points": [], "point_indices": [], "box": [{"xref": "x", "yref": "y", **region}], "lasso": []}}
    at.run()
    assert_clean(at)


def test_map_coloured_by_selection_state_survives_more_includes_than_the_budget(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gist_backend.curation.edits import add_edit

    add_edit(run_dir, "include", open_run(run_dir).train["id"][:30].to_list(), "api")  # the budget is 5 % = 12
    at = app(run_dir, monkeypatch, "map")
    wait_for_map(at)
    at.segmented_control(key="map_colour").set_value("selection state").run()
    assert not at.exception and at.get("plotly_chart") and any("force-included but the budget" in plain(e.value) for e in at.error)


def test_map_region_lists_ranked_examples_and_edits(run_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from gist_backend.curation.edits import load_edits

    run = open_run(run_dir)
    at = app(run_dir, monkeypatch, "map")
    wait_for_map(at)
    assert any("No region selected" in m.value for m in at.markdown)
    before = export_ids(at, tmp_path / "before.jsonl")
    region, rows = map_region(run)
    ids = run.train["id"].to_numpy()
    assert 0 < len(rows) < run.train.height and set(ids[rows]) & set(before)
    at.switch_page("views/map.py").run()
    wait_for_map(at)
    select_region(at, region)
    assert any(f"**{len(rows)} examples** in the region" in m.value for m in at.markdown)
    # linked view: the region's examples beside the map, ranked by the sidebar's method at the current rank, top one in detail
    order = scoring.ranking(scoring.scores(run, "gist", run.k_max))
    expected = [i for i in ids[order] if i in set(ids[rows])]
    assert list(at.dataframe[0].value["id"]) == expected[: len(at.dataframe[0].value)]
    assert any(m.value == f"#### `{expected[0]}`" for m in at.markdown)  # the detail pane of the region's best example
    at.button(key="map_exclude").click().run()
    assert_clean(at)
    edits = load_edits(run_dir)
    assert edits[-1]["op"] == "exclude" and sorted(edits[-1]["ids"]) == sorted(ids[rows].tolist())
    assert edits[-1]["origin"]["kind"] == "map" and edits[-1]["origin"]["detail"]["modes"] == ["box"]
    after = export_ids(at, tmp_path / "after.jsonl")
    assert not set(ids[rows]) & set(after) and len(after) == len(before)


def test_map_region_stays_when_the_rank_moves(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new rank recolours the map (Streamlit starts the chart afresh); the region and its ranked list stay until cleared."""
    run = open_run(run_dir)
    at = app(run_dir, monkeypatch, "map")
    wait_for_map(at)
    region, rows = map_region(run)
    select_region(at, region)
    at.session_state["map_chart"] = {"selection": {"points": [], "point_indices": [], "box": [], "lasso": []}}  # the fresh chart's state
    at.sidebar.slider(key="rank").set_value(5).run()
    assert_clean(at)
    assert any(f"**{len(rows)} examples** in the region" in m.value for m in at.markdown)
    ids = run.train["id"].to_numpy()
    order = scoring.ranking(scoring.scores(run, "gist", 5))
    assert list(at.dataframe[0].value["id"]) == [i for i in ids[order] if i in set(ids[rows])][: len(at.dataframe[0].value)]
    assert any("drawn before the map was recoloured" in c.value for c in at.caption)
    at.button(key="map_clear").click().run()
    assert any("No region selected" in m.value for m in at.markdown)


def test_map_region_opens_in_examples_as_a_filter(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = open_run(run_dir)
    at = app(run_dir, monkeypatch, "map")
    wait_for_map(at)
    region, rows = map_region(run)
    select_region(at, region)
    button(at, "Show them in Examples").click().run()
    assert_clean(at)
    assert at.title[0].value == "Examples"
    ids = run.train["id"].to_numpy()
    order = scoring.ranking(scoring.scores(run, "gist", run.k_max))
    assert table_ids(at) == [i for i in ids[order] if i in set(ids[rows])][:100]
    assert any(f"**{len(rows):,}** of {run.train.height:,} examples match" in m.value and "map region" in m.value for m in at.markdown)
    at.switch_page("views/examples.py")  # AppTest keeps its own page for later runs; a browser follows st.switch_page's URL
    button(at, "Clear map filter").click().run()
    assert len(table_ids(at)) == 100 and any(f"**{run.train.height:,}** of" in m.value for m in at.markdown)


def _fake_map_job(run_dir: Path):
    """A process that looks like `gist-curate map` (as compute starts it), with its pid file and progress."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "gist_backend.cli", "map", "--run-dir", str(run_dir)],
                            start_new_session=True)  # fmt: skip
    (run_dir / "map.pid").write_text(str(proc.pid))
    (run_dir / "maps").mkdir(exist_ok=True)
    (run_dir / "maps" / "progress.json").write_text(json.dumps({"stage": "UMAP map", "done": 0, "total": 1, "updated": time.time() - 65}))
    return proc


def test_map_waits_for_the_background_map_job(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh run whose `gist-curate map` still runs: the Map shows its progress and waits, starting no fit of its own."""
    import threading

    from gist_backend.curation.maps import umap_map

    shutil.rmtree(run_dir / "maps", ignore_errors=True)
    proc = _fake_map_job(run_dir)
    try:
        at = app(run_dir, monkeypatch, "map")
        assert any("computed in the background by `gist-curate map`" in i.value and "Running for 1 min" in i.value for i in at.info)
        assert not at.get("plotly_chart")
        assert not [t for t in threading.enumerate() if t.name.startswith("gist-map-")], "the view started a fit beside the background job"
        assert not list((run_dir / "maps").glob("*.safetensors"))
        umap_map(open_run(run_dir), 16)  # what the background job writes when it finishes
    finally:
        proc.kill()
        proc.wait()
    (run_dir / "maps" / "progress.json").write_text(json.dumps({"stage": "complete", "status": "complete", "done": 1, "total": 1, "updated": time.time()}))
    at.run()
    assert_clean(at)
    assert at.get("plotly_chart") and not at.info


def test_map_of_a_large_pool_keeps_its_layout_when_the_rank_moves(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above AUTO_FIT_UP_TO a rank change shows the cached layout (colours follow the slider) and fits only on request."""
    import threading

    from dashboard import mapjobs

    at = app(run_dir, monkeypatch, "map")
    wait_for_map(at)
    monkeypatch.setattr(mapjobs, "AUTO_FIT_UP_TO", 10)
    at.sidebar.slider(key="rank").set_value(8).run()
    assert_clean(at)
    assert at.get("plotly_chart") and any("The layout is the map of rank 16" in c.value for c in at.caption)
    assert not [t for t in threading.enumerate() if t.name == "gist-map-r8"]
    assert not (run_dir / "maps" / "umap-synthetic-r8.safetensors").exists()
    button(at, "Fit the rank-8 layout").click().run()
    wait_for_map_rank(at, run_dir, 8)


def wait_for_map_rank(at: AppTest, run_dir: Path, rank: int, timeout: float = 240) -> None:
    """Rerun until the map of ``rank`` is cached and shown."""
    deadline = time.time() + timeout
    while not (run_dir / "maps" / f"umap-synthetic-r{rank}.safetensors").exists() or any("The layout is the map" in c.value for c in at.caption):
        assert time.time() < deadline, "the map was not fitted in time"
        assert_clean(at)
        time.sleep(1)
        at.run()
    assert any(f"Layout: rank {rank}." in c.value for c in at.caption)


# ---------------------------------------------------------------- export, compare, runs


def test_budget_and_caps_drive_the_export(run_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    run = open_run(run_dir)
    at = app(run_dir, monkeypatch, "export")
    at.sidebar.segmented_control(key="budget_mode").set_value("count").run()
    at.sidebar.number_input(key="budget_count").set_value(40).run()
    assert len(export_ids(at, tmp_path / "forty.jsonl")) == 40
    at.toggle(key="cap_on").set_value(True).run()
    at.segmented_control(key="cap_mode").set_value("count").run()
    at.number_input(key="cap_count").set_value(5).run()
    ids = export_ids(at, tmp_path / "capped.jsonl")
    sources = dict(zip(run.train["id"].to_list(), run.train["source"].to_list()))
    counts = {s: sum(sources[i] == s for i in ids) for s in set(sources.values())}
    assert max(counts.values()) <= 5
    assert at.metric[0].value == str(len(ids))
    expected = select(run, method=at.session_state["method"], rank=at.session_state["rank"], budget=40, per_source_cap=5, edits=[])
    assert ids == expected.ids  # the CLI's twin: the same capped selection, in the same order


def test_export_path_follows_the_selection_until_the_user_types_one(run_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    at = app(run_dir, monkeypatch, "export")
    at.sidebar.segmented_control(key="budget_mode").set_value("count").run()
    at.sidebar.number_input(key="budget_count").set_value(40).run()
    name = Path(run_dir).name
    assert at.text_input(key="export_path").value == str(Path("exports") / f"{name}-{open_run(run_dir).target}-gist-40.jsonl")
    at.sidebar.number_input(key="budget_count").set_value(30).run()
    assert at.text_input(key="export_path").value.endswith("-gist-30.jsonl")  # the default names the selection it writes
    assert len(export_ids(at, tmp_path / "mine.jsonl")) == 30  # a path typed and written …
    at.sidebar.number_input(key="budget_count").set_value(20).run()
    assert at.text_input(key="export_path").value == str(tmp_path / "mine.jsonl")  # … stays


def test_compare_shows_g2is_as_a_set(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = app(run_dir, monkeypatch, "compare")
    assert len(at.get("plotly_chart")) >= 3
    table = at.dataframe[-1].value
    assert dict(zip(table["method"], table["kind"]))["G2IS"] == "set"


def test_compute_form_validation_and_job_lifecycle(run_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dashboard import jobs
    from gist_backend.config import ComputeConfig

    at = app(run_dir, monkeypatch)
    assert not [b for b in at.button if b.label == "Start computing"]  # with a run open, the form waits for its toggle
    at.toggle(key="show_compute_form").set_value(True).run()
    submit = [b for b in at.button if b.label == "Start computing"][0]
    submit.click().run()
    assert not at.exception and any("Give a model" in plain(e.value) for e in at.error)
    # a job whose inputs do not exist fails with the reason, not a trace
    config = ComputeConfig(model="no-such-model", train=[str(tmp_path / "missing.jsonl")], val=[str(tmp_path / "missing-val.jsonl")])
    assert jobs.command("compute", config.to_argv(), tmp_path / "r")[:4] == [sys.executable, "-m", "gist_backend.cli", "compute"]
    job_dir = tmp_path / "runs" / "bad"
    jobs.launch("compute", config.to_argv(), job_dir)
    deadline = time.time() + 120
    while jobs.job_status(job_dir).state == "running" and time.time() < deadline:
        time.sleep(0.5)
    status = jobs.job_status(job_dir)
    assert status.state in ("failed", "stopped") and status.error
    # cancel: a stand-in process that looks like a compute is stopped through its process group
    import subprocess

    fake = tmp_path / "runs" / "slow"
    fake.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "gist_backend.cli", "compute", "--run-dir", "slow"],
                            start_new_session=True, cwd=fake.parent)  # fmt: skip
    (fake / "compute.pid").write_text(str(proc.pid))
    assert jobs.job_status(fake).state == "running"
    other = tmp_path / "runs" / "other"  # a pid file naming a job of another run (a copied folder, a recycled pid) is not this run's job
    other.mkdir()
    (other / "compute.pid").write_text(str(proc.pid))
    assert jobs.job_status(other).state == "stopped" and not jobs.cancel(other)
    with pytest.raises(ValueError, match="still running"):  # a second job of one kind on one run would only fail on its lock
        jobs.launch("compute", config.to_argv(), fake)
    assert jobs.cancel(fake)
    proc.wait(timeout=10)
    assert jobs.job_status(fake).state == "cancelled"


# ---------------------------------------------------------------- helpers without Streamlit


def test_map_figure_points_and_raster() -> None:
    from dashboard.figures import figure_bytes, map_figure

    rng = np.random.default_rng(0)
    xy = rng.normal(size=(3000, 2)).astype(np.float32)
    scores = rng.random(3000)
    small = map_figure(xy[:800], "source", np.array(["s1", "s2"] * 400, dtype=object), labels=np.array([f"ex-{i}" for i in range(800)]))
    drawn = [t for t in small.data if t.customdata is not None]
    assert [t.name for t in drawn] == ["s1", "s2"]
    assert sorted(np.concatenate([t.customdata for t in drawn]).tolist()) == list(range(800))  # row numbers
    assert all(t.text[0] == f"ex-{t.customdata[0]}" for t in drawn)  # ids on hover
    # raster: every point binned, mean score per cell, blank cells empty
    fig = map_figure(xy, "score", scores, xy[:5], xy[:2], ["a", "b"], points_up_to=1000, bins=(40, 30))
    heat = fig.data[0]
    assert heat.type == "heatmap" and np.asarray(heat.z).shape == (30, 40)
    counts = np.asarray(heat.customdata)
    assert counts.sum() == 3000 and np.isnan(np.asarray(heat.z, float)[counts == 0]).all()
    top = np.unravel_index(np.argmax(counts), counts.shape)
    cx, cy = heat.x[top[1]], heat.y[top[0]]
    w, h = (xy.max(0) - xy.min(0)) / (40, 30)
    near = (np.abs(xy[:, 0] - cx) <= w / 2 + 1e-6) & (np.abs(xy[:, 1] - cy) <= h / 2 + 1e-6)
    assert abs(float(heat.z[top]) - scores[near].mean()) < 1e-4
    assert [t.name for t in fig.data[1:]] == ["validation", "sub-task centroids"]
    # categories: majority source per cell, the rarest selection state where present
    states = np.array(["not selected"] * 3000, dtype=object)
    states[7] = "excluded by hand"
    raster = map_figure(xy, "selection state", states, points_up_to=1000, bins=(40, 30), categories=["selected", "not selected", "excluded by hand"])
    z = np.asarray(raster.data[0].z, float)
    assert np.nansum(z == 2) == 1 and list(raster.data[0].colorbar.ticktext) == ["selected", "not selected", "excluded by hand"]
    # user text in labels is shown, not followed as Plotly's pseudo-HTML
    hostile = map_figure(xy[:4], "source", np.array(['<a href="javascript:x">s</a>', "b"] * 2, dtype=object), xy[:1], xy[:1], ["<b>t</b>"],
                         labels=np.array(["<img src=x>"] * 4))  # fmt: skip
    assert hostile.data[0].name == '&lt;a href="javascript:x"&gt;s&lt;/a&gt;' and hostile.data[0].text[0] == "&lt;img src=x&gt;"
    assert "<b>" not in str(hostile.data[-1].text) and "javascript" not in hostile.data[0].hovertemplate
    # size: a 270k pool is a few hundred kB, not megabytes
    big = rng.normal(size=(270_000, 2)).astype(np.float32)
    assert figure_bytes(map_figure(big, "score", rng.random(270_000))) < 500_000
    assert figure_bytes(map_figure(big, "source", rng.integers(0, 5, 270_000), categories=list("abcde"))) < 500_000


def test_table_key_follows_the_rows_shown() -> None:
    """An edit that swaps the rows on a page keeps the row count: the key (and so the picked row) must still change."""
    from dashboard.filters import ExampleFilter, table_key

    settings = (ExampleFilter(state="not selected"), 4, "gist", 1, 100, "run@val@1")
    before, after = np.array([3, 7, 9]), np.array([3, 9, 11])
    assert table_key(settings, before) == table_key(settings, before.copy())
    assert table_key(settings, before) != table_key(settings, after)
    assert table_key(settings, before) != table_key((*settings[:-1], "run@other@1"), before)


def test_points_in_region_matches_brute_force() -> None:
    from dashboard.filters import points_in_region, region_mask

    rng = np.random.default_rng(1)
    xy = rng.normal(size=(5000, 2))
    xy[:50] = np.round(xy[:50], 1)  # points on vertices' rows
    for trial in range(20):
        k = int(rng.integers(3, 40))
        angles = np.sort(rng.random(k)) * 2 * np.pi
        radius = rng.uniform(0.3, 2.0, k)
        poly = {"kind": "lasso", "x": (radius * np.cos(angles)).round(1).tolist(), "y": (radius * np.sin(angles)).round(1).tolist()}
        xs, ys = np.asarray(poly["x"]), np.asarray(poly["y"])
        brute = np.zeros(len(xy), dtype=bool)
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(np.roll(xs, -1), np.roll(ys, -1))):  # even-odd, every point and edge
            with np.errstate(divide="ignore", invalid="ignore"):
                brute ^= ((y0 > xy[:, 1]) != (y1 > xy[:, 1])) & (xy[:, 0] < (x1 - x0) * (xy[:, 1] - y0) / (y1 - y0) + x0)
        assert (points_in_region(xy, poly) == brute).all(), trial
        assert (points_in_region(xy, poly, np.argsort(xy[:, 1], kind="stable")) == brute).all()
    box = points_in_region(xy, {"kind": "box", "x": [0, 1], "y": [0, 1]})
    assert box.sum() == int(((xy >= 0) & (xy <= 1)).all(axis=1).sum())
    lasso = points_in_region(xy, {"kind": "lasso", "x": [0, 1, 1, 0], "y": [0, 0, 1, 1]})
    assert (lasso == box).mean() > 0.99
    both = region_mask(xy, [{"kind": "box", "x": [0, 1], "y": [0, 1]}, {"kind": "box", "x": [-1, 0], "y": [-1, 0]}])
    assert both.sum() == box.sum() + int(((xy >= -1) & (xy <= 0)).all(axis=1).sum())


def test_scores_are_the_same_from_the_float32_copy(base_run: Path) -> None:
    """The dashboard scores from Run.resident_unit_coords once made (prefetch); the numbers must not change."""
    run = open_run(base_run)
    assert run.scoring_unit_coords is run.unit_coords and run.unit_coords.dtype == np.float16
    before = {(m, r): scoring.scores(run, m, r) for m in ("gist", "gist-global") for r in (1, 5, run.k_max)}
    assert run.resident_unit_coords.dtype == np.float32 and run.scoring_unit_coords is run.resident_unit_coords
    for (m, r), values in before.items():
        np.testing.assert_array_equal(scoring.scores(run, m, r), values)


def test_selection_ids_read_dict_style() -> None:
    from dashboard.events import selection_ids, selection_rows

    event = {"selection": {"points": [{"customdata": "a"}, {"customdata": ["b", 1]}, {"customdata": "a"}, {"x": 1}], "box": [], "lasso": []}}
    assert selection_ids(event) == ["a", "b"]
    assert selection_ids({"selection": {"points": []}}) == [] and selection_ids(None) == []
    rows = {"selection": {"points": [{"customdata": 7}, {"customdata": [3]}, {"customdata": 7}, {"customdata": 99}, {"customdata": "x"}, {"customdata": True}]}}
    assert selection_rows(rows, 10).tolist() == [3, 7] and selection_rows(None, 10).size == 0


def test_export_outside_the_allowed_folders_is_refused(run_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> None:
    outside = tmp_path_factory.mktemp("elsewhere") / "x.jsonl"
    at = app(run_dir, monkeypatch, "export")
    at.text_input(key="export_path").set_value(str(outside))
    button(at, "Write").click().run()
    assert not outside.exists()
    assert at.error and "outside the allowed folders" in plain(at.error[0].value)
    escape = run_dir.parent / "out" / ".." / ".." / "escape.jsonl"
    at.text_input(key="export_path").set_value(str(escape))
    button(at, "Write").click().run()
    assert not escape.resolve().exists()
    assert [e.value for e in at.error if "outside the allowed folders" in plain(e.value)], [e.value for e in at.error] + [s.value for s in at.success]


# ---------------------------------------------------------------- the dashboard's boundary


def test_compute_form_refuses_paths_outside_the_allowed_folders(run_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> None:
    outside = tmp_path_factory.mktemp("outside")
    (outside / "pool.jsonl").write_text("{}\n")
    at = app(run_dir, monkeypatch)
    at.toggle(key="show_compute_form").set_value(True).run()
    at.text_input(key="cf_tool defaults_model").set_value("HuggingFaceTB/SmolLM2-135M-Instruct")  # a hub id is not a path
    at.text_area(key="cf_tool defaults_train").set_value(str(outside / "pool.jsonl"))
    at.text_area(key="cf_tool defaults_val").set_value("../../" + str(outside / "val.jsonl"))
    button(at, "Start computing").click().run()
    errors = " ".join(plain(e.value) for e in at.error)
    assert "pool file is not allowed" in errors and "validation file is not allowed" in errors and "model" not in errors.split("allowed")[0]
    assert not list(outside.rglob("compute.pid")) and not list(run_dir.parent.rglob("compute.pid"))
    # a line read as an option by the compute command would write outside them: refused before anything starts
    at.text_area(key="cf_tool defaults_train").set_value(f"pool.jsonl\n--dump-full-grads={outside / 'dump'}")
    button(at, "Start computing").click().run()
    assert any("starts with '-'" in plain(e.value) for e in at.error), [plain(e.value) for e in at.error]
    assert not (outside / "dump").exists() and not list(run_dir.parent.rglob("compute.pid"))
    # a runs folder outside the allowed ones is refused too
    at.session_state["runs_root"] = str(outside)
    at.run()
    assert any("Folder not allowed" in plain(e.value) for e in at.error)


@pytest.fixture(scope="module")
def hostile_run(tiny_llama, tmp_path_factory) -> Path:
    """A run whose pool ids and sources carry markdown and HTML: an image link, a script tag, a colour directive."""
    from gist_backend.compute import ComputeConfig, compute

    root = tmp_path_factory.mktemp("hostile-ui")
    payloads = ["![pixel](http://evil.example/p.png)", "<img src=x onerror=alert(1)>", ":red[**shout**]", "`code` [link](javascript:x)"]
    rows = [{"id": payloads[i % 4] + f" {i}", "dataset": payloads[(i + 1) % 4],
             "messages": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}
            for i in range(24)]  # fmt: skip
    val = [{"id": f"v{i}", "task": ["<b>t</b>", "<img src=y onerror=alert(2)>"][i % 2],
            "messages": [{"role": "user", "content": f"Add {i} and 1."}, {"role": "assistant", "content": f"{i + 1}."}]} for i in range(6)]  # fmt: skip
    (root / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    config = ComputeConfig(model=str(tiny_llama), train=[str(root / "pool.jsonl")], val=[str(root / "val.jsonl")], k_max=4, warmup=False, max_len=64)
    return Path(compute(config, root / "run"))


def _strings(tree) -> list[str]:
    """Every string in a decoded JSON tree (keys excluded)."""
    if isinstance(tree, str):
        return [tree]
    if isinstance(tree, dict):
        tree = list(tree.values())
    return [s for item in tree for s in _strings(item)] if isinstance(tree, list) else []


def test_user_text_is_never_rendered_as_markdown(hostile_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = app(hostile_run, monkeypatch, "examples")
    for view in ("examples", "export", "runs", "compare"):
        at.switch_page(f"views/{view}.py").run()
        assert_clean(at)
        shown = [e.value for kind in ("markdown", "caption", "warning", "info", "success", "error") for e in at.get(kind)]
        for text in (re.sub(r"`[^`]*`", "", t) for t in shown):  # inside a code span markdown is not interpreted
            assert "![" not in text and "<img" not in text and ":red[" not in text and "](javascript" not in text, (view, text)
        for chart in at.get("plotly_chart"):  # Plotly draws pseudo-HTML in names, labels and hover text: tags must arrive escaped
            texts = _strings(json.loads(chart.proto.spec))
            assert not [t for t in texts if "<img" in t or "<b>" in t], (view, [t for t in texts if "<" in t][:5])
    at.switch_page("views/examples.py").run()
    assert any("\\!\\[pixel\\]" in c.value or "ʼcodeʼ" in m.value for c in at.caption for m in at.markdown)  # shown, escaped


# ---------------------------------------------------------------- evaluate


def test_evaluate_page_runs_an_evaluation_in_the_background(tiny_llama, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, finish_job) -> None:
    from gist_backend.compute import ComputeConfig, compute
    from gist_backend.devkit.tiny import make_toy_data

    pool, val = make_toy_data(tmp_path / "data", n_train=40, n_val=8)
    run_dir = Path(compute(ComputeConfig(model=str(tiny_llama), train=[str(pool)], val=[str(val)], k_max=6, warmup_epochs=1,
                                         warmup_fraction=0.2, warmup_batch=4, max_len=64), tmp_path / "run"))  # fmt: skip
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"id": f"t{i}", "messages": [{"role": "user", "content": f"What is {100 + i} plus 1?"},
                                                                     {"role": "assistant", "content": f"{101 + i}."}],
                                        "choices": [f"{101 + i}.", f"{102 + i}."], "answer_index": 0}) + "\n" for i in range(8)))  # fmt: skip
    at = app(run_dir, monkeypatch, "evaluate")
    assert any("No evaluation for target" in i.value for i in at.info)
    at.text_input(key="eval_test").set_value(str(test))
    at.number_input(key="eval_baselines").set_value(2)
    at.number_input(key="eval_epochs").set_value(1)
    at.session_state["cap_on"], at.session_state["cap_mode"], at.session_state["cap_count"] = True, "count", 1  # the Export view's cap
    button(at, "Evaluate the current selection").click().run()
    assert_clean(at)
    finish_job(run_dir, "evaluate", timeout=240)
    at.run()
    assert_clean(at)
    assert at.get("plotly_chart") and at.dataframe[-1].value["arm"].to_list()[:2] == ["gist-r6", "base"]
    from gist_backend.evaluate import past_evaluations

    (result,) = past_evaluations(open_run(run_dir))
    assert result["baselines"] == 2 and result["recipe"]["epochs"] == 1 and result["arms"][0]["selection"]["budget"] == 2  # 5 % of 40
    assert result["train_seeds"] == 1 and result["arms"][0]["selection"]["per_source_cap"] == "1"  # what every view shows, cap included
    assert app(run_dir, monkeypatch, "evaluate").text_input(key="eval_test").value == str(test)  # a new session offers the last test file


# ---------------------------------------------------------------- many targets


def test_add_target_switch_compare_and_combine(tiny_llama, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, finish_job) -> None:
    """Runs page adds a target in the background; the sidebar switches to it; Compare and Export span both targets."""
    from gist_backend.compute import ComputeConfig, compute
    from gist_backend.curation import Part, combine
    from gist_backend.devkit.tiny import make_toy_data

    pool, val = make_toy_data(tmp_path / "data", n_train=40, n_val=8)
    other = tmp_path / "data" / "animals.jsonl"
    other.write_text("".join(json.dumps({"id": f"a{i}", "messages": [{"role": "user", "content": f"How many legs has animal {i}?"},
                                                                      {"role": "assistant", "content": f"{i % 5} legs."}]}) + "\n" for i in range(8)))  # fmt: skip
    run_dir = Path(compute(ComputeConfig(model=str(tiny_llama), train=[str(pool)], val=[str(val)], k_max=6, warmup_epochs=1, warmup_fraction=0.2, warmup_batch=4,
                                         max_len=64, methods=["gist", "less"], less_dim=128, reusable=True, sketch_dim=1024), tmp_path / "run"))  # fmt: skip
    at = app(run_dir, monkeypatch)
    at.text_area(key="at_val").set_value(str(other))
    at.text_input(key="at_name").set_value("val")
    button(at, "Add the target").click().run()
    assert any("already has a target" in plain(e.value) for e in at.error)  # refused before anything starts
    at.text_input(key="at_name").set_value("animals")
    button(at, "Add the target").click().run()
    assert_clean(at)
    finish_job(run_dir, "add-target", timeout=240)
    at.run()
    button(at, "Open animals").click().run()
    assert_clean(at)
    assert at.sidebar.selectbox(key="target").value == "animals" and open_run(run_dir).targets == ["val", "animals"]
    assert at.sidebar.toggle(key="edit_only_target").label == "New edits for animals only"
    at.switch_page("views/compare.py").run()
    assert_clean(at)
    assert any(s.value == "Across targets" for s in at.subheader)
    # Export: one selection for both targets; the manifest names both parts
    at.switch_page("views/export.py").run()
    at.toggle(key="combine_on").set_value(True).run()
    assert_clean(at)
    out = tmp_path / "exports" / "both.jsonl"
    at.text_input(key="export_path").set_value(str(out))
    button(at, "Write").click().run()
    assert_clean(at)
    manifest = json.loads(out.with_name(out.name + ".manifest.json").read_text())
    assert manifest["method"] == "combined" and [p["target"] for p in manifest["method_info"]["parts"]] == ["val", "animals"]
    expected = combine(run_dir, [Part("val", "gist", 6, 1), Part("animals", "gist", 6, 1)], 2, edits=[])
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == expected.ids
    # Evaluate offers each target its own test file: test.jsonl beside the first target's validation file is for it only
    (Path(val).parent / "test.jsonl").write_text("")
    at.sidebar.selectbox(key="target").set_value("val")
    at.switch_page("views/evaluate.py").run()
    assert_clean(at)
    assert at.text_input(key="eval_test").value == str(Path(val).parent / "test.jsonl")
    at.switch_page("views/spectrum.py").run()
    at.switch_page("views/evaluate.py").run()
    assert at.text_input(key="eval_test").value == str(Path(val).parent / "test.jsonl")  # still there after a visit elsewhere
    at.sidebar.selectbox(key="target").set_value("animals").run()
    from gist_backend.curation.edits import add_edit, undo

    add_edit(run_dir, "exclude", [open_run(run_dir).train["id"][0]], "api", target="val")
    at.run()
    assert any("last: exclude 1 ids (target val only)" in c.value for c in at.sidebar.caption)  # undo would remove another target's edit: said
    undo(run_dir)
    at.run()
    assert not at.text_input(key="eval_test").value and any("No evaluation for target" in i.value for i in at.info)
