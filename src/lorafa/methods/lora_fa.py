"""LoRA-FA (SPEC §2.2): the rank-r update closest to the one-step update −Ḡ in the K-FAC functional metric.

‖C^{1/2} (ΔW + Ḡ) Σ^{1/2}‖_F is minimised over rank-r ΔW by M = C^{-1/2} [−C^{1/2} Ḡ Σ^{1/2}]_r Σ^{-1/2}; with
C = Σ = I this is LoRA-One's [−G]_r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import InitResult, SvdMode, check_rank, normalize_scale, top_svd
from .lora_one import balanced_factors, finish_one_step

EIG_FLOOR = 1e-8


@dataclass
class LoraFAOptions:
    scale: str = "stable"
    stable_gamma: float = 128.0
    reg: float = 1e-6
    reg_mode: str = "relative"

    def __post_init__(self):
        self.scale = normalize_scale(self.scale)
        if self.scale == "stable" and not self.stable_gamma > 0:  # checked here: the stable factor divides by √γ
            raise ValueError(f"stable_gamma must be > 0, got {self.stable_gamma}")
        if self.reg_mode not in ("relative", "absolute"):
            raise ValueError(f"reg_mode must be 'relative' or 'absolute', got {self.reg_mode!r}")
        if not self.reg >= 0:
            raise ValueError(f"reg must be >= 0, got {self.reg}")


def damped_roots(cov: torch.Tensor, reg: float, relative: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(cov_λ)^{1/2} and (cov_λ)^{-1/2} by eigh, eigenvalues clamped at 1e-8 (× the largest in relative mode)."""
    d = cov.shape[0]
    cov = cov.double() if d <= 2048 else cov.float()
    lam = reg * torch.trace(cov) / d if relative else torch.as_tensor(reg, dtype=cov.dtype)
    evals, evecs = torch.linalg.eigh(cov + lam * torch.eye(d, dtype=cov.dtype, device=cov.device))
    floor = EIG_FLOOR * evals.max().clamp_min(0) if relative else EIG_FLOOR
    evals = evals.clamp_min(floor if float(floor) > 0 else EIG_FLOOR)
    root = (evecs * evals.sqrt()) @ evecs.T
    inv_root = (evecs * evals.rsqrt()) @ evecs.T
    return root.float(), inv_root.float()


def factor_low_rank(P: torch.Tensor, S: torch.Tensor, Q: torch.Tensor):
    """SVD of M = P diag(S) Qᵀ (P: m×r, Q: n×r) through its r×r core, never forming M."""
    qp, rp = torch.linalg.qr(P)
    qq, rq = torch.linalg.qr(Q)
    u, s, vh = torch.linalg.svd((rp * S[None, :]) @ rq.T)
    return qp @ u, s, vh @ qq.T


def lora_fa_init(weight: torch.Tensor, stats, *, rank: int, scaling: float, opts: LoraFAOptions,
                 svd: SvdMode = "auto", seed: int = 0) -> InitResult:
    """Whitened functional approximation from the kfac statistics (cross Ḡ, C, Σ); then `scale`. No offset."""
    m, n = weight.shape
    check_rank(rank, m, n)
    relative = opts.reg_mode == "relative"
    c_root, c_inv_root = damped_roots(stats.out_cov, opts.reg, relative)
    s_root, s_inv_root = damped_roots(stats.in_cov, opts.reg, relative)
    h = c_root @ stats.cross @ s_root
    U, S, Vh, used = top_svd(-h, rank, svd, seed)  # [−H̃]_r
    U1, S1, V1h = factor_low_rank(c_inv_root @ U, S, s_inv_root @ Vh.T)
    A, B = balanced_factors(U1, S1, V1h)
    return finish_one_step(weight, A, B, scaling=scaling, opts=opts, svd=svd, seed=seed,
                           info={"svd": used, "reg_mode": opts.reg_mode, "h_sigma": S.tolist()})
