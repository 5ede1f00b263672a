
import numpy as np
import pytest
import torch

from gist_backend.methods.g2is import g2is_select, knn_graph, pca_components, split_budget

torch.set_num_threads(1)


def _data(n=300, m=40, p=32, seed=0, shared=1.5, noise=1.0):
    """Clustered features with a shared direction (mostly non-negative dots, like real gradients)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, p, generator=g)
    common = torch.randn(p, generator=g)
    train = shared * common + centres[torch.randint(0, 8, (n,), generator=g)] + noise * torch.randn(n, p, generator=g)
    val = shared * common + centres[torch.randint(0, 3, (m,), generator=g)] + noise * torch.randn(m, p, generator=g)
    return train, val


def _authors_budgets(total: int, ratios: list[float]) -> list[int]:
    """The G2IS authors' largest-remainder split, restated: floor, then +1 in reversed numpy argsort order of remainders."""
    exact = total * np.asarray(ratios) / np.sum(ratios)
    parts = np.floor(exact).astype(int)
    for c in np.argsort(exact - parts)[::-1][: total - parts.sum()]:
        parts[c] += 1
    return parts.tolist()


def _reference(train, val, budget, k, delta, n_anchors, thr, orientation="sklearn"):
    """An independent port of the G2IS authors' walk (their gradient_walk.py, restated in float64 numpy).

    PCA is scikit-learn's, exactly as they call it (``PCA(n_components=thr)`` on the normalised validation
    features, components used with the sign sklearn gives them); budgets split by their largest-remainder rule;
    anchors are the top ``n_anchors`` by cosine with the component; the walk scans the last pick's neighbours
    (sorted by similarity) and falls back to all rows sorted by cosine with the component, each candidate
    checked against no-conflict and |cos(S + x, v)| ≥ δ |cos(S, v)|; a component stops when nothing passes.
    ``orientation="mean"`` flips each component along the mean validation feature first (our option).
    """
    from sklearn.decomposition import PCA

    x = train.double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    v = val.double().numpy()
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    pca = PCA(n_components=thr).fit(v)
    comps = pca.components_ / np.linalg.norm(pca.components_, axis=1, keepdims=True)
    if orientation == "mean":
        comps = np.stack([c if c @ v.mean(0) >= 0 else -c for c in comps])
    parts = _authors_budgets(budget, list(pca.explained_variance_ratio_))
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    nbrs = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    used, selected = set(), []
    for c, vc in enumerate(comps):
        cv = x @ vc
        anchors = np.argsort(-cv, kind="stable")[:n_anchors]
        chosen = []

        def ok(i):
            if i in used or any(x[i] @ x[s] < 0 for s in chosen):
                return False
            S = x[chosen].sum(0)
            before = abs(S @ vc) / np.linalg.norm(S) if chosen else 0.0
            after = abs((S + x[i]) @ vc) / np.linalg.norm(S + x[i])
            return after >= delta * before

        while len(chosen) < parts[c]:
            pick = next((int(a) for a in anchors if int(a) not in used), None) if not chosen else next((int(j) for j in nbrs[chosen[-1]] if ok(int(j))), None)
            if pick is None:
                pick = next((int(j) for j in np.argsort(-cv, kind="stable") if ok(int(j))), None)
            if pick is None:
                break
            chosen.append(pick)
            used.add(pick)
        selected.extend(chosen)
    return selected, parts


def _replay(train, res, delta, val, orientation="sklearn"):
    """Check the rules step by step from the result's walk order."""
    x = train.double()
    x = x / x.norm(dim=1, keepdim=True)
    comps, _ = pca_components(val, orientation=orientation)
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
    assert split_budget(10, [0.4, 0.35, 0.25]) == [4, 3, 3]  # remainders .5/.5 tie → the later component (reversed argsort)
    assert split_budget(7, [1, 1, 1]) == [2, 2, 3] == _authors_budgets(7, [1, 1, 1])
    assert split_budget(0, [0.3, 0.2]) == [0, 0]
    g = np.random.default_rng(0)
    for _ in range(100):
        r = list(g.random(int(g.integers(1, 9))))
        b = int(g.integers(0, 1000))
        parts = split_budget(b, r)
        assert sum(parts) == b and all(abs(pi - b * ri / sum(r)) < 1 for pi, ri in zip(parts, r))
        assert parts == _authors_budgets(b, r)
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


@pytest.mark.parametrize("flush_every,orientation", [(1, "sklearn"), (3, "mean"), (64, "sklearn")])
def test_matches_the_authors_walk(flush_every, orientation):
    train, val = _data()
    res = g2is_select(train, val, 40, knn_k=10, delta=0.8, n_anchors=20, device="cpu", block=64,
                      progress=False, flush_every=flush_every, orientation=orientation)
    ref, parts = _reference(train, val, 40, 10, 0.8, 20, 0.5, orientation)
    assert res.selected == ref
    assert [c["budget"] for c in res.per_component] == parts and sum(parts) == 40
    assert len(res.per_component) >= 2
    _replay(train, res, 0.8, val, orientation)


def test_orientation_changes_the_walk_and_sklearn_signs_match():
    from sklearn.decomposition import PCA

    train, val = _data(seed=2)
    ours, _ = pca_components(val, 0.5)
    theirs = PCA(n_components=0.5).fit(torch.nn.functional.normalize(val.double(), dim=1).numpy()).components_
    np.testing.assert_allclose(ours.numpy(), theirs / np.linalg.norm(theirs, axis=1, keepdims=True), atol=1e-5)
    sets = {o: set(g2is_select(train, val, 40, knn_k=10, progress=False, orientation=o).selected) for o in ("sklearn", "mean")}
    flipped = [c for c in range(len(ours)) if float(ours[c] @ torch.nn.functional.normalize(val, dim=1).mean(0)) < 0]
    assert (sets["sklearn"] != sets["mean"]) == bool(flipped)


def test_reference_with_tight_constraints_and_fallbacks():
    train, val = _data(n=200, p=24, seed=1, shared=0.0, noise=1.2)  # many conflicts → fallbacks and shortfalls
    res = g2is_select(train, val, 60, knn_k=5, delta=0.9, n_anchors=1, block=50, progress=False, flush_every=4, orientation="mean")
    ref, _ = _reference(train, val, 60, 5, 0.9, 1, 0.5, "mean")
    assert res.selected == ref
    comps = res.per_component
    assert sum(c["fallback_steps"] for c in comps) > 0
    assert sum(c["shortfall"] for c in comps) > 0
    assert any(c["start_from_anchor"] is False for c in comps)  # its only anchor was taken by an earlier component
    _replay(train, res, 0.9, val, "mean")


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
    comps, ratios = pca_components(val, 0.5, orientation="mean")
    assert sum(ratios[:-1]) <= 0.5 < sum(ratios) + 1e-9
    v = torch.nn.functional.normalize(val, dim=1)
    assert bool(((comps @ v.mean(0)) >= 0).all())
    sk, _ = pca_components(val, 0.5)
    assert bool((sk.gather(1, sk.abs().argmax(1, keepdim=True)) > 0).all())  # sklearn's rule: largest |entry| positive
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
