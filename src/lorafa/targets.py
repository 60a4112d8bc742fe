"""Which modules are adapted, each one's rank and scale, and how their weights read as the SPEC's `m × n` matrix.

PEFT decides what a `target_modules` entry matches; we reuse its matcher so that the statistics pass and
`get_peft_model` always agree on the set of layers. What we add is the checking PEFT does not do: every entry must
match something, every match must be a layer whose weight we can read and change.
"""

from __future__ import annotations

import copy

import difflib
import math
from collections.abc import Iterable

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from torch import nn
from transformers.pytorch_utils import Conv1D

from .zero3 import check_not_engine, gathered_weight, is_zero3_param, set_gathered_weight, zero3_partitioned

SUPPORTED_LAYERS = (nn.Linear, Conv1D)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/accelerate wrappers; refuse a PEFT model (statistics are taken before adapters exist)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    _refuse_unreadable(model)
    if type(model).__name__.startswith("Peft") or hasattr(model, "peft_config"):
        raise TypeError(
            "Statistics are computed on the base model before adapters exist: pass the model you will give to "
            "get_peft_model, not a PeftModel."
        )
    return model


def _refuse_unreadable(model: nn.Module) -> None:
    """FSDP (v1) keeps a layer's weight in a flattened buffer outside forward: refuse it with the way out; and a model
    whose DeepSpeed ZeRO-3 engine already exists (a model partitioned by `deepspeed.zero.Init` alone is read one
    layer at a time: `lorafa.zero3`)."""
    wrapped = [m for m in model.modules() if type(m).__name__ == "FullyShardedDataParallel"]
    if wrapped:
        flat = not all(getattr(m, "_use_orig_params", False) for m in wrapped)
        raise ValueError(
            "The model is wrapped in FSDP (v1)" + (" with use_orig_params=False, whose FlatParameters cannot be "
                                                    "mapped to module names" if flat else "") + ". lorafa supports "
            "FSDP2: shard the blocks with torch.distributed.fsdp.fully_shard (accelerate: fsdp_version: 2), or run "
            "the init before wrapping the model.")
    if zero3_partitioned(model):
        check_not_engine(model)


def _as_config(target_modules) -> LoraConfig:
    if isinstance(target_modules, LoraConfig):
        return target_modules
    if isinstance(target_modules, str):
        return LoraConfig(target_modules=target_modules)
    if isinstance(target_modules, Iterable):
        names = list(target_modules)
        if not names or not all(isinstance(t, str) for t in names):
            raise ValueError(f"target_modules must be a non-empty list of module names, got {target_modules!r}")
        return LoraConfig(target_modules=names)
    raise TypeError(f"target_modules must be a LoraConfig, a regex string or a list of names, got {type(target_modules)}")


def _default_targets(model: nn.Module) -> set[str]:
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in mapping:
        raise ValueError(
            f"target_modules is None and PEFT has no default targets for model_type={model_type!r}: "
            "set LoraConfig(target_modules=[...])."
        )
    return set(mapping[model_type])


def resolve_targets(model: nn.Module, target_modules) -> dict[str, nn.Module]:
    """Map module names (as in `model.named_modules()`) to the layers that will carry adapters.

    Args:
        model: the base model (not wrapped by PEFT).
        target_modules: a `LoraConfig`, a regex (PEFT's full-match semantics) or a list of names (exact name or
            name suffix, as PEFT matches them).

    Returns:
        Ordered dict name -> module, in `named_modules()` order.

    Raises:
        ValueError: an entry matches no module (close matches are listed), a match is not `nn.Linear`/`Conv1D`,
            or its weight is quantized with a scheme lorafa does not support, or not floating point.
    """
    config = _as_config(target_modules)
    if config.target_modules is None:
        config = LoraConfig(**{**config.to_dict(), "target_modules": _default_targets(model)})
    elif isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        # PEFT's keyword: every linear layer but the output head, expanded as get_peft_model expands it
        from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

        config = _maybe_include_all_linear_layers(copy.deepcopy(config), model)
    named = dict(model.named_modules())
    found = {n: m for n, m in named.items() if n and _is_match(check_target_module_exists(config, n))}
    _check_every_entry_matched(config, named, found)
    for name, mod in found.items():
        check_layer(name, mod)
    return found  # dicts keep named_modules() order


def _is_match(result) -> bool:
    # PEFT returns True, a re.Match, or a falsy/_ExcludedModule marker.
    return result is True or (result is not None and type(result).__name__ == "Match")


def _check_every_entry_matched(config: LoraConfig, named: dict, found: dict) -> None:
    entries = config.target_modules
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n in named if n})
    if isinstance(entries, str):
        if not found:
            raise ValueError(f"target_modules regex {entries!r} matches no module. Module leaf names: {leaf_names}")
        return
    missing = [e for e in entries if not any(n == e or n.endswith("." + e) for n in found)]
    if missing:
        hints = {e: difflib.get_close_matches(e.rsplit(".", 1)[-1], leaf_names, n=3) for e in missing}
        raise ValueError(
            "target_modules entries match no module: "
            + "; ".join(f"{e!r} (close: {hints[e] or 'none'})" for e in missing)
            + ". Fix the names or check layers_to_transform/exclude_modules."
        )


def check_layer(name: str, module: nn.Module) -> None:
    """Raise a clear error unless `module` is an `nn.Linear` (float, or bitsandbytes 4-bit/int8) or a `Conv1D` that
    lorafa can read and modify."""
    from .quant import quant_kind

    if not isinstance(module, SUPPORTED_LAYERS):
        raise ValueError(
            f"Target {name!r} is a {type(module).__name__}; lorafa initialises nn.Linear and transformers Conv1D "
            "layers only. Remove it from target_modules."
        )
    try:
        kind = quant_kind(module)
    except ValueError as err:
        raise ValueError(f"Target {name!r}: {err}") from None
    if kind is None and not torch.is_floating_point(module.weight):
        raise ValueError(f"Target {name!r} has a non-floating weight dtype {module.weight.dtype}: load it in "
                         "fp32/bf16/fp16.")


def is_quantized(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit or int8 layer (whose `weight` is not the `out × in` float matrix)."""
    from .quant import quant_kind

    return quant_kind(module) is not None


def is_transposed(module: nn.Module) -> bool:
    """Conv1D stores `weight` as (in, out): the SPEC's W (out × in) is its transpose."""
    return isinstance(module, Conv1D)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as an fp32 `m × n` (out × in) matrix (a fresh tensor); a bitsandbytes layer is dequantized
    (that layer only), an FSDP2-sharded or ZeRO-3-partitioned weight is gathered (that layer only)."""
    if is_quantized(module):
        from .quant import dequantized_weight

        return dequantized_weight(module)
    if is_zero3_param(module.weight):  # DeepSpeed ZeRO-3: gathered on every rank
        return as_matrix(gathered_weight(module), module)
    w = module.weight.detach()
    if hasattr(w, "full_tensor"):  # a DTensor (FSDP2 shard): one layer's full weight, gathered on every rank
        w = w.full_tensor()
    return as_matrix(w, module).clone()


def as_matrix(w: torch.Tensor, like: nn.Module) -> torch.Tensor:
    """A weight tensor stored as `like` stores its weight (Conv1D: in × out), as the fp32 `out × in` matrix (no copy
    when it already is one)."""
    w = w.detach()
    return (w.t() if is_transposed(like) else w).float()


@torch.no_grad()
def set_weight_matrix(module: nn.Module, w: torch.Tensor) -> None:
    """Store the `m × n` matrix `w` as the float layer's weight, in its dtype; an FSDP2 shard keeps its own rows (the
    same `w` is computed on every rank, so nothing is communicated), a ZeRO-3 partition its own part (a collective).
    Quantized layers: `quant.requantize_`."""
    w = w.t() if is_transposed(module) else w
    weight = module.weight
    if is_zero3_param(weight):  # DeepSpeed ZeRO-3: written whole, partitioned again
        set_gathered_weight(module, w)
    elif hasattr(weight, "full_tensor"):
        from torch.distributed.tensor import distribute_tensor

        local = distribute_tensor(w.to(weight.device, weight.dtype), weight.device_mesh, weight.placements,
                                  src_data_rank=None).to_local()
        weight.to_local().copy_(local)
    else:
        weight.copy_(w.to(weight.device, weight.dtype))


def out_in_features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):  # a packed 4-bit weight's shape is not the layer's
        return module.out_features, module.in_features
    w = module.weight
    return (w.shape[1], w.shape[0]) if is_transposed(module) else (w.shape[0], w.shape[1])


def layer_rank_and_scaling(lora_config: LoraConfig, name: str) -> tuple[int, float]:
    """r and s for one module, resolving rank_pattern/alpha_pattern exactly as PEFT does."""
    r = lora_config.rank_pattern.get(get_pattern_key(lora_config.rank_pattern.keys(), name), lora_config.r)
    alpha = lora_config.alpha_pattern.get(get_pattern_key(lora_config.alpha_pattern.keys(), name), lora_config.lora_alpha)
    return r, alpha / math.sqrt(r) if lora_config.use_rslora else alpha / r
