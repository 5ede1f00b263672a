"""One selection serving several targets of a run: per-target quotas, or a round-robin by rank.

Each part names a target, a method, a rank (GIST methods) and a share of the budget. Every part ranks the pool
its own way (G2IS: its walk order); curation edits apply as in ``select`` (an edit scoped to a target only to
that target's part). "quotas" fills each part's share of the budget in turn (largest remainder), with its best
examples not taken yet, and when a part runs out the others fill its share; "round-robin" takes one example at
a time from the part furthest behind its share, so the best of every target comes first. The export manifest names every target, method, rank and share.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..methods.g2is import split_budget
from ..runs.store import open_run
from .budget import resolve_budget_note
from .edits import load_edits
from .selection import Selection, select

MODES = ("quotas", "round-robin")


@dataclass(frozen=True)
class Part:
    """One target's contribution: its method, rank and share of the budget."""

    target: str
    method: str = "gist"
    rank: int | None = None
    share: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "Part":
        """'mmlu:gist:32=60%' → Part("mmlu", "gist", 32, 0.6); method, rank and share are optional."""
        spec, _, share = text.partition("=")
        target, method, rank = (spec.split(":") + ["", ""])[:3]
        try:
            value = float(share[:-1]) / 100 if share.endswith("%") else float(share or 1.0)
            rank_value = int(rank) if rank else None
        except ValueError:
            value = rank_value = None
        if not target or value is None or not value > 0 or spec.count(":") > 2:
            raise ValueError(f"part {text!r}: write TARGET[:METHOD[:RANK]][=SHARE], e.g. mmlu:gist:32=60%")
        return cls(target, method or "gist", rank_value, value)


def combine(run_dir: str | Path, parts: list[Part], budget: int | float | str, *, mode: str = "quotas", edits: list[dict] | None = None) -> Selection:
    """The combined selection of ``parts`` (see the module docstring); ``edits=None`` reads the run's log."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if len({p.target for p in parts}) != len(parts) or not parts:
        raise ValueError("give each target once")
    edits = load_edits(run_dir) if edits is None else list(edits)
    runs = [open_run(run_dir, p.target) for p in parts]
    n = runs[0].train.height
    count, warning = resolve_budget_note(budget, n)
    # each part's own order, with its edits applied: a selection of the whole pool by that part's method
    own = [select(run, method=p.method, rank=p.rank, budget=count if p.method == "g2is" else n, edits=edits) for run, p in zip(runs, parts)]
    forced_in = sorted({run.row_index[i] for s, run in zip(own, runs) for i in s.forced_in})
    if len(forced_in) > count:
        raise ValueError(f"{len(forced_in)} examples are force-included but the budget is {count}; raise the budget or reset some includes")
    taken, chosen, by_part = set(forced_in), list(forced_in), [0] * len(parts)
    orders = [[int(r) for r in s.rows] for s in own]  # each part's own exclusions are already out of its order
    cursors = [0] * len(parts)
    goals = split_budget(max(0, count - len(forced_in)), [p.share for p in parts], earlier_first=True)

    def take(i: int) -> bool:
        while cursors[i] < len(orders[i]):
            row = orders[i][cursors[i]]
            cursors[i] += 1
            if row not in taken:
                taken.add(row)
                chosen.append(row)
                by_part[i] += 1
                return True
        return False

    if mode == "quotas":
        for i, goal in enumerate(goals):
            while by_part[i] < goal and take(i):
                pass
    active = set(range(len(parts)))  # round-robin; after quotas, the parts with examples left fill the share of those that ran out
    while len(chosen) < count and active:
        i = min(active, key=lambda j: (by_part[j] / parts[j].share, j))  # the part furthest behind its share
        if not take(i):
            active.discard(i)
    notes = [warning] if warning else []
    if len(chosen) < count:
        notes.append(f"selected {len(chosen)} of the budget {count}: the parts ran out of examples not excluded or already taken")
    rows = np.asarray(chosen, dtype=np.int64)
    info = {"mode": mode, "parts": [{"target": p.target, "method": p.method, "rank": s.rank, "share": p.share / sum(q.share for q in parts),
                                     "count": by_part[i]} for i, (p, s) in enumerate(zip(parts, own))]}  # fmt: skip
    return Selection(
        method="combined", rank=None, budget=count, ids=runs[0].train["id"].gather(rows).to_list(), rows=rows, scores=None,
        forced_in=[runs[0].train["id"][r] for r in forced_in], forced_out=sorted({i for s in own for i in s.forced_out}),
        capped={}, n_edits=len(edits), warnings=notes, info=info, target="+".join(p.target for p in parts),
    )  # fmt: skip
