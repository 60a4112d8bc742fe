"""DeepSpeed ZeRO-3: the statistics pass and the init on a model whose weights `deepspeed.zero.Init` partitioned.

Each process holds 1/world of every weight. lorafa runs before `deepspeed.initialize` (as `initialize_trainer` does,
before the Trainer builds its engine): during the statistics pass each module's own weights are gathered just before
its forward and again before its backward, and partitioned right after each, so one module's weights are whole at a
time (the pass then runs in lockstep, as under FSDP2: each gather is a collective). A layer's weight is read (the
inits that use W) and written (the offset `W − s·B·A`) through `deepspeed.zero.GatheredParameters`, one layer at a
time. The adapters PEFT adds are ordinary tensors, which `deepspeed.initialize` partitions with the rest.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def is_zero3_param(p: torch.Tensor) -> bool:
    """A parameter partitioned by DeepSpeed ZeRO-3 (`deepspeed.zero.Init` marks each with `ds_id`)."""
    return hasattr(p, "ds_id")


def zero3_partitioned(model: nn.Module) -> bool:
    """Whether any parameter is partitioned by DeepSpeed ZeRO-3 (`deepspeed.zero.Init`)."""
    return any(is_zero3_param(p) for p in model.parameters())


def check_not_engine(model: nn.Module) -> None:
    """Refuse a model whose ZeRO-3 engine exists (`deepspeed.initialize` has run: its hooks fetch the weights, and its
    optimiser already holds the parameters, so adapters added now would never train)."""
    if any(hasattr(m, "ds_grads_remaining") for m in model.modules()):
        raise ValueError("The model is already wrapped by a DeepSpeed ZeRO-3 engine (deepspeed.initialize / "
                         "accelerator.prepare has run), whose optimiser would not hold the adapters lorafa adds. "
                         "Run lorafa's init first: on the model loaded under deepspeed.zero.Init (transformers does "
                         "this with a ZeRO-3 config), or through lorafa.initialize_trainer before trainer.train().")


def _module_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if is_zero3_param(p)]


@contextlib.contextmanager
def gather_per_module(model: nn.Module):
    """Hooks that make each module's own partitioned weights whole just before its forward and before its backward,
    and partition them right after each. Every process must run the same passes (each gather is a collective)."""
    handles = []
    for module in model.modules():
        params = _module_params(module)
        if not params:
            continue

        def gather(*_, params=params):
            params[0].all_gather(param_list=params)

        def release(*_, params=params):
            params[0].partition(param_list=params)

        handles += [module.register_forward_pre_hook(gather), module.register_forward_hook(release),
                    module.register_full_backward_pre_hook(gather), module.register_full_backward_hook(release)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def gathered_weight(module: nn.Module) -> torch.Tensor:
    """A copy of the layer's whole weight (a collective: every process calls it for the same layer)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([module.weight]):
        return module.weight.detach().clone()


@torch.no_grad()
def set_gathered_weight(module: nn.Module, w: torch.Tensor) -> None:
    """Write the whole weight `w` (stored as the layer stores it; the same on every process) into the partitions:
    rank 0 writes it into the gathered weight, which is then partitioned again (a collective)."""
    import deepspeed
    import torch.distributed as dist

    with deepspeed.zero.GatheredParameters([module.weight], modifier_rank=0):
        if not dist.is_initialized() or dist.get_rank() == 0:
            module.weight.copy_(w.to(module.weight.device, module.weight.dtype))


def gather_zero3(model: nn.Module):
    """`gather_per_module(model)` for a ZeRO-3-partitioned model; nothing otherwise."""
    return gather_per_module(model) if zero3_partitioned(model) else contextlib.nullcontext()
