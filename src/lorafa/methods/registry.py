"""Method names -> pure init functions, their option types and the statistics they need."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

import torch

from ..checks import check_number, check_positive_int
from ..stats.types import LayerStats
from .activation_methods import CordaOptions, EvaOptions, corda_init, eva_init, input_spectrum
from .common import InitResult
from .extract import ExtractOptions, extract_init, extract_spectrum
from .lora_fa import LoraFAOptions, lora_fa_init, whitened_spectrum
from .lora_ga import DIRECTIONS, LoraGAOptions, lora_ga_init
from .lora_one import LoraOneOptions, gradient_spectrum, lora_one_init
from ..goat import GoatOptions
from .variant_methods import KasaOptions, goat_init, kasa_init
from .weight_methods import NoOptions, lora_init, milora_init, pissa_init


@dataclass(frozen=True)
class Method:
    name: str
    fn: callable
    options: type
    needs: str | None  # statistic kind: None, "grad", "kfac" or "act"
    subtracts: bool  # SPEC §2's offset column
    spectrum: callable = None  # (weight, stats, opts) -> singular values for data-aware ranks (SPEC §6); None: none
    tuned: bool = False  # the method takes the fine-tuned weight of the layer (`tuned=`), e.g. extract
    variant: str | None = None  # a LoRA variant installed on the PEFT model (SPEC §9): "kasa" | "goat"
    # the base weights differ from the original model's whatever the offset (KaSA truncates W to [W]_{k-r}): the
    # model with its adapters disabled is then not the original model (self-alignment, SPEC §5)
    truncates_base: bool = False
    # PEFT's merge (W + ΔW) gives the adapted model's function; False for GOAT, whose router makes the update
    # input-dependent (no single weight equals it): no merged weights, so no EMA teacher refresh
    mergeable: bool = True
    # options -> the loss terms the method adds to training (SPEC §9: KaSA's regulariser, GOAT's load balancing),
    # objects of the `lorafa.terms` protocol; None: none
    terms: callable = None


def _kasa_terms(opts) -> list:
    from ..kasa import KasaTerm

    return [KasaTerm()]  # β and γ live in the model's KaSA layers


def _goat_terms(opts) -> list:
    from ..goat import GoatAuxTerm

    return [GoatAuxTerm(opts.aux_loss_weight)] if opts.aux_loss_weight > 0 else []


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lora", lora_init, NoOptions, None, False),
        Method("pissa", pissa_init, NoOptions, None, True),
        Method("milora", milora_init, NoOptions, None, True),
        Method("lora_ga", lora_ga_init, LoraGAOptions, "grad", True, gradient_spectrum),
        Method("lora_one", lora_one_init, LoraOneOptions, "grad", False, gradient_spectrum),
        Method("lora_fa", lora_fa_init, LoraFAOptions, "kfac", False, whitened_spectrum),
        Method("corda", corda_init, CordaOptions, "act", True),
        Method("eva", eva_init, EvaOptions, "act", False, input_spectrum),
        Method("extract", extract_init, ExtractOptions, "kfac", False, extract_spectrum, tuned=True),
        Method("kasa", kasa_init, KasaOptions, None, False, variant="kasa", truncates_base=True, terms=_kasa_terms),
        Method("goat", goat_init, GoatOptions, None, False, variant="goat", mergeable=False, terms=_goat_terms),
    )
}


def changes_base(init_config) -> bool:
    """Whether an init leaves base weights that differ from the original model's: an offset (−s·B·A, as
    `InitConfig.subtracts()`) or a method that rewrites them (KaSA's truncation). With such an init the student with
    its adapters disabled is not the original model, so it cannot serve as its own base teacher (SPEC §5)."""
    return bool(base_change(init_config))


def base_change(init_config) -> str:
    """In words, how an init changes the base weights ("" when it does not): for error messages."""
    if init_config.subtracts():
        return f"{init_config.method} (offset={init_config.offset}) offsets them by −s·B·A"
    if METHODS[resolve_method(init_config.method)[0]].truncates_base:
        return f"{init_config.method} truncates them (drops each weight's r smallest singular pairs)"
    return ""


def _key(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def resolve_method(name: str) -> tuple[str, str | None]:
    """Canonical method name (and lora_ga direction, if the name was one) for any accepted spelling.

    Accepts our names, the seed's `LoRA-FA`/`LoRA-One`/`LoRA-GA` (case-insensitive) and lora_ga's direction names.

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    key = _key(name)
    if key in METHODS:
        return key, None
    for d in DIRECTIONS:
        if key == d.lower():
            return "lora_ga", d
    known = sorted(METHODS) + ["LoRA-FA", "LoRA-One", "LoRA-GA"] + list(DIRECTIONS)
    raise ValueError(f"Unknown init method {name!r}; known: {known}")


def method_options(method: str) -> list[str]:
    """Names of the options a method accepts (besides the common `svd` and `seed`)."""
    return [f.name for f in dataclasses.fields(METHODS[resolve_method(method)[0]].options)]


def make_options(method: str, **options):
    """Build a method's typed options; an option the method does not have is an error naming the valid ones."""
    return build_options(method, options)


def build_options(method: str, options: dict, names: dict | None = None):
    """`make_options(method, **options)`, with the type errors naming each option as the caller knows it: `names`
    maps the method's field names to those (InitConfig's `eva_rho` is EvaOptions' `rho`)."""
    spec = METHODS[resolve_method(method)[0]]
    valid = method_options(spec.name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"{spec.name} has no option(s) {unknown}; its options are {valid or 'none'} (plus svd, seed).")
    types = {f.name: f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
             for f in dataclasses.fields(spec.options)}
    label = {key: f"{spec.name}'s {(names or {}).get(key, key)}" for key in options}
    for key, value in options.items():
        check_option_type(label[key], value, types[key])
    opts = spec.options(**options)  # each option's range, in the method's own words
    for key, value in options.items():
        if types[key] == "float":
            check_number(label[key], value)  # what the ranges let through: inf (γ = inf gives A = B = 0)
    return opts


def check_option_type(name: str, value, declared: str) -> None:
    """Raise ValueError unless `value` is of the option's declared type (`declared`: its dataclass annotation): an
    int option (a count) takes an integer >= 1, not a bool, a float or a string; a float option a real number, not a
    bool or a string (a numeric string is told to drop its quotes); a bool option True or False. The ranges are the
    option dataclass's own checks; `make_options` then refuses a non-finite float they let through."""
    if declared == "int":
        check_positive_int(name, value)
    elif declared == "float" and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        check_number(name, value)  # raises, saying what was given
    elif declared == "bool" and not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def method_needs(method: str, options) -> str | None:
    """The statistics kind a method needs with these options: lora_one's `kfac` step length needs kfac (C, Σ)."""
    spec = METHODS[resolve_method(method)[0]]
    if callable(getattr(options, "needs", None)):  # the options decide (extract's metric)
        return options.needs()
    if spec.needs == "grad" and getattr(options, "uses_curvature", lambda: False)():
        return "kfac"
    return spec.needs


_METHOD_DEFAULT = object()


def check_stats(name: str, method: Method, weight_shape, stats: LayerStats | None,
                needs: str | None = _METHOD_DEFAULT) -> None:
    """Raise unless `stats` has what `method` needs (by default its own kind; `needs`: what its options need,
    None for nothing), with shapes matching an m × n weight and finite values."""
    needs = method.needs if needs is _METHOD_DEFAULT else needs
    if needs is None:
        return
    label = name or "this layer"
    if stats is None or needs not in stats.kinds():
        raise ValueError(
            f"{method.name} needs '{needs}' statistics for {label!r}, which are missing. Run "
            f"collect_stats(..., kinds=('{needs}',)) over the same target_modules, or pass batches to initialize."
        )
    m, n = weight_shape
    expected = {"grad": (m, n), "in_cov": (n, n), "out_cov": (m, m)}
    for kind, t in stats.tensors().items():
        if tuple(t.shape) != expected[kind]:
            raise ValueError(f"{kind} statistics for {label!r} have shape {tuple(t.shape)}, the layer needs "
                             f"{expected[kind]}: they were computed for another model or layer.")
        if not torch.isfinite(t).all():
            raise ValueError(f"{kind} statistics for {label!r} contain NaN/inf; recompute them (fp32/bf16, not fp16).")


def init_factors(method: str, weight: torch.Tensor, stats: LayerStats | None = None, *, rank: int, scaling: float,
                 svd: str = "auto", seed: int = 0, name: str = "", tuned: torch.Tensor | None = None,
                 **options) -> InitResult:
    """Compute one layer's LoRA factors with a named method (a pure function of its inputs).

    Args:
        method: any accepted spelling (see `resolve_method`).
        weight: W as an m × n (out × in) floating tensor.
        stats: the layer's LayerStats, for methods that need them.
        rank: r; scaling: s (α/r, or α/√r with rsLoRA).
        svd: "auto", "exact" or "randomized"; seed: for random parts (LoRA's A, randomized SVD, lora_ga's random split).
        name: module name, used in error messages.
        tuned: the layer's fine-tuned weight (m × n), for methods that extract from it (`extract`).
        **options: the method's options (e.g. direction=, scale=, stable_gamma=, reg=, reg_mode=, corda_method=).

    Returns:
        InitResult with fp32 A (r × n), B (m × r) and `subtract`.

    Raises:
        ValueError: unknown method/option, invalid rank, missing/mismatched/non-finite statistics.
        TypeError: a non-floating weight.
    """
    canonical, direction = resolve_method(method)
    if direction is not None:
        options.setdefault("direction", direction)
    spec = METHODS[canonical]
    opts = make_options(canonical, **options)
    if not torch.is_tensor(weight) or not torch.is_floating_point(weight) or weight.dim() != 2:
        raise TypeError(f"weight for {name or 'the layer'!r} must be a 2-D floating tensor, got {getattr(weight, 'dtype', type(weight))}")
    if not scaling > 0:
        raise ValueError(f"scaling must be > 0, got {scaling}")
    if spec.needs in ("grad", "kfac") and stats is not None:
        stats = stats.densified()  # a gradient sketch becomes its rank-k reconstruction, one layer at a time
    check_stats(name, spec, tuple(weight.shape), stats, method_needs(canonical, opts))
    extra = {}
    if spec.tuned:
        extra["tuned"] = check_tuned(name, spec.name, weight, tuned)
    elif tuned is not None:
        raise ValueError(f"tuned= is the fine-tuned weight that extract starts from; {spec.name} does not use it")
    return spec.fn(weight.float(), stats, rank=rank, scaling=float(scaling), opts=opts, svd=svd, seed=seed, **extra)


def check_tuned(name: str, method: str, weight: torch.Tensor, tuned: torch.Tensor | None) -> torch.Tensor:
    """The fine-tuned weight of a layer, checked against the base weight (same shape, finite), as fp32."""
    label = name or "this layer"
    if tuned is None:
        raise ValueError(f"{method} needs the fine-tuned weight of {label!r}: pass tuned= (a model of the base's "
                         "architecture, or its state dict)")
    if tuple(tuned.shape) != tuple(weight.shape):
        raise ValueError(f"the fine-tuned weight of {label!r} has shape {tuple(tuned.shape)}, the base's "
                         f"{tuple(weight.shape)}: {method} needs a fine-tune of the same architecture")
    if not torch.isfinite(tuned).all():
        raise ValueError(f"the fine-tuned weight of {label!r} contains NaN/inf")
    return tuned.float().to(weight.device)
