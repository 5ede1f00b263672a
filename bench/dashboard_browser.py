"""The dashboard in a real browser: what a curator waits for, on a synthetic run of ``--pool N`` examples.

Drives Debian chromium (/usr/bin/chromium, headless, no GPU: WebGL is software; ``playwright install`` is never
used) with Playwright against ``gist-curate serve``, and times each action from the user's input until its result
is on screen and the app is idle (no script running, nothing stale; polled every animation frame):

  browser_open_s             a new browser profile opens the dashboard on a running server: until the first page
                             is drawn with the run open (the sidebar's selection count shown)
  browser_rank_change_s      one step of the sidebar's rank slider on the Examples view: until the header and the
                             ranked table show the new rank
  browser_map_select_s       a lasso on the Map view: until the region's count and its ranked examples show
  browser_export_s           Download JSONL on the Export view: until the file has downloaded
  browser_rank_change_map_s  one rank step on the Map with a region selected: until the map is recoloured and the
                             region's table re-ranked

Opening is measured three ways on each of ``--repeats`` fresh servers: right after the server's health check (a
new profile; the server's warm-up still running: ``browser_open_cold_s``), then a second new profile
(``browser_open_s``), then that browser reloading (``browser_open_reload_s``); the same three on a one-line
Streamlit app give Streamlit's own floor (``streamlit_floor_open_*``). Every figure is the median of
``--repeats`` samples (all kept in the JSON), and each result is checked: the table's rank, the map's count
against ``filters.points_in_region`` on the cached map, the download's size against ``select``.

The synthetic run (``synthetic.synthetic_run``, the real run format) is built once under ``--work-dir`` and
reused. Its map at rank k_max is computed before any timing (``maps.umap_map(run, k_max)``, as the background
``gist-curate map`` job that compute starts would) and other cached maps are removed, so the Map view is timed
drawing and selecting, not fitting UMAP. Curation edits of the run are cleared first. The 1-minute load average
is recorded with every sample, and ``uptime`` before and after.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.browser import (  # noqa: E402
    ARGS, CHROMIUM, browser, deploy_button_shown, goto_view, load, screenshot_on_failure, serve, server_times, wait_for_quiet_cpu, wait_until,
)
from bench.common import machine, result_lines, table, write_json  # noqa: E402

SLIDER = '[data-testid="stSidebar"] [data-testid="stSlider"] input[type="range"]'
REGION = re.compile(r"([\d,]+) examples? in the region")
REGION_JS = """() => { for (const el of document.querySelectorAll('[data-testid="stMarkdownContainer"]')) {
                         const m = el.innerText.match(/([\\d,]+) examples? in the region/); if (m) return m[0]; } return null; }"""


def sidebar_rank(page) -> int:
    """The value of the sidebar rank slider."""
    return int(page.locator(SLIDER).first.input_value())


OPENED_JS = ("() => !!document.querySelector('h1') && [...document.querySelectorAll('[data-testid=\"stSidebar\"] [data-testid=\"stCaptionContainer\"]')]"
             ".some(e => /Selected [\\d,]+ of/.test(e.innerText))")  # fmt: skip
FLOOR_APP = """import streamlit as st
st.title("Runs")
st.sidebar.caption("Selected 1 of 1 examples")
"""


def time_open(page, url: str) -> float:
    """Seconds from navigating to the dashboard until the first page is drawn with the run open (the sidebar's selection count)."""
    t0 = time.perf_counter()
    page.goto(url)
    wait_until(page, OPENED_JS)
    return time.perf_counter() - t0


def open_samples(playwright, run_dir: Path, log: Path, app: Path | None = None) -> dict[str, float]:
    """One server start: the first open right after its health check (a new browser profile; server caches cold), a
    second new profile once the machine is quiet again (warm server, its background loading done; empty browser
    cache), and that browser reloading (both warm).

    With ``app`` (a one-line Streamlit script) the same is measured on it instead: Streamlit's own floor.
    """
    out = {"load_1m": load()}
    with serve(run_dir, log, app=app) as url:
        with browser(playwright) as page:
            out["cold"] = time_open(page, url)
        # a running server has finished loading in the background what the first page started (warmup.prefetch)
        out["waited_for_quiet_s"] = wait_for_quiet_cpu()
        with browser(playwright) as page:
            out["first_visit"] = time_open(page, url)
            out["reload"] = time_open(page, url)
    return out


RANK_SHOWN_JS = {  # the view shows the new rank r everywhere it is drawn
    "examples": "(r) => [...document.querySelectorAll('[data-testid=\"stCaptionContainer\"]')].some(e => e.innerText.includes(`at rank ${r}:`))"
                " && !!document.querySelector('[data-testid=\"stDataFrame\"]')",
    "map": "(r) => { const c = [...document.querySelectorAll('[data-testid=\"stCaptionContainer\"]')].map(e => e.innerText);"
           " return c.some(t => t.includes(`examples by`) && (t.includes(`at rank ${r} `) || t.includes(`at rank ${r}.`)))"
           " && c.some(t => t.includes(`, rank ${r})`)) && !!document.querySelector('.js-plotly-plot'); }",
}  # fmt: skip


def step_rank(page, view: str = "examples") -> tuple[float, int]:
    """One ArrowLeft on the rank slider: (seconds until the view shows the new rank, the new rank).

    Examples: the header and the ranked table. Map: the map recoloured (its caption) and the region's ranked table.
    """
    thumb = page.locator(SLIDER).first
    new = sidebar_rank(page) - 1
    thumb.focus()
    t0 = time.perf_counter()
    thumb.press("ArrowLeft")
    wait_until(page, RANK_SHOWN_JS[view], new)
    return time.perf_counter() - t0, new


def plot_box(page) -> dict:
    """Bounding box of the map's plotting area (Plotly's drag layer)."""
    box = page.locator(".js-plotly-plot .nsewdrag").first.bounding_box()
    if not box:
        raise RuntimeError("the map's plotting area was not found")
    return box


def draw_lasso(page, polygon: list[tuple[float, float]]) -> float:
    """Drag a lasso through ``polygon`` (fractions of the plotting area); returns perf_counter() at mouse release."""
    box = plot_box(page)
    x0, y0, w, h = box["x"], box["y"], box["width"], box["height"]
    page.mouse.move(x0 + polygon[0][0] * w, y0 + polygon[0][1] * h)
    page.mouse.down()
    for fx, fy in polygon[1:] + polygon[:1]:
        page.mouse.move(x0 + fx * w, y0 + fy * h, steps=6)
    t0 = time.perf_counter()
    page.mouse.up()
    return t0


def clear_selection(page) -> None:
    """Double-click an empty corner of the map (Plotly's deselect) and wait until the region panel is empty again."""
    if page.evaluate(REGION_JS) is None:
        return
    box = plot_box(page)
    page.mouse.dblclick(box["x"] + 0.03 * box["width"], box["y"] + 0.03 * box["height"])
    wait_until(page, f"() => ({REGION_JS})() === null")


def plotly_regions(page) -> list[dict]:
    """The selection regions the map holds now, in data coordinates (as sent to the server)."""
    shapes = page.evaluate("() => (document.querySelector('.js-plotly-plot').layout.selections || [])"
                           ".map(s => ({type: s.type, path: s.path || null, x0: s.x0, x1: s.x1, y0: s.y0, y1: s.y1}))")  # fmt: skip
    out = []
    for s in shapes:
        if s["type"] == "rect":
            out.append({"kind": "box", "x": [s["x0"], s["x1"]], "y": [s["y0"], s["y1"]]})
        elif s["path"]:
            pts = [tuple(map(float, p.split(","))) for p in s["path"].replace("M", "").replace("Z", "").split("L")]
            out.append({"kind": "lasso", "x": [p[0] for p in pts], "y": [p[1] for p in pts]})
    return out


def region_count(page) -> int | None:
    """The selected count the Map view shows, or None."""
    text = page.evaluate(REGION_JS)
    return int(REGION.match(text).group(1).replace(",", "")) if text else None


def lasso_polygon(i: int) -> list[tuple[float, float]]:
    """The i-th test lasso: a 24-vertex ellipse at a different place each time (fractions of the plotting area)."""
    import math

    cx, cy, rx, ry = (0.42, 0.45, 0.2, 0.22) if i % 3 == 0 else (0.6, 0.55, 0.17, 0.2) if i % 3 == 1 else (0.35, 0.6, 0.14, 0.16)
    return [(cx + rx * math.cos(2 * math.pi * k / 24), cy + ry * math.sin(2 * math.pi * k / 24)) for k in range(24)]


def select_on_map(page, i: int, train_xy) -> tuple[float, int, int | None]:
    """A lasso on the Map: (seconds until the count shows, the count shown, the count ``points_in_region`` gives for it)."""
    from dashboard.filters import points_in_region

    clear_selection(page)
    t0 = draw_lasso(page, lasso_polygon(i))
    wait_until(page, f"() => ({REGION_JS})() !== null")
    seconds = time.perf_counter() - t0
    regions = plotly_regions(page)
    expected = int(points_in_region(train_xy, regions[0]).sum()) if len(regions) == 1 else None
    return seconds, region_count(page), expected


def export_download(page, out_dir: Path) -> tuple[float, int]:
    """Click Download JSONL: (seconds until the file is downloaded, its number of records)."""
    button = page.get_by_role("button", name=re.compile("Download JSONL"))
    with page.expect_download(timeout=300_000) as info:
        t0 = time.perf_counter()
        button.click()
    path = info.value.path()
    seconds = time.perf_counter() - t0
    target = out_dir / "export.jsonl"
    shutil.copyfile(path, target)
    with open(target, "rb") as f:
        return seconds, sum(1 for line in f if line.strip())


def prepare_run(work: Path, n: int, k_max: int, n_val: int, n_ckpt: int) -> tuple[Path, dict]:
    """The synthetic run (built once, reused), edits cleared, its map at rank k_max computed; (path, facts)."""
    from bench.dashboard import ensure_run
    from gist_backend.curation.maps import umap_map
    from gist_backend.runs import open_run

    run_dir = work / f"synthetic-{n}-k{k_max}-c{n_ckpt}"
    build_s, reused = ensure_run(run_dir, n, n_val, k_max, n_ckpt)
    (run_dir / "edits.json").unlink(missing_ok=True)
    run = open_run(run_dir)
    for other in (run_dir / "maps").glob("umap-*.safetensors"):  # only the map compute's background job makes
        if other.name != f"umap-{run.target}-r{run.k_max}.safetensors":
            other.unlink()
    t0 = time.perf_counter()
    umap_map(run, run.k_max)
    return run_dir, {"n": n, "k_max": run.k_max, "n_ckpt": n_ckpt, "n_val": n_val, "build_s": build_s, "reused_run": reused,
                     "map_s": round(time.perf_counter() - t0, 3)}  # fmt: skip


def bench(run_dir: Path, repeats: int, out_dir: Path) -> dict:
    """Every browser timing on one run (see the module docstring)."""
    from playwright.sync_api import sync_playwright

    from gist_backend.curation import select
    from gist_backend.curation.maps import cached_map
    from gist_backend.runs import open_run

    run = open_run(run_dir)
    train_xy = cached_map(run, run.k_max)["train_xy"]
    log = out_dir / "server.log"
    log.unlink(missing_ok=True)
    samples: dict[str, list] = {"browser_open_s": [], "browser_rank_change_s": [], "browser_map_select_s": [], "browser_export_s": [],
                                "browser_rank_change_map_s": []}  # fmt: skip
    opens: dict[str, list] = {"dashboard": [], "streamlit_floor": []}
    checks: dict = {}
    floor_app = out_dir / "floor" / "floor_app.py"
    floor_app.parent.mkdir(exist_ok=True)
    floor_app.write_text(FLOOR_APP)
    with sync_playwright() as p:
        for _ in range(repeats):  # each: a new server, then new browser profiles
            opens["dashboard"].append(open_samples(p, run_dir, log))
            opens["streamlit_floor"].append(open_samples(p, run_dir, out_dir / "floor" / "server.log", app=floor_app))
            samples["browser_open_s"].append({"s": opens["dashboard"][-1]["first_visit"], "load_1m": opens["dashboard"][-1]["load_1m"]})
        with serve(run_dir, log) as url, browser(p) as page, screenshot_on_failure(page, out_dir / "failure.png"):
            page.goto(url)
            page.wait_for_selector('h1:has-text("Runs")')
            wait_until(page)
            checks["deploy_button_shown"] = deploy_button_shown(page)
            goto_view(page, "Examples")
            for _ in range(repeats):
                before = load()
                seconds, rank = step_rank(page)
                samples["browser_rank_change_s"].append({"s": seconds, "rank": rank, "load_1m": before})
            rank = sidebar_rank(page)
            goto_view(page, "Map")
            page.wait_for_selector(".js-plotly-plot", timeout=300_000)
            # a pool of up to mapjobs.AUTO_FIT_UP_TO is fitted at the new rank at once: wait for that map (not timed)
            wait_until(page, "() => ![...document.querySelectorAll('[data-testid=\"stAlert\"]')].some(e => e.innerText.includes('Computing the map'))",
                       timeout=600)  # fmt: skip
            for i in range(repeats):
                before = load()
                seconds, count, expected = select_on_map(page, i, train_xy)
                samples["browser_map_select_s"].append({"s": seconds, "count": count, "expected": expected, "load_1m": before})
            page.screenshot(path=str(out_dir / "map-selection.png"), full_page=True)
            for _ in range(repeats):  # the region stays; the map is recoloured and the region re-ranked
                before = load()
                seconds, rank = step_rank(page, "map")
                if region_count(page) != samples["browser_map_select_s"][-1]["count"]:
                    raise AssertionError("the map's region changed with the rank")
                samples["browser_rank_change_map_s"].append({"s": seconds, "rank": rank, "load_1m": before})
            rank = sidebar_rank(page)
            goto_view(page, "Export")
            expected = len(select(run, method="gist", rank=rank, budget="5%", edits=[]).ids)
            for _ in range(repeats):
                before = load()
                seconds, records = export_download(page, out_dir)
                samples["browser_export_s"].append({"s": seconds, "records": records, "expected": expected, "load_1m": before})
    checks["server_script_runs"] = server_times(log)[-40:]
    checks["mismatches"] = [f"{name}: shown {s.get('count', s.get('records'))}, expected {s['expected']}" for name, got in samples.items()
                            for s in got if "expected" in s and s["expected"] is not None and s["expected"] != s.get("count", s.get("records"))]  # fmt: skip
    medians = {k: statistics.median(s["s"] for s in v) for k, v in samples.items()}
    for kind, prefix in (("dashboard", "browser_open"), ("streamlit_floor", "streamlit_floor_open")):
        for variant in ("cold", "reload") if kind == "dashboard" else ("cold", "first_visit", "reload"):
            medians[f"{prefix}_{variant}_s"] = statistics.median(o[variant] for o in opens[kind])
    return {"samples": samples, "opens": opens, "checks": checks, "medians": medians}


def main(argv: list[str] | None = None) -> dict:
    """Run the browser benchmark on one pool size; prints the table, JSON and RESULT lines."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pool", type=int, default=50_000, help="examples in the synthetic pool")
    p.add_argument("--k-max", type=int, default=128)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--n-ckpt", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work-dir", default=str(ROOT / "bench" / "out" / "dashboard_browser"), help="where the synthetic runs live (kept, reused)")
    p.add_argument("--json", help="write the results here (default bench/out/dashboard_browser-<N>.json)")
    args = p.parse_args(argv)
    if not CHROMIUM.exists():
        raise SystemExit(f"{CHROMIUM} is missing: apt-get install chromium (this benchmark never runs `playwright install`)")
    import torch

    torch.set_num_threads(1)
    work = Path(args.work_dir)
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    run_dir, facts = prepare_run(work, args.pool, args.k_max, args.n_val, args.n_ckpt)
    out_dir = work / f"browser-{args.pool}"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = bench(run_dir, args.repeats, out_dir)
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rows = [[name, result["medians"][name], ", ".join(f"{s['s']:.2f}" for s in result["samples"][name]),
             ", ".join(f"{s['load_1m']:.1f}" for s in result["samples"][name])] for name in result["samples"]]  # fmt: skip
    for kind, prefix in (("dashboard", "browser_open"), ("streamlit_floor", "streamlit_floor_open")):
        for variant in ("cold", "first_visit", "reload"):
            got = result["opens"][kind]
            rows.append([f"{prefix}_{variant}_s", statistics.median(o[variant] for o in got), ", ".join(f"{o[variant]:.2f}" for o in got),
                         ", ".join(f"{o['load_1m']:.1f}" for o in got)])  # fmt: skip
    print(f"pool {args.pool:,} (k_max {facts['k_max']}, {args.n_ckpt} checkpoints); seconds; {uptime_before}")
    print(table(rows, ["action", "median s", "samples s", "load (1 min) per sample"]))
    print(f"Deploy button shown: {result['checks']['deploy_button_shown']}; after: {uptime_after}")
    out = {"bench": "dashboard_browser", "machine": machine(), "uptime_before": uptime_before, "uptime_after": uptime_after,
           "run": facts, "chromium": str(CHROMIUM), "chromium_args": ARGS, **result}  # fmt: skip
    write_json(args.json or work.parent / f"dashboard_browser-{args.pool}.json", out)
    print(result_lines(result["medians"]))
    if result["checks"]["mismatches"]:
        raise SystemExit("wrong results on screen: " + "; ".join(result["checks"]["mismatches"]))
    return out


if __name__ == "__main__":
    main()
