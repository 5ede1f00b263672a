import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from gist_backend.g2is import g2is_select, knn_graph, pca_components, split_budget

torch.set_num_threads(1)


def _data(n=300, m=40, p=32, seed=0, shared=1.5, noise=1.0):
    """Clustered features with a shared direction (mostly non-negative dots, like real gradients)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, p, generator=g)
    common = torch.randn(p, generator=g)
    train = shared * common + centres[torch.randint(0, 8, (n,), generator=g)] + noise * torch.randn(n, p, generator=g)
    val = shared * common + centres[torch.randint(0, 3, (m,), generator=g)] + noise * torch.randn(m, p, generator=g)
    return train, val


def _reference(train, val, budget, k, delta, n_anchors, thr):
    """The method exactly as written in DESIGN §4, in float64 with explicit loops over the chosen set."""
    x = train.double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    v = val.double().numpy()
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    mu = v.mean(0)
    _, s, wt = np.linalg.svd(v - mu, full_matrices=False)
    ratio = s**2 / np.sum(s**2)
    kc = int(np.argmax(np.cumsum(ratio) >= thr - 1e-12)) + 1
    comps = [wt[c] if wt[c] @ mu >= 0 else -wt[c] for c in range(kc)]
    # largest remainder with exact fractions
    fr = [Fraction(float(r)) for r in ratio[:kc]]
    quotas = [budget * f / sum(fr) for f in fr]
    parts = [math.floor(q) for q in quotas]
    for c in sorted(range(kc), key=lambda c: (-(quotas[c] - parts[c]), c))[: budget - sum(parts)]:
        parts[c] += 1
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    nbrs = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    used, selected = set(), []
    for c in range(kc):
        vc = comps[c]
        cv = x @ vc
        anchors = np.argsort(-cv, kind="stable")[:n_anchors]
        chosen = []

        def ok(i):
            if i in used or any(x[i] @ x[s] < 0 for s in chosen):
                return False
            if not chosen:  # S = 0: rule (b) is vacuous
                return True
            S = x[chosen].sum(0)
            before = abs(S @ vc) / np.linalg.norm(S)
            after = abs((S + x[i]) @ vc) / np.linalg.norm(S + x[i])
            return after >= delta * before

        while len(chosen) < parts[c]:
            if not chosen:
                free = [a for a in anchors if a not in used]
                pick = free[0] if free else None
            else:
                pick = next((int(j) for j in nbrs[chosen[-1]] if ok(int(j))), None)
            if pick is None:
                pick = next((int(j) for j in np.argsort(-cv, kind="stable") if ok(int(j))), None)
            if pick is None:
                break
            chosen.append(int(pick))
            used.add(int(pick))
        selected.extend(chosen)
    return selected, parts


def _replay(train, res, delta, val):
    """Check the rules step by step from the result's walk order."""
    x = train.double()
    x = x / x.norm(dim=1, keepdim=True)
    comps, _ = pca_components(val)
    assert len(set(res.selected)) == len(res.selected)
    for info, vc in zip(res.per_component, comps.double()):
        ch = info["chosen"]
        for t in range(1, len(ch)):
            prev = x[ch[:t]]
            assert float((prev @ x[ch[t]]).min()) >= -1e-6, "conflicting pair within a component"
            S = prev.sum(0)
            before = abs(float(S @ vc)) / float(S.norm())
            after = abs(float((S + x[ch[t]]) @ vc)) / float((S + x[ch[t]]).norm())
            assert after >= delta * before - 1e-6, "delta rule violated"
        assert info["shortfall"] == info["budget"] - len(ch)


def test_split_budget_largest_remainder():
    assert split_budget(10, [0.4, 0.35, 0.25]) == [4, 4, 2]  # remainders .5/.5 tie → lower index
    assert split_budget(7, [1, 1, 1]) == [3, 2, 2]
    assert split_budget(0, [0.3, 0.2]) == [0, 0]
    g = np.random.default_rng(0)
    for _ in range(100):
        r = list(g.random(int(g.integers(1, 9))))
        b = int(g.integers(0, 1000))
        parts = split_budget(b, r)
        assert sum(parts) == b and all(abs(pi - b * ri / sum(r)) < 1 for pi, ri in zip(parts, r))
    with pytest.raises(ValueError):
        split_budget(3, [0.0, 0.0])


@pytest.mark.parametrize("block", [1000, 7, 64])
def test_knn_graph_equals_bruteforce(block):
    x = torch.nn.functional.normalize(torch.randn(150, 12, generator=torch.Generator().manual_seed(2)), dim=1)
    sims = (x.double() @ x.double().T).numpy()
    np.fill_diagonal(sims, -np.inf)
    want = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    got = knn_graph(x, 10, block=block)
    assert got.dtype == torch.int32 and got.shape == (150, 10)
    np.testing.assert_array_equal(got.numpy(), want)
    assert knn_graph(x[:5], 10).shape == (5, 4)  # k clamped to N-1


@pytest.mark.parametrize("flush_every", [1, 3, 64])
def test_matches_reference_walk(flush_every):
    train, val = _data()
    res = g2is_select(train, val, 40, knn_k=10, delta=0.8, n_anchors=20, device="cpu", block=64,
                      progress=False, flush_every=flush_every)
    ref, parts = _reference(train, val, 40, 10, 0.8, 20, 0.5)
    assert res.selected == ref
    assert [c["budget"] for c in res.per_component] == parts and sum(parts) == 40
    assert len(res.per_component) >= 2
    _replay(train, res, 0.8, val)


def test_reference_with_tight_constraints_and_fallbacks():
    train, val = _data(n=200, p=24, seed=1, shared=0.0, noise=1.2)  # many conflicts → fallbacks and shortfalls
    res = g2is_select(train, val, 60, knn_k=5, delta=0.9, n_anchors=1, block=50, progress=False, flush_every=4)
    ref, _ = _reference(train, val, 60, 5, 0.9, 1, 0.5)
    assert res.selected == ref
    comps = res.per_component
    assert sum(c["fallback_steps"] for c in comps) > 0
    assert sum(c["shortfall"] for c in comps) > 0
    assert any(c["start_from_anchor"] is False for c in comps)  # its only anchor was taken by an earlier component
    _replay(train, res, 0.9, val)


def test_rules_hold_and_deterministic():
    train, val = _data(n=400, p=48, seed=3)
    kw = dict(knn_k=15, delta=0.8, n_anchors=50, progress=False, block=100)
    before = train.clone()
    a = g2is_select(train, val, 60, **kw)
    b = g2is_select(train, val, 60, **kw)
    assert torch.equal(train, before)  # inputs are never modified
    assert a.selected == b.selected and a.per_component == b.per_component
    assert sum(c["budget"] for c in a.per_component) == 60
    assert len(a.selected) == 60 - sum(c["shortfall"] for c in a.per_component)
    assert all(c["start_from_anchor"] for c in a.per_component if c["budget"])
    _replay(train, a, 0.8, val)
    c = g2is_select(train.half(), val.half(), 60, **kw)  # fp16 input works (normalised in fp32)
    _replay(train.half().float(), c, 0.8, val.half().float())


def test_shortfall_when_every_pair_conflicts():
    n = 30  # regular simplex: all pairwise dots are -1/(n-1) → after the first pick nothing qualifies
    simplex = torch.eye(n) - 1.0 / n
    train = torch.cat([simplex, torch.zeros(n, 2)], dim=1)
    g = torch.Generator().manual_seed(0)
    direction = torch.zeros(n + 2)
    direction[0] = 1.0
    val = torch.randn(20, 1, generator=g) * 5 * direction + 0.01 * torch.randn(20, n + 2, generator=g) + torch.ones(n + 2) * 0.1
    res = g2is_select(train, val, 6, knn_k=5, progress=False)
    assert len(res.per_component) == 1
    info = res.per_component[0]
    assert info["budget"] == 6 and len(info["chosen"]) == 1 and info["shortfall"] == 5
    assert res.selected == info["chosen"]


def test_zero_rows_never_selected_and_budget_beyond_pool():
    train, val = _data(n=60, p=16, seed=4)
    train[::3] = 0.0
    res = g2is_select(train, val, 100, knn_k=8, n_anchors=5, progress=False)
    assert not set(res.selected) & set(range(0, 60, 3))
    assert sum(c["budget"] for c in res.per_component) == 100
    assert sum(c["shortfall"] for c in res.per_component) == 100 - len(res.selected) >= 60
    _replay(train[[i for i in range(60) if i % 3]].clone(), _remap(res, [i for i in range(60) if i % 3]), 0.8, val)


def _remap(res, keep):
    pos = {r: i for i, r in enumerate(keep)}
    for c in res.per_component:
        c["chosen"] = [pos[i] for i in c["chosen"]]
    res.selected = [pos[i] for i in res.selected]
    return res


def test_pca_orientation_and_threshold():
    train, val = _data()
    comps, ratios = pca_components(val, 0.5)
    assert sum(ratios[:-1]) < 0.5 <= sum(ratios) + 1e-9
    v = torch.nn.functional.normalize(val, dim=1)
    assert bool(((comps @ v.mean(0)) >= 0).all())
    torch.testing.assert_close(comps @ comps.T, torch.eye(len(ratios)), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="at least 2 validation"):
        pca_components(val[:1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_reference():
    train, val = _data()
    res = g2is_select(train.cuda(), val.cuda(), 40, knn_k=10, n_anchors=20, block=64, progress=False)
    ref, _ = _reference(train, val, 40, 10, 0.8, 20, 0.5)
    assert res.selected == ref
    x = torch.nn.functional.normalize(train, dim=1)
    assert torch.equal(knn_graph(x.cuda(), 10, block=50).cpu(), knn_graph(x, 10))
    approx = knn_graph(x.cuda(), 10, knn_dtype=torch.bfloat16).cpu()  # approximate: most neighbours agree
    assert (approx[:, :5] == knn_graph(x, 10)[:, :5]).float().mean() > 0.6
