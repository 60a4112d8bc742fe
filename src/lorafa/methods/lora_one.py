"""LoRA-One (SPEC §2, §2.3): the adapter starts as the best rank-r one-step update −[G]_r, normalised by σ₁.

The one-step family (lora_one, lora_fa) shares how the step's *length* is chosen (SPEC §2.5): `stable` (‖s·B·A‖₂ =
s/γ), `kfac` (the minimiser of the K-FAC quadratic model of the loss along the step), `line_search` (a global factor
chosen by the loss on the statistics batches, done by the bridge over all layers at once), or LoRA-GA's `gd_scale`,
`unit` and `weight_svd` factors; and whether the factors carry the step (no offset) or are scaled for training with
the base offset by the difference (`offset="partial"`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .common import STEP_SCALES, InitResult, SvdMode, apply_scale, check_rank, normalize_scale, top_svd


@dataclass
class LoraOneOptions:
    """Options of the one-step inits.

    Attributes:
        scale: stable | kfac | line_search | gd_scale | unit | weight_svd.
        stable_gamma: γ of `stable` (the step's spectral norm is s/γ).
        step_factor: a global factor on the `kfac` steps, also where `line_search` starts from them (per-layer
            minimisers taken together overshoot).
        line_search_from: the per-layer steps the line search scales: stable | kfac.
        factor_gamma: with offset="partial", both factors are scaled to LoRA-GA's `stable` norm m^{1/4}/√γ (γ =
            factor_gamma), whatever the step; the base weight takes the difference.
        partial: set from InitConfig(offset="partial").
    """

    scale: str = "stable"
    stable_gamma: float = 128.0
    step_factor: float = 1.0
    line_search_from: str = "stable"
    factor_gamma: float = 16.0
    partial: bool = False

    def __post_init__(self):
        self.scale = normalize_scale(self.scale, STEP_SCALES)
        if self.scale == "stable" and not self.stable_gamma > 0:  # checked here: the stable factor divides by √γ
            raise ValueError(f"stable_gamma must be > 0, got {self.stable_gamma}")
        if not (math.isfinite(self.step_factor) and self.step_factor > 0):
            raise ValueError(f"step_factor must be a positive number, got {self.step_factor}")
        if self.line_search_from not in ("stable", "kfac"):
            raise ValueError(f"line_search_from must be 'stable' or 'kfac', got {self.line_search_from!r}")
        if not self.factor_gamma > 0:
            raise ValueError(f"factor_gamma must be > 0, got {self.factor_gamma}")

    def uses_curvature(self) -> bool:
        """Whether the step length needs the K-FAC factors (C, Σ) besides the gradient."""
        return self.scale == "kfac" or (self.scale == "line_search" and self.line_search_from == "kfac")


def balanced_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B = U diag(√S)/√σ₁, A = diag(√S) Vᵀ/√σ₁, so B·A = U S Vᵀ / σ₁ with ‖B‖₂ = ‖A‖₂ = 1."""
    sigma1 = S[0]
    if not sigma1 > 0:
        raise ValueError("The statistic is zero (σ₁ = 0): the loss does not depend on this layer on the given data.")
    root = torch.sqrt(S / sigma1)
    return root[:, None] * Vh, U * root[None, :]


def kfac_curvature(stats, A: torch.Tensor, B: torch.Tensor) -> float:
    """κ(M) for M = B·A: the K-FAC model of the loss's second derivative along M (docs/notes.md, "kfac step").

    κ = (Σ_b T_b N_b / n_batches) · tr((Bᵀ C B)(A Σ Aᵀ)). C is built from gradients of each batch's *mean* loss, so
    J_t = g_t / T_b; the per-token Gauss-Newton term of batch b is T_b·Σ_t (J_tᵀ M x_t)², and K-FAC approximates
    Σ_t (J_tᵀ M x_t)² by N_b·tr(Mᵀ C M Σ).
    """
    if stats.out_cov is None or stats.in_cov is None:
        raise ValueError("The kfac step length needs K-FAC statistics (C and Σ): collect kinds=('kfac',).")
    if not stats.fisher_weight > 0:
        raise ValueError("The kfac step length needs each statistics batch's number of loss tokens, which was not "
                         "recorded (batches without 'labels', or statistics saved by an older lorafa): pass batches "
                         "with labels and recompute the statistics, or use scale='stable' or 'line_search'.")
    C, Sig = stats.out_cov.float(), stats.in_cov.float()
    Bf, Af = B.float().to(C.device), A.float().to(C.device)
    core = torch.sum((Bf.T @ C @ Bf) * (Af @ Sig @ Af.T).T)
    return float(core) * stats.fisher_weight / stats.n_batches


def kfac_step(stats, A_hat: torch.Tensor, B_hat: torch.Tensor) -> tuple[float, dict]:
    """η* = −⟨G, M⟩ / κ(M) along M = B̂·Â: where the K-FAC quadratic model of the loss is lowest on that line."""
    slope = float(torch.sum(stats.grad.float() * (B_hat.float() @ A_hat.float())))
    kappa = kfac_curvature(stats, A_hat, B_hat)
    if not (kappa > 0 and math.isfinite(kappa)):
        raise ValueError(f"The K-FAC curvature along the init direction is {kappa}: the statistics carry no "
                         "curvature for this layer. Use scale='stable' or 'line_search'.")
    return -slope / kappa, {"slope": slope, "kappa": kappa}


def finish_one_step(weight, A, B, *, stats, scaling, opts: LoraOneOptions, svd, seed, info) -> InitResult:
    """Give the unit step direction B̂Â (‖B̂‖₂ = ‖Â‖₂ = 1) its length and its factors (SPEC §2.3, §2.5)."""
    info = {**info, "scale": opts.scale}
    if opts.scale in ("stable", "kfac", "line_search"):
        if opts.scale == "kfac" or (opts.scale == "line_search" and opts.line_search_from == "kfac"):
            eta, details = kfac_step(stats, A, B)
            t = eta / scaling * opts.step_factor  # s·t·B̂Â = η·B̂Â (times the global factor)
            info.update(eta=eta, **details)
        else:
            t = 1.0 / opts.stable_gamma
    else:  # LoRA-GA's scale family on both factors: the product, i.e. the step, is multiplied by factor²
        _, _, factor = apply_scale(A, B, opts.scale, scaling=scaling, gamma=opts.stable_gamma, weight=weight,
                                   svd=svd, seed=seed, stable_factor=1.0 / opts.stable_gamma ** 0.5)
        t = factor ** 2
    info["step_norm"] = abs(t) * scaling  # ‖initial change of W‖₂
    if opts.partial:  # trainable factors, the base offset so that the model starts at W + s·t·B̂Â
        k = weight.shape[0] ** 0.25 / opts.factor_gamma ** 0.5
        offset = 1.0 - t / k ** 2
        info.update(factor=k, offset_scale=offset)
        return InitResult(A=A * k, B=B * k, subtract=True, offset_scale=offset, step=t, info=info)
    root = abs(t) ** 0.5
    info["factor"] = root
    return InitResult(A=A * root, B=B * (root if t >= 0 else -root), subtract=False, step=t, info=info)


def lora_one_init(weight: torch.Tensor, stats, *, rank: int, scaling: float, opts: LoraOneOptions,
                  svd: SvdMode = "auto", seed: int = 0) -> InitResult:
    """SVD(−G) = U S Vᵀ; B = U_r √S_r/√σ₁, A = √S_r V_rᵀ/√σ₁; then `scale` (and the partial offset). No offset."""
    m, n = weight.shape
    check_rank(rank, m, n)
    U, S, Vh, used = top_svd(-stats.grad, rank, svd, seed)
    A, B = balanced_factors(U, S, Vh)
    return finish_one_step(weight, A, B, stats=stats, scaling=scaling, opts=opts, svd=svd, seed=seed,
                           info={"svd": used})


def gradient_spectrum(weight: torch.Tensor, stats, opts) -> torch.Tensor:
    """The singular values of G (lora_ga, lora_one): the spectrum data-aware ranks are drawn from (SPEC §6)."""
    return torch.linalg.svdvals(stats.grad.float())
