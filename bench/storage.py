"""Storage: bytes per example of GIST's stored coordinates vs LESS's 8192-dim × 4-checkpoint fp16 gradient store.

With --run-dir, the bytes are measured on disk from a finished run: ``train_coords.npy`` (C checkpoints ×
k_max floats per example, what scoring and the dashboard read), and separately the per-shard copies of the
same coordinates that compute keeps under ``ckpt-<c>/train/`` (for resuming) and the run's other files.
Without it, the bytes come from the formula C × k_max × bytes-per-float. The reference is LESS's store as
the design states it: 8192 dims × 4 checkpoints × 2 bytes (fp16) = 65,536 bytes per example
(17.7 GB for 270k examples).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, result_lines, table, write_json

LESS_DIM, LESS_CKPTS, LESS_BYTES = 8192, 4, 2
LESS_PER_EXAMPLE = LESS_DIM * LESS_CKPTS * LESS_BYTES


def _npy_payload(path: Path) -> tuple[int, tuple, str]:
    """(file bytes, shape, dtype) of a .npy file, read from its header only."""
    import numpy as np

    array = np.load(path, mmap_mode="r", allow_pickle=False)
    return path.stat().st_size, tuple(array.shape), str(array.dtype)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _shard_bytes(run_dir: Path) -> dict[str, int]:
    """Bytes per tensor name (coords, sketch, loss) in compute's per-shard files, which stay after the merge."""
    from safetensors import safe_open

    out: dict[str, int] = {}
    for path in run_dir.glob("ckpt-*/train/shard-*.safetensors"):
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                sl = f.get_slice(key)
                count = 1
                for dim in sl.get_shape():
                    count *= dim
                out[key] = out.get(key, 0) + count * {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}.get(sl.get_dtype(), 4)
    return out


def from_run(run_dir: Path) -> dict:
    """Measured bytes per example of a finished run's coordinates (and of the rest of the run)."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    coords = run_dir / "train_coords.npy"
    size, shape, dtype = _npy_payload(coords)
    n_ckpt, n, k = shape
    shards = _shard_bytes(run_dir)
    sketches = _dir_bytes(run_dir / "sketches")
    total = _dir_bytes(run_dir)
    return {
        "source": str(run_dir), "n": n, "checkpoints": n_ckpt, "k_max": k, "dtype": dtype,
        "coords_bytes_per_example": size / n, "shard_bytes_per_example": {k: v / n for k, v in shards.items()},
        "less_sketch_bytes_per_example": sketches / n, "run_total_bytes_per_example": total / n,
        "methods": manifest.get("methods", ["gist"]),
    }  # fmt: skip


def from_formula(k_max: int, checkpoints: int, float_bytes: int) -> dict:
    """Bytes per example of C × k_max floats."""
    return {"source": "formula", "checkpoints": checkpoints, "k_max": k_max, "dtype": {2: "float16", 4: "float32"}[float_bytes],
            "coords_bytes_per_example": float(checkpoints * k_max * float_bytes)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    """Print the storage table, JSON and RESULT line; returns the result dict."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", help="measure a finished run instead of using the formula")
    p.add_argument("--k-max", type=int, default=128)
    p.add_argument("--checkpoints", type=int, default=4, help="C, warmup checkpoints stored (the tool's default warmup_epochs is 4)")
    p.add_argument("--float-bytes", type=int, default=4, choices=[2, 4], help="bytes per stored coordinate (the tool writes float32)")
    p.add_argument("--n-examples", type=int, default=270_000, help="pool size for the totals column")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    main_row = from_run(Path(args.run_dir)) if args.run_dir else from_formula(args.k_max, args.checkpoints, args.float_bytes)
    variants = [main_row] + [
        from_formula(main_row["k_max"], c, b) for c, b in ((4, 4), (4, 2), (1, 4), (1, 2)) if (c, b) != (main_row["checkpoints"], {"float32": 4, "float16": 2}.get(main_row["dtype"]))
    ]  # fmt: skip
    rows = []
    for v in variants:
        per = v["coords_bytes_per_example"]
        rows.append([v["source"], v["checkpoints"], v["k_max"], v["dtype"], per, 100 * per / LESS_PER_EXAMPLE, per * args.n_examples / 1e9])
    rows.append(["LESS (8192 × 4 ckpt fp16)", LESS_CKPTS, LESS_DIM, "float16", float(LESS_PER_EXAMPLE), 100.0, LESS_PER_EXAMPLE * args.n_examples / 1e9])
    print(table(rows, ["store", "ckpts", "dims", "dtype", "bytes/example", "% of LESS", f"GB @ {args.n_examples:,}"]))
    if args.run_dir:
        r = main_row
        shard = ", ".join(f"{k} {v:.0f} B" for k, v in sorted(r["shard_bytes_per_example"].items())) or "none"
        print(
            f"run on disk per example: coordinates {r['coords_bytes_per_example']:.0f} B (train_coords.npy); compute's per-shard files, kept after the merge: {shard}; "
            f"merged LESS/G2IS sketches {r['less_sketch_bytes_per_example']:.0f} B; whole run directory {r['run_total_bytes_per_example']:.0f} B (fixed costs such as the basis included)"
        )
    ratio = 100 * main_row["coords_bytes_per_example"] / LESS_PER_EXAMPLE
    print(f"GIST coordinates ({main_row['checkpoints']} ckpt × {main_row['k_max']} × {main_row['dtype']}): {ratio:.3f}% of LESS's store (target <= 0.5% at k_max 128)")
    result = {"bench": "storage", "machine": machine(), "less_bytes_per_example": LESS_PER_EXAMPLE, "main": main_row,
              "variants": variants[1:], "storage_vs_less_pct": ratio}  # fmt: skip
    write_json(args.json, result)
    print(result_lines({"storage_vs_less_pct": ratio}))
    return result


if __name__ == "__main__":
    main()
