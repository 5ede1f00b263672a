"""Curation edits: persistence, step-by-step undo, the implied state, validation, and crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from gist_backend.curation import edits as curation
from gist_backend.runs import files as runs_files
from gist_backend.curation.edits import add_edit, edit_state, load_edits, undo
from gist_backend.runs import RunError, open_run
from gist_backend.devkit.synthetic import synthetic_run

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return synthetic_run(tmp_path_factory.mktemp("cur") / "run", n_train=120, n_val=12, n_tasks=2, k_max=8, n_ckpt=1, n_sources=3)


@pytest.fixture
def fresh(run_dir):
    """The shared run with an empty edit log."""
    (run_dir / "edits.json").unlink(missing_ok=True)
    return run_dir


def test_edits_persist_and_undo_step_by_step(fresh):
    ids = open_run(fresh).train["id"].to_list()
    assert load_edits(fresh) == []
    add_edit(fresh, "include", ids[:3], {"kind": "row", "detail": "clicked"})
    add_edit(fresh, "exclude", [ids[2], ids[5]], {"kind": "filter", "detail": "n_tokens > 500"})
    edits = add_edit(fresh, "reset", [ids[0]], {"kind": "map", "detail": {"lasso": [[0, 0], [1, 1]], "rank": 8}})
    assert [e["op"] for e in edits] == ["include", "exclude", "reset"]
    assert load_edits(fresh) == edits  # persisted, reread identically

    data = json.loads((fresh / "edits.json").read_text())
    assert data["version"] == 1 and data["edits"] == edits
    for e in edits:
        assert set(e) == {"op", "ids", "time", "origin"}
        assert datetime.fromisoformat(e["time"]).utcoffset().total_seconds() == 0
    assert edits[2]["origin"] == {"kind": "map", "detail": {"lasso": [[0, 0], [1, 1]], "rank": 8}}

    assert edit_state(edits) == {ids[1]: "include", ids[2]: "exclude", ids[5]: "exclude"}
    assert edit_state(undo(fresh)) == {ids[0]: "include", ids[1]: "include", ids[2]: "exclude", ids[5]: "exclude"}
    assert edit_state(undo(fresh)) == {i: "include" for i in ids[:3]}
    assert undo(fresh) == [] and load_edits(fresh) == []
    assert undo(fresh) == []  # nothing left to undo is not an error


def test_edit_state_later_wins_and_reset_removes():
    edits = [
        {"op": "include", "ids": ["a", "b"], "origin": {"kind": "api"}},
        {"op": "exclude", "ids": ["b", "c"], "origin": {"kind": "api"}},
        {"op": "reset", "ids": ["a"], "origin": {"kind": "api"}},
        {"op": "include", "ids": ["c"], "origin": {"kind": "api"}},
    ]
    assert edit_state(edits) == {"b": "exclude", "c": "include"}


def test_validation_errors(fresh):
    run = open_run(fresh)
    with pytest.raises(ValueError, match="not in run"):
        add_edit(run, "include", ["no-such-id", run.train["id"][0]], "api")
    with pytest.raises(ValueError, match="op must be one of"):
        add_edit(fresh, "undo", ["x"], "api")
    with pytest.raises(ValueError, match="origin kind"):
        add_edit(fresh, "include", ["x"], {"kind": "mouse"})
    with pytest.raises(TypeError, match="single string"):
        add_edit(fresh, "include", "abc", "api")
    with pytest.raises(ValueError, match="at least one"):
        add_edit(fresh, "include", [], "api")
    with pytest.raises(RunError, match="no such run"):
        add_edit(fresh / "missing", "include", ["x"], "api")
    assert load_edits(fresh) == []  # nothing was written by the failed calls
    edits = add_edit(run, "exclude", [run.train["id"][1], run.train["id"][1]], "api")  # a Run: ids checked and deduplicated
    assert edits[-1]["ids"] == [run.train["id"][1]] and edits[-1]["origin"] == {"kind": "api", "detail": ""}


def test_corrupt_log_is_reported_by_name(fresh):
    (fresh / "edits.json").write_text('{"version": 1, "edits": [{"op": "incl')
    with pytest.raises(RunError, match="edits.json"):
        load_edits(fresh)
    (fresh / "edits.json").write_text('{"version": 1, "edits": [{"op": "boom", "ids": []}]}')
    with pytest.raises(RunError, match="malformed edit"):
        load_edits(fresh)


def test_failed_write_keeps_earlier_edits(fresh, monkeypatch):
    add_edit(fresh, "include", ["a"], "api")
    before = (fresh / "edits.json").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(runs_files.os, "replace", crash)  # the rename that would publish the new log
    with pytest.raises(OSError, match="disk full"):
        add_edit(fresh, "exclude", ["b"], "api")
    with pytest.raises(OSError, match="disk full"):
        undo(fresh)
    monkeypatch.undo()
    assert (fresh / "edits.json").read_bytes() == before
    assert [p.name for p in fresh.iterdir() if p.name.startswith(".edits.json.")] == []  # no temp files left behind
    assert edit_state(load_edits(fresh)) == {"a": "include"}


WRITER = """
import sys
from gist_backend.curation.edits import add_edit
i = 0
while True:
    add_edit(sys.argv[1], "include" if i % 2 else "exclude", [f"x{i}", f"y{i}"], {"kind": "cli", "detail": f"edit {i}"})
    i += 1
"""


def test_killed_writer_leaves_a_valid_log(fresh):
    """SIGKILL a process that writes edits in a tight loop: the log is valid and holds a prefix of its edits."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(fresh)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if len(json.loads((fresh / "edits.json").read_text())["edits"]) >= 20:
                    break
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass  # the reader may race the rename; the writer never leaves a partial file in place
            time.sleep(0.02)
        else:
            pytest.fail(f"writer produced no edits: {proc.stderr.read().decode() if proc.poll() is not None else 'still running'}")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    edits = load_edits(fresh)
    assert len(edits) >= 20
    for i, e in enumerate(edits):
        assert e["ids"] == [f"x{i}", f"y{i}"] and e["origin"]["detail"] == f"edit {i}"
    # The lock died with the writer: a new edit goes through.
    assert len(add_edit(fresh, "reset", ["x0"], "api")) == len(edits) + 1


def test_log_is_version_checked(fresh):
    (fresh / "edits.json").write_text(json.dumps({"version": 99, "edits": []}))
    with pytest.raises(RunError, match="version-1"):
        load_edits(fresh)
    assert curation.EDITS_FILE == "edits.json"
