"""Inits that need only the weight (SPEC §2): plain LoRA, PiSSA, MiLoRA."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .common import InitResult, SvdMode, _exact, check_rank, top_svd


@dataclass
class NoOptions:
    """These methods take no method-specific options."""


def lora_init(weight: torch.Tensor, stats, *, rank: int, scaling: float, opts: NoOptions, svd: SvdMode = "auto",
              seed: int = 0) -> InitResult:
    """PEFT's default: A Kaiming-uniform (a = √5), B = 0, so ΔW = 0 and no offset is needed."""
    m, n = weight.shape
    check_rank(rank, m, n)
    bound = 1.0 / math.sqrt(n)  # kaiming_uniform_(a=√5) on an (r × n) tensor: gain·√(3/fan_in) = 1/√n
    gen = torch.Generator().manual_seed(seed)
    A = (torch.rand(rank, n, generator=gen) * 2 - 1) * bound
    return InitResult(A=A.to(weight.device), B=torch.zeros(m, rank, device=weight.device), subtract=False)


def _principal(weight, rank, scaling, U, S, Vh, used, which) -> InitResult:
    root = torch.sqrt(S / scaling)
    return InitResult(A=root[:, None] * Vh, B=U * root[None, :], subtract=True,
                      info={"svd": used, "pairs": which, "sigma_max": float(S.max())})


def pissa_init(weight: torch.Tensor, stats, *, rank: int, scaling: float, opts: NoOptions, svd: SvdMode = "auto",
               seed: int = 0) -> InitResult:
    """PiSSA: the r principal pairs of W, B = U_r √(S_r/s), A = √(S_r/s) V_rᵀ, subtracted from W."""
    m, n = weight.shape
    check_rank(rank, m, n)
    U, S, Vh, used = top_svd(weight, rank, svd, seed)
    return _principal(weight, rank, scaling, U, S, Vh, used, "top")


def milora_init(weight: torch.Tensor, stats, *, rank: int, scaling: float, opts: NoOptions, svd: SvdMode = "auto",
                seed: int = 0) -> InitResult:
    """MiLoRA: as PiSSA with the r *smallest* pairs (needs the exact SVD: a range finder cannot see them)."""
    m, n = weight.shape
    check_rank(rank, m, n)
    if svd == "randomized":
        raise ValueError("milora needs the smallest singular pairs; randomized SVD finds the largest. Use svd='exact' or 'auto'.")
    U, S, Vh = _exact(weight)
    return _principal(weight, rank, scaling, U[:, -rank:], S[-rank:], Vh[-rank:], "exact", "bottom")
