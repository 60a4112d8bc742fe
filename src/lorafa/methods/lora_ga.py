"""LoRA-GA (SPEC §2.1), faithful to the paper: both factors scaled, offset from the cast factors.

With these factors the first SGD step moves W' + s·B·A along −[G]_{2r}. PEFT ≥ 0.19 instead multiplies B by diag(S)
and scales only B under `stable`, which breaks that property; we do not copy it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import InitResult, SvdMode, apply_scale, check_rank, normalize_scale, top_svd

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")


@dataclass
class LoraGAOptions:
    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: float = 16.0

    def __post_init__(self):
        match = [d for d in DIRECTIONS if d.lower() == str(self.direction).lower()]
        if not match:
            raise ValueError(f"Unknown lora_ga direction {self.direction!r}; choose from {DIRECTIONS}.")
        self.direction = match[0]
        self.scale = normalize_scale(self.scale)
        if self.scale == "stable" and not self.stable_gamma > 0:  # checked here: the stable factor divides by √γ
            raise ValueError(f"stable_gamma must be > 0, got {self.stable_gamma}")


def split_pairs(direction: str, rank: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices of the singular pairs of G that go to A (rows of Vᵀ) and to B (columns of U)."""
    r = rank
    if direction == "ArB2r":
        return list(range(r)), list(range(r, 2 * r))
    if direction == "A2rBr":
        return list(range(r, 2 * r)), list(range(r))
    if direction == "ArBr":
        return list(range(1, 2 * r, 2)), list(range(0, 2 * r, 2))
    perm = torch.randperm(2 * r, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[:r]), sorted(perm[r:])


def lora_ga_init(weight: torch.Tensor, stats, *, rank: int, scaling: float, opts: LoraGAOptions,
                 svd: SvdMode = "auto", seed: int = 0) -> InitResult:
    """A and B from the first 2r singular pairs of G, by `direction`, then `scale`; subtracted from W."""
    m, n = weight.shape
    check_rank(rank, m, n, pairs_per_rank=2, what=" (lora_ga takes 2r singular pairs of G)")
    U, S, Vh, used = top_svd(stats.grad, 2 * rank, svd, seed)
    a_idx, b_idx = split_pairs(opts.direction, rank, seed)
    A, B = Vh[a_idx].clone(), U[:, b_idx].clone()
    A, B, factor = apply_scale(A, B, opts.scale, scaling=scaling, gamma=opts.stable_gamma, weight=weight, svd=svd,
                               seed=seed, stable_factor=m ** 0.25 / opts.stable_gamma ** 0.5)
    return InitResult(A=A, B=B, subtract=True,
                      info={"svd": used, "direction": opts.direction, "scale": opts.scale, "factor": factor,
                            "grad_sigma": S.tolist()[: 2 * rank]})
