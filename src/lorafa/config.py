"""`InitConfig`: the whole initialisation (method, its options, the statistics pass) as one typed value."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from .methods.registry import METHODS, make_options, method_options, resolve_method
from .stats.sketch import sketch_sizes

METHOD_OPTION_FIELDS = ("direction", "scale", "stable_gamma", "reg", "reg_mode", "corda_method")


@dataclass
class InitConfig:
    """How to initialise the adapters.

    Method options default to None, meaning "the method's default"; setting one the method does not have is an
    error (so a typo never silently changes nothing). `weight` is accepted as an alias of `scale` (seed configs).

    Attributes:
        method: lora | pissa | milora | lora_ga | lora_one | lora_fa | corda | eva (or LoRA-FA, LoRA-One, LoRA-GA,
            or a lora_ga direction name, which selects lora_ga with that direction).
        direction: lora_ga's ArB2r | A2rBr | ArBr | random.
        scale: stable | gd_scale | unit | weight_svd (aliases gd, weightS) for lora_ga, lora_one, lora_fa.
        stable_gamma: γ of the `stable` scale (defaults: 16 for lora_ga, 128 for lora_one and lora_fa).
        reg, reg_mode: damping of lora_fa (1e-6, relative|absolute); corda's damping (0.01).
        corda_method: ipm | kpm.
        bsz, iters, max_length: the statistics pass's batch size, number of batches and token limit.
        sample: random (seeded) | first.
        seed: seed of the sample and of every random choice in the init.
        offset: auto (the method's own rule) | subtract | none.
        svd: auto | exact | randomized.
        sketch, sketch_l: accumulate the gradient as a streaming randomized sketch of sizes k = `sketch` and
            l = `sketch_l` (default 2k + 1) instead of densely: O(m·k + l·n) memory per layer instead of m·n. The
            gradient methods then use its rank-k reconstruction; k > 2r is advised (lora_ga uses 2r directions).
        accumulate_on: device of the fp32 statistics accumulators, e.g. "cpu" to keep them off the GPU (each
            layer's contribution is copied over as soon as it is computed); None: the weights' device.
    """

    method: str = "lora_fa"
    direction: str | None = None
    scale: str | None = None
    stable_gamma: float | None = None
    reg: float | None = None
    reg_mode: str | None = None
    corda_method: str | None = None
    bsz: int = 2
    iters: int = 64
    max_length: int = 1024
    sample: Literal["random", "first"] = "random"
    seed: int = 0
    offset: Literal["auto", "subtract", "none"] = "auto"
    svd: Literal["auto", "exact", "randomized"] = "auto"
    sketch: int | None = None
    sketch_l: int | None = None
    accumulate_on: str | None = None
    weight: str | None = None  # alias of `scale`

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
        _check_choice("sample", self.sample, ("random", "first"))
        _check_choice("offset", self.offset, ("auto", "subtract", "none"))
        _check_choice("svd", self.svd, ("auto", "exact", "randomized"))
        for key in ("bsz", "iters", "max_length"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if self.sketch is not None or self.sketch_l is not None:
            if self.sketch is None:
                raise ValueError("sketch_l is the second size of a gradient sketch: set sketch=k too, or drop it.")
            if self.needs not in ("grad", "kfac"):
                raise ValueError(f"sketch= approximates the gradient, which {self.method} does not use: drop it.")
            sketch_sizes(self.sketch, self.sketch_l)
        self.method_options()  # validates the options against the method

    def method_options(self) -> dict:
        """The options that were set, checked against the method (unknown ones raise, naming the valid ones)."""
        given = {k: getattr(self, k) for k in METHOD_OPTION_FIELDS if getattr(self, k) is not None}
        unknown = sorted(set(given) - set(method_options(self.method)))
        if unknown:
            raise ValueError(
                f"InitConfig sets {unknown}, which {self.method} does not have; its options are "
                f"{method_options(self.method) or 'none'}. Remove them or choose another method."
            )
        make_options(self.method, **given)  # type/choice validation by the method itself
        return given

    @property
    def needs(self) -> str | None:
        """The statistic kind the method needs (None, grad, kfac or act)."""
        return METHODS[self.method].needs

    def subtracts(self) -> bool:
        """Whether the base weight is offset by −s·B·A."""
        return METHODS[self.method].subtracts if self.offset == "auto" else self.offset == "subtract"

    @property
    def sketch_sizes(self) -> tuple[int, int] | None:
        """(k, l) of the gradient sketch, or None for the exact gradient."""
        return None if self.sketch is None else sketch_sizes(self.sketch, self.sketch_l)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_choice(key, value, choices):
    if value not in choices:
        raise ValueError(f"{key} must be one of {choices}, got {value!r}")
