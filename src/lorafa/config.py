"""`InitConfig`: the whole initialisation (method, its options, the statistics pass) as one typed value."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from .checks import check_choice, is_real as _is_real, parse_device
from .methods.registry import METHODS, build_options, make_options, method_needs, resolve_method
from .options import (BY_NAME, METHOD_OPTIONS, RENAMED, check_fields, check_methods, method_fields, misplaced_hint,
                      options_of, renamed_message)
from .stats.sketch import sketch_sizes

METHOD_OPTION_FIELDS = tuple(o.name for o in METHOD_OPTIONS)  # declared in lorafa.options
RANK_RULES = ("energy", "effective", "budget", "importance")


def _known_fields_only(cls):
    """Wrap a dataclass's generated __init__ so that a keyword that is not a field is a TypeError naming the fields
    (with close matches), not Python's bare "unexpected keyword argument"; everything else is the dataclass's."""
    generated = cls.__init__

    @functools.wraps(generated)
    def __init__(self, *args, **kwargs):
        fields = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = [k for k in kwargs if k not in fields]
        if any(k in RENAMED for k in unknown):
            raise TypeError(f"{cls.__name__}: {'; '.join(renamed_message(k) for k in unknown if k in RENAMED)}.")
        if unknown:
            close = {k: difflib.get_close_matches(k, fields, 2) for k in unknown}
            hints = "; ".join(f"{k!r}" + (f" (did you mean {' or '.join(close[k])}?)" if close[k] else "")
                              for k in unknown)
            raise TypeError(f"{cls.__name__} got an unexpected keyword argument {hints}: it is not one of "
                            f"{cls.__name__}'s fields, which are {', '.join(fields)}.")
        generated(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@_known_fields_only
@dataclass
class InitConfig:
    """How to initialise the adapters.

    Method options default to None, meaning "the method's default"; setting one the method does not have is an
    error (so a typo never silently changes nothing). `weight` is accepted as an alias of `scale` (seed configs).
    Every option is declared once, in `lorafa.options` (its type, default, methods and help); each name means one
    thing, so the old `rho`, `beta` and `gamma` are refused with the names that replaced them.

    Attributes:
        method: lora | pissa | milora | lora_ga | lora_one | lora_fa | corda | eva | extract (from a fine-tune:
            `initialize(..., tuned=)`) | kasa | goat (the LoRA variants of SPEC §9); or LoRA-FA, LoRA-One, LoRA-GA,
            or a lora_ga direction name, which selects lora_ga with that direction.
        direction: lora_ga's ArB2r | A2rBr | ArBr | random.
        scale: stable | gd_scale | unit | weight_svd (aliases gd, weightS) for lora_ga, lora_one, lora_fa; and for
            lora_one and lora_fa (SPEC §2.5) `kfac` (each layer's step from the K-FAC quadratic model of the loss)
            or `line_search` (one global factor on the steps, chosen by the loss on the statistics batches: needs
            `batches` at init).
        stable_gamma: γ of the `stable` scale (defaults: 16 for lora_ga, 128 for lora_one and lora_fa).
        target: lora_fa's gradient (−Ḡ) | natural (−C⁻¹ḠΣ⁻¹, the K-FAC natural-gradient step).
        step_factor: global factor on the `kfac` steps (default 1); line_search_from: stable | kfac, the steps
            `line_search` scales; factor_gamma: with offset="partial", the factors' γ (norm m^{1/4}/√γ, default 16).
        reg, reg_mode: damping of the K-FAC factors C and Σ for lora_fa and extract (1e-6, relative|absolute).
        corda_method, corda_reg: corda's ipm | kpm, and its damping Σ + corda_reg·mean(diag Σ)·I (0.01).
        eva_rho: eva's rank redistribution (default 2: a layer takes at most round(2r); 1: none).
        kasa_beta, kasa_gamma: kasa's regulariser weights (Σ‖σ‖², default 1e-4; ‖BᵀB − I‖ + ‖AAᵀ − I‖, default
            1e-3), added to the training loss by the runner or `lorafa.kasa_loss`.
        num_experts, top_k, goat_rho, eta, expert_scale, residual, aux_loss_weight: goat's E experts of rank r/E
            (default 8), its router's k (2), the divisor of the experts' singular values (÷ s·goat_rho, 10), the
            scale √(3·eta·n/(r/E)) (expert_scale="goat", eta 1) or PEFT's α/r ("lora"), the residual (routed: exact
            output at init; static: the authors' W − s·Σ B_i A_i) and the weight of the load-balancing loss (1e-3).
            See `lorafa.goat`.
        metric: extract's input (Σ only, the default) | kfac (C and Σ) | identity (plain truncated SVD).
        rank: None (LoraConfig's r and rank_pattern) or "auto" (its only other value; the rank itself is the
            LoraConfig's r): per-layer ranks from the method's spectra (SPEC §6),
            written into the LoraConfig's rank_pattern/alpha_pattern; rank_rule: energy | effective | budget |
            importance; rank_budget: Σ r_l (budget_by="rank", default r × layers) or Σ r_l(m_l + n_l)
            (budget_by="params", default r·Σ(m_l + n_l)); r_min, r_max: bounds per layer (r_max default 2r);
            tau: the energy rule's threshold.
        bsz, iters, max_length: the statistics pass's batch size, number of batches and token limit.
        sample: random (seeded) | first.
        seed: seed of the sample and of every random choice in the init.
        offset: auto (the method's own rule) | subtract | none | partial (lora_one, lora_fa: factors at a trainable
            scale, the base offset by the difference, so the model starts at W + the init step; SPEC §2.5).
        svd: auto | exact | randomized.
        sketch, sketch_l: accumulate the gradient as a streaming randomized sketch of sizes k = `sketch` and
            l = `sketch_l` (default 2k + 1) instead of densely: O(m·k + l·n) memory per layer instead of m·n. The
            gradient methods then use its rank-k reconstruction; k > 2r is advised (lora_ga uses 2r directions).
        accumulate_on: device of the fp32 statistics accumulators, e.g. "cpu" to keep them off the GPU (each
            layer's contribution is copied over as soon as it is computed); None: the weights' device.
        stats_memory: a budget for the statistics held at once: bytes (an int), a size such as "8GiB", or "auto"
            (half the free memory of the device the statistics accumulate on). When every target's statistics do
            not fit, the targets are split in depth order into groups that do, and each group gets its own sweep
            over the same batches: its statistics are collected, its layers' factors computed, and the statistics
            freed before the next group (the same init as one pass; `lorafa.plan_init` shows the groups). None
            (default): one pass holding every layer's statistics.
        stats_sharding: under torch.distributed with every process holding the whole model (DDP, `accelerate launch`),
            shard the statistics over the processes: each target layer has an owner process (layers reading one
            input together, balanced by bytes), each batch's statistics are reduced to it, and only it holds them
            (about 1/world of the statistics per process) and computes its layers' factors, which are then sent to
            every process: the same init as one process. Combines with `stats_memory`. Refused on FSDP2-sharded
            models (their pass all-reduces); not used with statistics given as `stats=`. Default False.
        align_init, align_lambda: teacher-aware init (SPEC §5): the statistics pass (and the line search) use the
            gradient of L_task + align_lambda · D(student, teacher) instead of L_task, so a gradient method starts
            toward the aligned update; `initialize` then needs `align=` (a `lorafa.align.AlignmentTerm`).
    """

    method: str = "lora_fa"
    direction: str | None = None
    scale: str | None = None
    stable_gamma: float | None = None
    reg: float | None = None
    reg_mode: str | None = None
    corda_method: str | None = None
    corda_reg: float | None = None
    target: str | None = None
    step_factor: float | None = None
    line_search_from: str | None = None
    factor_gamma: float | None = None
    eva_rho: float | None = None
    metric: str | None = None
    kasa_beta: float | None = None
    kasa_gamma: float | None = None
    num_experts: int | None = None
    top_k: int | None = None
    goat_rho: float | None = None
    eta: float | None = None
    expert_scale: str | None = None
    residual: str | None = None
    aux_loss_weight: float | None = None
    rank: Literal["auto"] | None = None
    rank_rule: str = "energy"
    rank_budget: int | None = None
    budget_by: Literal["rank", "params"] = "rank"
    r_min: int = 1
    r_max: int | None = None
    tau: float = 0.9
    bsz: int = 2
    iters: int = 64
    max_length: int = 1024
    sample: Literal["random", "first"] = "random"
    seed: int = 0
    offset: Literal["auto", "subtract", "none", "partial"] = "auto"
    svd: Literal["auto", "exact", "randomized"] = "auto"
    sketch: int | None = None
    sketch_l: int | None = None
    accumulate_on: str | None = None
    stats_memory: int | str | None = None
    stats_sharding: bool = False
    weight: str | None = None  # alias of `scale`
    align_init: bool = False
    align_lambda: float = 1.0

    def __post_init__(self):
        canonical, direction = resolve_method(self.method)
        self.method = canonical
        if direction is not None:
            if self.direction is not None and self.direction.lower() != direction.lower():
                raise ValueError(f"method {direction!r} names a lora_ga direction, but direction={self.direction!r}")
            self.direction = direction
        if self.weight is not None:
            if self.scale is not None and self.scale != self.weight:
                raise ValueError(f"scale={self.scale!r} and its alias weight={self.weight!r} disagree: set one.")
            self.scale, self.weight = self.weight, None
        check_choice("sample", self.sample, ("random", "first"))
        check_choice("offset", self.offset, ("auto", "subtract", "none", "partial"))
        if self.offset == "partial" and self.method not in ("lora_one", "lora_fa"):
            raise ValueError(f"offset='partial' separates the init step from the factors' scale, which only the "
                             f"one-step methods lora_one and lora_fa have (not {self.method}).")
        if METHODS[self.method].variant is not None and self.offset in ("subtract", "partial"):
            raise ValueError(f"{self.method} is a LoRA variant that leaves the base to itself (KaSA: PEFT's truncation; "
                             f"GOAT: the residual in the forward); offset={self.offset!r} would also offset it. Use "
                             "offset='auto'.")
        self._check_rank()
        check_choice("svd", self.svd, ("auto", "exact", "randomized"))
        for key in ("bsz", "iters", "max_length"):
            setattr(self, key, _integer(key, getattr(self, key), 1))
        self.seed = _integer("seed", self.seed, 0, 2 ** 64 - 1)
        self.accumulate_on = _accumulate_device(self.accumulate_on)
        if self.stats_memory is not None:
            from .plan import parse_memory

            self.stats_memory = parse_memory(self.stats_memory)
            if self.needs is None:
                raise ValueError(f"stats_memory bounds the statistics pass, which {self.method} does not run: drop it.")
        if not isinstance(self.stats_sharding, bool):
            raise ValueError(f"stats_sharding must be True or False, got {self.stats_sharding!r}")
        if self.stats_sharding and self.needs is None:
            raise ValueError(f"stats_sharding shards the statistics pass, which {self.method} does not run: drop it.")
        if not isinstance(self.align_init, bool):
            raise ValueError(f"align_init must be True or False, got {self.align_init!r}")
        if self.sketch is not None or self.sketch_l is not None:
            if self.sketch is None:
                raise ValueError("sketch_l is the second size of a gradient sketch: set sketch=k too, or drop it.")
            if self.needs not in ("grad", "kfac"):
                raise ValueError(f"sketch= approximates the gradient, which {self.method} does not use: drop it.")
            self.sketch = _integer("sketch", self.sketch, 1)
            if self.sketch_l is not None:
                self.sketch_l = _integer("sketch_l", self.sketch_l, 1)
            sketch_sizes(self.sketch, self.sketch_l)
        self.method_options()  # validates the options against the method
        if not (_is_real(self.align_lambda) and self.align_lambda >= 0):
            raise ValueError(f"align_lambda must be a finite number >= 0, got {self.align_lambda!r}")
        if self.align_init and self.needs not in ("grad", "kfac"):
            raise ValueError(f"align_init points the gradient methods (lora_ga, lora_one, lora_fa) at the aligned "
                             f"update through the statistics pass's gradient; {self.method} uses no gradient.")

    def _check_rank(self) -> None:
        # the allocation's settings are checked whether or not rank="auto" uses them: a bad value is an error now,
        # not when someone later turns rank="auto" on
        check_choice("rank_rule", self.rank_rule, RANK_RULES)
        check_choice("budget_by", self.budget_by, ("rank", "params"))
        self.r_min = _integer("r_min", self.r_min, 0)
        if self.r_max is not None:
            self.r_max = _integer("r_max", self.r_max, 1)
            if self.r_max < self.r_min:
                raise ValueError(f"r_max must be >= r_min, got r_min={self.r_min} > r_max={self.r_max} (the per-layer "
                                 "bounds of rank='auto'): lower r_min or raise r_max.")
        if self.rank_budget is not None:
            self.rank_budget = _integer("rank_budget", self.rank_budget, 1)
        if not _is_real(self.tau) or not 0 < self.tau <= 1:
            raise ValueError(f"tau (the energy rule's threshold) must be a number in (0, 1], got {self.tau!r}")
        if self.rank is None:
            return
        if self.rank != "auto":
            raise ValueError(f"rank must be None (the LoraConfig's r and rank_pattern) or 'auto', got {self.rank!r}; "
                             "fixed per-layer ranks go into LoraConfig(rank_pattern=...).")
        if METHODS[self.method].spectrum is None:
            raise ValueError(f"rank='auto' draws ranks from the method's spectrum; {self.method} has none. Use one of "
                             f"{sorted(m for m, spec in METHODS.items() if spec.spectrum is not None)}.")
        if self.rank_rule == "importance" and METHODS[self.method].needs not in ("grad", "kfac"):
            raise ValueError(f"rank_rule='importance' is GoRA's mean|W ⊙ G|, which needs the gradient; {self.method} "
                             "has none.")

    def method_options(self) -> dict:
        """The method options that were set, checked against the method (one it does not take raises, naming those
        it does), under the names of the method's option dataclass (InitConfig's `eva_rho` is EvaOptions' `rho`)."""
        given = {k: getattr(self, k) for k in METHOD_OPTION_FIELDS if getattr(self, k) is not None}
        own = [o.name for o in options_of(self.method)]
        unknown = sorted(set(given) - set(own))
        if unknown:
            hints = "".join(misplaced_hint(self.method, k) for k in unknown)
            raise ValueError(f"InitConfig sets {unknown}, which {self.method} does not have{hints}; its options are "
                             f"{own or 'none'}. Remove them or choose another method.")
        fields = method_fields(self.method, given)
        if self.offset == "partial":
            fields["partial"] = True
        # type/choice validation by the method itself, naming each option as InitConfig does
        build_options(self.method, fields, {BY_NAME[k].method_field: k for k in given})
        return fields

    @property
    def needs(self) -> str | None:
        """The statistic kind the method needs (None, grad, kfac or act): lora_one's `kfac` step needs kfac."""
        return method_needs(self.method, make_options(self.method, **self.method_options()))

    @property
    def line_search(self) -> bool:
        """Whether the init ends with a line search over the statistics batches (needs them at init)."""
        return self.scale == "line_search"

    def subtracts(self) -> bool:
        """Whether the base weight is offset by −s·B·A."""
        return METHODS[self.method].subtracts if self.offset == "auto" else self.offset in ("subtract", "partial")

    @property
    def sketch_sizes(self) -> tuple[int, int] | None:
        """(k, l) of the gradient sketch, or None for the exact gradient."""
        return None if self.sketch is None else sketch_sizes(self.sketch, self.sketch_l)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


check_fields(InitConfig, runner=False, extra=("method", "weight"))  # the fields are the declared options
check_methods()  # and so are the methods' own option dataclasses


def as_init_config(init_config) -> InitConfig:
    """`init_config` as an InitConfig: None gives InitConfig(), a dict (e.g. {"method": "lora_ga", "bsz": 4}) is
    InitConfig(**init_config), an InitConfig is returned as it is.

    Raises:
        TypeError: a dict with keys that are not InitConfig fields (named, with the fields), or another type.
        ValueError: whatever InitConfig raises on the values.
    """
    if init_config is None:
        return InitConfig()
    if isinstance(init_config, InitConfig):
        return init_config
    if isinstance(init_config, Mapping):
        fields = [f.name for f in dataclasses.fields(InitConfig) if f.init]
        unknown = sorted(str(k) for k in init_config if k not in fields)
        if unknown:
            renamed = "".join(f" ({renamed_message(k)})" for k in unknown if k in RENAMED)
            raise TypeError(f"init_config has keys that are not InitConfig fields: {unknown}{renamed}. The fields "
                            f"are: {', '.join(fields)}.")
        return InitConfig(**init_config)
    hint = (f" ({init_config!r}): write InitConfig(method={init_config!r})" if isinstance(init_config, str) else
            ": build it with lorafa.InitConfig(method=...)")
    raise TypeError(f"init_config must be a lorafa.InitConfig (or a dict of its fields, or None), got "
                    f"{type(init_config).__name__}{hint}.")


def _integer(key: str, value, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high]; a bool (which Python counts as an int), a float or a string is refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{key} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < low or high is not None and value > high:
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{key} must be an integer {bounds}, got {value}")
    return value


def _accumulate_device(value):
    """accumulate_on: None (the weights' device) or a torch device, given as a torch.device or its string (kept as
    the string: InitConfig is saved as JSON)."""
    device = parse_device(value, 'accumulate_on is the device of the statistics accumulators: None (the weights\' '
                                 'device), "cpu", "cuda", "cuda:1", ... (a torch device)')
    return str(device) if isinstance(value, torch.device) else value
