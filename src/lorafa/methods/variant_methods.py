"""The inits of the two LoRA variants lorafa covers (SPEC §9): KaSA (PEFT's own variant) and GOAT (lorafa.goat).

Both are pure functions of the weight, like the other methods; what makes them variants (KaSA's truncated base and
trainable singular values, GOAT's experts and router) is installed on the PEFT model by `lorafa.initialize`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .common import InitResult, check_rank
from .weight_methods import NoOptions, lora_init


@dataclass(frozen=True)
class KasaOptions:
    """KaSA's regulariser weights (paper Eq. 9-11; PEFT's `KasaConfig` defaults, the reference GLUE values).

    Attributes:
        beta: weight of Σ‖σ‖² (the trainable singular values).
        gamma: weight of ‖BᵀB − I‖_F + ‖AAᵀ − I‖_F.
    """

    beta: float = 1e-4
    gamma: float = 1e-3

    def __post_init__(self):
        for key in ("beta", "gamma"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"KaSA's {key} (InitConfig's kasa_{key}) must be a finite number >= 0 (0 drops that "
                                 f"regulariser), got {value!r}")


def kasa_init(weight: torch.Tensor, stats, *, rank: int, scaling: float, opts: KasaOptions, svd="auto",
              seed: int = 0) -> InitResult:
    """KaSA's factors are LoRA's (A Kaiming-uniform, B = 0; the singular values σ are PEFT's random draw, multiplied
    by B = 0): the update starts at 0 on the truncated base. The truncation itself (W → [W]_{k−r}) is PEFT's
    variant's, run when the adapter is added; at least one singular pair must remain, so r < min(m, n)."""
    m, n = weight.shape
    check_rank(rank, m, n)
    if rank >= min(m, n):
        raise ValueError(f"KaSA drops the r smallest singular pairs of each {m}×{n} weight and keeps the rest: it needs "
                         f"r < min(m, n) = {min(m, n)}, got r={rank}. Lower lora_r or set a rank_pattern entry.")
    res = lora_init(weight, None, rank=rank, scaling=scaling, opts=NoOptions(), seed=seed)
    res.info["truncated_pairs"] = rank
    return res


def goat_init(weight: torch.Tensor, stats, *, rank: int, scaling: float, opts, svd="auto",
              seed: int = 0) -> InitResult:
    """GOAT's experts: SVD slices of W spread over the spectrum (exact SVD), scaled by 1/(s·ρ) with GOAT's scale s;
    nothing is subtracted from the base (the residual is applied in the forward, `lorafa.goat`)."""
    from ..goat import goat_factors, goat_scale

    m, n = weight.shape
    check_rank(rank, m, n)
    opts.check(rank, m, n)
    s = goat_scale(n, rank, opts, scaling)
    A, B = goat_factors(weight, rank, opts, s)
    return InitResult(A=A, B=B, subtract=False, info={"svd": "exact", "goat_scale": s,
                                                      "num_experts": opts.num_experts})
