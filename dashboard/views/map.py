"""Map: UMAP of the pool's GIST coordinates; lasso or box a region to read its examples, ranked, and include or exclude them."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import streamlit as st

from dashboard import backend, events, filters, jobs, mapjobs, session, ui
from dashboard.detail import detail_pane
from dashboard.figures import MAP_BINS, POINTS_UP_TO
from gist_backend.curation.maps import FIT_SAMPLE

COLOURS = ("score", "source", "selection state")
REGION_ROWS = 200  # rows of a region listed beside the map (the rest: "Show in Examples")

run = ui.require_run()
n_pool = run.train.height
ui.header("Map", "Each pool example is placed by UMAP from its GIST coordinates (crosses: validation examples; stars: sub-task centroids). "
                 "Lasso or box a region to list its examples, best first, and read or edit them.")  # fmt: skip


def _fit_words() -> str:
    """What a fit of this pool does, in words."""
    if n_pool <= FIT_SAMPLE:
        return f"UMAP of {n_pool:,} points"
    return f"UMAP of {FIT_SAMPLE:,} sampled points, the other {n_pool - FIT_SAMPLE:,} placed from their nearest fitted neighbours"


def waiting_panel() -> None:
    """Progress of the fit the view waits for; reruns the app when the map is ready (a polling fragment)."""
    state = mapjobs.map_state(run, session.rank())
    if state.waiting is None:
        st.rerun(scope="app")
    if state.waiting == "background":
        job = state.job
        since = job.progress.get("updated") if job else None
        st.info(f"The map is being computed in the background by `gist-curate map` (started when the compute completed; pid {job.pid if job else '—'}): "
                f"{_fit_words()}. Running for {jobs.format_age(since).removesuffix(' ago')}. This view waits for it rather than starting "
                "a second fit, and shows the map as soon as it is cached; the other views stay usable.", icon=":material/hourglass_top:")  # fmt: skip
        st.caption(f"Stage: {session.escape(job.progress.get('stage', 'starting') if job else 'starting')} · log: {session.code(run.path / 'map.log')}")
    else:
        st.info(f"Computing the map at rank {session.rank()} in the background ({_fit_words()}; it is cached in the run once done). "
                + (f"Showing the map of rank {state.rank} meanwhile." if state.xy is not None else "Other views stay usable meanwhile."),
                icon=":material/hourglass_top:")  # fmt: skip


def _selected_rows(event, xy: dict, map_rank: int, figure: str) -> tuple[np.ndarray, list[dict], bool]:
    """(rows, regions, kept): rows inside the drawn regions (every pool example, also those a raster cell stands for),
    else the points picked. A region stays when the chart is redrawn for a new rank or colouring (Streamlit then
    starts the chart afresh, without the selection) and goes when the user clears it on the chart it was drawn on."""
    ss, key = st.session_state, backend.run_key(run)
    regions = events.selection_regions(event)
    if regions:
        ss["map_region"] = {"regions": regions, "map_rank": map_rank, "drawn_on": figure, "run": key}
        return mapjobs.region_rows(run, map_rank, xy, regions), regions, False
    stored = ss.get("map_region")
    if stored and stored["run"] == key and stored["map_rank"] == map_rank and stored["drawn_on"] != figure:
        return mapjobs.region_rows(run, map_rank, xy, stored["regions"]), stored["regions"], True
    ss.pop("map_region", None)
    return events.selection_rows(event, n_pool), [], False


def map_panel(map_rank: int, xy: dict) -> None:
    """The map and the region's examples beside it; a fragment, so a selection reruns only this part of the page."""
    left, right = st.columns([3, 2], gap="medium")
    with left:
        colour = st.segmented_control("Colour by", COLOURS, key="map_colour", required=True) or COLOURS[0]
        try:
            fig = mapjobs.map_figure(run, map_rank, xy, colour)
        except ValueError as err:  # no selection to colour by (e.g. more forced includes than the budget): colour by score
            session.show_error(err, "No selection at these settings")
            colour = COLOURS[0]
            fig = mapjobs.map_figure(run, map_rank, xy, colour)
        figure = mapjobs.figure_key(run, map_rank, colour)
        event = st.plotly_chart(fig, key="map_chart", on_select="rerun", selection_mode=("box", "lasso"),
                                config={"displaylogo": False, "modeBarButtonsToRemove": ["toImage"]})  # fmt: skip
        method = backend.score_method(backend.method(run))
        drawn = (f"{n_pool:,} examples binned into {MAP_BINS[0]}×{MAP_BINS[1]} cells, each coloured by the "
                 + ("mean score" if colour == "score" else "most common source" if colour == "source" else "rarest selection state")
                 + " of its examples (hover for the count); a region takes every example inside it.") if n_pool > POINTS_UP_TO else "Hover a point for its id."  # fmt: skip
        st.caption(f"Layout: rank {map_rank}. Colour: {colour}" + (f" ({session.METHOD_LABELS[method]}, rank {session.rank()})" if colour == "score" else "")
                   + f". {drawn} Drag to lasso, or pick the box tool in the toolbar; double-click clears.")  # fmt: skip
    rows, regions, kept = _selected_rows(event, xy, map_rank, figure)
    with right:
        if kept:
            c = st.columns([3, 1], vertical_alignment="center")
            c[0].caption("The region drawn before the map was recoloured (its outline is not redrawn).")
            c[1].button("Clear", key="map_clear", icon=":material/close:", width="stretch", on_click=st.session_state.pop, args=("map_region", None))
        region_panel(rows, regions, map_rank, colour)


def region_panel(rows: np.ndarray, regions: list[dict], map_rank: int, colour: str) -> None:
    """The selected region: counts, include / exclude / reset, Show in Examples, its examples ranked, and one in detail."""
    ss = st.session_state
    if not len(rows):
        st.markdown("**No region selected.** Lasso or box a region of the map: its examples are listed here, best first, "
                    "with the same detail pane as the Examples view.")  # fmt: skip
        return
    method = backend.method(run)
    scores = backend.scores(run, backend.score_method(method))
    order, positions = backend.ordering(run, method)
    try:
        selected = backend.selected_mask(run)
    except ValueError as err:  # e.g. more forced includes than the budget: keep the map usable to fix it
        session.show_error(err, "No selection at these settings")
        selected = np.zeros(n_pool, dtype=bool)
    in_region = np.zeros(n_pool, dtype=bool)
    in_region[rows] = True
    edit_state = backend.edit_state(run)
    by_hand = {"include": 0, "exclude": 0}
    for example_id, op in edit_state.items():
        row = run.row_index.get(example_id)
        if row is not None and in_region[row]:
            by_hand[op] += 1
    parts = [f"**{len(rows):,} examples** in the region", f"{int(selected[rows].sum()):,} currently selected"]
    parts += [f"{n:,} {op}d by hand" for op, n in by_hand.items() if n]
    st.markdown(" · ".join(parts))
    origin = {"rank": session.rank(), "map_rank": map_rank, "colour": colour, "modes": [g["kind"] for g in regions] or ["points"], "count": len(rows)}
    for col, op in zip(st.columns(3), ("include", "exclude", "reset")):
        if col.button(f"{op.capitalize()} {len(rows):,}", key=f"map_{op}", width="stretch", type="primary" if op == "exclude" else "secondary"):
            backend.add_edit(run, op, run.train["id"].gather(rows.astype(np.int64)).to_list(), "map", origin)
            st.toast(f"{op}: {len(rows):,} examples from the map")
            st.rerun(scope="app")
    label = f"map region: {len(rows):,} examples ({', '.join(origin['modes'])} on the rank-{map_rank} map)"
    if st.button("Show them in Examples", key="map_to_examples", icon=":material/table_rows:", width="stretch",
                 help="Open the Examples view filtered to this region (search and filter further there; clear the filter to leave it)."):  # fmt: skip
        ss["f_map"] = {"rows": rows.copy(), "label": label, "origin": origin, "run": backend.run_key(run)}
        st.switch_page("views/examples.py")
    ranked = filters.ranked_rows(order, in_region)
    view = ranked[:REGION_ROWS]
    region_key = hashlib.sha1(json.dumps(regions, sort_keys=True).encode() + rows[:64].tobytes()).hexdigest()[:10]  # the region, not its order
    table = filters.ranked_table(run.train, run.text, view, positions, scores, None, selected, edit_state, preview_chars=100)
    event = st.dataframe(table, key=f"map_tbl_{region_key}_{session.rank()}_{method}", hide_index=True, on_select="rerun",
                         selection_mode="single-row", height=260, width="stretch",
                         column_config={"position": st.column_config.NumberColumn("position", width="small", help="Position in the full ranking"),
                                        "score": st.column_config.NumberColumn("score", format="%.3f", width="small"),
                                        "included": st.column_config.CheckboxColumn("included?", width="small"),
                                        "text": st.column_config.TextColumn("text", width="medium")})  # fmt: skip
    st.caption(f"The region's examples by {session.METHOD_LABELS[backend.score_method(method)]} at rank {session.rank()}"
               + (f" (the top {REGION_ROWS} of {len(rows):,}; *Show them in Examples* for all)." if len(rows) > REGION_ROWS else "."))  # fmt: skip
    picked = event["selection"]["rows"] if event else []
    if picked:  # the row picked stays in the detail pane while the region does (a new rank re-sorts the table)
        ss["map_detail_pick"] = (region_key, table["id"][picked[0]])
    pick = ss.get("map_detail_pick")
    detail = pick[1] if pick and pick[0] == region_key else table["id"][0]  # else the region's best example
    row = backend.row_of(run, detail)
    if row is not None:
        detail_pane(run, detail, int(positions[row]), float(scores[row]), bool(selected[row]), key="map_detail")


state = mapjobs.map_state(run, session.rank())
if state.waiting:
    st.fragment(waiting_panel, run_every=2)()
elif state.error is not None:
    session.show_error(state.error, "The map could not be computed")
if state.xy is None:
    st.stop()
if state.rank != session.rank() and not state.waiting:
    c = st.columns([4, 1], vertical_alignment="center")
    c[0].caption(f"The layout is the map of rank {state.rank}; colours and the region's ranking follow the slider (rank {session.rank()}). "
                 f"A layout of rank {session.rank()} means a new fit ({_fit_words()}).")  # fmt: skip
    if c[1].button(f"Fit the rank-{session.rank()} layout", key="map_fit", icon=":material/refresh:", width="stretch"):
        mapjobs.map_state(run, session.rank(), fit=True)
        st.rerun()
st.fragment(map_panel)(state.rank, state.xy)
