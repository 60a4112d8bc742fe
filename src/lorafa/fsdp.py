"""The LoRA factors under FSDP2: `shard_adapters` makes each factor an FSDP2 unit after `initialize`, and
`unsharded_adapters` gathers them back into plain modules while an adapter is saved.

The helpers every process calls together (world size, sums, agreeing on a failure, the main process's writes) are in
`lorafa.stats.distributed`; this module is the part that knows PEFT's LoRA layers.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer


def shard_adapters(peft_model: PeftModel, **fully_shard_kwargs) -> PeftModel:
    """Shard the LoRA factors of a PEFT model whose base blocks were sharded with FSDP2 before `initialize`.

    `initialize` writes A and B as plain tensors, identical on every rank. A later `fully_shard` of the root does not
    take them (they sit inside the already-sharded blocks), so their gradients would never be synchronised; each
    factor's `nn.Linear` is therefore made an FSDP2 unit of its own, and training averages its gradient over the ranks.

    Args:
        peft_model: the model `initialize` returned.
        fully_shard_kwargs: passed to `torch.distributed.fsdp.fully_shard` (mesh=, reshard_after_forward=, ...).

    Returns:
        The same model, its factors now DTensor shards.
    """
    from torch.distributed.fsdp import fully_shard

    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ValueError("shard_adapters found no LoRA layer: pass the PeftModel lorafa.initialize returned.")
    for layer in layers:
        for factors in (layer.lora_A, layer.lora_B):
            for linear in factors.values():
                fully_shard(linear, **fully_shard_kwargs)
    return peft_model


def _plain_copy(module: torch.nn.Module) -> torch.nn.Module:
    """An ordinary module of `module`'s own class (not FSDP2's subclass of it), with the same attributes and its
    parameters gathered into full tensors (a collective under FSDP2), for saving only."""
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(module).__mro__ if issubclass(c, torch.nn.Module) and not issubclass(c, FSDPModule))
    plain = cls.__new__(cls)
    torch.nn.Module.__init__(plain)
    for key, value in vars(module).items():
        if not key.startswith("_"):
            object.__setattr__(plain, key, value)
    for key, p in module._parameters.items():
        if p is not None:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            plain._parameters[key] = torch.nn.Parameter(full.detach(), requires_grad=False)
    for key, b in module._buffers.items():
        plain._buffers[key] = b.full_tensor() if hasattr(b, "full_tensor") else b
    return plain


@contextmanager
def unsharded_adapters(peft_model: PeftModel, keep: bool):
    """Under FSDP2 (`shard_adapters`), swap each sharded LoRA factor module for a plain copy holding the full
    tensors, so that PEFT's `save_pretrained` and its weight conversion see ordinary tensors; put the shards back
    afterwards. Every process gathers (the gathers are collectives, in the same order on every process); only a
    process with `keep` swaps. Nothing happens when no factor is sharded."""
    swapped = []
    for layer in peft_model.modules():
        if not isinstance(layer, LoraLayer):
            continue
        for attr in layer.adapter_layer_names:
            modules = getattr(layer, attr, None)
            if not isinstance(modules, torch.nn.ModuleDict):
                continue
            for key, module in list(modules.items()):
                if any(hasattr(p, "full_tensor") for p in module.parameters(recurse=False)):
                    plain = _plain_copy(module)
                    if keep:
                        swapped.append((modules, key, module))
                        modules[key] = plain
    try:
        yield
    finally:
        for modules, key, module in swapped:
            modules[key] = module
