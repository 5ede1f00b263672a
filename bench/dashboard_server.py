"""Server-side timings of the dashboard on a run: `python bench/dashboard_server.py --run-dir cache/<run>`.

Measures, with Streamlit's AppTest (no browser), the server-side wall and CPU time of the script
(recorded by app.py in session state): opening the run, each view (first visit and rerun), a
rank-slider change on the Examples view (new scores, selection and table), a box region on the Map
(counted, ranked and listed beside it), and the size of every Plotly figure sent to the browser.
What the browser shows is timed by ``bench/dashboard_browser.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"
VIEWS = ("runs", "spectrum", "coupling", "examples", "map", "compare", "export")


def _figure_sizes(at) -> dict[str, int]:
    """Bytes of each Plotly figure spec in the last run's output."""
    return {f"figure {i}": len(el.proto.spec.encode()) for i, el in enumerate(at.get("plotly_chart"))}


def _script(at) -> dict:
    """Server-side wall and CPU seconds of the app's last script run."""
    wall, cpu = at.session_state["_script_seconds"]
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}


def bench(run_dir: str, ranks: tuple[int, ...] = (8, 16, 32, 64, 100, 128), timeout: float = 600) -> dict:
    """Open the run, visit every view, move the rank slider; return the timings in seconds."""
    from streamlit.testing.v1 import AppTest

    from gist_backend.runs import open_run

    out: dict = {"run_dir": run_dir}
    t = time.perf_counter()
    run = open_run(run_dir)
    out["open_run_s"] = time.perf_counter() - t
    out["n_train"], out["k_max"] = run.train.height, run.k_max
    os.environ["GIST_RUN_DIR"] = str(Path(run_dir).resolve())
    at = AppTest.from_file(str(APP), default_timeout=timeout)
    at.run()
    out["first_page"] = _script(at)
    out["views"], out["figures"] = {}, {}
    for view in VIEWS[1:]:
        at.switch_page(f"views/{view}.py").run()
        first = _script(at)
        if view == "map":  # the UMAP runs in the background; wait for it (minutes on a large pool the first time)
            t = time.perf_counter()
            while not at.get("plotly_chart") and time.perf_counter() - t < timeout and not at.exception and not at.error:
                time.sleep(2)
                at.run()
            out["map_ready_s"] = round(time.perf_counter() - t, 1)
            first = _script(at)
        at.run()
        out["views"][view] = {"first": first, "rerun": _script(at), "errors": [e.value for e in at.error] + [str(e.value) for e in at.exception]}
        out["figures"][view] = _figure_sizes(at)
    at.switch_page("views/examples.py").run()
    k_ranks = [r for r in ranks if r <= run.k_max]
    rank_times = []
    for r in k_ranks:
        at.sidebar.slider(key="rank").set_value(r).run()
        rank_times.append({"rank": r, **_script(at)})
    out["rank_change_examples"] = rank_times
    at.text_input(key="f_text").set_value("python").run()
    out["text_search"] = _script(at)
    at.toggle(key="f_regex").set_value(True).run()
    at.text_input(key="f_text").set_value(r"pyth(on|ons)\b").run()
    out["regex_search"] = _script(at)
    at.text_input(key="f_text").set_value("").run()
    at.toggle(key="f_regex").set_value(False).run()
    at.switch_page("views/map.py").run()
    out["map_view"] = _script(at)
    at.run()
    out["map_rerun"] = _script(at)
    out["map_region"] = _map_region(at, run)
    return out


def _map_region(at, run) -> dict:
    """Server time of a box over the middle half of the map shown (its examples counted, ranked and listed)."""
    import numpy as np

    from gist_backend.curation.maps import latest_cached_map

    latest = latest_cached_map(run)
    if latest is None:
        return {"skipped": "no cached map"}
    xy = latest[1]["train_xy"]
    (x0, y0), (x1, y1) = np.percentile(xy, 25, axis=0), np.percentile(xy, 75, axis=0)
    box = {"xref": "x", "yref": "y", "x": [float(x0), float(x1)], "y": [float(y0), float(y1)]}
    at.session_state["map_chart"] = {"selection": {"points": [], "point_indices": [], "box": [box], "lasso": []}}
    at.run()
    shown = [m.value for m in at.markdown if "in the region" in m.value]
    return {**_script(at), "map_rank": latest[0], "shown": shown[:1]}


def main() -> None:
    """CLI entry."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args()
    print(json.dumps(bench(args.run_dir), indent=2, default=str))


if __name__ == "__main__":
    main()
