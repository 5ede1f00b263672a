"""End to end in a real browser (Debian chromium via Playwright): rank slider, map lasso, exclude, export.

Screenshots of every view are saved under ``test-artifacts/`` (git-ignored).
"""

from __future__ import annotations

import json
import os
import signal
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "dashboard" / "app.py"
ARTIFACTS = ROOT / "test-artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]  # fmt: skip

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed at /usr/bin/chromium (apt-get install chromium)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """A demo-sized synthetic run with every method."""
    from gist_backend.devkit.synthetic import synthetic_run

    root = tmp_path_factory.mktemp("browser-runs")
    return Path(synthetic_run(root / "demo", n_train=300, n_val=40, n_tasks=3, k_max=32, n_ckpt=2, n_sources=4,
                              methods=("gist", "less", "g2is"), seed=1))  # fmt: skip


@pytest.fixture(scope="module")
def server(demo_run: Path):
    """`gist-curate serve` (the product's own launcher, with its Host check) on a free loopback port, opened on the demo run."""
    port = _free_port()
    env = os.environ | {"GIST_CACHE": str(demo_run.parent), "PYTHONUNBUFFERED": "1"}
    env.pop("GIST_RUN_DIR", None)
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / "streamlit-server.log", "wb")
    cmd = [sys.executable, "-m", "gist_backend.cli", "serve", "--run-dir", str(demo_run), "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited early; see {ARTIFACTS / 'streamlit-server.log'}")
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        raise RuntimeError("streamlit did not become healthy within 90 s")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)  # serve and its streamlit child
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def wait_idle(page, timeout: float = 120) -> None:
    """Wait until the app's script run has finished and no element is stale."""
    app = page.locator('[data-testid="stApp"]')
    page.wait_for_timeout(250)
    deadline = time.time() + timeout
    quiet = 0
    while time.time() < deadline:
        busy = app.get_attribute("data-test-script-state") != "notRunning" or page.locator('[data-stale="true"]').count()
        quiet = 0 if busy else quiet + 1
        if quiet >= 3:
            return
        page.wait_for_timeout(150)
    raise AssertionError("the app did not become idle")


def goto_view(page, title: str) -> None:
    """Switch view with the sidebar navigation (same session, so the shared state is kept)."""
    page.locator('[data-testid="stSidebarNav"]').get_by_text(title, exact=True).click()
    page.wait_for_selector(f'h1:has-text("{title}")', timeout=60_000)
    wait_idle(page)


def shot(page, name: str) -> None:
    """Screenshot of the whole view (the viewport is stretched to the page's height) into test-artifacts/."""
    height = page.evaluate("() => (document.querySelector('[data-testid=\"stMain\"]') || document.body).scrollHeight")
    page.set_viewport_size({"width": 1500, "height": int(min(max(1000, height + 40), 4000))})
    page.wait_for_timeout(600)
    wait_idle(page)
    page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"))
    page.set_viewport_size({"width": 1500, "height": 1000})
    page.wait_for_timeout(300)


SLIDER = '[data-testid="stSidebar"] [data-testid="stSlider"] input[type="range"]'


def sidebar_rank(page) -> int:
    """The value of the sidebar rank slider."""
    return int(page.locator(SLIDER).first.input_value())


def test_browser_end_to_end(server: str, demo_run: Path) -> None:
    from playwright.sync_api import sync_playwright

    from gist_backend.curation import scoring
    from gist_backend.curation.edits import load_edits
    from gist_backend.runs import open_run
    from gist_backend.curation import select

    run = open_run(demo_run)
    ids = run.train["id"].to_numpy()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1500, "height": 1000}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(60_000)
        try:
            page.goto(server)
            page.wait_for_selector('h1:has-text("Runs")')
            wait_idle(page)
            assert page.get_by_text("demo", exact=False).count()
            shot(page, "1-runs")

            # rank slider: Home → 1, then 3 steps right → 4
            goto_view(page, "Spectrum")
            assert sidebar_rank(page) == run.k_max
            thumb = page.locator(SLIDER).first
            thumb.focus()
            thumb.press("Home")
            wait_idle(page)
            for _ in range(3):
                thumb.press("ArrowRight")
                wait_idle(page)
            assert sidebar_rank(page) == 4
            assert page.locator('[data-testid="stMetricValue"]').first.inner_text().strip() == "4"
            shot(page, "2-spectrum")

            goto_view(page, "Coupling")
            page.wait_for_selector(".js-plotly-plot")
            shot(page, "3-coupling")

            # the Examples detail pane opens on the top example, which must be the backend's top at rank 4
            goto_view(page, "Examples")
            expected_top = ids[scoring.ranking(scoring.scores(run, "gist", 4))[0]]
            page.wait_for_selector(f'h4:has-text("{expected_top}")')
            page.wait_for_selector('[data-testid="stDataFrame"]')
            page.wait_for_timeout(800)
            shot(page, "4-examples")

            # map: lasso the middle of the plot, then exclude that region
            goto_view(page, "Map")
            plot = page.locator(".js-plotly-plot").first
            plot.wait_for(timeout=240_000)  # the first UMAP runs in the background (numba compiles on first use)
            wait_idle(page)
            page.wait_for_timeout(1000)
            drag = page.locator(".js-plotly-plot .nsewdrag").first
            box = drag.bounding_box()
            assert box, "plotly drag layer not found"
            x0, y0, w, h = box["x"], box["y"], box["width"], box["height"]
            polygon = [(0.2, 0.2), (0.8, 0.2), (0.8, 0.8), (0.2, 0.8), (0.21, 0.25)]
            page.mouse.move(x0 + polygon[0][0] * w, y0 + polygon[0][1] * h)
            page.mouse.down()
            for fx, fy in polygon[1:]:
                page.mouse.move(x0 + fx * w, y0 + fy * h, steps=12)
            page.mouse.up()
            region = page.get_by_text(re.compile(r"[\d,]+ examples in the region"))
            region.wait_for(timeout=60_000)
            wait_idle(page)
            count = int(re.match(r"([\d,]+)", region.inner_text()).group(1).replace(",", ""))
            assert 0 < count < run.train.height
            shot(page, "5-map-lasso")
            before = set(select(run, method="gist", rank=4, budget="5%", edits=[]).ids)
            page.get_by_role("button", name=re.compile(rf"^Exclude {count:,}$")).click()
            page.get_by_text("Curation edits: 1", exact=False).wait_for(timeout=60_000)
            wait_idle(page)
            edits = load_edits(demo_run)
            assert len(edits) == 1 and edits[0]["op"] == "exclude" and edits[0]["origin"]["kind"] == "map"
            excluded = set(edits[0]["ids"])
            assert len(excluded) == count
            assert excluded & before, "the lasso caught no selected example; the region is too small to test the export"
            shot(page, "6-map-after-exclude")

            goto_view(page, "Compare")
            page.wait_for_selector(".js-plotly-plot")
            shot(page, "7-compare")

            # export: download the JSONL and check it against the backend's selection with the edits applied
            goto_view(page, "Export")
            shot(page, "8-export")
            with page.expect_download(timeout=60_000) as info:
                page.get_by_role("button", name=re.compile("Download JSONL")).click()
            target = ARTIFACTS / "dashboard-export.jsonl"
            info.value.save_as(str(target))
        finally:
            context.close()
            browser.close()

    records = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines() if line.strip()]
    exported = [r["id"] for r in records]
    expected = select(run, method="gist", rank=4, budget="5%", edits=load_edits(demo_run))
    assert exported == expected.ids
    assert len(exported) == round(0.05 * run.train.height)
    assert not excluded & set(exported)
    raws = dict(zip(run.train["id"].to_list(), run.raw.to_list()))
    assert all(json.loads(raws[r["id"]]) == r for r in records)


# ---------------------------------------------------------------- a 50k pool


@pytest.fixture(scope="module")
def pool_50k(tmp_path_factory) -> Path:
    """A 50,000-example synthetic run whose map is being made by `gist-curate map` in the background, as compute leaves it."""
    from gist_backend.commands import start_map
    from gist_backend.devkit.synthetic import synthetic_run

    run_dir = Path(synthetic_run(tmp_path_factory.mktemp("browser-50k") / "pool-50k", n_train=50_000, n_val=120, n_tasks=4, k_max=64, n_ckpt=2, seed=2))
    start_map(run_dir)
    return run_dir


def test_browser_50k_map_waits_then_selects_and_follows_the_rank(pool_50k: Path) -> None:
    """The Map waits for the background map job, a lasso lists the region's examples ranked (count checked against the
    cached map), a rank step re-ranks them, and Show in Examples filters the Examples view to them."""
    from playwright.sync_api import sync_playwright

    from bench import dashboard_browser as bb
    from dashboard.filters import points_in_region
    from gist_backend.curation import scoring
    from gist_backend.curation.maps import cached_map
    from gist_backend.runs import open_run

    run = open_run(pool_50k)
    ids = run.train["id"].to_numpy()
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p, bb.serve(pool_50k, ARTIFACTS / "streamlit-server-50k.log") as url, bb.browser(p) as page:
        page.goto(f"{url}/map")
        page.wait_for_selector('h1:has-text("Map")')
        assert not bb.deploy_button_shown(page)
        # still fitting (a UMAP of 20,000 points takes tens of seconds here): the view says so and waits, starting no fit of its own
        page.wait_for_selector('.js-plotly-plot, [data-testid="stAlert"]:has-text("computed in the background by")', timeout=60_000)
        if not page.locator(".js-plotly-plot").count():
            shot(page, "9-map-50k-waiting")
        page.wait_for_selector(".js-plotly-plot", timeout=400_000)
        bb.wait_until(page)
        xy = cached_map(run, run.k_max)["train_xy"]
        assert (pool_50k / "maps" / "progress.json").exists() and "complete" in (pool_50k / "maps" / "progress.json").read_text()

        seconds, count, _ = bb.select_on_map(page, 0, xy)
        regions = bb.plotly_regions(page)
        rows = np.flatnonzero(points_in_region(xy, regions[0]))
        assert count == len(rows) and 0 < count < run.train.height
        top = rows[np.argmax(scoring.scores(run, "gist", run.k_max)[rows])]
        page.wait_for_selector(f'h4:has-text("{ids[top]}")')  # the region's best example, in the detail pane
        shot(page, "10-map-50k-region")

        thumb = page.locator(SLIDER).first
        thumb.focus()
        thumb.press("Home")  # rank 1: the region stays (the map is recoloured), ranked anew
        bb.wait_until(page, "() => [...document.querySelectorAll('[data-testid=\"stCaptionContainer\"]')].some(e => /examples by .* at rank 1\\b/.test(e.innerText))")
        assert bb.region_count(page) == count
        top_1 = rows[np.argmax(scoring.scores(run, "gist", 1)[rows])]
        page.wait_for_selector(f'h4:has-text("{ids[top_1]}")')
        shot(page, "11-map-50k-rank-1")

        page.get_by_role("button", name="Show them in Examples").click()
        page.wait_for_selector('h1:has-text("Examples")')
        page.get_by_text(f"{count:,} of {run.train.height:,} examples match", exact=False).wait_for()
        bb.wait_until(page)
        shot(page, "12-examples-50k-map-filter")


# ---------------------------------------------------------------- a real model: many targets and an evaluation


def test_browser_add_target_switch_combine_and_evaluate(tiny_llama, tmp_path: Path, finish_job) -> None:
    """On a tiny-model --reusable run: add a target from the Runs page, switch to it in the sidebar, compare the
    targets, export one selection for both, and evaluate the selection in the background, all in the browser."""
    from playwright.sync_api import sync_playwright

    from bench import browser as bb
    from dashboard import jobs
    from gist_backend.compute import ComputeConfig, compute
    from gist_backend.curation import Part, combine
    from gist_backend.devkit.tiny import make_toy_data
    from gist_backend.runs import open_run

    pool, val = make_toy_data(tmp_path / "data", n_train=40, n_val=10)
    other, test = tmp_path / "data" / "animals.jsonl", tmp_path / "data" / "test.jsonl"
    other.write_text("".join(json.dumps({"id": f"a{i}", "messages": [{"role": "user", "content": f"How many legs has animal {i}?"},
                                                                      {"role": "assistant", "content": f"{i % 5} legs."}]}) + "\n" for i in range(10)))  # fmt: skip
    test.write_text("".join(json.dumps({"id": f"t{i}", "messages": [{"role": "user", "content": f"What is {100 + i} plus 1?"},
                                                                     {"role": "assistant", "content": f"{101 + i}."}],
                                        "choices": [f"{101 + i}.", f"{102 + i}."], "answer_index": 0}) + "\n" for i in range(6)))  # fmt: skip
    run_dir = Path(compute(ComputeConfig(model=str(tiny_llama), train=[str(pool)], val=[str(val)], k_max=6, warmup_epochs=1, warmup_fraction=0.2,
                                         warmup_batch=4, max_len=64, methods=["gist", "less"], less_dim=128, reusable=True, sketch_dim=1024),
                           tmp_path / "runs" / "tiny"))  # fmt: skip
    out = tmp_path / "exports" / "both.jsonl"
    ARTIFACTS.mkdir(exist_ok=True)
    os.environ["GIST_ALLOWED_DIRS"] = str(tmp_path)  # the server inherits it: data, runs and exports live under tmp_path
    try:
        with (sync_playwright() as p, bb.serve(run_dir, ARTIFACTS / "streamlit-server-targets.log") as url, bb.browser(p) as page,
              bb.screenshot_on_failure(page, ARTIFACTS / "dashboard-targets-failure.png")):
            page.goto(url)
            page.wait_for_selector('h1:has-text("Runs")')
            bb.wait_until(page)
            page.get_by_role("textbox", name="Validation file(s) of the new target, one per line").fill(str(other))
            page.get_by_role("textbox", name="Target name").fill("animals")
            page.get_by_role("button", name="Add the target").click()
            page.get_by_role("button", name="Open animals").wait_for(timeout=240_000)  # the job panel refreshes every 2 s
            assert jobs.job_status(run_dir, "add-target").state == "complete"
            page.get_by_role("button", name="Open animals").click()
            bb.wait_until(page)
            sidebar = page.locator('[data-testid="stSidebar"]')
            sidebar.get_by_text("validation (animals)", exact=False).wait_for()
            assert len(open_run(run_dir).targets) == 2 and open_run(run_dir).targets[-1] == "animals"
            shot(page, "13-runs-target-added")

            goto_view(page, "Compare")
            page.get_by_role("heading", name="Across targets").wait_for()
            shot(page, "14-compare-across-targets")

            goto_view(page, "Export")
            page.get_by_text("Serve several targets").click()
            # wait for the rerun that draws the combined selection (its default file name), or the fill below is reset by it
            bb.wait_until(page, "() => [...document.querySelectorAll('input')].some(i => i.value.includes('-combined-'))")
            page.get_by_role("textbox", name="Write to path").fill(str(out))
            page.get_by_role("button", name="Write", exact=True).click()
            page.get_by_text("Wrote", exact=False).wait_for()
            shot(page, "15-export-combined")

            goto_view(page, "Evaluate")
            page.get_by_role("textbox", name="Held-out test file").fill(str(test))
            page.get_by_role("button", name="Evaluate the current selection").click()
            page.get_by_text("Evaluating in the background", exact=False).wait_for()
            finish_job(run_dir, "evaluate")
            page.wait_for_selector(".js-plotly-plot", timeout=30_000)  # the page redraws itself when the job ends: no reload
            bb.wait_until(page)
            shot(page, "16-evaluate")
    finally:
        os.environ.pop("GIST_ALLOWED_DIRS", None)
    targets = open_run(run_dir).targets
    manifest = json.loads(out.with_name(out.name + ".manifest.json").read_text())
    assert manifest["method"] == "combined" and [p["target"] for p in manifest["method_info"]["parts"]] == targets
    expected = combine(run_dir, [Part(t, "gist", 6, 1) for t in targets], 2, edits=[])
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == expected.ids
    from gist_backend.evaluate import past_evaluations

    (result,) = past_evaluations(open_run(run_dir))  # evals/ also holds the job's progress.json
    assert result["target"] == "animals" and [a["name"] for a in result["arms"]][:2] == ["gist-r6", "base"]
