"""2-D maps: plain coordinates at ranks 1–2, UMAP above, shapes, sampling, and the per-rank cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gist_backend.curation import maps
from gist_backend.curation.maps import umap_map
from gist_backend.runs import open_run
from gist_backend.devkit.synthetic import synthetic_run

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = synthetic_run(tmp_path_factory.mktemp("maps") / "run", n_train=300, n_val=18, n_tasks=3, k_max=12, n_ckpt=2, n_sources=3, seed=1)
    return open_run(path)


def no_umap(*args, **kwargs):
    raise AssertionError("the map was recomputed although it is cached")


def test_low_ranks_are_the_coordinates(run, monkeypatch):
    monkeypatch.setattr(maps, "_umap", no_umap)  # ranks 1-2 never embed
    two = umap_map(run, 2)
    np.testing.assert_array_equal(two["train_xy"], run.train_coords[-1, :, :2])
    np.testing.assert_array_equal(two["val_xy"], run.val_coords[-1, :, :2])
    labels = np.asarray(run.val_tasks)
    means = [run.val_coords[-1][labels == t, :2].mean(axis=0) for t in sorted(set(run.val_tasks))]
    np.testing.assert_allclose(two["centroid_xy"], np.stack(means), rtol=1e-6)
    one = umap_map(run, 1)
    assert one["train_xy"].shape == (300, 2) and not one["train_xy"][:, 1].any()
    np.testing.assert_array_equal(one["train_xy"][:, 0], run.train_coords[-1, :, 0])
    assert (run.path / "maps" / "umap-synthetic-r1.safetensors").exists()


def test_a_cached_map_of_the_wrong_shape_or_with_nan_is_never_served(run, monkeypatch):
    from safetensors import safe_open

    from gist_backend.runs.files import write_tensors

    good = umap_map(run, 2)
    path = run.path / "maps" / "umap-synthetic-r2.safetensors"
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()  # the right parameters: only the arrays are wrong
    for name, bad in (("train_xy", good["train_xy"][:5]), ("centroid_xy", good["centroid_xy"][:1]), ("val_xy", np.full_like(good["val_xy"], np.nan))):
        write_tensors(path, {**good, name: np.ascontiguousarray(bad)}, metadata=metadata)
        assert maps.cached_map(run, 2) is None, name  # map rows become edits: a short map would exclude the wrong examples
        rebuilt = umap_map(run, 2)
        for k in maps.MAP_KEYS:
            np.testing.assert_array_equal(rebuilt[k], good[k])


@pytest.mark.slow  # UMAP's numba JIT costs ~12 s of CPU in a fresh process, whatever the data size
def test_umap_shapes_and_cache(run, monkeypatch):
    path = run.path / "maps" / "umap-synthetic-r6.safetensors"
    path.unlink(missing_ok=True)
    first = umap_map(run, 6, n_neighbors=10)
    assert first["train_xy"].shape == (300, 2) and first["val_xy"].shape == (18, 2) and first["centroid_xy"].shape == (3, 2)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in first.values())
    assert first["train_xy"].std(axis=0).min() > 0  # a spread-out map, not a collapsed one
    assert path.exists()
    mtime = path.stat().st_mtime_ns

    monkeypatch.setattr(maps, "_umap", no_umap)
    again = umap_map(run, 6, n_neighbors=10)
    for k in maps.MAP_KEYS:
        np.testing.assert_array_equal(again[k], first[k])
    assert path.stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="recomputed"):
        umap_map(run, 6, n_neighbors=10, seed=1)  # other parameters: not served from the cache
    monkeypatch.undo()

    path.write_bytes(b"garbage")  # a damaged cache is rebuilt, not an error
    monkeypatch.setattr(maps, "_umap", lambda *a: {k: np.ones((n, 2), np.float32) for k, n in zip(maps.MAP_KEYS, (300, 18, 3))})
    assert umap_map(run, 6, n_neighbors=10)["train_xy"].shape == (300, 2)


@pytest.mark.slow
def test_umap_fits_a_sample_and_places_the_rest(run):
    out = umap_map(run, 4, fit_sample=200, n_neighbors=8)
    assert out["train_xy"].shape == (300, 2) and np.isfinite(out["train_xy"]).all()
    assert out["centroid_xy"].shape == (3, 2) and out["val_xy"].shape == (18, 2)
    # rows outside the sample sit inside the hull of the fitted rows (weighted means of fitted neighbours)
    fitted = np.sort(np.random.default_rng(0).choice(300, 200, replace=False))
    rest = np.setdiff1d(np.arange(300), fitted)
    lo, hi = out["train_xy"][fitted].min(axis=0), out["train_xy"][fitted].max(axis=0)
    assert ((out["train_xy"][rest] >= lo - 1e-4) & (out["train_xy"][rest] <= hi + 1e-4)).all()
    with pytest.raises(ValueError, match="rank must be a whole number from 1"):
        umap_map(run, 0)


def test_exact_knn():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 5)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    idx, dist = maps.knn(x, x, 4, block_elems=7 * 50)  # several blocks
    sims = x @ x.T
    np.testing.assert_array_equal(idx, np.argsort(-sims, axis=1, kind="stable")[:, :4])
    np.testing.assert_allclose(dist, 1 - np.take_along_axis(sims, idx, axis=1), atol=1e-6)
    assert (idx[:, 0] == np.arange(50)).all()


@pytest.mark.slow
def test_compute_starts_the_map_in_the_background(tiny_llama, toy_data, tmp_path, monkeypatch):
    """After `gist-curate compute` the Map view's UMAP is computed by a background process and cached (progress in maps/)."""
    import json
    import time

    from gist_backend.cli import main as cli_main
    from gist_backend.curation.maps import cached_map

    monkeypatch.setenv("GIST_MAP_AFTER_COMPUTE", "1")
    pool, val = toy_data
    run_dir = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # a relative --run-dir, as users type it
    cli_main(["compute", "--model", str(tiny_llama), "--train", str(pool), "--val", str(val), "--run-dir", "run", "--k-max", "6",
              "--warmup-epochs", "1", "--warmup-fraction", "0.2", "--warmup-batch", "4", "--max-len", "64"])  # fmt: skip
    assert (run_dir / "map.pid").exists()
    from dashboard import jobs

    assert jobs.job_status(run_dir, "map").state in ("running", "complete")  # the dashboard knows the job by its absolute folder
    deadline = time.time() + 300
    while (json.loads((run_dir / "maps" / "progress.json").read_text()).get("status") if (run_dir / "maps" / "progress.json").exists() else None) is None:
        assert time.time() < deadline, (run_dir / "map.log").read_text()[-2000:]
        time.sleep(1)
    assert json.loads((run_dir / "maps" / "progress.json").read_text())["status"] == "complete"
    run = open_run(run_dir)
    assert cached_map(run, run.k_max)["train_xy"].shape == (run.train.height, 2)
