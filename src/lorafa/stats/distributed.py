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


def _comm_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` where the backend can send it: NCCL takes CUDA tensors only, gloo CPU ones here."""
    backend = dist.get_backend()
    if backend == "nccl" and tensor.device.type != "cuda":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    if backend == "gloo" and tensor.device.type != "cpu":
        return tensor.cpu()
    return tensor.contiguous()


def sum_to_owner(tensor: torch.Tensor, owner: int, add) -> None:
    """Every process's `tensor` (one shape) summed on rank `owner` only, by `add(t)` called there once per process,
    in rank order: with batch b on rank b mod world (as `init.iters` deals them), the owner adds the batches in the
    order one process would, so a sharded statistic is the single-process sum to the last bit. Point to point (each
    process sends to the owner, which receives into one buffer), so the owner holds at most one received tensor
    beside its sums. Every process must call it with the same `owner`, in the same order as the others; a single
    process just calls `add(tensor)`."""
    rank, world_size = world()
    if world_size == 1:
        add(tensor)
        return
    if rank != owner:
        dist.send(_comm_tensor(tensor), dst=owner)
        return
    buffer = None
    for src in range(world_size):
        if src == rank:
            add(tensor)
            continue
        if buffer is None:
            buffer = torch.empty_like(_comm_tensor(tensor))
        dist.recv(buffer, src=src)
        add(buffer)


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


class RankFailedError(RuntimeError):
    """Another process failed in a collective pass; raised on every process that did nothing wrong itself."""


def agree_step(error: Exception | None, active: bool, what: str) -> bool:
    """One step of a pass whose processes may fail, or run out of work, at different times.

    Every process calls it once per step with its own outcome, so a failure on one rank is raised on all of them at
    the same step instead of leaving the others waiting in the next all-reduce. The cost is one all-reduce of two
    int64 per step (plus an object gather only when a step failed); single-process, no communication at all.

    Args:
        error: the exception this process hit during the step, or None.
        active: whether this process did a step (False once it has no work left).
        what: the step, for messages (e.g. "statistics batch 3").

    Returns:
        Whether any process still had work at this step (all processes see the same value, so they loop together).

    Raises:
        `error` itself on a process that failed; RankFailedError naming the failed ranks and their errors elsewhere.
    """
    if world()[1] == 1:
        if error is not None:
            raise error
        return active
    flags = torch.tensor([int(error is not None), int(active)], dtype=torch.int64)
    n_failed, n_active = all_reduce_sum_(flags).tolist()
    if n_failed:
        messages = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)
        raise RankFailedError(f"{what} failed on another process ({failed}). Rank {world()[0]} stops too, so that no "
                              "process waits forever in a collective: fix the cause reported by the failing rank.")
    return n_active > 0


def on_main_process(work, what: str, errors=(Exception,)) -> None:
    """Run `work()` on the main process only (a write), then agree: every process returns, or every process raises
    (the main process its own error, the others RankFailedError), so none waits in a later collective. Every
    process calls it; single-process it is `work()`."""
    error = None
    if world()[0] == 0:
        try:
            work()
        except errors as e:  # raised by agree_step, here and (named) on the others
            error = e
    agree_step(error, True, what)


def all_agree(flag: bool) -> bool:
    """True on every process if `flag` is true on every process (single-process: `flag`)."""
    if world()[1] == 1:
        return bool(flag)
    return all_reduce_counts([int(bool(flag))], torch.device("cpu"))[0] == world()[1]


def check_same_on_all_ranks(value: dict, what: str) -> None:
    """Raise on every process (together) unless all processes hold an equal `value` (a picklable dict).

    Raises:
        ValueError: naming the entries that differ and each rank's value of them.
    """
    values = all_gather_objects(value)
    if all(v == values[0] for v in values):
        return
    keys = sorted({k for v in values for k in v if any(w.get(k) != v.get(k) for w in values)})
    detail = "; ".join(f"{k}: " + ", ".join(f"rank {r}={v.get(k)!r}" for r, v in enumerate(values)) for k in keys)
    raise ValueError(f"Processes disagree on the {what} ({detail}). Every process must load the same model weights "
                     "and config: check the checkpoint each node reads.")
