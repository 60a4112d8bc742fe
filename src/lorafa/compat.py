"""Drop-in entry points for users of the LoRA-GA authors' API and of PEFT's `preprocess_loraga`.

Both flows run on lorafa's statistics pass and its paper-faithful LoRA-GA (SPEC §2.1), and save adapters that load
on the original base with stock PEFT. Switching is a change of import:

    from lorafa.compat import LoraGAConfig, estimate_gradient, LoraGAContext, get_peft_model, \
        save_loraga_model_init, save_loraga_model_final
    from lorafa.compat import preprocess_loraga, get_peft_model   # PEFT's flow
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import peft
import torch
from peft import LoraConfig
from torch import nn

from .config import InitConfig
from .methods.lora_ga import LoraGAOptions
from .fsio import remove_owned
from .peft_bridge import initialize
from .saving import INITIAL_FILES, init_record, is_initial_adapter, save_adapter, write_initial_folder
from .stats import LayerStats, StatsRecorder, collect_stats, load_stats, save_stats
from .targets import SUPPORTED_LAYERS, resolve_targets, unwrap_model

logger = logging.getLogger(__name__)
_CONTEXT_GRADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> named_grad (LoraGAContext)
_PREPROCESSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> stats (preprocess_loraga)
_LORA_FIELDS = [f.name for f in dataclasses.fields(LoraConfig) if f.init]


def _plain_lora_config(config: LoraConfig, **overrides) -> LoraConfig:
    """A stock LoraConfig with the LoraConfig fields of `config` (shallow: nested configs stay objects)."""
    return LoraConfig(**{**{k: getattr(config, k) for k in _LORA_FIELDS}, **overrides})
INITIAL_SUBDIR = "initial_adapter"


@dataclass
class LoraGAConfig(LoraConfig):
    """The authors' LoraGAConfig: a LoraConfig plus the gradient-estimation and LoRA-GA options.

    Attributes:
        bsz, iters, max_length: gradient-estimation batch size, batches and token limit (for the user's dataloader).
        direction: ArB2r | A2rBr | ArBr | random.   scale: stable | gd_scale | unit | weight_svd (or gd, weightS).
        stable_gamma: γ of the stable scale.   dtype: "fp32" | "bf16" (the authors' estimation dtype; informational).
    """

    bsz: int = 2
    iters: int = 64
    direction: str = "ArB2r"
    max_length: int = 1024
    dtype: str = "fp32"
    scale: str = "stable"
    stable_gamma: float = 16

    def __post_init__(self):
        super().__post_init__()
        opts = LoraGAOptions(direction=self.direction, scale=self.scale, stable_gamma=self.stable_gamma)
        self.direction, self.scale = opts.direction, opts.scale
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"dtype must be 'fp32', 'bf16' or 'fp16', got {self.dtype!r}")

    def to_lora_config(self) -> LoraConfig:
        """The plain PEFT LoraConfig part (what gets saved with the adapter)."""
        return _plain_lora_config(self)

    def to_init_config(self) -> InitConfig:
        return InitConfig(method="lora_ga", direction=self.direction, scale=self.scale, stable_gamma=self.stable_gamma,
                          bsz=self.bsz, iters=self.iters, max_length=self.max_length)


def _all_linear_names(model: nn.Module) -> list[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if isinstance(m, SUPPORTED_LAYERS) and m is not head]


def estimate_gradient(model: nn.Module, dataloader, accelerator=None, quant_flag: bool = False,
                      origin_type: str = "bf16", quant_type: str = "nf4", no_split_module_classes=None,
                      target_modules=None) -> dict[str, torch.Tensor]:
    """Mean gradient of the loss over the dataloader, per linear module (the authors' `estimate_gradient`).

    Args:
        model: a floating-point model.
        dataloader: yields HF-style dict batches (with labels). Under accelerate/torchrun each process passes its
            own shard; the result is summed over processes.
        accelerator: accepted for compatibility; distribution is read from torch.distributed.
        quant_flag: the authors offload blocks to save accelerator memory; here the fp32 accumulators go to the CPU.
        origin_type, quant_type, no_split_module_classes: accepted for compatibility (not needed by the streaming pass).
        target_modules: restrict to these modules (default: every nn.Linear/Conv1D except the output head).

    Returns:
        module name -> fp32 gradient in out × in orientation.
    """
    base = unwrap_model(model)
    targets = target_modules or _all_linear_names(base)
    stats = collect_stats(base, dataloader, targets, kinds=("grad",), accumulate_on="cpu" if quant_flag else None)
    return {name: st.grad for name, st in stats.items()}


class LoraGAContext:
    """Makes `named_grad` available to `get_peft_model` for this model (held in a registry, not on the module)."""

    def __init__(self, model: nn.Module, named_grad: dict | None = None):
        self.model, self.named_grad = model, named_grad

    def __enter__(self):
        _CONTEXT_GRADS[self.model] = self.named_grad
        return self

    def __exit__(self, *exc):
        _CONTEXT_GRADS.pop(self.model, None)
        return False


def preprocess_loraga(model: nn.Module, lora_config: LoraConfig, train_step: Callable[[], None],
                      cache_file: str | None = None) -> None:
    """PEFT's `preprocess_loraga`: estimate gradients by running `train_step()` (its own forward/backward calls).

    The gradient of each target is averaged over the backward passes that reached it (PEFT's semantics), kept in
    fp32 as each arrives. `cache_file` is a safetensors file (PEFT uses pickle; we never do).

    Raises:
        ValueError: no `lora_config.lora_ga_config`, quantized/unsupported targets, a layer without gradient.
    """
    if getattr(lora_config, "lora_ga_config", None) is None:
        raise ValueError("Set LoraConfig(init_lora_weights='lora_ga', lora_ga_config=peft.LoraGAConfig(...)) to use LoRA-GA.")
    base = unwrap_model(model)
    targets = resolve_targets(base, lora_config)
    if cache_file is not None and os.path.exists(cache_file) and os.path.getsize(cache_file) > 0:
        stats = load_stats(cache_file)
    else:
        with StatsRecorder(base, targets, {"grad"}, train_mode=True) as recorder, torch.enable_grad():
            train_step()
        stats = recorder.finalize("calls")
        if cache_file is not None:
            save_stats(stats, cache_file, config={"source": "preprocess_loraga", "targets": sorted(targets)})
    _PREPROCESSED[base] = stats


def _peft_lora_ga_init_config(lora_config: LoraConfig) -> tuple[LoraConfig, InitConfig]:
    ga = lora_config.lora_ga_config
    init = InitConfig(method="lora_ga", direction=ga.direction, scale=ga.scale, stable_gamma=ga.stable_gamma)
    plain = _plain_lora_config(lora_config, init_lora_weights=True, lora_ga_config=None)
    return plain, init


def _check_lora_ga_call(peft_config, mixed: bool, low_cpu_mem_usage: bool) -> None:
    """Refuse, before anything is changed, what a LoRA-GA init cannot honour (PEFT crashes on the last two)."""
    if not isinstance(peft_config, LoraGAConfig) and peft_config.lora_ga_config is None:
        raise ValueError("LoraConfig(init_lora_weights='lora_ga') needs lora_ga_config, as in PEFT: pass "
                         "lora_ga_config=peft.LoraGAConfig() (PEFT's defaults: direction='ArB2r', scale='stable', "
                         "stable_gamma=16) or peft.LoraGAConfig(direction=..., scale=..., stable_gamma=...).")
    if mixed:
        raise ValueError("mixed=True is not supported with LoRA-GA: a PeftMixedModel cannot be saved (PEFT raises "
                         "NotImplementedError), so the initialised adapter could never be written relative to the "
                         "original base. Use mixed=False, save the adapter, and load it into a PeftMixedModel.")
    if low_cpu_mem_usage:
        raise ValueError("low_cpu_mem_usage=True is not supported with LoRA-GA: it creates the adapter weights on the "
                         "meta device to be filled from a checkpoint, while LoRA-GA computes them now (PEFT's own "
                         "lora_ga init fails on it). Use low_cpu_mem_usage=False; to load a saved adapter use "
                         "PeftModel.from_pretrained(base, path, low_cpu_mem_usage=True).")


def _set_revision(peft_config, revision: str | None) -> None:
    """PEFT's `get_peft_model` handling of `revision`: it overrides the config's, with a warning if they differ."""
    if revision is None:
        return
    if peft_config.revision is not None and peft_config.revision != revision:
        warnings.warn(f"peft config has already set base model revision to {peft_config.revision}, "
                      f"overwriting with revision {revision}")
    peft_config.revision = revision


def _lora_ga_inputs(model: nn.Module, base: nn.Module, peft_config) -> tuple[LoraConfig, InitConfig, dict]:
    if isinstance(peft_config, LoraGAConfig):
        named_grad = _CONTEXT_GRADS.get(model, _CONTEXT_GRADS.get(base))
        if named_grad is None:
            raise ValueError("LoraGAConfig needs gradients: call get_peft_model inside "
                             "`with LoraGAContext(model=model, named_grad=estimate_gradient(...)):`.")
        stats = {n: LayerStats(grad=g.float(), n_batches=1) for n, g in named_grad.items()}
        return peft_config.to_lora_config(), peft_config.to_init_config(), stats
    stats = _PREPROCESSED.get(base)
    if stats is None:
        raise ValueError("init_lora_weights='lora_ga' needs gradients: call "
                         "lorafa.compat.preprocess_loraga(model, lora_config, train_step) first.")
    return (*_peft_lora_ga_init_config(peft_config), stats)


def get_peft_model(model: nn.Module, peft_config, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: str | None = None, low_cpu_mem_usage: bool = False):
    """`peft.get_peft_model` (same arguments, same meaning), with LoRA-GA configs initialised by lorafa.

    - the authors' `LoraGAConfig`: gradients from the enclosing `LoraGAContext`;
    - PEFT's `LoraConfig(init_lora_weights='lora_ga', ...)`: gradients from `preprocess_loraga`;
    - anything else goes to `peft.get_peft_model` unchanged.

    Args:
        model, peft_config, adapter_name: as in PEFT.
        mixed: as in PEFT; refused for LoRA-GA (a PeftMixedModel cannot be saved).
        autocast_adapter_dtype: as in PEFT: True keeps fp16/bf16 models' adapters in fp32, False in the model's
            dtype. The factors are written in the adapter dtype and the offset is computed from the cast factors.
        revision: as in PEFT: stored in the config (and in the saved adapter_config.json).
        low_cpu_mem_usage: as in PEFT; refused for LoRA-GA (the adapter weights are computed, not loaded).

    Raises:
        ValueError: LoRA-GA requested without lora_ga_config, with mixed=True or low_cpu_mem_usage=True, or with no
            gradients estimated for this model.
    """
    if not isinstance(peft_config, LoraGAConfig) and not (
            isinstance(peft_config, LoraConfig) and peft_config.init_lora_weights == "lora_ga"):
        return peft.get_peft_model(model, peft_config, adapter_name=adapter_name, mixed=mixed,
                                   autocast_adapter_dtype=autocast_adapter_dtype, revision=revision,
                                   low_cpu_mem_usage=low_cpu_mem_usage)
    base = unwrap_model(model)
    _check_lora_ga_call(peft_config, mixed, low_cpu_mem_usage)
    lora_config, init, stats = _lora_ga_inputs(model, base, peft_config)
    _set_revision(peft_config, revision)
    lora_config.revision = peft_config.revision
    peft_model = initialize(base, lora_config, init, stats=stats, adapter_name=adapter_name,
                            autocast_adapter_dtype=autocast_adapter_dtype)
    _PREPROCESSED.pop(base, None)
    # PEFT records the base model's name on the config it was given; lorafa's init worked on a copy
    peft_config.base_model_name_or_path = peft_model.peft_config[adapter_name].base_model_name_or_path
    return peft_model


def save_loraga_model_init(model, save_dir: str) -> None:
    """Save the initial adapter (A₀, B₀) under `save_dir/initial_adapter` (the authors' first save)."""
    record = init_record(model)
    if record is None:
        raise ValueError("save_loraga_model_init expects the model returned by lorafa.compat.get_peft_model.")
    os.makedirs(save_dir, exist_ok=True)
    write_initial_folder(model, record, os.path.join(save_dir, INITIAL_SUBDIR))


def save_loraga_model_final(model, save_dir: str) -> None:
    """Save the trained adapter relative to the original base (rank 2r), then drop the initial checkpoint.

    Afterwards `PeftModel.from_pretrained(original_base, save_dir)` reproduces the trained model.
    """
    save_adapter(model, save_dir)
    initial = os.path.join(save_dir, INITIAL_SUBDIR)
    if is_initial_adapter(initial):  # only lorafa's own files are removed, never a folder it did not write
        remove_owned(initial, INITIAL_FILES)
