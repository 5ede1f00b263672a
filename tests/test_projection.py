import numpy as np
import pytest
import scipy.linalg
import torch

from gist_backend.methods.projection import Projection, fwht, make_projection, project

torch.set_num_threads(1)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 64, 256])
def test_fwht_equals_scipy_hadamard(n):
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n))
    want = x.double().numpy() @ scipy.linalg.hadamard(n)
    np.testing.assert_allclose(fwht(x).double().numpy(), want, rtol=1e-5, atol=1e-5 * np.sqrt(n))


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.zeros(2, 6))


def _correlated(b, d, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4, d, generator=g)
    mix = torch.randn(b, 4, generator=g)
    return mix @ base + 0.7 * torch.randn(b, d, generator=g)  # a spread of cosines, not all ≈ 0


def test_jl_norms_and_cosines():
    d, p = 5000, 1024
    x = _correlated(60, d, 0)
    y = project(make_projection(d, p, seed=3), x)
    assert y.shape == (60, p) and y.dtype == torch.float32
    ratio = y.norm(dim=1) / x.norm(dim=1)
    assert float((ratio - 1).abs().max()) < 0.15
    cx = torch.nn.functional.normalize(x, dim=1)
    cy = torch.nn.functional.normalize(y, dim=1)
    err = (cx @ cx.T - cy @ cy.T).abs()
    assert float(err.max()) < 0.15 and float(err.mean()) < 0.04
    # inner products: relative error w.r.t. the product of norms
    ip = (x @ x.T - y @ y.T).abs() / (x.norm(dim=1)[:, None] * x.norm(dim=1)[None, :])
    assert float(ip.max()) < 0.2


def test_unbiased_norm_over_seeds():
    d, p = 300, 64
    x = _correlated(1, d, 1)
    sq = torch.stack([project(make_projection(d, p, s), x).square().sum() for s in range(200)])
    assert abs(float(sq.mean() / x.square().sum()) - 1) < 0.05


def test_deterministic_chunked_and_seeds():
    d, p = 1000, 128
    x = torch.randn(37, d)
    proj = make_projection(d, p, seed=7)
    full = project(proj, x)
    assert torch.equal(full, project(proj, x))
    assert torch.equal(full, project(make_projection(d, p, seed=7), x, chunk_rows=5))
    assert torch.equal(full[3], project(proj, x[3]))
    assert torch.equal(full[10:20], project(proj, x[10:20], chunk_rows=1))
    other = project(make_projection(d, p, seed=8), x)
    assert not torch.allclose(full, other)


def test_half_inputs_match_fp32_of_same_values():
    d, p = 700, 64
    x = torch.randn(9, d).half()
    proj = make_projection(d, p, 1)
    assert torch.equal(project(proj, x), project(proj, x.float()))


def test_identity_when_p_at_least_d():
    x = torch.randn(4, 50, dtype=torch.float64)
    proj = make_projection(50, 64)
    assert proj.identity and make_projection(50, 50).identity and not make_projection(51, 50).identity
    y = project(proj, x)  # identity, zero-padded to p columns: every inner product exact
    assert y.shape == (4, 64) and y.dtype == torch.float32
    assert torch.equal(y[:, :50], x.float()) and not y[:, 50:].any()
    y[0, 0] = 123.0
    assert x[0, 0] != 123.0  # a copy, never an alias
    assert torch.equal(project(make_projection(50, 50), x.half()), x.half().float())


def test_power_of_two_d_and_validation():
    proj = make_projection(256, 32, 0)
    assert proj.n == 256 and make_projection(257, 32).n == 512 and make_projection(1, 1).n == 1
    assert project(proj, torch.randn(3, 256)).shape == (3, 32)
    with pytest.raises(ValueError, match="expects"):
        project(proj, torch.randn(3, 255))
    with pytest.raises(ValueError):
        make_projection(0, 5)
    assert Projection(10, 4, 1) == make_projection(10, 4, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_identical():
    d, p = 3000, 512
    x = torch.randn(33, d)
    proj = make_projection(d, p, 11)
    assert torch.equal(project(proj, x), project(proj, x.cuda(), chunk_rows=4).cpu())
