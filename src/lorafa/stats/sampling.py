"""Which examples the statistics pass sees, and how they are split across processes."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..checks import check_positive_int
from .distributed import world


def sample_indices(n_examples: int, bsz: int, iters: int, sample: str = "random", seed: int = 0,
                   skip: int = 0) -> list[list[int]]:
    """The `iters` batches of `bsz` example indices the statistics pass uses, identical on every process.

    Args:
        n_examples: size of the training set.
        bsz, iters: batch size and number of batches (bsz × iters examples in all).
        sample: "random" (a seeded random sample, the default) or "first" (the first bsz·iters examples, as the
            LoRA-GA reference code does).
        seed: seed of the random sample.
        skip: leave out the first `skip` batches of that order and return the `iters` after them. With the same
            `sample` and `seed`, `skip=k` gives batches disjoint from the k batches of `skip=0` (the line search's
            held-out split: `search_indices`).

    Raises:
        ValueError: bad sizes, an unknown `sample`, or fewer examples than bsz × iters.
    """
    check_positive_int("bsz", bsz)  # a bool is refused, not read as 1
    check_positive_int("iters", iters)
    check_positive_int("skip", skip, low=0)
    need = bsz * (skip + iters)
    if n_examples < need:
        what = "The statistics pass" if not skip else "The statistics pass and the line search's split"
        raise ValueError(f"{what} needs {need} examples (bsz={bsz} × {skip + iters} batches), the dataset has "
                         f"{n_examples}: lower init.iters, init.search_iters or init.bsz.")
    if sample == "first":
        order = list(range(need))
    elif sample == "random":
        order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed))[:need].tolist()
    else:
        raise ValueError(f"sample must be 'random' or 'first', got {sample!r}")
    return [order[(skip + i) * bsz : (skip + i + 1) * bsz] for i in range(iters)]


def shard_batches(batches: Sequence, rank: int | None = None, world_size: int | None = None) -> list:
    """This process's share of whole batches (batch b goes to rank b mod world_size).

    Sharding whole batches keeps every batch's composition, so the all-reduced statistics equal a single-process
    pass over the same batches.
    """
    if rank is None or world_size is None:
        rank, world_size = world()
    return list(batches[rank::world_size])


def stat_batches(dataset: Sequence, collate_fn: Callable[[list], dict], bsz: int, iters: int,
                 sample: str = "random", seed: int = 0, skip: int = 0) -> list[dict]:
    """Collated statistics batches for this process: `sample_indices`, sharded, then `collate_fn` on each batch.
    `skip=iters_of_the_statistics_pass` gives batches of other examples (the line search's split)."""
    chosen = shard_batches(sample_indices(len(dataset), bsz, iters, sample, seed, skip=skip))
    return [collate_fn([dataset[i] for i in idx]) for idx in chosen]
