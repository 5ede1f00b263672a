"""GIST math: subspace, coordinates and scores against straightforward independent computations."""

from __future__ import annotations

import numpy as np
import pytest

from gist_backend.methods.geometry import coupling, module_slices, normalised_block, spectrum
from gist_backend.methods.gist import fit_subspace, gist_scores


def svd_scores(val_grads, train_grads, tasks, rank):
    """Independent GIST: full SVD of G, project onto the top-r right singular vectors, cosine."""
    _, _, vt = np.linalg.svd(val_grads.astype(np.float64), full_matrices=False)
    v = vt[:rank].T
    z_val, z_train = val_grads @ v, train_grads @ v
    labels = np.asarray(tasks)
    best = np.full(len(train_grads), -np.inf)
    for t in sorted(set(tasks)):
        c = z_val[labels == t].mean(0)
        cos = z_train @ c / (np.linalg.norm(z_train, axis=1) * np.linalg.norm(c))
        best = np.maximum(best, cos)
    return best


def svd_global_scores(val_grads, train_grads, tasks, rank):
    """Independent GIST-global: the cosine of the whole gradient with each sub-task's direction V_r ĉ_t in gradient space."""
    _, _, vt = np.linalg.svd(val_grads.astype(np.float64), full_matrices=False)
    v = vt[:rank].T
    z_val = val_grads @ v
    labels = np.asarray(tasks)
    best = np.full(len(train_grads), -np.inf)
    for t in sorted(set(tasks)):
        direction = v @ z_val[labels == t].mean(0)
        best = np.maximum(best, train_grads @ direction / (np.linalg.norm(train_grads, axis=1) * np.linalg.norm(direction)))
    return best


@pytest.fixture
def gradients():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(6, 300))
    val = rng.normal(size=(20, 6)) @ mixing + 0.05 * rng.normal(size=(20, 300))
    train = rng.normal(size=(50, 6)) @ mixing + 0.05 * rng.normal(size=(50, 300))
    tasks = ["a"] * 7 + ["b"] * 7 + ["c"] * 6
    return val.astype(np.float32), train.astype(np.float32), tasks


def test_basis_is_orthonormal_and_coordinates_are_projections(gradients):
    val, _, _ = gradients
    sigma, basis, val_coords = fit_subspace(val, k_max=10, block=64)
    np.testing.assert_allclose(basis.T @ basis, np.eye(10), atol=1e-4)
    np.testing.assert_allclose(val @ basis, val_coords, atol=1e-4)
    np.testing.assert_allclose(sigma, np.linalg.svd(val.astype(np.float64), compute_uv=False), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rank", [1, 3, 6, 10])
def test_scores_from_stored_coordinates_equal_svd_recomputation_at_every_rank(gradients, rank):
    val, train, tasks = gradients
    _, basis, val_coords = fit_subspace(val, k_max=10)
    stored = (train @ basis)[None]  # what a run keeps: k_max coordinates per example
    ours = gist_scores(stored, val_coords[None], tasks, [1.0], rank)
    np.testing.assert_allclose(ours, svd_scores(val, train, tasks, rank), atol=1e-4)


def _cosines(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Plain cosine of every row of x with every row of c."""
    return (x @ c.T) / np.linalg.norm(x, axis=1, keepdims=True) / np.linalg.norm(c, axis=1)[None, :]


def _centroids(val_coords: np.ndarray, tasks: list[str], rank: int) -> np.ndarray:
    return np.stack([val_coords[np.asarray(tasks) == t, :rank].mean(0) for t in sorted(set(tasks))])


def test_checkpoint_weights_average_cosines_before_the_max(gradients):
    val, train, tasks = gradients
    runs = []
    for scale in (1.0, -2.0):  # a second "checkpoint" with different gradients
        _, basis, val_coords = fit_subspace(val * scale + (scale < 0) * 0.3, k_max=5)
        runs.append(((train * scale) @ basis, val_coords))
    train_c = np.stack([r[0] for r in runs])
    val_c = np.stack([r[1] for r in runs])
    ours = gist_scores(train_c, val_c, tasks, [3.0, 1.0], 4)
    expected = sum(w * _cosines(t[:, :4], _centroids(v, tasks, 4)) for w, t, v in zip((0.75, 0.25), train_c, val_c))
    np.testing.assert_allclose(ours, expected.max(1), atol=1e-5)


def test_gist_global_is_the_cosine_of_the_whole_gradient_with_the_target_direction(gradients):
    val, train, tasks = gradients
    _, basis, val_coords = fit_subspace(val, k_max=8)
    coords = train @ basis
    norms = np.linalg.norm(coords, axis=1)
    unit = coords / norms[:, None]
    for rank in (1, 3, 8):
        centroids = _centroids(val_coords, tasks, rank)
        directions = (basis[:, :rank] @ (centroids / np.linalg.norm(centroids, axis=1, keepdims=True)).T).T  # unit vectors in gradient space
        expected = _cosines(train, directions).max(1)
        ours = gist_scores(unit[None], val_coords[None], tasks, [1.0], rank, coord_norms=norms[None], grad_norms=np.linalg.norm(train, axis=1)[None])
        np.testing.assert_allclose(ours, expected, atol=1e-5)
        # and it is the published subspace cosine times the share of the gradient the first `rank` directions hold
        inside = gist_scores(unit[None], val_coords[None], tasks, [1.0], rank)
        share = np.linalg.norm(coords[:, :rank], axis=1) / np.linalg.norm(train, axis=1)
        per_task_product = _cosines(coords[:, :rank], centroids) * share[:, None]
        np.testing.assert_allclose(ours, per_task_product.max(1), atol=1e-5)
        assert np.all(np.abs(ours) <= np.abs(inside) + 1e-6)
    with pytest.raises(ValueError, match="needs both coord_norms"):
        gist_scores(unit[None], val_coords[None], tasks, [1.0], 3, grad_norms=np.linalg.norm(train, axis=1)[None])


def test_rank_deficient_validation_keeps_only_real_directions():
    val = np.ones((4, 10), np.float32)  # rank one
    sigma, basis, _ = fit_subspace(val, k_max=8)
    assert basis.shape == (10, 1) and sigma[0] == pytest.approx(np.sqrt(40), rel=1e-6)


def test_coupling_fraction_matches_explicit_second_moment(gradients):
    val, _, _ = gradients
    g = val[:, :40].astype(np.float64)
    slices = {"q": (0, 24), "v": (24, 40)}
    summary, blocks = coupling(g, slices, block_size=16)
    m = g.T @ g / g.shape[0]
    rho = 1 - (np.diag(m) ** 2).sum() / (m**2).sum()
    assert summary["rho"] == pytest.approx(rho, rel=1e-9)
    mq = m[:24, :24]
    assert summary["rho_per_module"]["q"] == pytest.approx(1 - (np.diag(mq) ** 2).sum() / (mq**2).sum(), rel=1e-9)
    top = np.sort(np.argsort(-np.diag(m))[:16])
    np.testing.assert_array_equal(blocks["top_idx"], top)
    d = np.sqrt(np.diag(m)[top])
    np.testing.assert_allclose(blocks["top_block"], np.abs(m[np.ix_(top, top)]) / d[:, None] / d[None, :], rtol=1e-5)
    assert np.allclose(np.diag(normalised_block(g)), 1.0)


def test_spectrum_ranks_and_module_slices():
    spec = spectrum(np.array([3.0, 2.0, 1.0, 0.5]))
    assert spec["cumulative"][-1] == pytest.approx(1.0)
    assert (spec["r90"], spec["r95"], spec["r99"]) == (2, 3, 4)
    names = ["base_model.model.l.0.q.lora_A.default.weight", "base_model.model.l.0.q.lora_B.default.weight", "base_model.model.l.0.v.lora_A.default.weight"]
    assert module_slices(names, [4, 6, 3]) == {"l.0.q": (0, 10), "l.0.v": (10, 13)}
