"""G2IS selection speed on synthetic clustered features: `python bench/g2is.py [--n 270000 --p 8192 --device cuda]`.

Needs only torch (runs on a bare GPU box). Prints the timings of each stage (PCA, exact kNN graph, walk)
and a `RESULT g2is_total_s` line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gist_backend.methods.g2is import g2is_select  # noqa: E402


def benchmark_g2is(n_train: int = 50_000, p: int = 8192, m: int = 500, budget_frac: float = 0.05, seed: int = 0,
                   device: str | None = None, knn_dtype: torch.dtype | None = None) -> dict:
    """Time g2is_select on synthetic clustered features (default 50k × 8192, 5% budget); returns the timings dict."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    g = torch.Generator(device=dev).manual_seed(seed)
    n_clusters = 50
    centres = torch.randn(n_clusters, p, generator=g, device=dev)
    shared = torch.randn(p, generator=g, device=dev)
    lab = torch.randint(0, n_clusters, (n_train,), generator=g, device=dev)
    train = torch.empty(n_train, p, device=dev)
    for r0 in range(0, n_train, 4096):  # shared direction + cluster + noise: mostly non-negative dots, like real gradients
        r1 = min(n_train, r0 + 4096)
        train[r0:r1] = 1.5 * shared + centres[lab[r0:r1]] + torch.randn(r1 - r0, p, generator=g, device=dev)
    vlab = torch.randint(0, 5, (m,), generator=g, device=dev)
    val = 1.5 * shared + centres[vlab] + torch.randn(m, p, generator=g, device=dev)
    timings: dict = {"device": str(dev), "n_train": n_train, "p": p, "m": m, "budget": int(budget_frac * n_train),
                     "threads": torch.get_num_threads(), "knn_dtype": str(knn_dtype)}
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    res = g2is_select(train, val, timings["budget"], device=dev, progress=False, timings=timings, knn_dtype=knn_dtype)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    timings["total_s"] = time.perf_counter() - t
    timings["selected"] = len(res.selected)
    timings["components"] = len(res.per_component)
    timings["fallback_steps"] = sum(c["fallback_steps"] for c in res.per_component)
    timings["shortfall"] = sum(c["shortfall"] for c in res.per_component)
    return timings


def main(argv: list[str] | None = None) -> dict:
    """Parse options, run the benchmark, print its timings and RESULT line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=50_000, help="training rows")
    p.add_argument("--p", type=int, default=8192, help="feature dimensions")
    p.add_argument("--m", type=int, default=500, help="validation rows")
    p.add_argument("--budget", type=float, default=0.05, help="fraction of the rows to select")
    p.add_argument("--device", default=None)
    p.add_argument("--bf16-knn", action="store_true", help="build the kNN graph in bfloat16")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    timings = benchmark_g2is(args.n, args.p, args.m, args.budget, device=args.device, knn_dtype=torch.bfloat16 if args.bf16_knn else None)
    if torch.cuda.is_available():
        timings["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(timings, indent=1, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(timings, indent=1, default=str))
    print("RESULT g2is_total_s", round(timings["total_s"], 3))
    return timings


if __name__ == "__main__":
    main()
