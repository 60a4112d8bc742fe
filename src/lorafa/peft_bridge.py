"""Model surgery: InitResults into a PEFT LoraModel, base-weight offsets, and saving relative to the pristine base."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
import re
import tempfile
import uuid
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import CONFIG_NAME, get_peft_model_state_dict
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .checks import is_real
from .config import InitConfig, as_init_config
from .kasa import TRUNCATION_NOTE, kasa_lora_config
from .methods.common import InitResult
from .methods.extract import check_difference
from .methods.lora_fa import whitener_scope
from .methods.registry import METHODS, init_factors, make_options
from .stats.collect import collect_stats, fsdp_sharded
from .fsio import check_destination, remove_owned, swap_in
from .stats.distributed import agree_step, all_gather_objects, all_reduce_sum_, on_main_process, world
from .stats.types import check_stats_dict
from .quant import keep_4bit_differentiable_, requantize_
from .targets import (is_quantized, is_transposed, out_in_features, resolve_targets, set_weight_matrix, unwrap_model,
                      weight_matrix)

logger = logging.getLogger(__name__)


INIT_FILE = "lorafa_init.json"  # beside A₀/B₀ in an initial adapter folder, and beside every saved adapter
INITIAL_WEIGHTS = "adapter_model.safetensors"


@dataclass
class InitRecord:
    """What `save_adapter` needs to express the trained adapter relative to the original base weights (SPEC §3).

    Either `initial_state` holds A₀, B₀ in memory, or `initial_dir` names the folder `save_initial_adapter` wrote
    them to (then nothing but this small record stays in memory).
    """

    adapter_name: str
    init_config: InitConfig
    subtracted: bool
    initial_state: dict[str, torch.Tensor] | None = None  # A₀, B₀ in PEFT's state-dict format
    infos: dict[str, dict] = field(default_factory=dict)
    initial_dir: str | None = None
    summary: dict = field(default_factory=dict)  # model-wide facts of the init: rank allocation, line search

    def offset_state(self) -> dict[str, torch.Tensor]:
        """The factors of the base offset, W_base = W − s·B_off·A₀ (PEFT's conversion input, SPEC §3): A₀ and B₀,
        with each layer's B₀ scaled by its `offset_scale` (1 unless offset="partial")."""
        state = dict(self.initial_tensors())
        for key, value in state.items():
            if ".lora_B." in key:
                c = self.infos.get(_module_of_key(key), {}).get("offset_scale", 1.0)
                if c != 1.0:
                    state[key] = value * c
        return state

    def initial_tensors(self) -> dict[str, torch.Tensor]:
        if self.initial_state is not None:
            return self.initial_state
        return load_file(os.path.join(self.initial_dir, INITIAL_WEIGHTS))


def _module_of_key(key: str) -> str:
    """'base_model.model.<module>.lora_B.weight' -> '<module>'."""
    module = key.split(".lora_B.")[0].split(".lora_A.")[0]
    return module[len("base_model.model."):] if module.startswith("base_model.model.") else module


# The records of models built by `initialize` in this process, keyed weakly by the PeftModel (a record dies with its
# model; nothing is stored as attributes on modules). A deepcopy or a new process has no record: pass
# `initial_adapter=` (the folder `initialize(..., initial_adapter_dir=)` wrote) to `save_adapter` instead.
_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def init_record(peft_model: PeftModel, initial_adapter: str | os.PathLike | None = None) -> InitRecord | None:
    """The record of this model's init: read from `initial_adapter` if given, else the one `initialize` kept in
    this process for this very object (None if there is none)."""
    if initial_adapter is not None:
        return read_initial_adapter(initial_adapter)
    return _RECORDS.get(peft_model)


def read_initial_adapter(path: str | os.PathLike) -> InitRecord:
    """The InitRecord stored in an initial adapter folder by `save_initial_adapter`.

    Raises:
        FileNotFoundError: the folder lacks the files `save_initial_adapter` writes.
        ValueError: its lorafa_init.json is not valid JSON, lacks a key, or holds an init_config this version of
            InitConfig refuses (the message names the file).
    """
    path = os.fspath(path)
    meta_path = os.path.join(path, INIT_FILE)
    if not (os.path.isfile(meta_path) and os.path.isfile(os.path.join(path, INITIAL_WEIGHTS))):
        raise FileNotFoundError(f"{path} is not an initial adapter written by lorafa (it needs {INIT_FILE} and "
                                f"{INITIAL_WEIGHTS}): pass the folder given to initialize(initial_adapter_dir=...).")
    redo = ("write the initial adapter again (initialize(..., initial_adapter_dir=) or save_initial_adapter) with "
            "this lorafa version")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{meta_path} is not valid JSON ({err}): the file is damaged; {redo}.") from None
    missing = [k for k in ("adapter_name", "init_config", "subtracted") if not isinstance(meta, dict) or k not in meta]
    if missing or not isinstance(meta["init_config"], dict):
        what = f"lacks {missing}" if missing else "has an init_config that is not a JSON object"
        raise ValueError(f"{meta_path} {what}: it is not a record lorafa wrote (or it was edited); {redo}.")
    try:
        init_config = InitConfig(**meta["init_config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{meta_path} holds an init_config this lorafa version cannot use ({err}): it was written "
                         f"by another lorafa version, or edited; {redo}.") from None
    return InitRecord(meta["adapter_name"], init_config, bool(meta["subtracted"]),
                      infos=meta.get("infos", {}), initial_dir=path, summary=meta.get("summary", {}))


def layer_rank_and_scaling(lora_config: LoraConfig, name: str) -> tuple[int, float]:
    """r and s for one module, resolving rank_pattern/alpha_pattern exactly as PEFT does."""
    r = lora_config.rank_pattern.get(get_pattern_key(lora_config.rank_pattern.keys(), name), lora_config.r)
    alpha = lora_config.alpha_pattern.get(get_pattern_key(lora_config.alpha_pattern.keys(), name), lora_config.lora_alpha)
    return r, alpha / math.sqrt(r) if lora_config.use_rslora else alpha / r


def _check_lora_config(lora_config, init_config: InitConfig) -> None:
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}")
    _check_ranks(lora_config)
    if lora_config.init_lora_weights is not True:
        raise ValueError(
            f"lora_config.init_lora_weights={lora_config.init_lora_weights!r}: choose the method with "
            f"InitConfig(method=...) and leave init_lora_weights=True, so PEFT does not run a second init."
        )
    if lora_config.kasa_config is not None and init_config.method != "kasa":
        if init_config.subtracts():
            raise ValueError(f"KaSA (lora_config.kasa_config) truncates the base weight, and {init_config.method} "
                             "offsets it by its initial factors: the two cannot share a layer (the saved adapter could "
                             "not be expressed on the original base). Use one of them.")
        raise ValueError(f"lora_config.kasa_config turns on KaSA, whose factors start at B = 0 with random singular "
                         f"values; {init_config.method}'s factors would be scaled by those. Use InitConfig("
                         "method='kasa', beta=..., gamma=...) and leave kasa_config unset.")
    if lora_config.use_dora and init_config.method != "lora":
        raise ValueError("use_dora is not supported with data-aware inits (DoRA's magnitude would be taken from the "
                         "wrong weight). Use InitConfig(method='lora') with DoRA, or turn DoRA off.")
    if METHODS[init_config.method].variant == "goat" and lora_config.lora_bias:
        raise ValueError("GOAT needs LoRA without a bias (its experts replace the LoRA forward): set "
                         "LoraConfig(lora_bias=False).")


def _is_rank(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _check_ranks(lora_config: LoraConfig) -> None:
    """r, rank_pattern and the alphas, as `layer_rank_and_scaling` and PEFT read them: refused before any work (the
    scale alpha/r would divide by zero, or PEFT would refuse them after the statistics pass)."""
    if not _is_rank(lora_config.r):
        raise ValueError(f"lora_config.r={lora_config.r!r}: the LoRA rank r must be an integer >= 1 (e.g. "
                         "LoraConfig(r=8)).")
    for key, r in (lora_config.rank_pattern or {}).items():
        if not _is_rank(r):
            raise ValueError(f"lora_config.rank_pattern[{key!r}]={r!r}: each rank of rank_pattern must be an integer "
                             ">= 1. To give these layers no adapter, leave them out of target_modules (or put them "
                             "in exclude_modules).")
    alphas = [("lora_alpha", lora_config.lora_alpha),
              *((f"alpha_pattern[{k!r}]", a) for k, a in (lora_config.alpha_pattern or {}).items())]
    for what, alpha in alphas:
        if not (is_real(alpha) and alpha > 0):
            raise ValueError(f"lora_config.{what}={alpha!r}: alpha sets the adapter's scale (alpha/r, or alpha/√r "
                             "with rsLoRA) and must be a finite number > 0.")


def _check_variant_targets(targets: dict, lora_config: LoraConfig, init_config: InitConfig) -> None:
    """GOAT installs its experts on nn.Linear layers (weight out × in) only: refused here, before get_peft_model
    wraps the caller's model."""
    if METHODS[init_config.method].variant != "goat":
        return
    for name, module in targets.items():
        if not isinstance(module, torch.nn.Linear) or lora_config.fan_in_fan_out:
            raise ValueError(f"GOAT supports nn.Linear layers (weight out×in) only; {name} is a "
                             f"{type(module).__name__} (fan_in_fan_out={lora_config.fan_in_fan_out}): leave it out of "
                             "target_modules")


def compute_init(model, lora_config: LoraConfig, init_config: InitConfig, stats=None, batches=None, loss_fn=None,
                 progress: bool = True, search_batches=None, align=None, tuned=None,
                 base_weights=None) -> dict[str, InitResult]:
    """Every target layer's InitResult, computed from the untouched base model (nothing is modified).

    With `init_config.rank="auto"` each result has its allocated rank (`info["rank"]`); `initialize` also writes
    the allocation into the LoraConfig.

    Raises:
        ValueError: see `initialize`.
    """
    init_config = as_init_config(init_config)
    _check_lora_config(lora_config, init_config)
    return _compute_init(model, lora_config, init_config, stats, batches, loss_fn, progress, search_batches, align,
                         tuned, base_weights)[0]


def aligned_loss(align, lambda_: float, loss_fn=None):
    """`loss_fn(model, batch)` = L_task + λ · D(model, teacher), the dual objective of SPEC §5 at the init.

    Args:
        align: a `lorafa.align.AlignmentTerm` (its teacher must be a separate model: against the model itself D and
            its gradient are 0 at the start).
        lambda_: λ.
        loss_fn: the task loss (default `model(**batch).loss`).
    """
    if not hasattr(align, "teacher") or not hasattr(align.teacher, "refresh_ema"):
        raise ValueError("align_init needs an AlignmentTerm with a separate teacher model (ModelTeacher): against "
                         "the base model itself the alignment gradient is 0 at the start")

    def loss(model, batch):
        out = model(**batch, **({"output_hidden_states": True} if align.needs_hidden else {}))
        task = loss_fn(model, batch) if loss_fn is not None else out.loss
        return task + lambda_ * align(model, batch, out, 0)

    return loss


def _compute_init(model, lora_config, init_config, stats, batches, loss_fn, progress, search_batches=None,
                  align=None, tuned=None, base_weights=None):
    """(results, the LoraConfig the results are for, summary, {name: a function reading W})."""
    if init_config.align_init:
        if align is None:
            raise ValueError("InitConfig(align_init=True) needs the teacher: pass align=AlignmentTerm(teacher, ...) to "
                             "initialize / compute_init")
        loss_fn = aligned_loss(align, init_config.align_lambda, loss_fn)
    elif align is not None:
        raise ValueError("align= is used by InitConfig(align_init=True) only: set it, or drop align=")
    if stats is not None:
        check_stats_dict(stats)  # a precomputed statistics dict: a wrong one fails here, named
    base = unwrap_model(model)
    targets = resolve_targets(base, lora_config)
    _check_variant_targets(targets, lora_config, init_config)
    _check_quantized(base, targets, init_config)
    weights = base_weight_readers(base_weights, targets, init_config)
    tuned = tuned_weights(tuned, targets, init_config.method)  # a wrong architecture fails before the pass
    if tuned is not None:  # a fine-tune equal to the base gives zero adapters (B = A = 0), which cannot train
        check_difference(weights, tuned)
    needs = init_config.needs
    _check_sketch_size(init_config, lora_config, targets)
    _check_budget(init_config, targets)
    if init_config.line_search and batches is None and search_batches is None:
        raise ValueError("scale='line_search' chooses the step by the loss on the statistics batches: pass batches= "
                         "(or search_batches=) to initialize, also when stats= are given, or use scale='stable' or "
                         "'kfac'.")
    if needs is not None and stats is None:
        if batches is None:
            raise ValueError(f"{init_config.method} needs '{needs}' statistics: pass batches= (or stats=).")
        rank, world_size = world()
        # init.iters counts batches over all processes: batch b belongs to rank b mod world_size
        stats = collect_stats(base, batches, list(targets), kinds=(needs,), loss_fn=loss_fn,
                              max_batches=len(range(rank, init_config.iters, world_size)), progress=progress,
                              sketch=init_config.sketch_sizes, accumulate_on=init_config.accumulate_on)
    if stats is not None and needs is not None:
        missing = [n for n in targets if n not in stats]
        if missing:
            raise ValueError(f"No statistics for target modules {missing[:6]}{' ...' if len(missing) > 6 else ''}: "
                             "they were collected for other target_modules. Recompute them for this LoraConfig.")
    summary = {}
    opts = init_config.method_options()
    with whitener_scope():
        lora_config, targets, summary["ranks"] = _allocate(targets, lora_config, init_config, stats, opts, weights,
                                                           tuned)
        results = _init_layers(targets, lora_config, init_config, stats, opts, progress, weights, tuned)
    if init_config.line_search:
        own = search_batches is None  # the statistics batches: this process's share of init.iters
        summary["line_search"] = line_search(base, targets, results, lora_config, batches if own else search_batches,
                                             loss_fn, offset=init_config.offset == "partial",
                                             max_batches=len(range(world()[0], init_config.iters, world()[1]))
                                             if own else None)
        summary["line_search"]["on"] = "statistics batches" if own else "search_batches"
    if summary["ranks"] is None:
        del summary["ranks"]
    return results, lora_config, summary, weights


def _check_quantized(base, targets, init_config) -> None:
    """Quantized (bitsandbytes) targets: refuse, before the statistics pass, what cannot be read or re-quantized."""
    from .quant import check_quantized_model

    kinds = check_quantized_model(base, targets, method_needs_weight_grad=init_config.needs in ("grad", "kfac"),
                                  offset=init_config.subtracts())
    quantized = sorted(n for n, k in kinds.items() if k is not None)
    if not quantized:
        return
    why = {"kasa": "KaSA truncates the base weight through PEFT, which cannot on 4-bit/int8 layers",
           "goat": "the GOAT variant runs on float nn.Linear layers only"}.get(METHODS[init_config.method].variant)
    if why is not None:
        raise ValueError(f"{init_config.method} on quantized layers ({quantized[:3]}...) is not supported: {why}. "
                         "Load the model in fp32/bf16, or use another method (pissa, lora_ga, lora_fa, ...).")


def tuned_weights(tuned, targets, method: str):
    """{target name: a function giving its fine-tuned weight (out × in, fp32)} from a model or a state dict, every
    layer checked now (presence, shape) so a wrong architecture fails before the statistics pass; the weights are
    read one layer at a time. None for methods that do not use one."""
    if not METHODS[method].tuned:
        if tuned is not None:
            raise ValueError(f"tuned= is the fine-tuned model that method='extract' starts from; {method} does not "
                             "use it")
        return None
    if tuned is None:
        raise ValueError("method='extract' needs the fine-tuned model: pass tuned= (a model of the base's "
                         "architecture, or its state dict)")
    return layer_weights(tuned, targets, "the fine-tuned model", "extract needs a fine-tune of the same "
                         "architecture as the base (the same module names and shapes)")


def layer_weights(source, targets, what: str, hint: str) -> dict:
    """{target name: a function giving that layer's weight from `source` as an fp32 `out × in` matrix on the
    target's device}, read one layer at a time; every layer's presence and shape is checked now.

    Args:
        source: a model (its layers are read as `weight_matrix` reads them: dequantized if quantized), a state dict,
            or a checkpoint: a `.safetensors` file or a folder of them (sharded checkpoints included), opened lazily.
        targets: name -> target module of the base.
        what, hint: for error messages (what the source is; what it must be).
    """
    if isinstance(source, torch.nn.Module):
        modules = dict(unwrap_model(source).named_modules())
        found = {n: modules[n] for n in targets if n in modules and hasattr(modules[n], "weight")}
        shapes = {n: out_in_features(m) for n, m in found.items()}
        read = lambda n: weight_matrix(found[n])  # noqa: E731
    else:
        tensors = _checkpoint_tensors(source) if isinstance(source, (str, os.PathLike)) else source
        # a task model's checkpoint may be its backbone's (keys without `bert.`/`model.`), as transformers allows;
        # the exact key, looked at last, wins
        found = {n: k for n in targets for k in (f"{n.partition('.')[2]}.weight", f"{n}.weight") if k in tensors}
        shapes = {n: _stored_shape(tensors, k, targets[n]) for n, k in found.items()}
        read = lambda n: _as_matrix(tensors[found[n]], targets[n])  # noqa: E731
    missing = [n for n in targets if n not in found]
    if missing:
        raise ValueError(f"{what} has no {missing[:4]}{' ...' if len(missing) > 4 else ''}: {hint}")
    for name in targets:
        if shapes[name] != out_in_features(targets[name]):
            raise ValueError(f"{what}'s {name!r} is {shapes[name][0]} × {shapes[name][1]} (out × in), the base's "
                             f"{out_in_features(targets[name])}: {hint}")
    return {n: (lambda n=n: read(n).to(targets[n].weight.device)) for n in targets}


def _stored_shape(tensors, key: str, like) -> tuple[int, int]:
    shape = tensors.shape(key) if isinstance(tensors, _checkpoint_tensors) else tuple(tensors[key].shape)
    if len(shape) != 2:
        return shape
    return (shape[1], shape[0]) if is_transposed(like) else shape


class _checkpoint_tensors:
    """A read-only mapping key -> tensor over a `.safetensors` file or a folder of them, each tensor read from disk
    only when asked for (one layer at a time, never the whole checkpoint)."""

    def __init__(self, path):
        from safetensors import safe_open

        path = os.fspath(path)
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors")) \
            if os.path.isdir(path) else [path]
        if not files or not all(os.path.isfile(f) for f in files):
            raise ValueError(f"{path!r} is neither a .safetensors file nor a folder holding .safetensors files: pass "
                             "the full-precision checkpoint's folder (as saved by save_pretrained), a state dict or "
                             "a model.")
        self._files = {}
        for f in files:
            with safe_open(f, framework="pt") as h:
                for k in h.keys():
                    self._files[k] = f
        self._open = safe_open

    def __contains__(self, key) -> bool:
        return key in self._files

    def shape(self, key) -> tuple:
        with self._open(self._files[key], framework="pt") as h:
            return tuple(h.get_slice(key).get_shape())

    def __getitem__(self, key) -> torch.Tensor:
        with self._open(self._files[key], framework="pt") as h:
            return h.get_tensor(key)


def _as_matrix(w: torch.Tensor, like: torch.nn.Module) -> torch.Tensor:
    w = w.detach()
    return (w.t() if is_transposed(like) else w).float()


def base_weight_readers(base_weights, targets, init_config) -> dict:
    """{target name: a function giving W, the weight the factors are computed from and the offset is taken from}.

    Float targets: their own weight. bitsandbytes-quantized targets: their dequantized weight Q(W), or, with
    `base_weights` (the full-precision checkpoint), the original W, read one layer at a time; an offset method then
    stores Q(W − s·B·A): closer to W than Q(W) is when the offset comes out of W (pissa, corda; QPiSSA), further when
    it enlarges the residual (lora_ga; docs/benchmarks.md, "4-bit bases"). Offset methods on quantized targets need
    `base_weights` (or `base_weights="dequantized"` to accept Q(Q(W) − s·B·A), which adds a second quantization
    error), so that the loss of accuracy is never silent.
    """
    quantized = [n for n, m in targets.items() if is_quantized(m)]
    if base_weights is None or isinstance(base_weights, str) and base_weights == "dequantized":
        if quantized and base_weights is None and init_config.subtracts():
            raise ValueError(
                f"{init_config.method} offsets the base by its factors, and the targets ({quantized[:2]}...) are "
                "quantized: the residual W − s·B·A must come from the full-precision W, or it carries the 4-bit "
                "error twice. Pass base_weights=<the full-precision checkpoint folder, state dict or model> "
                "(read one layer at a time), or base_weights='dequantized' to start from the quantized weights.")
        return {n: (lambda m=m: weight_matrix(m)) for n, m in targets.items()}
    if not quantized:
        raise ValueError("base_weights= gives the full-precision weights of quantized targets, but no target is "
                         "quantized: drop it (the model's own weights are used).")
    return layer_weights(base_weights, targets, "base_weights", "pass the full-precision checkpoint the quantized "
                         "model was loaded from")


def _check_budget(init_config, targets) -> None:
    """A rank budget that cannot give every layer r_min: an error before the statistics pass."""
    if init_config.rank != "auto" or init_config.rank_budget is None:
        return
    sizes = [sum(out_in_features(m)) for m in targets.values()]
    need = init_config.r_min * (len(sizes) if init_config.budget_by == "rank" else sum(sizes))
    if init_config.rank_budget < need:
        raise ValueError(f"rank_budget={init_config.rank_budget} ({init_config.budget_by}s) cannot give each of the "
                         f"{len(sizes)} target layers r_min={init_config.r_min}: it needs at least {need}. Raise the "
                         "budget, or set r_min=0 to let layers drop out.")


def _check_sketch_size(init_config, lora_config, targets) -> None:
    """A rank-k gradient sketch holds k directions: a method needing more (r, or 2r for lora_ga) would take noise."""
    if init_config.sketch is None:
        return
    pairs = 2 if init_config.method == "lora_ga" else 1
    if init_config.rank == "auto":
        need = pairs * (init_config.r_max if init_config.r_max is not None else 2 * lora_config.r)
    else:
        need = pairs * max(layer_rank_and_scaling(lora_config, n)[0] for n in targets)
    if init_config.sketch < need:
        raise ValueError(f"sketch={init_config.sketch} keeps {init_config.sketch} gradient directions, but "
                         f"{init_config.method} uses up to {need} here ({'2r' if pairs == 2 else 'r'}"
                         f"{', r_max with rank=auto' if init_config.rank == 'auto' else ''}): set sketch >= {need} "
                         "(more than that is advised), or lower the rank.")


def _allocate(targets, lora_config, init_config, stats, opts, weights, tuned=None):
    """Per-layer ranks from the method's spectra (SPEC §6), or EVA's redistribution; (LoraConfig, targets, info)."""
    from . import ranks as R

    method = METHODS[init_config.method]
    eva = init_config.method == "eva" and init_config.rank is None and make_options("eva", **opts).rho > 1
    if init_config.rank != "auto" and not eva:
        return lora_config, targets, None
    layer_r = {n: layer_rank_and_scaling(lora_config, n)[0] for n in targets}
    sizes = {n: out_in_features(m) for n, m in targets.items()}
    method_opts = make_options(init_config.method, **opts)
    spectra = {}
    for name, module in targets.items():
        st = stats[name].densified() if stats is not None else None
        extra = {"tuned": tuned[name]()} if method.tuned else {}
        spectra[name] = method.spectrum(weights[name](), st, method_opts, **extra).detach().float().cpu()
    if eva:
        rho = method_opts.rho
        explained = {n: s / s.sum().clamp_min(1e-30) for n, s in spectra.items()}
        owners = {}  # layers reading one input (one Σ tensor): PEFT's EVA keys the group by its first layer
        equal = {}
        for n in targets:
            key = id(stats[n].in_cov)
            if key in owners:
                equal[n] = owners[key]
            else:
                owners[key] = n
        allocation = R.eva_ranks(explained, r=lora_config.r, rho=rho, equal_inputs=equal)
        rule, budget = f"eva (rho={rho:g})", lora_config.r * len(targets)
    else:
        pairs = 2 if init_config.method == "lora_ga" else 1
        r_max = init_config.r_max if init_config.r_max is not None else 2 * max(layer_r.values())
        caps = {n: min(sz) // pairs for n, sz in sizes.items()}  # each layer by its own shape, not the smallest's
        if init_config.budget_by == "params":
            budget = init_config.rank_budget or sum(layer_r[n] * sum(sizes[n]) for n in targets)
        else:
            budget = init_config.rank_budget or sum(layer_r.values())
        importance = None
        if init_config.rank_rule == "importance":
            importance = {}
            for n in targets:
                w = weights[n]()
                importance[n] = float((w * stats[n].densified().grad.to(w.device)).abs().mean())
        allocation = R.allocate_ranks(spectra, budget, rule=init_config.rank_rule, r_min=init_config.r_min,
                                      r_max=r_max, tau=init_config.tau, sizes=sizes, budget_by=init_config.budget_by,
                                      importance=importance, caps=caps)
        rule = init_config.rank_rule
    kept = {n: r for n, r in allocation.items() if r > 0}
    rank_pattern, _, dropped = R.rank_patterns(allocation, lora_config.r, lora_config.lora_alpha,
                                               lora_config.use_rslora)
    # Each kept layer keeps the scale s_l its LoraConfig gives it (a user's alpha_pattern included) at its new rank.
    # The allocation's keys come first: PEFT takes the first pattern that matches, so a user's rank_pattern (which
    # set the budget) cannot shadow the allocated rank.
    scale = {re.escape(n): layer_rank_and_scaling(lora_config, n)[1] for n in kept}
    alpha_pattern = {k: scale[k] * (math.sqrt(r) if lora_config.use_rslora else r) for k, r in rank_pattern.items()}
    new_config = dataclasses.replace(
        lora_config, rank_pattern={**rank_pattern, **lora_config.rank_pattern},
        alpha_pattern={**alpha_pattern, **lora_config.alpha_pattern},
        exclude_modules=_merge_exclude(lora_config.exclude_modules, dropped))
    for n, r in kept.items():  # what ranks.json reports is what PEFT will build
        built_r, built_s = layer_rank_and_scaling(new_config, n)
        if built_r != r or not math.isclose(built_s, scale[re.escape(n)], rel_tol=1e-9):
            raise RuntimeError(f"the rank pattern resolves {n!r} to r={built_r}, s={built_s}, not the allocated "
                               f"r={r}, s={scale[re.escape(n)]}: please report this with your LoraConfig.")
    info = {"rule": rule, "budget": budget, "budget_by": "rank" if eva else init_config.budget_by,
            "ranks": allocation, "energy": {n: _energy(spectra[n], r) for n, r in allocation.items()}}
    logger.info("lorafa: ranks by %s (budget %s):\n%s", rule, budget, R.rank_table(allocation, spectra, lora_config.r))
    return new_config, {n: targets[n] for n in kept}, info


def _merge_exclude(existing, dropped):
    """LoraConfig.exclude_modules plus the layers whose allocated rank is 0 (PEFT reads a list as module names or
    name suffixes, a string as one regex)."""
    if not dropped:
        return existing
    if existing is None or not isinstance(existing, str):
        return list(existing or []) + list(dropped)
    return f"(?:{existing})|" + "|".join(re.escape(n) for n in dropped)


def _energy(spectrum: torch.Tensor, r: int) -> float:
    sq = spectrum.double() ** 2
    return float(sq[:r].sum() / sq.sum()) if float(sq.sum()) > 0 else 0.0


def _init_layers(targets, lora_config, init_config, stats, opts, progress, weights,
                 tuned=None) -> dict[str, InitResult]:
    results = {}
    for i, (name, module) in enumerate(tqdm(targets.items(), desc=f"lorafa {init_config.method} init",
                                            disable=not progress or world()[0] != 0, leave=False)):
        r, s = layer_rank_and_scaling(lora_config, name)
        results[name] = init_factors(init_config.method, weights[name](), None if stats is None else stats.get(name),
                                     rank=r, scaling=s, svd=init_config.svd, seed=init_config.seed + i, name=name,
                                     tuned=None if tuned is None else tuned[name](), **opts)
        results[name].info["rank"] = r
    return results


LINE_SEARCH_MAX_DOUBLINGS = 8  # up to 256× the starting steps
LINE_SEARCH_MAX_HALVINGS = 10  # down to 1/1024 of them


@torch.no_grad()
def line_search(model, targets, results, lora_config, batches, loss_fn=None, *, offset: bool,
                max_batches: int | None = None) -> dict:
    """Choose one global factor g on every layer's init step by the loss on the statistics batches (forward passes
    only, SPEC §2.5), and apply it to `results`.

    g = 1 (the steps as computed: `stable` or `kfac`) is tried first, then doubled while the loss falls (only if g = 1
    lowers it), else halved until the loss stops falling below the model's loss before the init; the lowest loss tried
    is kept, so on these batches the result is never worse than g = 1 nor
    than the model before the init (g = 0, a candidate when the base is offset; without an offset both factors would
    be zero and could not train, so there the smallest g tried is 2^-10). The steps are applied through forward
    hooks (x ↦ y + g·c·s·(x Aᵀ) Bᵀ), so the weights are never modified and nothing is rounded.

    Returns:
        {"tried": [[g, loss], ...], "chosen": g, "loss_before": loss at g = 0, "loss_chosen": ...}.
    """
    batches = list(batches)[: max_batches] if max_batches is not None else list(batches)
    if not batches:
        raise ValueError("scale='line_search' got no statistics batches for this process.")
    # under FSDP each forward gathers the sharded weights on every rank: a rank with fewer batches runs blank passes
    blank = max(all_gather_objects(len(batches))) - len(batches) if fsdp_sharded(model) else 0
    deltas = {}
    for name, res in results.items():
        _, s = layer_rank_and_scaling(lora_config, name)
        B, A, c = res.initial_update(s)
        deltas[name] = (A, B, c * s)
    g_now = {"g": 0.0}

    def hook(module, args, out, name):
        A, B, coef = deltas[name]
        x = args[0]
        return out + (g_now["g"] * coef) * ((x @ A.to(x.device, x.dtype).T) @ B.to(x.device, x.dtype).T)

    handles = [m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n)) for n, m in targets.items()]
    was = model.training
    model.eval()
    tried: dict[float, float] = {}

    @torch.no_grad()  # forward only: no graph (the target weights still require grad here)
    def loss_at(g: float) -> float:
        if g not in tried:
            g_now["g"] = g
            total = torch.zeros(2, dtype=torch.float64, device=next(model.parameters()).device)
            for i, b in enumerate(batches + batches[:1] * blank):  # the blank passes are not counted
                b = {k: v.to(total.device) if torch.is_tensor(v) else v for k, v in b.items()}
                loss = (loss_fn(model, b) if loss_fn else model(**b).loss).double()
                total += torch.stack([loss, torch.ones_like(loss)]) * (i < len(batches))
            all_reduce_sum_(total)
            tried[g] = float(total[0] / total[1])
            if not math.isfinite(tried[g]):
                tried[g] = math.inf
        return tried[g]

    try:
        before = loss_at(0.0)
        # up only while the steps help: where g = 1 already raises the loss, a longer step is never looked for
        # (far past the minimum the loss is not unimodal: measured 15.0 at g = 1 and 12.7 at g = 2, 1.4 at g = 0)
        if loss_at(1.0) < before and loss_at(2.0) < loss_at(1.0):
            for k in range(2, LINE_SEARCH_MAX_DOUBLINGS + 1):
                if loss_at(2.0 ** k) >= loss_at(2.0 ** (k - 1)):
                    break
        else:
            for k in range(1, LINE_SEARCH_MAX_HALVINGS + 1):
                if loss_at(2.0 ** -k) >= loss_at(2.0 ** (1 - k)) and loss_at(2.0 ** -k) < before:
                    break
        best = min((g for g in tried if g > 0), key=lambda g: tried[g])
        if offset and before < tried[best]:
            best = 0.0
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    for res in results.values():
        res.scale_step(best)
        res.info.update(step_norm=res.info.get("step_norm", 0.0) * best, global_factor=best)
        if res.subtract:
            res.info["offset_scale"] = res.offset_scale
    logger.info("lorafa line search: factor %g (loss %.4f; %.4f before the init, %.4f at factor 1)", best,
                tried[best], before, tried[1.0])
    return {"tried": sorted([g, v] for g, v in tried.items()), "chosen": best, "loss_before": before,
            "loss_chosen": tried[best], "loss_at_1": tried[1.0]}


def initialize(model, lora_config: LoraConfig, init_config: InitConfig | None = None, batches=None, stats=None, *,
               adapter_name: str = "default", loss_fn=None, progress: bool = True,
               initial_adapter_dir: str | os.PathLike | None = None,
               autocast_adapter_dtype: bool = True, search_batches=None, align=None, tuned=None,
               base_weights=None) -> PeftModel:
    """Build a PEFT model whose adapters are initialised by `init_config`.

    Runs the statistics pass over `batches` if the method needs statistics and `stats` is None, computes every
    layer's factors from the untouched weights (so a bad input fails before the model is changed), then calls
    `peft.get_peft_model`, writes A and B in the adapter dtype and, for offset methods, sets the base weight to
    W − s·B·A computed from the *cast* factors.

    Args:
        model: a transformers model (or any nn.Module with nn.Linear/Conv1D targets). Modified in place, as by PEFT.
        lora_config: the PEFT LoraConfig (r, lora_alpha, use_rslora, rank_pattern, alpha_pattern, targets...).
        init_config: the method and its options; default InitConfig() (LoRA-FA).
        batches: statistics batches (HF-style dicts) for this process; at most its share of `init_config.iters`
            batches (batch b belongs to rank b mod world size) is used.
        stats: precomputed statistics (module name -> LayerStats), e.g. from `load_stats`.
        adapter_name: PEFT adapter name.
        loss_fn: `loss_fn(model, batch)`, default `model(**batch).loss`.
        initial_adapter_dir: if given, the initial adapter (A₀, B₀, the LoraConfig and the InitConfig, SPEC §3) is
            written there at once (`save_initial_adapter`) and A₀, B₀ are not kept in memory; `save_adapter` reads
            them back, also from another process or for a copy of the model (`initial_adapter=`). It must be new,
            empty, or an initial adapter written before (replaced); a folder holding anything else is refused before
            the statistics pass, never emptied. Under torch.distributed every process calls `initialize` (the
            statistics pass and this check are collective); the main process writes.
        autocast_adapter_dtype: as in `peft.get_peft_model`: True upcasts fp16/bf16 adapters to fp32, False keeps
            them in the model's dtype (the offset is computed from the factors in that dtype either way).
        search_batches: for scale="line_search", batches to choose the step on instead of the statistics batches.
            The statistics batches are the data the step was computed from, so a search on them favours long steps
            that fit those examples (measured: on a probe-first classifier, 128 statistics reviews' loss fell from
            0.61 to 0.03 while the held-out loss rose); other training examples avoid that.
        tuned: for method="extract", the fine-tuned model (same architecture as `model`) or its state dict: each
            target layer's adapter is extracted from W_tuned − W.
        base_weights: for a bitsandbytes-quantized model (SPEC §10), the full-precision weights it was loaded from:
            a checkpoint folder or `.safetensors` file (read lazily), a state dict, or a model. The factors are
            computed from W and offset methods store Q(W − s·B·A) (measured against Q(W) in docs/benchmarks.md,
            "4-bit bases": closer to W for pissa and corda, further for lora_ga). Required for offset
            methods on quantized targets; `"dequantized"` starts from the quantized weights instead. No-offset
            methods (lora_fa, lora_one, ...) leave the quantized base untouched.
        align: with `InitConfig(align_init=True)`, the `lorafa.align.AlignmentTerm` whose teacher the init aligns
            to: the statistics pass and the line search use L_task + align_lambda · D (SPEC §5, teacher-aware init).

    Returns:
        The PeftModel. `save_adapter` writes it so that it loads on the original base.

    Raises:
        ValueError/TypeError: unknown targets, unsupported layers, invalid rank, missing or bad statistics, an option
        the method lacks, quantized weights, a conflicting init_lora_weights.
    """
    init_config = as_init_config(init_config)
    _check_lora_config(lora_config, init_config)
    keep_4bit_differentiable_(model)  # and so it stays for training after an evaluation (bitsandbytes' CPU kernel)
    if initial_adapter_dir is not None:  # before the statistics pass: a folder that cannot take it fails at once
        on_main_process(lambda: check_initial_adapter_dir(initial_adapter_dir), "checking initial_adapter_dir",
                        errors=(FileExistsError,))
    results, lora_config, summary, weights = _compute_init(model, lora_config, init_config, stats, batches, loss_fn,
                                                           progress, search_batches, align, tuned, base_weights)
    subtract = init_config.subtracts()
    variant = METHODS[init_config.method].variant
    if variant == "kasa":
        opts = make_options("kasa", **init_config.method_options())
        lora_config = kasa_lora_config(lora_config, opts.beta, opts.gamma)
    with quiet_checkpointing_rename():
        peft_model = get_peft_model(unwrap_model(model), lora_config, adapter_name=adapter_name,
                                    autocast_adapter_dtype=autocast_adapter_dtype)
    layers = {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    if variant == "goat":
        from .goat import apply_goat

        apply_goat(peft_model, adapter_name, {n: (r.A, r.B) for n, r in results.items()},
                   make_options("goat", **init_config.method_options()), seed=init_config.seed)
    else:
        for name, res in results.items():
            _write_layer(name, layers[name], adapter_name, res, subtract, *layer_rank_and_scaling(lora_config, name),
                         weight=weights[name])
    initial = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_model, adapter_name=adapter_name).items()}
    record = InitRecord(adapter_name, init_config, subtract, initial, {n: r.info for n, r in results.items()},
                        summary=summary)
    _RECORDS[peft_model] = record
    if initial_adapter_dir is not None:
        save_initial_adapter(peft_model, initial_adapter_dir)
        record.initial_dir, record.initial_state = os.fspath(initial_adapter_dir), None
    logger.info("lorafa: %s init of %d layers (offset: %s)", init_config.method, len(results), subtract)
    return peft_model


@contextmanager
def quiet_checkpointing_rename():
    """PEFT reads transformers' old `is_gradient_checkpointing` property, which warns since transformers 5; the
    warning is PEFT's to fix and says nothing about the user's code, so it is hidden here (and only it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


@torch.no_grad()
def _write_layer(name, layer, adapter_name, res: InitResult, subtract: bool, r: int, s: float, weight) -> None:
    lora_A, lora_B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    if layer.r[adapter_name] != r or not math.isclose(layer.scaling[adapter_name], s, rel_tol=1e-6):
        raise RuntimeError(f"PEFT built {name!r} with r={layer.r[adapter_name]}, s={layer.scaling[adapter_name]}, "
                           f"lorafa expected r={r}, s={s}: please report this.")
    lora_A.copy_(res.A.to(lora_A.device, lora_A.dtype))
    lora_B.copy_(res.B.to(lora_B.device, lora_B.dtype))
    if subtract:
        base = layer.get_base_layer()
        c = res.offset_scale if res.subtract else 1.0
        w = weight() - (c * s) * (lora_B.float() @ lora_A.float()).to(base.weight.device)
        if is_quantized(base):  # SPEC §10: the residual goes into a fresh quantization with the layer's settings
            requantize_(base, w)
        else:
            set_weight_matrix(base, w)


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


@contextmanager
def _conversion_safe_config(peft_model: PeftModel, adapter_name: str):
    """PEFT's rank-2r conversion refuses rsLoRA together with rank/alpha patterns. The same adapter is expressed
    without rsLoRA by giving every layer an explicit (r_l, α'_l = s_l·r_l), which PEFT converts correctly."""
    config = peft_model.peft_config[adapter_name]
    if not (config.use_rslora and (config.rank_pattern or config.alpha_pattern)):
        yield
        return
    layers = {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    replacement = dataclasses.replace(
        config, use_rslora=False,
        rank_pattern={re.escape(n): m.r[adapter_name] for n, m in layers.items()},
        alpha_pattern={re.escape(n): m.scaling[adapter_name] * m.r[adapter_name] for n, m in layers.items()},
    )
    peft_model.peft_config[adapter_name] = replacement
    try:
        yield
    finally:
        peft_model.peft_config[adapter_name] = config


def save_adapter(peft_model: PeftModel, path: str | os.PathLike, *, save_initial: bool = False,
                 initial_adapter: str | os.PathLike | None = None) -> str:
    """Save the adapter so that stock `PeftModel.from_pretrained(original_base, path)` reproduces the model (GOAT:
    `lorafa.load_goat(original_base, path)`, since PEFT has no GOAT router; KaSA: PEFT truncates the base again).

    For methods that offset the base weight, the trained adapter is converted to ΔW = s·B·A − s·B₀·A₀ relative to the
    pristine base, a rank-2r LoRA, with PEFT's weight-converting `save_pretrained`. Other methods are saved as they
    are. Files are written into a temporary folder and moved into `path` one by one, so a crash never leaves a
    half-written file. A `lorafa_init.json` records the init.

    Args:
        peft_model: a model returned by `initialize` (possibly trained).
        path: output directory (created if needed).
        save_initial: also write the initial adapter (A₀, B₀) to `path/initial_adapter`; for offset methods it
            belongs on the offset base W − s·B₀·A₀, for the others on the original base. A previous initial adapter
            there is replaced; a folder of that name holding anything else is refused.
        initial_adapter: the folder `initialize(..., initial_adapter_dir=)` (or `save_initial_adapter`) wrote;
            needed when the model is not the very object `initialize` returned in this process (a copy, or a model
            rebuilt in another process).

    Under torch.distributed every process calls it: factors sharded by `shard_adapters` (FSDP2) are gathered on
    every process, the main process writes, and every process returns, or raises, together.

    Returns:
        The path.

    Raises:
        ValueError: neither an initial adapter folder nor this process's record of the model's init is available.
        FileExistsError: `path` is a file; or `save_initial` and `path/initial_adapter` holds something lorafa did
            not write.
        RankFailedError: on the other processes, when one process failed.
    """
    error, record = None, None
    try:
        record = init_record(peft_model, initial_adapter)
        if record is None:
            raise ValueError("The initial adapter of this model is unknown: it is not the object lorafa.initialize "
                             "returned in this process (a copy, or another process). Pass initial_adapter=<the folder "
                             "given to initialize(initial_adapter_dir=...)>, or save a plain PEFT model with "
                             "model.save_pretrained(path).")
        _check_adapter_matches(peft_model, record)
        _check_adapter_folder(path)  # on every process, before the collectives and the work
        if save_initial and world()[0] == 0:
            check_initial_adapter_dir(os.path.join(os.fspath(path), "initial_adapter"))
    except (ValueError, OSError) as e:
        error = e
    agree_step(error, True, "checking the adapter to save")  # every process raises together, or none does
    path = os.fspath(path)
    with _unsharded_adapters(peft_model, keep=world()[0] == 0):  # a collective under FSDP2: every process gathers
        on_main_process(lambda: _write_adapter(peft_model, record, path, save_initial), "saving the adapter")
    return path


def _check_adapter_folder(path: str | os.PathLike) -> None:
    """Raise if `path` cannot be the adapter's folder: it exists and is not a folder (a file, a broken link)."""
    path = os.fspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        kind = "a link to no folder" if os.path.islink(path) else "a file"
        raise FileExistsError(f"{path!r} is {kind}, not a folder: save_adapter writes a folder of files; give a new "
                              "folder (or an existing one) for the adapter.")


def _write_adapter(peft_model: PeftModel, record: InitRecord, path: str, save_initial: bool) -> None:
    os.makedirs(path, exist_ok=True)
    name = record.adapter_name
    with tempfile.TemporaryDirectory(dir=path, prefix=".lorafa-tmp-") as tmp:
        out = os.path.join(tmp, "adapter")
        if record.subtracted:
            init_dir = os.path.join(tmp, f"lorafa_initial_{uuid.uuid4().hex[:8]}")
            os.makedirs(init_dir)
            save_file(record.offset_state(), os.path.join(init_dir, INITIAL_WEIGHTS), metadata={"format": "pt"})
            with _conversion_safe_config(peft_model, name):
                peft_model.save_pretrained(out, selected_adapters=[name], path_initial_model_for_weight_conversion=init_dir)
        else:
            peft_model.save_pretrained(out, selected_adapters=[name])
        if save_initial:
            _save_initial(peft_model, record, os.path.join(tmp, "initial_adapter"))
        src = out if name == "default" else os.path.join(out, name)
        meta = {"init_config": record.init_config.to_dict(), "converted_to_original_base": record.subtracted}
        variant = METHODS[record.init_config.method].variant
        if variant == "kasa":
            logger.warning("lorafa: %s", TRUNCATION_NOTE)
            meta["base_truncated"] = TRUNCATION_NOTE
        elif variant == "goat":
            from .goat import save_goat

            save_goat(peft_model, src, adapter_name=name)
            meta["load_with"] = "lorafa.goat.load_goat(original_base, path): stock PEFT has no GOAT router"
        with open(os.path.join(src, INIT_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        if save_initial:  # checked again right before the swap; a previous initial adapter is replaced
            swap_in(os.path.join(tmp, "initial_adapter"), os.path.join(path, "initial_adapter"), is_initial_adapter,
                    INITIAL_FILES, _INITIAL, _INITIAL_HINT)
        for fname in os.listdir(src):
            if os.path.isfile(os.path.join(src, fname)):
                os.replace(os.path.join(src, fname), os.path.join(path, fname))


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
def _unsharded_adapters(peft_model: PeftModel, keep: bool):
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


def _check_adapter_matches(peft_model: PeftModel, record: InitRecord) -> None:
    if record.adapter_name not in peft_model.peft_config:
        raise ValueError(f"The initial adapter is for adapter {record.adapter_name!r}, but this model has "
                         f"{sorted(peft_model.peft_config)}: pass the initial adapter of this model.")


INITIAL_FILES = (INITIAL_WEIGHTS, CONFIG_NAME, INIT_FILE)  # all that an initial adapter folder holds
_INITIAL = "initial adapter"
_INITIAL_HINT = (" for initial_adapter_dir (the run's own folder, or a fresh one beside your checkpoints), or delete "
                 "the folder yourself if you no longer need it")


def is_initial_adapter(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder `save_initial_adapter` wrote: its three files and nothing else."""
    path = os.fspath(path)
    try:
        entries = set(os.listdir(path))
    except OSError:
        return False
    if INIT_FILE not in entries or not entries <= set(INITIAL_FILES):
        return False
    if any(os.path.islink(os.path.join(path, e)) or not os.path.isfile(os.path.join(path, e)) for e in entries):
        return False
    try:
        with open(os.path.join(path, INIT_FILE)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and {"adapter_name", "init_config", "subtracted"} <= set(meta)


def check_initial_adapter_dir(path: str | os.PathLike) -> None:
    """Raise unless `path` can take an initial adapter: absent, empty, or a previous initial adapter (replaced).

    Raises:
        FileExistsError: `path` is a file, or a folder holding anything else (which lorafa never deletes).
    """
    check_destination(path, is_initial_adapter, _INITIAL, _INITIAL_HINT)


def write_initial_folder(peft_model: PeftModel, record: InitRecord, path: str | os.PathLike) -> None:
    """Write the initial adapter into a temporary sibling of `path`, then swap it in (`fsio.swap_in`)."""
    path = os.fspath(path)
    check_initial_adapter_dir(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".lorafa-initial-", dir=parent)
    try:
        _save_initial(peft_model, record, tmp)
        swap_in(tmp, path, is_initial_adapter, INITIAL_FILES, _INITIAL, _INITIAL_HINT)
    finally:
        if os.path.isdir(tmp):
            remove_owned(tmp, INITIAL_FILES)


def save_initial_adapter(peft_model: PeftModel, path: str | os.PathLike) -> str:
    """Write the initial adapter (SPEC §3): A₀, B₀, PEFT's adapter_config.json and `lorafa_init.json` (the
    InitConfig, whether the base was offset, each layer's init info), into a temporary folder renamed to `path`.

    `path` must be new, empty, or an initial adapter written before (it is then replaced); a folder holding anything
    else is refused, never emptied. For offset methods A₀, B₀ belong on the offset base W − s·B₀·A₀; for the others on
    the original base. Only the main process writes; under torch.distributed every process calls it, and a failure
    is raised on every process. `read_initial_adapter(path)` and `save_adapter(..., initial_adapter=path)` read it.

    Raises:
        ValueError: the model was not created by `initialize` in this process.
        FileExistsError: `path` is a file, or a folder that holds anything but a previous initial adapter.
    """
    record = init_record(peft_model)
    if record is None:
        raise ValueError("save_initial_adapter needs the model returned by lorafa.initialize in this process.")
    path = os.fspath(path)
    on_main_process(lambda: write_initial_folder(peft_model, record, path), "writing the initial adapter")
    return path


def _save_initial(peft_model: PeftModel, record: InitRecord, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    save_file(record.initial_tensors(), os.path.join(directory, INITIAL_WEIGHTS), metadata={"format": "pt"})
    peft_model.peft_config[record.adapter_name].save_pretrained(directory)
    meta = {"adapter_name": record.adapter_name, "init_config": record.init_config.to_dict(),
            "subtracted": record.subtracted, "infos": _jsonable(record.infos), "summary": _jsonable(record.summary)}
    with open(os.path.join(directory, INIT_FILE), "w") as f:
        json.dump(meta, f, indent=1)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
