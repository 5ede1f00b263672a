"""A user's data is never the casualty: export guards, --overwrite, changed inputs, two writers, repeated ids,
and errors that say what to do instead of tracebacks (tests/RELIABILITY.md lists what each case showed before)."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gist_backend.cli import main as cli_main
from gist_backend.compute import ComputeConfig, compute
from gist_backend.curation import scores
from gist_backend.runs import RunError, open_run

torch.set_num_threads(1)
SMALL = dict(k_max=6, warmup_epochs=1, warmup_fraction=0.2, warmup_lr=1e-3, warmup_batch=4, max_len=64, shard_size=16)


def _config(model, pool, val, **changes) -> ComputeConfig:
    return ComputeConfig(model=str(model), train=[str(p) for p in (pool if isinstance(pool, list) else [pool])], val=[str(val)], **(SMALL | changes))


@pytest.fixture(scope="module")
def base(tiny_llama, tmp_path_factory):
    """A small finished run and its inputs (tests copy what they change)."""
    from gist_backend.devkit.tiny import make_toy_data

    root = tmp_path_factory.mktemp("safety")
    pool, val = make_toy_data(root / "data", n_train=24, n_val=8)
    run_dir = compute(_config(tiny_llama, pool, val), root / "run")
    return {"root": root, "pool": pool, "val": val, "run": Path(run_dir), "model": tiny_llama}


def _error(capsys, argv: list[str]) -> str:
    """Run the CLI expecting a clean failure (exit 2, one error line, no traceback); returns stderr."""
    capsys.readouterr()  # drop what earlier steps printed
    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------- 1. exports never overwrite a user's file


def test_export_refuses_inputs_run_files_and_existing_files(base, tmp_path, capsys):
    run, pool = base["run"], base["pool"]
    before = pool.read_bytes()
    mode = pool.stat().st_mode
    err = _error(capsys, ["select", "--run-dir", str(run), "--budget", "3", "--out", str(pool)])
    assert "is an input of run" in err and pool.read_bytes() == before and pool.stat().st_mode == mode
    link = tmp_path / "innocent.jsonl"
    link.symlink_to(pool)
    assert "is an input of run" in _error(capsys, ["select", "--run-dir", str(run), "--budget", "3", "--out", str(link), "--force"])
    assert pool.read_bytes() == before and link.is_symlink()
    manifest = (run / "manifest.json").read_bytes()
    for inside in (run / "manifest.json", run / "exports" / "sel.jsonl", run / "targets" / "val" / "x.jsonl"):
        assert "inside run folder" in _error(capsys, ["select", "--run-dir", str(run), "--budget", "3", "--out", str(inside), "--force"])
    assert (run / "manifest.json").read_bytes() == manifest and open_run(run)
    out = tmp_path / "sel.jsonl"
    cli_main(["select", "--run-dir", str(run), "--budget", "3", "--out", str(out)])
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()  # a normal file, not a 0600 temporary
    first = out.read_bytes()
    assert "already exists; pass --force" in _error(capsys, ["select", "--run-dir", str(run), "--budget", "5", "--out", str(out)])
    assert out.read_bytes() == first
    cli_main(["select", "--run-dir", str(run), "--budget", "5", "--out", str(out), "--force"])
    assert len(out.read_text().splitlines()) == 5
    assert "is a folder" in _error(capsys, ["select", "--run-dir", str(run), "--budget", "3", "--out", str(tmp_path)])
    assert "output path is empty" in _error(capsys, ["select", "--run-dir", str(run), "--budget", "3", "--out", " "])
    assert "is an input of run" in _error(capsys, ["scores", "--run-dir", str(run), "--out", str(base["val"]), "--force"])
    model_config = Path(base["model"]) / "config.json"  # the model folder is an input too
    before = model_config.read_bytes()
    assert "is an input of run" in _error(capsys, ["select", "--run-dir", str(run), "--budget", "3", "--out", str(model_config), "--force"])
    assert model_config.read_bytes() == before


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- 2. --overwrite starts from an empty run, atomically


def test_overwrite_recomputes_everything_and_keeps_the_old_run_until_done(base, tmp_path, capsys):
    from gist_backend.devkit.tiny import make_toy_data

    run = tmp_path / "run"
    shutil.copytree(base["run"], run)
    _, other_val = make_toy_data(tmp_path / "other", n_train=4, n_val=10, seed=5)
    changed = _config(base["model"], base["pool"], other_val, k_max=4, lora_rank=4)
    with pytest.raises(RunError, match="different options"):
        compute(changed, run)
    fresh = compute(changed, tmp_path / "fresh")
    from gist_backend.curation.edits import add_edit, load_edits

    edits = add_edit(run, "exclude", open_run(run).train["id"][:2].to_list(), "api")
    (run / "evals").mkdir()
    (run / "evals" / "old.json").write_text("{}")
    capsys.readouterr()
    compute(changed, run, overwrite=True)
    assert load_edits(run) == edits and not (run / "evals").exists()  # a curator's edits carry over, results of the old run do not
    assert "its curation edits kept; discarded: evals" in capsys.readouterr().out
    got, want = open_run(run), open_run(fresh)
    assert got.k_max == want.k_max == 4 and got.manifest["k_max"] == 4 and got.manifest["config"]["lora_rank"] == 4
    np.testing.assert_array_equal(got.val_coords, want.val_coords)
    np.testing.assert_allclose(scores(got, "gist"), scores(want, "gist"), atol=1e-6)
    assert not (tmp_path / ".run.overwrite").exists() and not (tmp_path / ".run.replaced").exists()


def _overwrite_child(args):
    cfg, run, marker = args
    import gist_backend.stages.passes as passes

    real = passes.pool_pass

    def pool_pass(*a, **k):  # the new run is under way: say so, then wait to be killed
        Path(marker).write_text("started")
        time.sleep(60)
        return real(*a, **k)

    passes.pool_pass = pool_pass
    import gist_backend.compute as c

    c.pool_pass = pool_pass
    compute(cfg, run, overwrite=True)


def test_killed_overwrite_leaves_the_old_run_readable(base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base["run"], run)
    old = scores(open_run(run), "gist")
    marker = tmp_path / "started"
    cfg = _config(base["model"], base["pool"], base["val"], k_max=3)
    # spawn, not fork: a child forked after torch's or polars' thread pools started can hang in them
    proc = multiprocessing.get_context("spawn").Process(target=_overwrite_child, args=((cfg, run, marker),))
    proc.start()
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists()
    np.testing.assert_array_equal(scores(open_run(run), "gist"), old)  # still the old run while the new one is computed
    from gist_backend.curation.edits import add_edit, load_edits

    edits = add_edit(run, "include", open_run(run).train["id"][:1].to_list(), "api")  # and a curator can still edit it
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    np.testing.assert_array_equal(scores(open_run(run), "gist"), old)
    compute(cfg, run, overwrite=True)  # the same command resumes the new run in its side folder, then swaps
    assert open_run(run).k_max == 3 and load_edits(run) == edits


# ---------------------------------------------------------------- 3. changed inputs are detected


def test_changed_pool_is_refused_naming_the_file(base, tmp_path, capsys):
    pool = tmp_path / "pool.jsonl"
    shutil.copy(base["pool"], pool)
    run = compute(_config(base["model"], pool, base["val"]), tmp_path / "run")
    lines = pool.read_text().splitlines()
    pool.write_text("\n".join(lines[:10]) + "\n")  # the user edits the pool after computing
    err = _error(capsys, ["compute", *_config(base["model"], pool, base["val"]).to_argv(), "--run-dir", str(run)])
    assert f"{pool} changed since run" in err and "--overwrite" in err
    out = tmp_path / "sel.jsonl"
    capsys.readouterr()
    cli_main(["select", "--run-dir", str(run), "--budget", "20", "--out", str(out)])
    printed = capsys.readouterr()
    assert "records copied from the run" in printed.out and f"note: {pool} changed since the run was computed" in printed.err
    exported = out.read_text().splitlines()
    original = base["pool"].read_text().splitlines()
    assert len(exported) == 20 and set(exported) <= set(original)  # the records the run was computed from


# ---------------------------------------------------------------- 4. one writer at a time


def _hold_lock(args):
    run, scope, ready = args
    from gist_backend.runs.lock import run_lock

    with run_lock(run, scope, "gist-curate compute (test)"):
        Path(ready).write_text("held")
        time.sleep(60)


def _start_holder(run: Path, scope: str, ready: Path):
    """A process holding the run's ``scope`` lock, started and ready (spawned: a fork could hang, see above)."""
    holder = multiprocessing.get_context("spawn").Process(target=_hold_lock, args=((run, scope, ready),))
    holder.start()
    deadline = time.time() + 120
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.02)
    assert ready.exists(), "the lock holder did not start"
    return holder


def never_wait_for_a_lock(monkeypatch) -> None:
    """A lock taken at once never sleeps: make any wait for one fail the test (fail fast, measured without a clock)."""
    from types import SimpleNamespace

    from gist_backend.runs import lock

    monkeypatch.setattr(lock, "time", SimpleNamespace(monotonic=time.monotonic, sleep=lambda s: pytest.fail("waited for a lock")))


def test_second_writer_fails_fast_naming_the_holder_and_a_dead_holder_frees_the_lock(base, tmp_path, monkeypatch):
    run = tmp_path / "run"
    ready = tmp_path / "ready"
    run.mkdir()
    holder = _start_holder(run, "run", ready)
    never_wait_for_a_lock(monkeypatch)
    with pytest.raises(RunError, match=rf"is busy: gist-curate compute \(test\) \(pid {holder.pid}"):
        compute(_config(base["model"], base["pool"], base["val"]), run)
    assert not (run / "manifest.json").exists()
    os.kill(holder.pid, signal.SIGKILL)  # the OS releases the lock of a dead process
    holder.join()
    compute(_config(base["model"], base["pool"], base["val"]), run)
    assert open_run(run).manifest["status"] == "complete"


@pytest.mark.parametrize("command", ["add-target", "evaluate", "map"])
def test_every_other_writer_fails_fast_naming_the_holder_and_writes_nothing(base, tmp_path, monkeypatch, capsys, command):
    run = compute(_config(base["model"], base["pool"], base["val"], reusable=True), tmp_path / "run")
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"id": "t0", "messages": [{"role": "user", "content": "Say 321."}, {"role": "assistant", "content": "321."}]}) + "\n")
    scope, argv = {
        "add-target": ("run", ["--val", str(base["val"]), "--name", "second"]),
        "evaluate": ("evals", ["--test", str(test), "--budget", "4", "--baselines", "random:1", "--epochs", "1"]),
        "map": ("maps", ["--rank", "2"]),
    }[command]
    files = lambda: {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file() and not p.name.startswith(".lock-")}  # noqa: E731
    holder = _start_holder(run, scope, tmp_path / "ready")
    try:
        before = files()  # with the holder's own progress file, if it had one
        never_wait_for_a_lock(monkeypatch)
        err = _error(capsys, [command, "--run-dir", str(run), *argv])
        assert f"is busy: gist-curate compute (test) (pid {holder.pid}" in err
        assert files() == before  # not a result, and not a "failed" over the running writer's progress
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()


def test_edits_wait_for_a_brief_writer_but_not_forever(base, tmp_path):
    from gist_backend.curation.edits import add_edit, load_edits

    run = tmp_path / "run"
    shutil.copytree(base["run"], run)
    ready = tmp_path / "ready"
    holder = _start_holder(run, "edits", ready)
    with pytest.raises(RunError, match="is busy"):
        add_edit(run, "exclude", ["x"], "api")  # waits ~10 s for the holder, then says who holds the log
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    add_edit(run, "exclude", ["x"], "api")
    assert len(load_edits(run)) == 1


def test_a_lock_file_replaced_while_waiting_is_not_trusted(tmp_path, monkeypatch):
    """compute --overwrite swaps a new run folder in and drops the old lock files: a writer that was waiting on the
    old file must lock the new one, or it and a newcomer would both write."""
    import threading
    from types import SimpleNamespace

    from gist_backend.runs import lock
    from gist_backend.runs.lock import RunLocked, run_lock

    run = tmp_path / "run"
    run.mkdir()
    got, release, retrying = threading.Event(), threading.Event(), threading.Event()
    monkeypatch.setattr(lock, "time", SimpleNamespace(monotonic=time.monotonic, sleep=lambda s: retrying.set() or time.sleep(s)))

    def waiter():
        with run_lock(run, "edits", "waiter", wait_s=20):
            got.set()
            release.wait(20)

    with run_lock(run, "edits", "holder"):
        thread = threading.Thread(target=waiter)
        thread.start()
        assert retrying.wait(20)  # the waiter has found the lock held and is retrying on the file that is about to go
        (run / ".lock-edits").unlink()
    try:
        assert got.wait(20)
        with pytest.raises(RunLocked, match="waiter"):
            with run_lock(run, "edits", "newcomer"):
                pass
    finally:
        release.set()
        thread.join()


# ---------------------------------------------------------------- 5. ids repeated across input files


def test_ids_repeated_across_files_are_made_unique_and_reported(base, tmp_path, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    rows = [json.loads(line) for line in base["pool"].read_text().splitlines()]
    a.write_text("".join(json.dumps(r | {"id": f"x{i}"}) + "\n" for i, r in enumerate(rows[:8])))
    b.write_text("".join(json.dumps(r | {"id": f"x{i}"}) + "\n" for i, r in enumerate(rows[8:16])))
    run = open_run(compute(_config(base["model"], [a, b], base["val"]), tmp_path / "run"))
    ids = run.train["id"].to_list()
    assert len(ids) == 16 == len(set(ids)) and "x0-2" in ids
    assert run.manifest["n_renamed_ids"] == 8 and run.manifest["renamed_ids"][0] == {"split": "train", "file": str(b), "line": 1, "id": "x0", "new_id": "x0-2"}
    assert "made unique" in capsys.readouterr().out
    cli_main(["select", "--run-dir", str(run.path), "--budget", "16", "--out", str(tmp_path / "all.jsonl")])
    assert sorted((tmp_path / "all.jsonl").read_text().splitlines()) == sorted(a.read_text().splitlines() + b.read_text().splitlines())
    # an id repeated inside one file: each copy gets its content hash, and that is reported too
    c = tmp_path / "c.jsonl"
    c.write_text("".join(json.dumps(r | {"id": "dup" if i < 2 else f"c{i}"}) + "\n" for i, r in enumerate(rows[:6])))
    run = open_run(compute(_config(base["model"], c, base["val"]), tmp_path / "run-c"))
    assert run.manifest["n_renamed_ids"] == 2 and [(r["id"], r["line"]) for r in run.manifest["renamed_ids"]] == [("dup", 1), ("dup", 2)]
    assert "dup" not in run.train["id"].to_list() and len(set(run.train["id"].to_list())) == 6
    # the same file given twice would count every record twice: refused before anything is read
    with pytest.raises(ValueError, match="given more than once"):
        compute(_config(base["model"], [a, a], base["val"]), tmp_path / "run-twice")


# ---------------------------------------------------------------- clear errors instead of tracebacks


def test_disk_full_and_read_only_folders_are_explained(base, tmp_path, monkeypatch, capsys):
    from gist_backend.runs import files

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    err = _error(capsys, ["select", "--run-dir", str(base["run"]), "--budget", "3", "--out", str(tmp_path / "x.jsonl")])
    assert "disk is full" in err and not list(tmp_path.glob(".x.jsonl.*"))
    monkeypatch.undo()
    # the records fit but the manifest beside them does not: neither is left, so the same command works once there is room
    monkeypatch.setattr("gist_backend.curation.export.write_json", lambda *a: full(None))
    assert "disk is full" in _error(capsys, ["select", "--run-dir", str(base["run"]), "--budget", "3", "--out", str(tmp_path / "y.jsonl")])
    assert not list(tmp_path.glob("*y.jsonl*"))
    monkeypatch.undo()
    cli_main(["select", "--run-dir", str(base["run"]), "--budget", "3", "--out", str(tmp_path / "y.jsonl")])
    assert len((tmp_path / "y.jsonl").read_text().splitlines()) == 3 and (tmp_path / "y.jsonl.manifest.json").exists()
    # a library that reports a full disk in its own exception type (safetensors) gets the same sentence, not a traceback
    from safetensors import SafetensorError

    def full_tensors(*a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr("safetensors.numpy.save_file", full_tensors)
    argv = ["compute", "--model", str(base["model"]), "--train", str(base["pool"]), "--val", str(base["val"]), "--no-warmup", "--k-max", "4",
            "--max-len", "64", "--run-dir", str(tmp_path / "full-run")]  # fmt: skip
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    err = capsys.readouterr().err  # after the progress bars, one sentence
    assert exit_.value.code == 2 and "\nerror: the disk is full" in err and "Traceback" not in err, err
    monkeypatch.setattr(files.os, "fsync", full)
    monkeypatch.setattr(files.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system", str(tmp_path))))
    assert "read-only or not yours" in _error(capsys, ["edit", "--run-dir", str(base["run"]), "exclude", open_run(base["run"]).train["id"][0]])


def test_bad_arguments_and_unknown_ids(base, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["serve", "--port", "99999"])
    assert exit_.value.code == 2 and "port must be between 1 and 65535" in capsys.readouterr().err
    assert "not in run" in _error(capsys, ["edit", "--run-dir", str(base["run"]), "exclude", "no-such-id"])
    assert "nothing to undo" in _error(capsys, ["edit", "--run-dir", str(base["run"]), "undo"])
    assert "no run folder" in _error(capsys, ["serve", "--run-dir", str(base["root"] / "no-such-run")])
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert "choose another --port" in _error(capsys, ["serve", "--port", str(busy.getsockname()[1])])
    with pytest.raises(SystemExit):
        cli_main(["evaluate", "--run-dir", str(base["run"]), "--test", "t.jsonl", "--baselines", "random:0"])
    assert "random:N with N ≥ 1" in capsys.readouterr().err
    for command in (["info"], ["map"], ["scores", "--out", str(base["root"] / "s.csv")]):  # rank 0 is an error, never k_max
        assert "rank must be a whole number from 1 to k_max=6, got 0" in _error(capsys, [*command, "--run-dir", str(base["run"]), "--rank", "0"])


def test_a_bad_budget_or_cap_is_refused_before_any_work_saying_what_fits(base, capsys):
    run = ["--run-dir", str(base["run"]), "--out", str(base["root"] / "never.jsonl")]
    for flags, message in ((["--budget", "abc"], "budget 'abc' is not a count (500), a fraction (0.05) or a percentage (5%)"),
                           (["--budget", "2.5"], "a float is a fraction (< 1) or a whole count"),
                           (["--budget", "5", "--per-source-cap", "2.0"], "a float cap is a fraction of the budget in (0, 1]"),
                           (["--budget", "5", "--per-source-cap", "x"], "is not a count (50), a fraction (0.3) or a percentage (30%)")):  # fmt: skip
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            cli_main(["select", *run, *flags])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and "Traceback" not in err, err
    assert not (base["root"] / "never.jsonl").exists()


@pytest.mark.parametrize("recipe", [[], ["--recipe", "paper"]])
def test_every_command_prints_its_help(recipe, capsys):
    from gist_backend.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"compute", "add-target", "select", "evaluate", "serve"} <= set(commands)
    for command in commands:
        with pytest.raises(SystemExit) as exit_:
            cli_main([command, *recipe, "--help"] if command == "compute" else [command, "--help"])
        out = capsys.readouterr().out
        assert exit_.value.code == 0 and out.startswith("usage: gist-curate " + command), out
    with pytest.raises(SystemExit):
        cli_main(["compute", "--help"])
    assert "top 5 % within" in " ".join(capsys.readouterr().out.split())  # help texts holding % are printed as written


def test_info_json_reports_an_unfinished_run_to_scripts(base, tmp_path, capsys):
    import socket
    import subprocess
    import sys

    from gist_backend.runs import write_manifest
    from gist_backend.runs.manifest import read_manifest

    run = tmp_path / "run"
    shutil.copytree(base["run"], run)
    write_manifest(run / "manifest.json", read_manifest(run) | {"status": "running"})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    for pid, status in ((int(dead), "stopped"), (os.getpid(), "running")):  # read from the lock file, never by taking the lock
        (run / ".lock-run").write_text(json.dumps({"pid": pid, "command": "gist-curate compute", "host": socket.gethostname(), "since": "now"}))
        capsys.readouterr()
        cli_main(["info", "--run-dir", str(run), "--json"])
        facts = json.loads(capsys.readouterr().out)
        assert facts["status"] == status and facts["run"] == str(run) and "timings" in facts
    assert "not complete" in _error(capsys, ["info", "--run-dir", str(run)])  # the human-readable form says what to do


def test_interrupted_commands_say_resume_only_when_they_can(base, monkeypatch, capsys):
    from gist_backend import commands

    def stop(args):
        raise KeyboardInterrupt

    for name, resumable in (("scores", False), ("serve", False), ("compute", True)):
        monkeypatch.setitem(commands.COMMANDS, name, stop)
        argv = {"scores": ["scores", "--run-dir", "r", "--out", "o"], "serve": ["serve"],
                "compute": ["compute", "--model", "m", "--train", "p", "--val", "v", "--run-dir", "r"]}[name]  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            cli_main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 130 and ("resume" in err) == resumable, (name, err)


def test_a_degenerate_subspace_is_warned_about(base, tmp_path, capsys):
    one = tmp_path / "one.jsonl"
    one.write_text(base["val"].read_text().splitlines()[0] + "\n")
    run = open_run(compute(_config(base["model"], base["pool"], one), tmp_path / "run"))
    assert run.k_max == 1 and "every GIST score is ±1" in run.manifest["warnings"][0] and "(only 1 validation example)" in run.manifest["warnings"][0]
    cli_main(["info", "--run-dir", str(run.path)])
    assert "warning: the task subspace has 1 direction" in capsys.readouterr().out
    record = json.loads(base["val"].read_text().splitlines()[0])
    same = tmp_path / "same.jsonl"  # three validation examples, one gradient: still a single direction
    same.write_text("".join(json.dumps({**record, "id": f"copy-{i}"}) + "\n" for i in range(3)))
    run = open_run(compute(_config(base["model"], base["pool"], same), tmp_path / "run-same"))
    assert run.k_max == 1 and "validation gradients are parallel" in run.manifest["warnings"][0]
