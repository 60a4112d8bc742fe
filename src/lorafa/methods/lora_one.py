"""LoRA-One (SPEC §2, §2.3): the adapter starts as the best rank-r one-step update −[G]_r, normalised by σ₁."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import InitResult, SvdMode, apply_scale, check_rank, normalize_scale, top_svd


@dataclass
class LoraOneOptions:
    scale: str = "stable"
    stable_gamma: float = 128.0

    def __post_init__(self):
        self.scale = normalize_scale(self.scale)
        if self.scale == "stable" and not self.stable_gamma > 0:  # checked here: the stable factor divides by √γ
            raise ValueError(f"stable_gamma must be > 0, got {self.stable_gamma}")


def balanced_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B = U diag(√S)/√σ₁, A = diag(√S) Vᵀ/√σ₁, so B·A = U S Vᵀ / σ₁ with ‖B‖₂ = ‖A‖₂ = 1."""
    sigma1 = S[0]
    if not sigma1 > 0:
        raise ValueError("The statistic is zero (σ₁ = 0): the loss does not depend on this layer on the given data.")
    root = torch.sqrt(S / sigma1)
    return root[:, None] * Vh, U * root[None, :]


def finish_one_step(weight, A, B, *, scaling, opts, svd, seed, info) -> InitResult:
    """Apply LoRA-One's scale family (`stable`: both ÷ √γ) and return the no-offset result."""
    A, B, factor = apply_scale(A, B, opts.scale, scaling=scaling, gamma=opts.stable_gamma, weight=weight, svd=svd,
                               seed=seed, stable_factor=1.0 / opts.stable_gamma ** 0.5)
    return InitResult(A=A, B=B, subtract=False, info={**info, "scale": opts.scale, "factor": factor})


def lora_one_init(weight: torch.Tensor, stats, *, rank: int, scaling: float, opts: LoraOneOptions,
                  svd: SvdMode = "auto", seed: int = 0) -> InitResult:
    """SVD(−G) = U S Vᵀ; B = U_r √S_r/√σ₁, A = √S_r V_rᵀ/√σ₁; then `scale`. No offset."""
    m, n = weight.shape
    check_rank(rank, m, n)
    U, S, Vh, used = top_svd(-stats.grad, rank, svd, seed)
    A, B = balanced_factors(U, S, Vh)
    return finish_one_step(weight, A, B, scaling=scaling, opts=opts, svd=svd, seed=seed, info={"svd": used})
