"""Model surgery (SPEC §3): `compute_init` computes every target layer's InitResult from the untouched base model,
and `initialize` builds the PEFT model, writes A and B into it and offsets the base weights.

What it draws on lives beside it: reading the weights (`lorafa.weights`), rank="auto" (`lorafa.auto_rank`), the
line search (`lorafa.methods.line_search`), the record of the init and saving (`lorafa.saving`), and FSDP2
(`lorafa.fsdp`).
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import warnings
from contextlib import contextmanager

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from .auto_rank import allocate, check_budget
from .checks import is_real
from .config import InitConfig, as_init_config
from .kasa import kasa_lora_config
from .methods.common import InitResult
from .methods.extract import check_difference
from .methods.line_search import guard_step, line_search
from .methods.lora_fa import whitener_scope
from .methods.registry import METHODS, make_options
from .saving import InitRecord, check_initial_adapter_dir, remember_record, save_initial_adapter
from .stats.distributed import on_main_process, world
from .stats.types import check_stats_dict
from .quant import keep_4bit_differentiable_, requantize_
from .targets import is_quantized, layer_rank_and_scaling, resolve_targets, set_weight_matrix, unwrap_model
from .sweeps import check_given_stats_fit, collect, grouped_init, init_layers, sharded, stats_groups
from .weights import base_weight_readers, tuned_weights

logger = logging.getLogger(__name__)

GUARDED = ("lora_fa", "lora_one")  # the methods whose init is a step of the model's function (guard_batches=)


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
                         "method='kasa', kasa_beta=..., kasa_gamma=...) and leave kasa_config unset.")
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
                 base_weights=None, guard_batches=None) -> dict[str, InitResult]:
    """Every target layer's InitResult, computed from the untouched base model (nothing is modified).

    With `init_config.rank="auto"` each result has its allocated rank (`info["rank"]`); `initialize` also writes
    the allocation into the LoraConfig.

    Raises:
        ValueError: see `initialize`.
    """
    init_config = as_init_config(init_config)
    _check_lora_config(lora_config, init_config)
    return _compute_init(model, lora_config, init_config, stats, batches, loss_fn, progress, search_batches, align,
                         tuned, base_weights, guard_batches)[0]


def _compute_init(model, lora_config, init_config, stats, batches, loss_fn, progress, search_batches=None,
                  align=None, tuned=None, base_weights=None, guard_batches=None):
    """(results, the LoraConfig the results are for, summary, {name: a function reading W})."""
    if init_config.align_init:
        from .align.term import aligned_loss

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
    shard = sharded(base, init_config, stats)
    _check_sketch_size(init_config, lora_config, targets)
    check_budget(init_config, targets)
    if guard_batches is not None:
        guard_batches = list(guard_batches)
        if init_config.method not in GUARDED:
            raise ValueError(f"guard_batches= checks the init step of {' and '.join(GUARDED)}; {init_config.method}'s "
                             "init does not step the model's function. Drop guard_batches=.")
    if init_config.line_search and batches is None and search_batches is None:
        raise ValueError("scale='line_search' chooses the step by the loss on the statistics batches: pass batches= "
                         "(or search_batches=) to initialize, also when stats= are given, or use scale='stable' or "
                         "'kfac'.")
    groups = None
    if needs is not None and stats is None:
        if batches is None:
            raise ValueError(f"{init_config.method} needs '{needs}' statistics: pass batches= (or stats=).")
        groups = stats_groups(base, targets, lora_config, init_config)
        if len(groups) > 1 or shard:
            results, lora_config, kept, summary = grouped_init(base, targets, lora_config, init_config, groups,
                                                               batches, loss_fn, progress, weights, tuned, shard)
            return _finish(base, kept, results, lora_config, init_config, summary, batches, search_batches,
                           loss_fn, weights, guard_batches)
        stats = collect(base, batches, list(targets), init_config, loss_fn, progress)
    elif stats is not None and init_config.stats_memory is not None:
        check_given_stats_fit(stats, targets, init_config.stats_memory)
    if stats is not None and needs is not None:
        missing = [n for n in targets if n not in stats]
        if missing:
            raise ValueError(f"No statistics for target modules {missing[:6]}{' ...' if len(missing) > 6 else ''}: "
                             "they were collected for other target_modules. Recompute them for this LoraConfig.")
    summary = {}
    opts = init_config.method_options()
    with whitener_scope():
        lora_config, targets, summary["ranks"] = allocate(targets, lora_config, init_config, stats, opts, weights,
                                                          tuned)
        results = init_layers(targets, lora_config, init_config, stats, opts, progress, weights, tuned)
    return _finish(base, targets, results, lora_config, init_config, summary, batches, search_batches, loss_fn,
                   weights, guard_batches)


def _finish(base, targets, results, lora_config, init_config, summary, batches, search_batches, loss_fn, weights,
            guard_batches=None):
    if init_config.line_search:
        own = search_batches is None  # the statistics batches: this process's share of init.iters
        summary["line_search"] = line_search(base, targets, results, lora_config, batches if own else search_batches,
                                             loss_fn, offset=init_config.offset == "partial",
                                             max_batches=len(range(world()[0], init_config.iters, world()[1]))
                                             if own else None)
        summary["line_search"]["on"] = "statistics batches" if own else "search_batches"
    if guard_batches is not None:  # after the line search: it checks the step the model will start from
        summary["guard"] = guard_step(base, targets, results, lora_config, guard_batches, loss_fn,
                                      can_offset=not any(is_quantized(m) for m in targets.values()))
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


def initialize(model, lora_config: LoraConfig, init_config: InitConfig | None = None, batches=None, stats=None, *,
               adapter_name: str = "default", loss_fn=None, progress: bool = True,
               initial_adapter_dir: str | os.PathLike | None = None,
               autocast_adapter_dtype: bool = True, search_batches=None, align=None, tuned=None,
               base_weights=None, guard_batches=None) -> PeftModel:
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
        guard_batches: for lora_fa and lora_one, batches of examples outside the statistics sample on which the init
            step must lower the loss beyond the examples' noise (`methods.line_search.guard_step`: each example is
            its own forward pass, and the paired changes' one-sided 95% upper bound must be ≤ 0): where it does
            not, the step is shortened until it does, else taken out (the factors keep their scale and the base is
            offset by the rest; a quantized base takes no offset, so there the factors shrink). Where it does,
            nothing changes. The tensors of each batch must have the batch's size as their first dimension. The
            runner (`init.guard_iters`, default 2) and `initialize_trainer` pass them;
            `lorafa.saving.init_record(peft_model).summary["guard"]` says what it found.
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
            the method lacks, quantized weights, a conflicting init_lora_weights, a `stats_memory` smaller than one
            layer's statistics or than the precomputed `stats`, an iterator of batches for grouped sweeps.
    """
    init_config = as_init_config(init_config)
    _check_lora_config(lora_config, init_config)
    keep_4bit_differentiable_(model)  # and so it stays for training after an evaluation (bitsandbytes' CPU kernel)
    if initial_adapter_dir is not None:  # before the statistics pass: a folder that cannot take it fails at once
        on_main_process(lambda: check_initial_adapter_dir(initial_adapter_dir), "checking initial_adapter_dir",
                        errors=(FileExistsError,))
    results, lora_config, summary, weights = _compute_init(model, lora_config, init_config, stats, batches, loss_fn,
                                                           progress, search_batches, align, tuned, base_weights,
                                                           guard_batches)
    # the guard offsets where it shortens a step (the factors keep their scale); offset="none" is otherwise kept
    subtract = init_config.subtracts() or summary.get("guard", {}).get("remedy") == "offset"
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
    remember_record(peft_model, record)
    if initial_adapter_dir is not None:
        save_initial_adapter(peft_model, initial_adapter_dir)
        record.initial_dir, record.initial_state = os.fspath(initial_adapter_dir), None
    logger.info("lorafa: %s init of %d layers (offset: %s)", init_config.method, len(results), subtract)
    return peft_model


# One of the shims for transformers 5's gradient -> activation checkpointing rename, each a different job: this hides
# PEFT's warning; train._checkpointing_arg sets the TrainingArguments field, integrations._checkpointing reads it.
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
