"""Map: UMAP of the training coordinates at the current rank; lasso or box a region to include or exclude it."""

from __future__ import annotations

from concurrent.futures import CancelledError

import numpy as np
import streamlit as st

from dashboard import backend, events, filters, mapjobs, session, ui

COLOURS = ("score", "source", "selection state")
DENSITY_ABOVE = 100_000
WAIT_S = 2.0  # a cached map loads within this; longer means a fresh UMAP is running in the background

run = ui.require_run()
ui.header("Map", "Each point is a pool example placed by UMAP from its GIST coordinates at the current rank; crosses are validation examples, stars the sub-task centroids.")
job = mapjobs.map_job(run)
try:
    job.result(timeout=WAIT_S)
except TimeoutError:
    pass
except CancelledError:  # another session moved the rank of this run meanwhile: ask again
    job = mapjobs.map_job(run)
except Exception as err:  # the backend's reason, not a trace
    session.show_error(err, "The map could not be computed")
    st.stop()


def map_panel() -> None:
    """The map and its actions; a fragment, so selecting points does not redraw the rest of the app."""
    r = session.rank()
    if job.done():
        if st.session_state.pop("_map_waiting", None):
            st.rerun(scope="app")  # the map just finished: redraw without the polling timer
        map_rank, xy = r, job.result()
    else:
        st.session_state["_map_waiting"] = True
        latest = mapjobs.latest_map(run)
        st.info(f"Computing the map at rank {r} in the background (UMAP of {run.train.height:,} points; it is cached per rank once done). "
                + (f"Showing the map of rank {latest[0]} meanwhile." if latest else "Other views stay usable meanwhile."),
                icon=":material/hourglass_top:")  # fmt: skip
        if latest is None:
            return
        map_rank, xy = latest
    colour = st.segmented_control("Colour by", COLOURS, key="map_colour", required=True)
    fig = mapjobs.map_figure(run, map_rank, xy, colour, DENSITY_ABOVE)
    event = st.plotly_chart(fig, key="map_chart", on_select="rerun", selection_mode=("box", "lasso"),
                            config={"displaylogo": False, "modeBarButtonsToRemove": ["toImage"]})  # fmt: skip
    ids = run.train["id"].to_numpy()
    method = backend.score_method(backend.method(run))
    st.caption(
        f"Colour: {colour}{f' ({session.METHOD_LABELS[method]}, rank {r})' if colour == 'score' else ''}. "
        "Drag to lasso (or pick the box tool in the toolbar) to select a region, then include or exclude it below. "
        + (f"Above {DENSITY_ABOVE:,} points a density background is drawn under a sample of points; a region then covers every point inside it." if len(ids) > DENSITY_ABOVE else "")
    )
    chosen = events.selection_ids(event)
    regions = events.selection_regions(event)
    if len(ids) > DENSITY_ABOVE and regions:  # the drawn points are a sample: take every point inside the region
        inside = np.zeros(len(ids), dtype=bool)
        for region in regions:
            inside |= filters.points_in_region(xy["train_xy"], region)
        chosen = list(dict.fromkeys(chosen + ids[inside].tolist()))
    with st.container(border=True):
        if not chosen:
            st.markdown("**No points selected.** Lasso or box a region of the map.")
            return
        sel_mask = np.isin(ids, chosen)
        now_selected = backend.selected_mask(run)
        by_hand = backend.edit_state(run)
        n_in, n_out = (sum(by_hand.get(i) == op for i in chosen) for op in ("include", "exclude"))
        by_hand_text = [f"{n:,} {op} by hand" for n, op in ((n_in, "included"), (n_out, "excluded")) if n]
        st.markdown(" · ".join([f"**{len(chosen):,} examples** in the region", f"{int(now_selected[sel_mask].sum()):,} currently selected", *by_hand_text]))
        origin = {"rank": r, "map_rank": map_rank, "colour": colour, "modes": [g["kind"] for g in regions] or ["points"], "count": len(chosen)}
        cols = st.columns(3)
        for col, op in zip(cols, ("include", "exclude", "reset")):
            if col.button(f"{op.capitalize()} {len(chosen):,}", key=f"map_{op}", width="stretch", type="primary" if op == "exclude" else "secondary"):
                backend.add_edit(run, op, chosen, "map", origin)
                st.toast(f"{op}: {len(chosen):,} examples from the map")
                st.rerun(scope="app")


st.fragment(map_panel, run_every=None if job.done() else 2)()
