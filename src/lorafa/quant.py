"""Quantized bases (SPEC §10): read one bitsandbytes layer as an fp32 matrix, write a new weight back quantized.

Supported: bitsandbytes `Linear4bit` (nf4, fp4, with or without double quantization) and `Linear8bitLt` (LLM.int8).
Layers are recognised by the package that defines their classes (bitsandbytes' own, or subclasses of them), so a
model without bitsandbytes never imports it, other schemes (GPTQ, AWQ, torchao, HQQ, ...) are refused without
importing their libraries, and a user's layer is never taken for a quantized one because of its name. Everything
works one layer at a time: nothing here copies the whole model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from torch import nn

SUPPORTED = "bitsandbytes 4-bit (nf4, fp4: Linear4bit, double quantization included) and LLM.int8 (Linear8bitLt)"
# Scheme -> the packages and modules that define its layers or weight tensors, checked in this order. A class belongs
# to a scheme when it is defined in one of them (its `__module__` is the name or below it): a user's class is never
# taken for a quantized one because of its name.
_UNSUPPORTED = (
    ("AWQ", ("awq", "gptqmodel.quantization.awq")),
    ("GPTQ", ("auto_gptq", "gptqmodel", "optimum.gptq", "exllama", "exllamav2", "exllama_kernels", "marlin")),
    ("HQQ", ("hqq",)), ("EETQ", ("eetq", "transformers.integrations.eetq")),
    ("torchao", ("torchao",)), ("optimum-quanto", ("optimum.quanto", "quanto")),
    ("BitNet", ("transformers.integrations.bitnet",)),
    ("AQLM / VPTQ / SpQR / HIGGS", ("aqlm", "vptq", "spqr_quant", "flute", "transformers.integrations.higgs")),
    ("FP8", ("transformers.integrations.finegrained_fp8", "transformers.integrations.fbgemm_fp8", "fbgemm_gpu")),
    ("compressed-tensors", ("compressed_tensors", "transformers.integrations.compressed_tensors")),
    ("MXFP4 / NVFP4 / FP-Quant / FourOverSix / SINQ",
     ("transformers.integrations.mxfp4", "transformers.integrations.nvfp4", "fp_quant", "fouroversix", "sinq")),
    ("transformers' Gemma / Metal quantization",
     ("transformers.integrations.gemma_quant", "transformers.integrations.metal_quantization")),
)
_FLOAT8 = {getattr(torch, n) for n in dir(torch) if n.startswith("float8_")}


def keep_4bit_differentiable_(model: nn.Module) -> int:
    """Keep every bitsandbytes 4-bit layer of `model` on its differentiable kernel; returns how many were unpacked.

    On CPUs with AVX512-BF16, bitsandbytes (0.49 and later) repacks a `Linear4bit` in place for a faster CPU kernel at
    its first eval-mode forward without gradients (an evaluation, a generation). That kernel has no backward: a later
    statistics pass gets no output gradient at the layer (a crash), and training silently loses the gradient through
    every such layer to the adapters below it. Here the repacking is turned off on each layer and undone where it
    already happened (`_unpacked_for_cpu`: bitsandbytes' own inverse, with the block scales put back as the fp32
    vector its other kernels read). The model computes the same function; CPU evaluation of a 4-bit model is slower.
    Nothing happens on a model without such layers.
    """
    unpacked = 0
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _unpacked_for_cpu(weight.data, state)
            unpacked += 1
    return unpacked


def require_bitsandbytes() -> None:
    """Raise a clear error when bitsandbytes, which quantized bases need, is not installed."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("A 4-bit base needs bitsandbytes: pip install 'lorafa[quant]' (bitsandbytes>=0.47).")


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module  # PEFT's wrapper -> the layer


def _classes(obj) -> list[type]:
    return [c for c in type(obj).__mro__ if c not in (object, nn.Module)]


def _defined_in(cls: type, package: str) -> bool:
    module = getattr(cls, "__module__", None) or ""
    return module == package or module.startswith(package + ".")


def _from_bnb(obj, cls_name: str) -> bool:
    """Whether `obj` is an instance of bitsandbytes' class `cls_name` (or of a subclass of it)."""
    return any(c.__name__ == cls_name and _defined_in(c, "bitsandbytes") for c in _classes(obj))


def _unsupported_scheme(*objs) -> str | None:
    classes = [c for obj in objs for c in _classes(obj)]
    return next((what for what, packages in _UNSUPPORTED
                 if any(_defined_in(c, p) for c in classes for p in packages)), None)


def quant_kind(module: nn.Module) -> str | None:
    """Which quantization a layer's weight carries.

    Args:
        module: a layer, possibly wrapped by PEFT (its `get_base_layer()` is read).

    Returns:
        "nf4" or "fp4" (bitsandbytes 4-bit), "int8" (bitsandbytes LLM.int8), or None for a plain float layer.

    Raises:
        ValueError: the layer uses a scheme lorafa does not support (the message names it and what is supported),
            or a bitsandbytes weight sits on a layer that is not linear.
    """
    base = _base(module)
    weight = getattr(base, "weight", None)
    if _from_bnb(weight, "Params4bit") or _from_bnb(weight, "Int8Params"):
        if not isinstance(base, nn.Linear):
            raise ValueError(f"{type(base).__name__} holds a bitsandbytes weight but is not a linear layer; "
                             f"lorafa adapts linear layers only. Supported: {SUPPORTED}.")
        if _from_bnb(weight, "Int8Params"):
            return "int8"
        state = weight.quant_state
        return state.quant_type if state is not None else weight.quant_type
    scheme = _unsupported_scheme(base, weight)
    if scheme is None and isinstance(weight, torch.Tensor) and (
            weight.dtype in _FLOAT8 or not torch.is_floating_point(weight)):
        scheme = f"an unrecognised scheme storing {weight.dtype} weights"
    if scheme is not None:
        raise ValueError(f"{type(base).__name__} (weight {type(weight).__name__}) is quantized with {scheme}, which "
                         f"lorafa does not support. Supported: {SUPPORTED}; or load the model in fp32/bf16/fp16.")
    return None


def _quantized_4bit(weight, what: str):
    if not weight.bnb_quantized or weight.quant_state is None:
        raise ValueError(f"Cannot {what} a Linear4bit that bitsandbytes has not quantized yet (it quantizes on "
                         ".to(device)); move the model to its device first.")
    if weight.device.type == "meta":
        raise ValueError(f"Cannot {what} an offloaded layer (weight on the meta device): load it without disk/CPU "
                         "offload (device_map) so that its weight is in memory.")
    return weight.quant_state


def _unpacked_for_cpu(data: torch.Tensor, state):
    """On AVX512-BF16 CPUs, an eval forward repacks the weight in place for bitsandbytes' CPU kernel (absmax becomes a
    transposed bf16 matrix, double quantization is undone). Undo the repacking on copies, leaving the layer alone."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    absmax = state.absmax.T.reshape(-1).float()
    plain = copy.copy(state)
    plain.original_nested = False  # keep the bf16 absmax the kernel uses rather than re-quantizing it
    data, plain = _convert_weight_packed_for_cpu_inverse(data, plain)
    plain.absmax, plain.nested = absmax, False
    return data, plain


def _settings_4bit(data: torch.Tensor, state) -> dict:
    """The quantization settings a 4-bit weight was made with (everything but the values and the shape)."""
    if getattr(state, "packing_format_for_cpu", False):
        return {"quant_type": state.quant_type, "blocksize": state.blocksize, "dtype": state.original_dtype,
                "double quantization": state.original_nested,
                "quant_storage": getattr(state, "original_storage_type", None) or data.dtype}
    out = {"quant_type": state.quant_type, "blocksize": state.blocksize, "dtype": state.dtype,
           "double quantization": bool(state.nested), "quant_storage": data.dtype}
    if state.nested:
        out.update({"nested blocksize": state.state2.blocksize, "nested absmax dtype": state.absmax.dtype,
                    "nested statistics dtype": state.state2.absmax.dtype, "nested code": state.state2.code.cpu()})
    return out


def _quantize_4bit(w: torch.Tensor, settings: dict):
    from bitsandbytes.functional import quantize_4bit

    return quantize_4bit(w.to(settings["dtype"]).contiguous(), blocksize=settings["blocksize"],
                         compress_statistics=settings["double quantization"], quant_type=settings["quant_type"],
                         quant_storage=settings["quant_storage"])


def _check_reproduced(old: dict, new: dict) -> None:
    same = lambda a, b: torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b  # noqa: E731
    differ = [k for k in old if k not in new or not same(old[k], new[k])]
    if differ:
        raise ValueError(
            f"Re-quantizing with bitsandbytes cannot reproduce this layer's {', '.join(differ)} "
            f"({', '.join(f'{k}={old[k]!r}' for k in differ if not isinstance(old[k], torch.Tensor))}); e.g. a "
            "double-quantized layer made by another bitsandbytes version. Re-quantize the model with the installed "
            "bitsandbytes, or use a no-offset method (lora_one, lora_fa), which leaves the base as it is.")


def _int8_parts(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(CB, SCB) of an int8 layer; None when it keeps float weights (has_fp16_weights). The scales sit on the weight
    until the first forward and on the layer's `state` after it."""
    weight = base.weight
    if torch.is_floating_point(weight):
        if not base.state.has_fp16_weights:
            raise ValueError("Cannot read a Linear8bitLt that bitsandbytes has not quantized yet (it quantizes on "
                             ".to(device)); move the model to its device first.")
        return None
    scb = weight.SCB if weight.SCB is not None else base.state.SCB
    if scb is None:
        raise ValueError("This Linear8bitLt holds int8 weights without their row scales (SCB): load it again.")
    return weight.data, scb


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a fresh fp32 `out × in` matrix: bitsandbytes' own dequantization, one layer only.

    4-bit weights are dequantized to their stored dtype (bf16 stays bf16-rounded), as PEFT's merge does; bitsandbytes
    >= 0.50 skips that rounding in an fp32 forward, a difference far below the 4-bit error.

    Args:
        module: a bitsandbytes 4-bit or int8 linear layer (possibly PEFT-wrapped), or a plain `nn.Linear`.

    Returns:
        An fp32 tensor on the weight's device.

    Raises:
        ValueError: an unsupported scheme (see `quant_kind`), a layer not quantized yet, or offloaded to meta.
    """
    kind, base = quant_kind(module), _base(module)
    if kind is None:
        return base.weight.detach().float().clone()
    if kind == "int8":
        parts = _int8_parts(base)
        if parts is None:
            return base.weight.detach().float().clone()
        from bitsandbytes.functional import int8_vectorwise_dequant

        return int8_vectorwise_dequant(*parts).float()
    from bitsandbytes.functional import dequantize_4bit

    data, state = base.weight.data, _quantized_4bit(base.weight, "dequantize")
    if getattr(state, "packing_format_for_cpu", False):
        data, state = _unpacked_for_cpu(data, state)
    return dequantize_4bit(data, state).float()


def _requantize_int8(base: nn.Module, w: torch.Tensor) -> None:
    import bitsandbytes as bnb

    if _int8_parts(base) is None:  # has_fp16_weights: float weights, quantized at each forward
        base.weight = bnb.nn.Int8Params(w.to(base.weight.dtype), requires_grad=base.weight.requires_grad,
                                        has_fp16_weights=True)
    else:
        w16 = w.to(torch.float16)
        if not torch.isfinite(w16).all():
            raise ValueError("new_weight overflows float16, through which LLM.int8 quantizes.")
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(w16.contiguous())
        base.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    base.state.reset_grads()  # drop the int8 copy cached by the last forward; the next one reads the new weight


@torch.no_grad()
def requantize_(module: nn.Module, new_weight: torch.Tensor) -> None:
    """Replace the layer's weight, in place, by a fresh quantization of `new_weight` with the layer's own settings.

    4-bit: quant_type, blocksize, double quantization (and its nested layout), quant_storage and the stored dtype are
    kept; the module's compute dtype is untouched. int8: the row-wise LLM.int8 quantization (through fp16, as
    bitsandbytes does) or, with `has_fp16_weights`, the float weight. The layer stays on its device.

    Args:
        module: a bitsandbytes 4-bit or int8 linear layer (possibly PEFT-wrapped).
        new_weight: the `out × in` weight to store, usually fp32 (e.g. the residual W − s·B·A).

    Raises:
        ValueError: a plain or unsupported layer, a shape mismatch, non-finite values, or a setting the
            re-quantization cannot reproduce (the layer is then left unchanged).
    """
    import bitsandbytes as bnb

    kind, base = quant_kind(module), _base(module)
    if kind is None:
        raise ValueError(f"{type(base).__name__} is not quantized: write its weight directly, not with requantize_.")
    shape = (base.out_features, base.in_features)
    if tuple(new_weight.shape) != shape or not torch.isfinite(new_weight).all():
        raise ValueError(f"new_weight must be a finite {shape} matrix, got {tuple(new_weight.shape)} "
                         f"(finite: {bool(torch.isfinite(new_weight).all())}).")
    if kind == "int8":
        _requantize_int8(base, new_weight.to(base.weight.device))
        return
    settings = _settings_4bit(base.weight.data, _quantized_4bit(base.weight, "re-quantize"))
    data, state = _quantize_4bit(new_weight.to(base.weight.device), settings)
    _check_reproduced(settings, _settings_4bit(data, state))
    base.weight = bnb.nn.Params4bit(
        data, requires_grad=False, quant_state=state, blocksize=settings["blocksize"],
        compress_statistics=settings["double quantization"], quant_type=settings["quant_type"],
        quant_storage=settings["quant_storage"], module=base, bnb_quantized=True)
    base.quant_state = state


def check_quantized_model(model: nn.Module, targets: Mapping[str, nn.Module] | Iterable[str],
                          method_needs_weight_grad: bool, offset: bool) -> dict[str, str | None]:
    """Refuse, before any long pass, targets lorafa cannot read or re-quantize.

    Args:
        model: the base model (or a PEFT model around it).
        targets: name -> module, or module names as in `model.named_modules()`.
        method_needs_weight_grad: the init reads the gradient w.r.t. W (lora_ga, lora_one, lora_fa, ...): a quantized
            target must then be dequantizable, one layer at a time.
        offset: the init writes W − s·B·A back: a quantized target must also be re-quantizable with its settings.

    Returns:
        name -> quant kind ("nf4", "fp4", "int8" or None), in the order of `targets`.

    Raises:
        ValueError: a target name not in the model, an unsupported scheme, a layer not quantized yet or offloaded,
            or (offset) settings the re-quantization cannot reproduce; each message names the target.
    """
    if not isinstance(targets, Mapping):
        named = dict(model.named_modules())
        missing = [n for n in targets if n not in named]
        if missing:
            raise ValueError(f"targets not found in the model: {missing}")
        targets = {n: named[n] for n in targets}
    kinds = {}
    for name, module in targets.items():
        try:
            kinds[name] = kind = quant_kind(module)
            base = _base(module)
            if kind == "int8" and (method_needs_weight_grad or offset):
                _int8_parts(base)
            elif kind is not None and offset:  # quantize 4 blocks with the layer's settings: what does bnb make?
                settings = _settings_4bit(base.weight.data, _quantized_4bit(base.weight, "re-quantize"))
                probe = torch.linspace(-1, 3, 4 * settings["blocksize"], device=base.weight.device).view(1, -1)
                _check_reproduced(settings, _settings_4bit(*_quantize_4bit(probe, settings)))
            elif kind is not None and method_needs_weight_grad:
                _quantized_4bit(base.weight, "dequantize")
        except ValueError as err:
            raise ValueError(f"target {name!r}: {err}") from None
    return kinds
