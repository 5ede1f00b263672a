"""Where the work runs: the device, the weight and autocast dtypes, and the torchrun process group."""

from __future__ import annotations

import os
from datetime import timedelta

import torch


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when available (the local process's GPU under torchrun), else CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtypes(dtype: str, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(weight dtype, autocast dtype): bf16 weights and autocast on CUDA by default, fp32 on CPU."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return torch.float32, None
    if dtype == "bfloat16":
        return torch.bfloat16, torch.bfloat16
    raise ValueError(f"dtype must be auto, float32 or bfloat16, got {dtype}")


def distributed() -> tuple[int, int]:
    """(this process's rank, number of processes); joins the process group when torchrun started several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # Process 0 runs the warmup and the subspace while the others wait: allow for hours.
        dist.init_process_group(backend, timeout=timedelta(hours=12))
    return dist.get_rank(), dist.get_world_size()


def barrier(world: int) -> None:
    """Wait for every process (no-op in a single process)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
