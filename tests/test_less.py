import numpy as np
import pytest
import torch

from gist_backend.methods.less import checkpoint_weights_from_lrs, less_scores, normalize_rows

torch.set_num_threads(1)


def _reference(train, val, tasks, weights):
    """Straightforward loops in float64."""
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    names = list(dict.fromkeys(tasks))
    n = train[0].shape[0]
    per_task = np.zeros((n, len(names)))
    for i in range(n):
        for t, name in enumerate(names):
            total = 0.0
            for c in range(len(train)):
                x = train[c][i].astype(np.float64)
                cos = []
                for j in range(len(tasks)):
                    if tasks[j] == name:
                        v = val[c][j].astype(np.float64)
                        cos.append(float(x @ v) / (np.linalg.norm(x) * np.linalg.norm(v)))
                total += w[c] * np.mean(cos)
            per_task[i, t] = total
    return per_task.max(axis=1), names, per_task


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_loops(dtype):
    g = torch.Generator().manual_seed(0)
    n, m, p = 37, 11, 16
    train = [(torch.randn(n, p, generator=g) * 3 + 0.5).to(dtype) for _ in range(2)]
    val = [(torch.randn(m, p, generator=g) + 0.5).to(dtype) for _ in range(2)]
    tasks = ["b", "a", "c", "a", "b", "c", "c", "a", "b", "b", "a"]
    weights = [2.0, 6.0]  # normalised inside
    scores, names, per_task = less_scores(train, val, tasks, weights, block=5)
    ref_s, ref_names, ref_pt = _reference([t.numpy() for t in train], [v.numpy() for v in val], tasks, weights)
    assert names == ref_names == ["b", "a", "c"]
    assert scores.shape == (n,) and per_task.shape == (n, 3) and scores.dtype == torch.float32
    np.testing.assert_allclose(per_task.numpy(), ref_pt, atol=1e-5)
    np.testing.assert_allclose(scores.numpy(), ref_s, atol=1e-5)


def test_block_size_does_not_change_result():
    g = torch.Generator().manual_seed(1)
    train = [torch.randn(50, 8, generator=g)]
    val = [torch.randn(6, 8, generator=g)]
    tasks = ["x", "y"] * 3
    a = less_scores(train, val, tasks, [1.0], block=7)
    b = less_scores(train, val, tasks, [1.0])
    torch.testing.assert_close(a[2], b[2])


def test_normalize_rows_and_weights():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float16)
    y = normalize_rows(x)
    assert y.dtype == torch.float32 and torch.equal(y, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))
    assert checkpoint_weights_from_lrs([2e-5, 1e-5, 1e-5]) == pytest.approx([0.5, 0.25, 0.25])
    with pytest.raises(ValueError, match="non-negative"):
        checkpoint_weights_from_lrs([0.0, 0.0])


def test_input_errors():
    t = [torch.randn(4, 3)]
    with pytest.raises(ValueError, match="weights"):
        less_scores(t, [torch.randn(2, 3)], ["a", "b"], [1.0, 1.0])
    with pytest.raises(ValueError, match="same p"):
        less_scores(t, [torch.randn(2, 5)], ["a", "b"], [1.0])
    with pytest.raises(ValueError, match="val_tasks"):
        less_scores(t, [torch.randn(2, 3)], ["a"], [1.0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(2)
    train = [torch.randn(40, 16, generator=g).half() for _ in range(2)]
    val = [torch.randn(9, 16, generator=g) for _ in range(2)]
    tasks = list("abcabcabc")
    a = less_scores(train, val, tasks, [1, 3])
    b = less_scores([t.cuda() for t in train], [v.cuda() for v in val], tasks, [1, 3], block=16)
    assert b[0].device.type == "cpu" and a[1] == b[1]
    torch.testing.assert_close(a[2], b[2], atol=1e-5, rtol=0)
