"""Faults: compute killed at chosen and random points resumes to the uninterrupted result; damaged or
tampered run directories give a RunError naming the file; curation edits survive a killed writer;
dashboard path safety. Figures of the last full run are in tests/RELIABILITY.md.

How kills are made: the compute runs in a child process forked from a fork server that imported torch
once (a forked child is a real process; SIGKILL ends it at once, with no cleanup). A child either kills itself with SIGKILL at a chosen point (a trap installed in the child
only: on a progress report of a stage, or in the middle of writing a named file, leaving half of it),
or is killed from here at a seeded random time or when an observable file appears. The children run
`gist_backend.cli.main`, as `gist-curate` does (tests/test_compute.py kills the installed CLI in its own
interpreter as well). The production code has no fault hook.

Set GIST_RELIABILITY_REPORT=path.json to get the counts of this run as JSON.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from gist_backend import runs
from gist_backend.runs import manifest as manifest_mod
from gist_backend.runs.manifest import record_file
from gist_backend.cli import main as cli_main
from gist_backend.curation.edits import add_edit, load_edits
from gist_backend.runs import RunError, open_run, read_npy
from gist_backend.curation.scoring import scores

torch.set_num_threads(1)

REPORT: dict = {"kills": [], "tamper": [], "edits": [], "safety": []}


@pytest.fixture(scope="module", autouse=True)
def _write_report():
    yield
    target = os.environ.get("GIST_RELIABILITY_REPORT")
    if target:
        Path(target).write_text(json.dumps(REPORT, indent=1, default=str))


# ============================================================================ child processes


def _install_trap(trap: dict) -> None:
    """In the child: SIGKILL ourselves at the trap's point (never returns there)."""

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    kind = trap["kind"]
    if kind == "progress":  # on the compute's progress report: stage prefix, done ≥ n
        import importlib

        compute = importlib.import_module("gist_backend.compute")  # the module (the package exports a function of that name)
        real_call = compute.Progress.__call__

        def call(self, stage, done, total, rate=0.0, force=False):
            if stage.startswith(trap["stage"]) and done >= trap["done"]:
                die()
            return real_call(self, stage, done, total, rate, force)

        compute.Progress.__call__ = call
    elif kind == "write":  # an atomic write of a named file: leave its temporary file half-written
        real_replace = os.replace
        seen = [0]

        def replace(src, dst, *args, **kwargs):
            if Path(dst).name == trap["name"] and (trap.get("contains") is None or trap["contains"].encode() in Path(src).read_bytes()):
                seen[0] += 1
                if seen[0] == trap.get("nth", 1):
                    victim = Path(src) / "adapter_model.safetensors" if Path(src).is_dir() else Path(src)
                    os.truncate(victim, victim.stat().st_size // 2)
                    die()
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace
    elif kind == "peft_save":  # peft's adapter writer (not atomic): half a file under its final name
        import peft.peft_model as peft_model

        real_save = peft_model.safe_save_file
        seen = [0]

        def save(tensors, filename, *args, **kwargs):
            real_save(tensors, filename, *args, **kwargs)
            seen[0] += 1
            if seen[0] == trap.get("nth", 1):
                os.truncate(filename, os.path.getsize(filename) // 2)
                die()

        peft_model.safe_save_file = save
    else:
        raise ValueError(kind)


# Children come from a fork server: one fresh interpreter that imports torch, transformers, peft and the
# backend once, then forks a child per request. Forking this test process itself would be cheaper
# still, but polars (like any library with a thread pool) deadlocks in a child forked after its pool
# started, and this process reads runs with polars between kills.
CTX = multiprocessing.get_context("forkserver")
CTX.set_forkserver_preload(
    ["torch", "transformers", "transformers.models.llama.modeling_llama", "peft", "safetensors", "numpy", "polars",
     "gist_backend.cli", "gist_backend.compute", "gist_backend.engine.model", "gist_backend.curation", "test_reliability"]
)  # fmt: skip


def _child_main(args: list[str], log: str, trap: dict | None) -> None:
    """Runs in the child: output to ``log``, the trap, then `gist-curate <args>` (its exit code is the child's)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)
    torch.set_num_threads(1)
    if trap:
        _install_trap(trap)
    cli_main(args)


def spawn(args: list[str], log: Path, trap: dict | None = None, target=_child_main):
    """Start a child running ``target(args, log, trap)``; returns the process (``.pid``, ``.join``, ``.exitcode``)."""
    proc = CTX.Process(target=target, args=(args, str(log), trap), daemon=True)
    proc.start()
    return proc


def wait(proc, timeout: float = 300.0) -> int:
    """Exit code of the child (negative: killed by that signal)."""
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise AssertionError(f"child {proc.pid} did not finish in {timeout} s")
    return proc.exitcode


def run_child(args: list[str], log: Path, trap: dict | None = None, target=_child_main) -> int:
    return wait(spawn(args, log, trap, target))


# ============================================================================ the run under test


def compute_args(model: Path, pool: Path, val: Path, run_dir: Path, warmup: bool = True) -> list[str]:
    args = [
        "compute", "--model", str(model), "--train", str(pool), "--val", str(val), "--run-dir", str(run_dir),
        "--k-max", "8", "--shard-size", "8", "--max-len", "64", "--max-batch", "4",
        "--methods", "gist,less" if warmup else "gist", "--less-dim", "64",  # LESS needs the warmup's Adam state
        "--memory-budget-gb", "1e-9",  # spill the validation gradients to disk: that path is killed too
    ]  # fmt: skip
    if warmup:
        return args + ["--warmup-epochs", "2", "--warmup-fraction", "0.75", "--warmup-lr", "1e-3", "--warmup-batch", "4"]
    return args + ["--no-warmup"]


WARMUP_STEPS = 6  # per epoch: 32 × 0.75 = 24 examples in batches of 4; 4 shards of 8 per checkpoint


@pytest.fixture(scope="module")
def setup(tiny_llama, tmp_path_factory):
    """Data, and the uninterrupted reference run (with its wall time, for the random kills)."""
    from gist_backend.devkit.tiny import make_toy_data

    root = tmp_path_factory.mktemp("faults")
    pool, val = make_toy_data(root / "data", n_train=32, n_val=10)
    ref = root / "reference"
    assert run_child(compute_args(tiny_llama, pool, val, ref), root / "reference.log") == 0, (root / "reference.log").read_text()[-3000:]
    seconds = sum(json.loads((ref / "manifest.json").read_text())["timings"].values())  # the compute, without start-up
    return {"model": tiny_llama, "pool": pool, "val": val, "root": root, "ref": ref, "seconds": seconds}


def file_digests(run_dir: Path) -> dict[str, str]:
    return {name: info["sha256"] for name, info in open_run(run_dir).manifest["files"].items()}


def assert_same_run(run_dir: Path, ref: Path) -> None:
    """Every final artefact byte-identical to the reference (checksums in the manifests), and the scores equal."""
    got, want = open_run(run_dir), open_run(ref)
    assert file_digests(run_dir) == file_digests(ref)
    np.testing.assert_array_equal(got.train_coords, want.train_coords)
    np.testing.assert_array_equal(got.val_coords, want.val_coords)
    if "less" in want.methods:
        for name in ("less_scores", "train_sketch", "val_sketch"):
            np.testing.assert_array_equal(read_npy(got.paths[name]), read_npy(want.paths[name]))
    for key in ("gist", "less", "k_max", "gradient_passes"):
        assert got.manifest.get(key) == want.manifest.get(key)
    np.testing.assert_array_equal(scores(got, "gist", 3), scores(want, "gist", 3))


def kill_and_resume(setup, name: str, *, trap: dict | None = None, kill_after: float | None = None, kill_on: str | None = None, warmup: bool = True, ref: Path | None = None) -> dict:
    """One fault: a child is killed (by a trap, after a delay, or when a file appears), then a fresh child resumes."""
    run_dir = setup["root"] / f"run-{name}"
    log = setup["root"] / f"{name}.log"
    args = compute_args(setup["model"], setup["pool"], setup["val"], run_dir, warmup)
    proc = spawn(args, log, trap)
    if kill_after is not None or kill_on is not None:
        deadline = time.time() + (kill_after if kill_after is not None else 300)
        while time.time() < deadline and proc.is_alive():
            if kill_on is not None and (run_dir / kill_on).exists():
                break
            time.sleep(0.002)
        if proc.is_alive():
            proc.kill()
    code = wait(proc)
    killed = code == -signal.SIGKILL
    outcome = {"name": name, "killed": killed, "exit": code, "trap": trap, "kill_after_s": kill_after, "kill_on": kill_on}
    if killed:
        manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").exists() else {}
        outcome["status_after_kill"] = manifest.get("status")
        progress = run_dir / "progress.json"
        outcome["stage_at_kill"] = json.loads(progress.read_text()).get("stage") if progress.exists() else None
        if manifest.get("status") != "complete":  # an unfinished run is never opened as valid
            with pytest.raises(RunError):
                open_run(run_dir)
    else:
        assert code == 0, log.read_text()[-3000:]
    code = run_child(args, log)
    assert code == 0, log.read_text()[-3000:]
    assert_same_run(run_dir, ref or setup["ref"])
    outcome["resumed_equal"] = True
    REPORT["kills"].append(outcome)
    return outcome


# ============================================================================ kills at chosen points

CHOSEN = {
    "warmup-epoch1-step3": {"kind": "progress", "stage": "warmup", "done": 3},
    "warmup-epoch2-step2": {"kind": "progress", "stage": "warmup", "done": WARMUP_STEPS + 2},
    "write-epoch2-adapter(half file, final name)": {"kind": "peft_save", "nth": 2},
    "write-epoch1-optimizer": {"kind": "write", "name": "optimizer.safetensors"},
    "write-train.parquet": {"kind": "write", "name": "train.parquet"},
    "val-grads-ckpt0(spill half full)": {"kind": "progress", "stage": "validation gradients (epoch-1)", "done": 4},
    "write-ckpt0-validation-sketch": {"kind": "write", "name": "val-val.safetensors"},
    "pool-grads-ckpt0-shard1": {"kind": "progress", "stage": "pool gradients (epoch-1)", "done": 12},
    "val-grads-ckpt1": {"kind": "progress", "stage": "validation gradients (epoch-2)", "done": 4},
    "write-ckpt1-shard2": {"kind": "write", "name": "shard-00002.safetensors", "nth": 2},
    "write-ckpt1-subspace": {"kind": "write", "name": "val-val.safetensors", "nth": 2},
    "pool-grads-ckpt1-shard3": {"kind": "progress", "stage": "pool gradients (epoch-2)", "done": 28},
    "merge-start": {"kind": "progress", "stage": "merging", "done": 0},
    "write-gist_unit.npy": {"kind": "write", "name": "gist_unit.npy"},
    "write-less_scores.npy": {"kind": "write", "name": "less_scores.npy"},
    "write-final-manifest": {"kind": "write", "name": "manifest.json", "contains": '"status": "complete"'},
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(CHOSEN))
def test_kill_at_chosen_point_resumes_to_the_uninterrupted_run(setup, point):
    outcome = kill_and_resume(setup, point.split("(")[0], trap=CHOSEN[point])
    assert outcome["killed"], f"the trap at {point} did not fire"
    assert outcome["status_after_kill"] in ("running", None)


@pytest.mark.slow
def test_kill_when_observable_files_appear(setup):
    """Killed from outside as soon as a file shows up (the kill lands a little later, wherever the child is)."""
    for marker in ("ckpt-1/val-val.safetensors", "ckpt-1/pool/shard-00001.safetensors"):
        assert kill_and_resume(setup, "file-" + marker.replace("/", "_"), kill_on=marker)["killed"], f"{marker} never appeared"


@pytest.mark.slow
def test_kills_at_seeded_random_times(setup):
    rng = random.Random(20240611)
    for i in range(4):
        kill_and_resume(setup, f"random-{i}", kill_after=0.2 + rng.uniform(0.0, 1.0) * setup["seconds"])
    assert sum(o["killed"] for o in REPORT["kills"] if o["name"].startswith("random-")) >= 1  # most land; all resume equal


@pytest.mark.slow
def test_no_warmup_run_killed_while_saving_its_initial_adapter(setup):
    """Without warmup the initial adapter is saved once; a kill mid-save used to leave half a file that resume trusted."""
    ref = setup["root"] / "reference-nowarmup"
    args = compute_args(setup["model"], setup["pool"], setup["val"], ref, warmup=False)
    assert run_child(args, setup["root"] / "ref-nowarmup.log") == 0
    outcome = kill_and_resume(setup, "write-init-adapter", trap={"kind": "peft_save", "nth": 1}, warmup=False, ref=ref)
    assert outcome["killed"]


@pytest.mark.slow
def test_damaged_intermediate_files_are_recomputed_on_resume(setup):
    """Shards and subspaces are trusted on resume only if complete and of the right shape; otherwise redone."""
    run_dir = setup["root"] / "run-damaged"
    args = compute_args(setup["model"], setup["pool"], setup["val"], run_dir)
    trap = {"kind": "progress", "stage": "pool gradients (epoch-2)", "done": 28}
    assert run_child(args, setup["root"] / "damaged.log", trap) == -signal.SIGKILL
    shards = sorted((run_dir / "ckpt-1" / "pool").glob("shard-*.safetensors"))
    assert len(shards) >= 3
    shards[0].write_bytes(shards[0].read_bytes()[:-7])  # truncated
    shards[1].write_bytes(shards[1].read_bytes() + b"\0" * 16)  # grown
    runs.write_tensors(shards[2], {"coords": np.zeros((3, 8), np.float32), "loss": np.zeros(3, np.float32)})  # wrong shape
    subspace = run_dir / "ckpt-1" / "val-val.safetensors"
    subspace.write_bytes(subspace.read_bytes()[:50])
    epoch = run_dir / "warmup" / "epoch-2" / "optimizer.safetensors"
    epoch.write_bytes(epoch.read_bytes()[:-3])
    assert run_child(args, setup["root"] / "damaged.log") == 0
    assert_same_run(run_dir, setup["ref"])
    REPORT["kills"].append({"name": "damaged-shards-subspace-optimizer", "killed": True, "resumed_equal": True})


# ============================================================================ add-target killed and resumed


@pytest.fixture(scope="module")
def add_setup(setup):
    """A --reusable run, a second target's validation file, and the run with that target added uninterrupted."""
    root = setup["root"]
    base = root / "reusable"
    args = compute_args(setup["model"], setup["pool"], setup["val"], base) + ["--reusable", "--sketch-dim", "256"]
    assert run_child(args, root / "reusable.log") == 0, (root / "reusable.log").read_text()[-3000:]
    other = root / "animals.jsonl"
    other.write_text("".join(json.dumps({"id": f"a{i}", "messages": [{"role": "user", "content": f"How many legs has animal {i}?"},
                                                                      {"role": "assistant", "content": f"{i % 5} legs."}]}) + "\n" for i in range(10)))  # fmt: skip
    ref = root / "added-reference"
    shutil.copytree(base, ref)
    assert run_child(add_args(ref, other), root / "added-reference.log") == 0, (root / "added-reference.log").read_text()[-3000:]
    return {"base": base, "other": other, "ref": ref}


def add_args(run_dir: Path, val: Path) -> list[str]:
    return ["add-target", "--run-dir", str(run_dir), "--val", str(val), "--name", "animals", "--max-tokens", "512"]


def target_digests(run_dir: Path) -> dict[str, str]:
    return {k: v for k, v in file_digests(run_dir).items() if k.startswith("targets/animals/")}


ADD_TARGET_POINTS = {
    "add-target-val-grads-ckpt1": {"kind": "progress", "stage": "validation gradients (epoch-2)", "done": 4},
    "add-target-write-val-work": {"kind": "write", "name": "ckpt-1.safetensors"},
    "add-target-write-gist_unit.npy": {"kind": "write", "name": "gist_unit.npy"},
    "add-target-write-manifest": {"kind": "write", "name": "manifest.json", "contains": '"animals"'},
}


@pytest.mark.slow
@pytest.mark.parametrize("point", [*ADD_TARGET_POINTS, "random-0", "random-1"])
def test_add_target_killed_leaves_the_run_intact_and_resumes(setup, add_setup, point):
    """A killed add-target never damages the run or lists a half-written target; re-running it finishes byte-identical."""
    run_dir = setup["root"] / f"add-{point}"
    shutil.copytree(add_setup["base"], run_dir)
    before = file_digests(run_dir)
    log = setup["root"] / f"add-{point}.log"
    proc = spawn(add_args(run_dir, add_setup["other"]), log, ADD_TARGET_POINTS.get(point))
    if point.startswith("random"):
        time.sleep(0.3 + random.Random(f"add-{point}").uniform(0.0, 3.0))
        if proc.is_alive():
            proc.kill()
    code = wait(proc)
    killed = code == -signal.SIGKILL
    assert killed or (point.startswith("random") and code == 0), log.read_text()[-3000:]
    if killed:
        assert open_run(run_dir).targets == open_run(add_setup["base"]).targets  # not listed
        assert file_digests(run_dir) == before  # the first target's artefacts untouched, and the run still opens
        with pytest.raises(RunError, match="no target 'animals'"):
            open_run(run_dir, "animals")
        assert run_child(add_args(run_dir, add_setup["other"]), log) == 0, log.read_text()[-3000:]
    assert target_digests(run_dir) == target_digests(add_setup["ref"]) and target_digests(run_dir)
    np.testing.assert_array_equal(scores(open_run(run_dir, "animals"), "gist", 3), scores(open_run(add_setup["ref"], "animals"), "gist", 3))
    REPORT["kills"].append({"name": point, "killed": killed, "trap": ADD_TARGET_POINTS.get(point), "resumed_equal": True})


# ============================================================================ tampered finished runs


@pytest.fixture(scope="module")
def finished(setup) -> Path:
    return setup["ref"]


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(finished, target)
    return target


def expect_run_error(run_dir: Path, names: str | tuple[str, ...], case: str) -> str:
    names = (names,) if isinstance(names, str) else names
    with pytest.raises(RunError) as err:
        open_run(run_dir)
    message = str(err.value)
    assert any(n in message for n in names), message
    REPORT["tamper"].append({"case": case, "outcome": "RunError", "message": message[:160]})
    return message


def _edit_manifest(run_dir: Path, resign: bool = True, **changes) -> None:
    """Change manifest fields; ``resign``: also recompute its checksum, as a deliberate editor could."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest.update(changes)
    if resign:
        runs.write_manifest(run_dir / "manifest.json", manifest)
    else:
        (run_dir / "manifest.json").write_text(json.dumps(manifest))


def _with_nan(array: np.ndarray) -> np.ndarray:
    array = np.array(array)
    array.flat[len(array.flat) // 2] = np.nan
    return array


def _rerecord(run_dir: Path, name: str) -> None:
    """An editor who also fixes the manifest's size and checksum for the file they replaced."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    record_file(manifest, run_dir, name)
    runs.write_manifest(run_dir / "manifest.json", manifest)


T = "targets/val"  # the run's target, named after its validation file
ARTEFACTS = ["train.parquet", "grad_norms.npy", "sketches/train.npy", f"{T}/val.parquet", f"{T}/gist_unit.npy", f"{T}/gist_norm.npy",
             f"{T}/val_coords.npy", f"{T}/geometry.json", f"{T}/coupling.safetensors", f"{T}/val_sketch.npy", f"{T}/less_scores.npy",
             f"{T}/less_task_scores.npy"]  # fmt: skip


@pytest.mark.parametrize("name", ARTEFACTS)
def test_truncated_deleted_or_bit_flipped_artefact_is_named(copy, name):
    path = copy / name
    original = path.read_bytes()
    path.write_bytes(original[: len(original) // 2])
    expect_run_error(copy, name, f"truncate {name}")
    path.write_bytes(original + b"x")
    expect_run_error(copy, name, f"append to {name}")
    rng = random.Random(name)
    for position in sorted(rng.sample(range(len(original)), 6)) + [0, len(original) - 1]:
        flipped = bytearray(original)
        flipped[position] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(flipped))
        expect_run_error(copy, name, f"bit flip {name}")
    path.unlink()
    expect_run_error(copy, name, f"delete {name}")
    path.write_bytes(original)
    open_run(copy)  # restored: fine again


@pytest.mark.parametrize(
    "case, change",
    [
        ("version 3", {"version": 3}),
        ("version '1' (a string)", {"version": "1"}),
        ("other format", {"format": "something-else"}),
        ("status running", {"status": "running"}),
        ("gist weights not numbers", {"gist": {"checkpoints": ["epoch-2"], "weights": ["a"]}}),
        ("gist weights zero", {"gist": {"checkpoints": ["epoch-2"], "weights": [0.0]}}),
        ("gist weights NaN", {"gist": {"checkpoints": ["epoch-2"], "weights": [float("nan")]}}),
        ("gist weights too many", {"gist": {"checkpoints": ["epoch-2"], "weights": [0.5, 0.5]}}),
        ("targets malformed", {"targets": [{"name": "../../x"}]}),
        ("files a list", {"files": ["train.parquet"]}),
        ("files entry without bytes", {"files": {"train.parquet": {"size": 3}}}),
        ("files entry outside the run", {"files": {"../../etc/passwd": {"bytes": 1}}}),
        ("methods a number", {"methods": 3}),
        ("checkpoints malformed", {"checkpoints": [1, 2]}),
        ("config a string", {"config": "x"}),
    ],
)
def test_edited_manifest_gives_a_clear_error(copy, case, change):
    """Each edit is caught by the manifest's checksum; re-signed, by the structural checks behind it."""
    _edit_manifest(copy, resign=False, **change)
    expect_run_error(copy, "manifest.json", f"manifest (checksum): {case}")
    _edit_manifest(copy, **change)
    expect_run_error(copy, "manifest.json" if case != "status running" else "not complete", f"manifest (re-signed): {case}")


@pytest.mark.parametrize("field, value", [("less", {"checkpoints": ["epoch-1", "epoch-2"], "weights": [0.9, 0.1], "dim": 64}), ("k_max", 3),
                                          ("n_train", 5), ("config", {"model": "other"})])  # fmt: skip
def test_silent_manifest_edits_are_caught_by_its_checksum(copy, field, value):
    """Edits that would otherwise open fine with different meaning (weights, counts) fail on the checksum."""
    _edit_manifest(copy, resign=False, **{field: value})
    assert "does not match its checksum" in expect_run_error(copy, "manifest.json", f"manifest silent edit: {field}")
    _edit_manifest(copy, resign=False, checksum=None)
    expect_run_error(copy, "manifest.json", "manifest checksum emptied")


def test_integrity_cannot_be_switched_off_by_editing_the_manifest(copy):
    """Stripping 'checksum' and 'files', or one file's entry, does not disable the checks (the file list comes from the format)."""
    manifest = json.loads((copy / "manifest.json").read_text())
    stripped = {k: v for k, v in manifest.items() if k not in ("checksum", "files")}
    (copy / "manifest.json").write_text(json.dumps(stripped))
    assert "must record 'files' and 'checksum'" in expect_run_error(copy, "manifest.json", "checksum and files removed")
    for name in (f"{T}/gist_unit.npy", "grad_norms.npy", f"{T}/less_scores.npy"):
        edited = dict(manifest, files={k: v for k, v in manifest["files"].items() if k != name})
        runs.write_manifest(copy / "manifest.json", edited)  # re-signed: only the format's list of artefacts catches it
        assert f"requires {name}" in expect_run_error(copy, "manifest.json", f"entry for {name} removed")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    open_run(copy)


def test_g2is_cache_is_validated_and_checksummed(tmp_path):
    """A hand-made G2IS cache (repeated, negative or out-of-range rows, or an edited list) is never trusted."""
    from gist_backend.curation import select
    from gist_backend.devkit.synthetic import synthetic_run
    from gist_backend.runs.manifest import manifest_checksum

    copy = synthetic_run(tmp_path / "g2is", n_train=120, n_val=12, n_tasks=2, k_max=6, n_ckpt=1, methods=("g2is",))
    run = open_run(copy)
    good = select(run, method="g2is", budget=6, edits=[])
    path = next((copy / "selections").glob("g2is-*-6-*.json"))
    entry = json.loads(path.read_text())
    n = run.train.height
    for case, rows in {"one row ten times": [good.rows[0]] * 6, "negative rows": [-1, -2, -3, -4, -5, -6],
                       "out of range": [n + i for i in range(6)], "too few": list(good.rows[:3])}.items():  # fmt: skip
        forged = dict(entry, selected=[int(r) for r in rows])
        forged["checksum"] = manifest_checksum(forged)  # even re-signed: the rows must be a valid walk result
        path.write_text(json.dumps(forged))
        again = select(open_run(copy), method="g2is", budget=6, edits=[])
        assert again.rows.tolist() == good.rows.tolist(), case
        REPORT["tamper"].append({"case": f"G2IS cache: {case}", "outcome": "recomputed"})
    path.write_text(json.dumps(dict(entry, selected=entry["selected"][::-1])))  # plausible rows, checksum not updated
    assert select(open_run(copy), method="g2is", budget=6, edits=[]).rows.tolist() == good.rows.tolist()


def test_manifest_damage(copy):
    manifest = copy / "manifest.json"
    original = manifest.read_bytes()
    for case, data in [
        ("truncated", original[: len(original) // 2]),
        ("empty", b""),
        ("not UTF-8", b"\xff\xfe" + original),
        ("a JSON list", b"[1, 2]"),
        ("deeply nested", b"[" * 100000),
        ("huge integer", b'{"version": 1' + b"0" * 5000 + b"}"),
    ]:
        manifest.write_bytes(data)
        expect_run_error(copy, "manifest.json", f"manifest {case}")
    manifest.unlink()
    expect_run_error(copy, "manifest.json", "manifest deleted")
    manifest.mkdir()
    expect_run_error(copy, "manifest.json", "manifest is a folder")
    manifest.rmdir()
    # Random bit flips: each either leaves a run that still means the same (same scores and selection) or gives a
    # RunError; never a crash, never a run that opens with other results.
    manifest.write_bytes(original)
    reference = open_run(copy)
    ref_scores, ref_ids = scores(reference, "gist", 3), reference.train["id"].to_list()
    rng = random.Random(7)
    outcomes = {"RunError": 0, "harmless": 0}
    for _ in range(60):
        flipped = bytearray(original)
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        manifest.write_bytes(bytes(flipped))
        try:
            opened = open_run(copy)
        except RunError:
            outcomes["RunError"] += 1
            continue
        np.testing.assert_array_equal(scores(opened, "gist", 3), ref_scores)
        assert opened.train["id"].to_list() == ref_ids
        outcomes["harmless"] += 1
    manifest.write_bytes(original)
    REPORT["tamper"].append({"case": "60 random manifest bit flips", "outcome": outcomes})


def test_missing_run_and_not_a_run(tmp_path):
    with pytest.raises(RunError, match="no such run directory"):
        open_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match=r"not a run \(no manifest.json\)"):
        open_run(tmp_path / "empty")


class _Payload:
    """Unpickling this creates a marker file: proof that something from the run was executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", [f"{T}/gist_unit.npy", f"{T}/val_coords.npy", "grad_norms.npy"])
def test_pickle_bearing_npy_is_refused_and_never_executed(copy, tmp_path, name):
    marker = tmp_path / "executed"
    good = np.load(copy / name)
    payload = np.empty(good.shape, dtype=object)
    payload.flat[0] = _Payload(marker)
    with open(copy / name, "wb") as f:
        np.save(f, payload, allow_pickle=True)
    expect_run_error(copy, name, f"pickle {name}, manifest not updated")
    _rerecord(copy, name)  # even with a manifest that vouches for it
    expect_run_error(copy, name, f"pickle {name}, manifest updated")
    with pytest.raises(RunError, match=name):
        read_npy(copy / name, mmap=False)
    assert not marker.exists()


def test_consistently_edited_tables_and_arrays_give_clear_errors(copy):
    """Someone rewrites a file and the manifest's record of it: structural checks still name the file."""
    train = pl.read_parquet(copy / "train.parquet")
    cases = [
        ("train.parquet", lambda: train.drop("raw").write_parquet(copy / "train.parquet"), "raw column dropped"),
        ("train.parquet", lambda: train.with_columns(pl.lit("same").alias("id")).write_parquet(copy / "train.parquet"), "duplicate ids"),
        ("train.parquet", lambda: train.with_columns(pl.col("row").alias("id")).write_parquet(copy / "train.parquet"), "integer ids"),
        (("train.parquet", "gist_unit.npy"), lambda: train.head(5).write_parquet(copy / "train.parquet"), "rows removed"),
        (f"{T}/gist_unit.npy", lambda: np.save(copy / T / "gist_unit.npy", np.zeros((2, 3), np.float16)), "2-D coords"),
        (f"{T}/gist_unit.npy", lambda: np.save(copy / T / "gist_unit.npy", np.load(copy / T / "gist_unit.npy").astype(np.int64)), "integer coords"),
        (f"{T}/val_coords.npy", lambda: np.save(copy / T / "val_coords.npy", np.load(copy / T / "val_coords.npy")[:, :, :3]), "val k differs"),
        (f"{T}/gist_norm.npy", lambda: np.save(copy / T / "gist_norm.npy", np.full_like(np.load(copy / T / "gist_norm.npy"), np.nan)), "NaN norms"),
        (f"{T}/gist_unit.npy", lambda: np.save(copy / T / "gist_unit.npy", _with_nan(np.load(copy / T / "gist_unit.npy"))), "a NaN coordinate"),
        (f"{T}/gist_norm.npy", lambda: np.save(copy / T / "gist_norm.npy", -np.load(copy / T / "gist_norm.npy")), "negative norms"),
        ("grad_norms.npy", lambda: np.save(copy / "grad_norms.npy", -np.load(copy / "grad_norms.npy")), "negative gradient norms"),
        (f"{T}/less_scores.npy", lambda: np.save(copy / T / "less_scores.npy", _with_nan(np.load(copy / T / "less_scores.npy"))), "a NaN LESS score"),
    ]
    names = ("train.parquet", f"{T}/gist_unit.npy", f"{T}/gist_norm.npy", "grad_norms.npy", f"{T}/val_coords.npy", f"{T}/less_scores.npy", "manifest.json")
    backup = {n: (copy / n).read_bytes() for n in names}
    for names, damage, case in cases:
        damage()
        names = (names,) if isinstance(names, str) else names
        _rerecord(copy, names[0])
        if "LESS" in case:  # LESS scores are read when LESS is asked for
            with pytest.raises(RunError, match="less_scores.npy"):
                scores(open_run(copy), "less")
        else:
            expect_run_error(copy, names, f"consistent edit: {case}")
        for n, data in backup.items():
            (copy / n).write_bytes(data)
    open_run(copy)


def test_shards_of_a_finished_run_are_removed(copy):
    """Shards only serve resuming: a finished run has merged and deleted them, and opens without them."""
    assert not list(copy.glob("ckpt-*/pool/shard-*"))
    open_run(copy)
    REPORT["tamper"].append({"case": "shards of a finished run", "outcome": "deleted after the merge; run opens"})


def test_cli_on_a_damaged_run_prints_the_file_not_a_traceback(copy, capsys):
    (copy / T / "gist_unit.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(SystemExit) as exit_:
        cli_main(["info", "--run-dir", str(copy)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "gist_unit.npy" in err and "Traceback" not in err


def test_list_runs_skips_damaged_manifests(copy, tmp_path):
    root = copy.parent
    for name, data in {"bad-utf8": b"\xff\xfe{}", "a-list": b"[]", "nested": b"[" * 100000, "odd": b'{"format": "gist-curator-run", "config": 3, "created": 5}'}.items():
        (root / name).mkdir()
        (root / name / "manifest.json").write_bytes(data)
    listed = runs.list_runs(root)
    assert {r["id"] for r in listed} == {"run", "odd"}


def test_checksums_are_cached_per_file_state(copy, monkeypatch):
    calls = []
    real = manifest_mod.file_sha256
    monkeypatch.setattr(manifest_mod, "file_sha256", lambda p: calls.append(p) or real(p))
    manifest_mod._VERIFIED.clear()
    open_run(copy)
    first = len(calls)
    open_run(copy)
    assert first >= 6 and len(calls) == first  # unchanged files are not hashed again
    monkeypatch.setenv("GIST_VERIFY_MAX_MB", "0")
    manifest_mod._VERIFIED.clear()
    open_run(copy)
    assert len(calls) == first  # checksums off: sizes only
    monkeypatch.delenv("GIST_VERIFY_MAX_MB")
    open_run(copy)  # verified and remembered again
    unit = copy / "targets" / "val" / "gist_unit.npy"
    data = bytearray(unit.read_bytes())
    data[-1] ^= 0x40  # the same size, changed in place: the remembered verification must not vouch for it
    unit.write_bytes(bytes(data))
    expect_run_error(copy, "gist_unit.npy", "gist_unit.npy changed in place after a verified open")


# ============================================================================ curation edits


@pytest.fixture
def edit_run(tmp_path) -> Path:
    from gist_backend.devkit.synthetic import synthetic_run

    return synthetic_run(tmp_path / "run", n_train=40, n_val=6, n_tasks=2, k_max=4, n_ckpt=1, n_sources=2)


def _edit_child_main(run_dir: str, log: str, trap: dict | None) -> None:
    """A dashboard process: records two edits through the dashboard's own code; the trap fires in the second."""
    from dashboard import backend

    run = open_run(run_dir)
    ids = run.train["id"].to_list()
    backend.add_edit(run, "include", ids[:3], "row", "first edit")
    if trap:
        _install_trap(trap)
    backend.add_edit(run, "exclude", ids[3:5], "filter", "second edit")


def _lock_child_main(run_dir: str, log: str, trap: dict | None) -> None:
    """A writer that dies while it holds the edit log's lock."""

    from gist_backend.runs.lock import run_lock

    with run_lock(Path(run_dir), "edits", "a dying writer"):
        os.kill(os.getpid(), signal.SIGKILL)


def test_dashboard_killed_while_writing_an_edit_keeps_the_earlier_ones(edit_run, tmp_path):
    ids = open_run(edit_run).train["id"].to_list()
    code = run_child(str(edit_run), tmp_path / "edits.log", {"kind": "write", "name": "edits.json"}, target=_edit_child_main)
    assert code == -signal.SIGKILL
    edits = load_edits(edit_run)
    assert [(e["op"], e["ids"]) for e in edits] == [("include", ids[:3])]
    assert list(edit_run.glob(".edits.json.*.tmp"))  # the half-written temporary file, never read
    add_edit(edit_run, "exclude", ids[3:5], {"kind": "api"})  # the lock died with the process
    assert [e["op"] for e in load_edits(edit_run)] == ["include", "exclude"]
    REPORT["edits"].append({"case": "killed mid-write of the 2nd edit", "edits_kept": 1, "next_edit_ok": True})


def test_dashboard_killed_between_edits_and_while_holding_the_lock(edit_run, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from gist_backend.runs import lock

    ids = open_run(edit_run).train["id"].to_list()
    assert run_child(str(edit_run), tmp_path / "a.log", None, target=_edit_child_main) == 0
    assert len(load_edits(edit_run)) == 2
    # A writer killed while it holds the edit lock: the next writer is not blocked (it takes the lock without one wait).
    assert run_child(str(edit_run), tmp_path / "lock.log", None, target=_lock_child_main) == -signal.SIGKILL
    monkeypatch.setattr(lock, "time", SimpleNamespace(monotonic=time.monotonic, sleep=lambda s: pytest.fail("waited for a dead writer's lock")))
    add_edit(edit_run, "reset", ids[:1], {"kind": "api"})
    assert len(load_edits(edit_run)) == 3
    REPORT["edits"].append({"case": "killed between edits / holding the lock", "edits_kept": 2, "next_edit_ok": True})


# ============================================================================ dashboard safety


def test_allowed_roots_default_and_env(tmp_path, monkeypatch):
    from dashboard.paths import allowed_roots

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GIST_ALLOWED_DIRS", raising=False)
    monkeypatch.delenv("GIST_CACHE", raising=False)
    assert allowed_roots() == [tmp_path.resolve()]
    monkeypatch.setenv("GIST_CACHE", str(tmp_path / "elsewhere"))
    assert allowed_roots() == [tmp_path.resolve(), (tmp_path / "elsewhere").resolve()]
    monkeypatch.setenv("GIST_ALLOWED_DIRS", os.pathsep.join([str(tmp_path / "a"), "", "b", str(tmp_path / "a")]))
    assert allowed_roots() == [(tmp_path / "a").resolve(), (tmp_path / "b").resolve()]
    assert allowed_roots(extra=[tmp_path / "c"])[-1] == (tmp_path / "c").resolve()


def test_resolve_allowed_rejects_traversal_and_escaping_symlinks(tmp_path, monkeypatch):
    from dashboard.paths import resolve_allowed, resolve_export_path

    root = tmp_path / "root"
    (root / "cache" / "run").mkdir(parents=True)
    (root / "cache" / "run" / "manifest.json").write_text("{}")
    (tmp_path / "root2").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link-out").symlink_to(outside)
    (root / "link-in").symlink_to(root / "cache")
    (root / "loop").symlink_to(root / "loop")
    monkeypatch.chdir(root)
    monkeypatch.delenv("GIST_ALLOWED_DIRS", raising=False)
    monkeypatch.delenv("GIST_CACHE", raising=False)

    assert resolve_allowed("cache/run") == root / "cache" / "run"
    assert resolve_allowed(root / "cache" / "x" / ".." / "run", must_exist=True) == root / "cache" / "run"
    assert resolve_allowed("link-in/run") == root / "cache" / "run"
    assert resolve_allowed("cache/new/file.jsonl") == root / "cache" / "new" / "file.jsonl"
    rejected = [
        "../outside", "cache/../../outside/x.jsonl", str(outside), "/etc/passwd", "link-out/x.jsonl", "link-out",
        "~", "loop/x", "", "  ", "cache/\x00x", str(tmp_path / "root2"), "cache/run/../../../root2",
    ]  # fmt: skip
    for bad in rejected:
        with pytest.raises(PermissionError):
            resolve_allowed(bad)
    with pytest.raises(FileNotFoundError):
        resolve_allowed("cache/missing", must_exist=True)
    assert resolve_allowed(str(outside / "f"), roots=[outside]) == outside / "f"

    assert resolve_export_path("exports/sel.jsonl") == root / "exports" / "sel.jsonl"
    for bad in ["cache/run/manifest.json", "exports/sel.npy", "link-out/sel.jsonl", "../sel.jsonl"]:
        with pytest.raises(PermissionError):
            resolve_export_path(bad)
    REPORT["safety"].append({"case": "paths rejected", "count": len(rejected) + 4})


def test_check_cli_value():
    from dashboard.paths import check_cli_value

    assert check_cli_value("data/pool.jsonl", "pool file") == "data/pool.jsonl"
    assert check_cli_value("a b; rm -rf ~ $(x)", "pool file") == "a b; rm -rf ~ $(x)"
    for bad in ["--dump-full-grads", " -x", "--overwrite"]:
        with pytest.raises(ValueError, match="option"):
            check_cli_value(bad, "pool file")


def test_served_on_loopback_by_default(monkeypatch, tmp_path):
    import socket
    import tomllib

    from gist_backend import cli, commands

    config = tomllib.loads((Path(__file__).resolve().parents[1] / "dashboard" / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1"
    assert cli.build_parser().parse_args(["serve"]).address == "127.0.0.1"
    seen = {}
    monkeypatch.setattr(commands.subprocess, "call", lambda cmd, **kw: seen.update(cmd=cmd, kw=kw) or 0)
    (tmp_path / "x; rm -rf ~").mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    commands.serve(str(tmp_path / "x; rm -rf ~"), port)
    assert isinstance(seen["cmd"], list) and not seen["kw"].get("shell")
    assert seen["cmd"][seen["cmd"].index("--server.address") + 1] == "127.0.0.1"
    assert seen["kw"]["env"]["GIST_RUN_DIR"].endswith("/x; rm -rf ~")  # one value, never parsed by a shell


def test_no_shell_eval_or_pickle_in_the_code():
    """Nothing builds a shell command, evaluates text, or unpickles: checked over every source file."""
    import re

    root = Path(__file__).resolve().parents[1]
    patterns = {
        "shell=True": r"shell\s*=\s*True", "os.system": r"\bos\.system\(", "os.popen": r"\bos\.popen\(",
        "eval(": r"(?<![\w.])eval\(", "exec(": r"(?<![\w.])exec\(", "pickle": r"\bimport pickle|\bpickle\.load|cloudpickle|joblib\.load",
        "allow_pickle=True": r"allow_pickle\s*=\s*True", "trust_remote_code=True": r"trust_remote_code\s*=\s*True",
        "torch.load without weights_only": r"torch\.load\((?![^)]*weights_only\s*=\s*True)",
    }  # fmt: skip
    files = sorted((root / "gist_backend").rglob("*.py")) + sorted((root / "dashboard").rglob("*.py"))
    found = [f"{f.relative_to(root)}: {name}" for f in files for name, rx in patterns.items() if re.search(rx, f.read_text())]
    assert not found, found
    REPORT["safety"].append({"case": "source files scanned", "count": len(files)})


def test_dashboard_compute_command_is_an_argument_list():
    """The dashboard's compute launcher passes user text as separate arguments, never through a shell."""
    from dashboard import jobs
    from gist_backend.config import ComputeConfig

    hostile = "x; rm -rf ~ && $(curl evil) `id` 'q\" | tee /tmp/p"
    config = ComputeConfig(model=hostile, train=[hostile], val=["v.jsonl"], adapter=hostile)
    cmd = jobs.command("compute", config.to_argv(), "cache/r")
    assert isinstance(cmd, list) and all(isinstance(c, str) for c in cmd)
    assert cmd.count(hostile) == 3  # each a single argv element
    from gist_backend.cli import build_parser, config_from_args

    assert config_from_args(build_parser().parse_args(["compute", *config.to_argv(), "--run-dir", "r"])) == config  # the argv round-trips


def test_dashboard_form_rejects_option_like_paths():
    """A pool line like '--dump-full-grads' would be read by the compute CLI as an option: the form refuses it."""
    from dashboard import jobs
    from gist_backend.config import ComputeConfig

    config = ComputeConfig(model="m", train=["pool.jsonl", "--dump-full-grads", "/tmp/anywhere"], val=["v.jsonl"])
    assert any("--dump-full-grads" in problem for problem in jobs.compute_problems(config))
    assert not jobs.compute_problems(ComputeConfig(model="m", train=["./-odd-name.jsonl"], val=["v.jsonl"]))
    # and should one reach the launcher anyway, its argv still reads it as a file name, never as an option
    from gist_backend.cli import build_parser, config_from_args

    odd = ComputeConfig(model="-m", train=["-a.jsonl", "--dump-full-grads=/tmp/x"], val=["-v.jsonl"], adapter="-ad")
    args = build_parser().parse_args(["compute", *odd.to_argv(), "--run-dir", "r"])
    back = config_from_args(args)
    assert args.dump_full_grads is None and (back.model, back.train, back.val, back.adapter) == (
        "./-m", ["./-a.jsonl", "./--dump-full-grads=/tmp/x"], ["./-v.jsonl"], "./-ad")
