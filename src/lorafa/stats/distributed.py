"""Summing statistics across processes (torchrun / accelerate launch, any backend)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over all processes. NCCL cannot reduce CPU tensors, so those make a round trip to the GPU."""
    if world()[1] == 1:
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
        tensor.copy_(on_gpu)
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_counts(counts: list[int], device: torch.device) -> list[int]:
    """Sum a list of integer counters over all processes (exact: int64)."""
    if world()[1] == 1:
        return list(counts)
    t = torch.tensor(counts, dtype=torch.int64, device=device)
    all_reduce_sum_(t)
    return [int(v) for v in t.tolist()]


def all_gather_objects(obj) -> list:
    """Every process's `obj` (picklable), in rank order; `[obj]` when not distributed."""
    if world()[1] == 1:
        return [obj]
    out = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out
