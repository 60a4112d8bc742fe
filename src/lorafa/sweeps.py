"""The statistics sweeps of an init (SPEC §12): one pass, grouped sweeps under `InitConfig.stats_memory`, and
statistics sharded over processes (`InitConfig.stats_sharding`), each ending with every target's factors
(`init_layers`) on every process. `peft_bridge._compute_init` chooses the path; the results are the one-pass
init's in every case.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from tqdm.auto import tqdm

from .auto_rank import allocate
from .methods.common import InitResult
from .methods.lora_fa import whitener_scope
from .methods.registry import init_factors
from .stats.collect import collect_stats
from .stats.distributed import world
from .stats.types import held_bytes
from .targets import layer_rank_and_scaling

logger = logging.getLogger(__name__)


def collect(base, batches, names, init_config, loss_fn, progress, shard: bool = False):
    rank, world_size = world()
    # init.iters counts batches over all processes: batch b belongs to rank b mod world_size
    return collect_stats(base, batches, names, kinds=(init_config.needs,), loss_fn=loss_fn,
                         max_batches=len(range(rank, init_config.iters, world_size)), progress=progress,
                         sketch=init_config.sketch_sizes, accumulate_on=init_config.accumulate_on, shard=shard)


def sharded(base, init_config, stats) -> bool:
    """Whether the statistics are sharded over the processes (InitConfig.stats_sharding): under torch.distributed
    with more than one process, when initialize collects them (not with stats=). Refused on an FSDP2 model."""
    if not init_config.stats_sharding:
        return False
    from .stats.collect import check_shardable

    check_shardable(base)
    return stats is None and init_config.needs is not None and world()[1] > 1


def exchange(local: dict, order) -> dict:
    """Sharded init: every process's InitResults (each process computed its own layers') on every process, in the
    order of `order`. The factors travel on the CPU (one object gather) and come back to the device they were
    computed on: the CPU, or this process's device of the layer's weight."""
    from .stats.distributed import all_gather_objects

    def cpu(r):
        info = {k: v.cpu() if torch.is_tensor(v) else v for k, v in r.info.items()}
        return dataclasses.replace(r, A=r.A.cpu(), B=r.B.cpu(), info=info), r.A.device.type

    parts = all_gather_objects({n: cpu(r) for n, r in local.items()})
    merged = {n: v for part in parts for n, v in part.items()}
    out = {}
    for name, module in order.items():
        r, device_type = merged[name]
        device = torch.device("cpu") if device_type == "cpu" else module.weight.device
        out[name] = local[name] if name in local else dataclasses.replace(r, A=r.A.to(device), B=r.B.to(device))
    return out


def stats_groups(base, targets, lora_config, init_config) -> list[list[str]]:
    """The target names of each statistics sweep: one group without `stats_memory`, else `plan_init`'s grouping
    (depth order, each group's statistics within the budget; "auto" reads the accumulators' device)."""
    if init_config.stats_memory is None:
        return [list(targets)]
    from .plan import plan_init

    from .stats.distributed import all_gather_objects

    device = init_config.accumulate_on or next(iter(targets.values())).weight.device
    groups = plan_init(base, lora_config, init_config, device=device, timings=False).groups
    return all_gather_objects(groups)[0]  # every process sweeps the main process's groups ("auto" may differ)


def check_given_stats_fit(stats, targets, budget) -> None:
    """stats_memory with precomputed statistics (stats=, a cached file): they are all held at once already, so a
    budget they exceed is refused rather than silently ignored."""
    from .plan import AUTO_FRACTION, fmt_bytes, free_memory

    total = held_bytes({n: stats[n] for n in targets if n in stats})
    if budget == "auto":
        budget = int(AUTO_FRACTION * free_memory(next(iter(targets.values())).weight.device))
    if total > budget:
        raise ValueError(f"stats_memory={fmt_bytes(budget)} ({budget} bytes), but the statistics given (stats=, e.g. "
                         f"a cached statistics file) hold {fmt_bytes(total)} ({total} bytes) at once: grouped passes "
                         "need the statistics to be collected group by group. Drop stats= (and the cache) to let "
                         "initialize collect them in groups, or raise stats_memory.")


def grouped_init(base, targets, lora_config, init_config, groups, batches, loss_fn, progress, weights, tuned,
                 shard: bool = False):
    """The init in grouped sweeps (InitConfig.stats_memory): each group's statistics are collected over the same
    batches, its layers' factors computed, and the statistics freed before the next group. The sums are the same
    numbers as one pass's, so the factors are the same. Ranks chosen from every layer's spectrum (rank="auto", EVA's
    redistribution) need them all first: one sweep per group gathers the spectra, then a second computes the
    factors at the allocated ranks.

    Sharded (InitConfig.stats_sharding, also with one group): each sweep leaves each process the statistics of the
    layers it owns (owners balanced within the group); it computes their spectra and factors (seeded by the layer's
    index in the whole init, as one pass), and the spectra, then the factors, are gathered on every process, so the
    allocation and the results are the same everywhere.

    Returns (results, the LoraConfig they are for, the kept targets, summary); the caller runs the line search."""
    from .auto_rank import allocates, merge_evidence, rank_evidence
    from .stats.distributed import all_gather_objects

    if len(groups) > 1 and iter(batches) is batches:
        raise ValueError("stats_memory sweeps the statistics batches once per group of layers, but batches= is an "
                         "iterator that can be read only once: pass a list (or another re-iterable collection).")
    opts = init_config.method_options()
    logger.info("lorafa: statistics in %d sweep(s) (stats_memory=%d bytes, sharded over %d processes)", len(groups),
                init_config.stats_memory if isinstance(init_config.stats_memory, int) else -1,
                world()[1] if shard else 1)
    summary, evidence, kept_stats = {}, None, None
    if allocates(init_config):
        parts = []
        for names in groups:
            stats = collect(base, batches, names, init_config, loss_fn, progress, shard)
            parts.append(rank_evidence({n: targets[n] for n in names if n in stats}, init_config, stats, opts,
                                       weights, tuned))  # sharded: this process's layers
            kept_stats = stats if len(groups) == 1 else None  # one group (sharded): one sweep serves both
            del stats
        if shard:
            parts = [p for gathered in all_gather_objects(parts) for p in gathered]
        evidence = merge_evidence(parts)
    lora_config, kept, summary["ranks"] = allocate(targets, lora_config, init_config, None, opts, weights, tuned,
                                                   evidence=evidence)
    index = {n: i for i, n in enumerate(kept)}  # each layer's seed offset, as in one pass
    results = {}
    for names in groups:
        mine = {n: kept[n] for n in names if n in kept}
        if not mine:
            continue
        stats = kept_stats if kept_stats is not None else collect(base, batches, list(mine), init_config, loss_fn,
                                                                   progress, shard)
        kept_stats = None
        with whitener_scope():
            local = init_layers({n: m for n, m in mine.items() if n in stats}, lora_config, init_config, stats,
                                 opts, progress, weights, tuned, index=index)
        del stats
        results.update(exchange(local, mine) if shard else local)
    if len(groups) > 1:
        summary["stats_groups"] = [len(g) for g in groups]
    if shard:
        summary["stats_sharding"] = world()[1]
    return results, lora_config, kept, summary


def init_layers(targets, lora_config, init_config, stats, opts, progress, weights,
                 tuned=None, index=None) -> dict[str, InitResult]:
    """Each target's factors; layer i (in `index`, default the order of `targets`) is seeded with seed + i."""
    results = {}
    for i, (name, module) in enumerate(tqdm(targets.items(), desc=f"lorafa {init_config.method} init",
                                            disable=not progress or world()[0] != 0, leave=False)):
        i = i if index is None else index[name]
        r, s = layer_rank_and_scaling(lora_config, name)
        results[name] = init_factors(init_config.method, weights[name](), None if stats is None else stats.get(name),
                                     rank=r, scaling=s, svd=init_config.svd, seed=init_config.seed + i, name=name,
                                     tuned=None if tuned is None else tuned[name](), **opts)
        results[name].info["rank"] = r
    return results
