"""LoRA-FA (SPEC §2.2, §2.5): the rank-r update closest to a one-step target in the K-FAC functional metric.

‖C^{1/2} (ΔW − T) Σ^{1/2}‖_F is minimised over rank-r ΔW by M = C^{-1/2} [C^{1/2} T Σ^{1/2}]_r Σ^{-1/2}. Targets:
`gradient`, T = −Ḡ (with C = Σ = I this is LoRA-One's [−G]_r); `natural`, T = −C⁻¹ Ḡ Σ⁻¹, the K-FAC
natural-gradient step, for which C^{1/2} T Σ^{1/2} = −C^{-1/2} Ḡ Σ^{-1/2}.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .common import InitResult, SvdMode, check_rank, top_svd
from .lora_one import LoraOneOptions, balanced_factors, finish_one_step

EIG_FLOOR = 1e-8
TARGETS = ("gradient", "natural")


@dataclass
class LoraFAOptions(LoraOneOptions):
    """LoRA-One's step options, plus the target and the damping λ of C and Σ (SPEC §2.2, §2.5)."""

    target: str = "gradient"
    reg: float = 1e-6
    reg_mode: str = "relative"

    def __post_init__(self):
        super().__post_init__()
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        check_damping(self.reg, self.reg_mode)


def check_damping(reg: float, reg_mode: str) -> None:
    """The damping λ of C and Σ: reg >= 0, relative (to tr/dim) or absolute."""
    if reg_mode not in ("relative", "absolute"):
        raise ValueError(f"reg_mode must be 'relative' or 'absolute', got {reg_mode!r}")
    if not reg >= 0:
        raise ValueError(f"reg must be >= 0, got {reg}")


class Whitener:
    """A factor F of the damped covariance, cov_λ = F Fᵀ.

    The LoRA-FA metric tr(Xᵀ C_λ X Σ_λ) depends only on C_λ and Σ_λ, so any such factor gives the same M as the
    symmetric roots of SPEC §2.2 (F = cov^{1/2} Q for an orthogonal Q, and the rank-r truncation commutes with it):
    the Cholesky factor is used when cov_λ is numerically positive definite (about 10× cheaper than eigh); otherwise
    eigh with eigenvalues clamped at 1e-8 (× the largest in relative mode), F = V Λ^{1/2}.
    """

    def __init__(self, cov: torch.Tensor, reg: float, relative: bool):
        d = cov.shape[0]
        # one copy, damped on its diagonal in place (no d × d identity: at d = 14336 that was 1.6 GB of transients)
        damped = cov.to(torch.float64 if d <= 4096 else torch.float32, copy=True)
        lam = reg * torch.trace(damped) / d if relative else torch.as_tensor(reg, dtype=damped.dtype)
        damped.diagonal().add_(lam)
        chol, info = torch.linalg.cholesky_ex(damped)
        # L_ii depends on every entry of row i, so a non-finite entry anywhere shows on the diagonal (and this
        # check holds d values, not a d × d mask)
        self.cholesky = bool(info == 0) and bool(torch.isfinite(chol.diagonal()).all())
        if self.cholesky:
            self.L = chol
        else:
            del chol  # the failed factor: not held through eigh
            evals, self.V = torch.linalg.eigh(damped)
            floor = EIG_FLOOR * float(evals.max().clamp_min(0)) if relative else EIG_FLOOR
            self.evals = evals.clamp_min(max(floor, EIG_FLOOR))

    def t_mul(self, X: torch.Tensor) -> torch.Tensor:
        """Fᵀ X."""
        X = X.to(self.L.dtype if self.cholesky else self.V.dtype)
        return self.L.T @ X if self.cholesky else self.evals.sqrt()[:, None] * (self.V.T @ X)

    def solve(self, X: torch.Tensor) -> torch.Tensor:
        """F^{-1} X."""
        X = X.to(self.L.dtype if self.cholesky else self.V.dtype)
        if self.cholesky:
            return torch.linalg.solve_triangular(self.L, X, upper=False)
        return self.evals.rsqrt()[:, None] * (self.V.T @ X)

    def t_solve(self, U: torch.Tensor) -> torch.Tensor:
        """F^{-T} U."""
        U = U.to(self.L.dtype if self.cholesky else self.V.dtype)
        if self.cholesky:
            return torch.linalg.solve_triangular(self.L.T, U, upper=True)
        return self.V @ (self.evals.rsqrt()[:, None] * U)


# Modules that read one input (q/k/v, gate/up) share one Σ tensor and are initialised one after another, so the
# last Σ's factor is kept, inside `whitener_scope()` (one `compute_init` call) only: the fp64 factors are released
# as the next input comes and when the call ends, never living through training.
_SCOPE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("lorafa_whiteners", default=None)


@contextmanager
def whitener_scope():
    """Reuse the factor of a shared input covariance within the block; nothing is kept after it."""
    token = _SCOPE.set({})
    try:
        yield
    finally:
        _SCOPE.get().clear()
        _SCOPE.reset(token)


def whitener(cov: torch.Tensor, reg: float, relative: bool, shared: bool = False) -> Whitener:
    """A Whitener of `cov`. With `shared=True`, inside `whitener_scope()`, a tensor equal by identity to the last
    shared one (and unmodified since) is not factored again."""
    memo = _SCOPE.get() if shared else None
    key = (id(cov), cov._version, reg, relative)
    last = memo.get("last") if memo is not None else None
    if last is not None and last[0] == key and last[1] is cov:
        return last[2]
    w = Whitener(cov, reg, relative)
    if memo is not None:
        memo["last"] = (key, cov, w)  # one entry: the previous factor is freed here
    return w


def factor_low_rank(P: torch.Tensor, S: torch.Tensor, Q: torch.Tensor):
    """SVD of M = P diag(S) Qᵀ (P: m×r, Q: n×r) through its r×r core, never forming M."""
    qp, rp = torch.linalg.qr(P)
    qq, rq = torch.linalg.qr(Q)
    u, s, vh = torch.linalg.svd((rp * S[None, :]) @ rq.T)
    return qp @ u, s, vh @ qq.T


def _release_other_inputs(cov: torch.Tensor) -> None:
    """Drop the kept factor of the last shared input unless it is `cov`'s: it would otherwise live through this
    layer's C whitener (784 MB more at the peak for a 14336-wide input)."""
    memo = _SCOPE.get()
    last = memo.get("last") if memo is not None else None
    if last is not None and last[1] is not cov:
        memo.clear()


def whitened_target(stats, opts: LoraFAOptions):
    """(the whitened target W̃ whose rank-r truncation gives M, the two whiteners): W̃ = −F_Cᵀ Ḡ F_Σ (`gradient`,
    i.e. −H̃) or −F_C⁻¹ Ḡ F_Σ⁻ᵀ (`natural`), for C_λ = F_C F_Cᵀ and Σ_λ = F_Σ F_Σᵀ."""
    relative = opts.reg_mode == "relative"
    _release_other_inputs(stats.in_cov)
    wc = whitener(stats.out_cov, opts.reg, relative)
    ws = whitener(stats.in_cov, opts.reg, relative, shared=True)
    if opts.target == "natural":
        h = wc.solve(ws.solve(stats.cross.T).T)
    else:
        h = wc.t_mul(ws.t_mul(stats.cross.T).T)
    return -h.float(), wc, ws


def lora_fa_init(weight: torch.Tensor, stats, *, rank: int, scaling: float, opts: LoraFAOptions,
                 svd: SvdMode = "auto", seed: int = 0) -> InitResult:
    """Whitened functional approximation of the target from the kfac statistics (cross Ḡ, C, Σ); then `scale`."""
    m, n = weight.shape
    check_rank(rank, m, n)
    h, wc, ws = whitened_target(stats, opts)
    U, S, Vh, used = top_svd(h, rank, svd, seed)  # [W̃]_r
    P, Q = wc.t_solve(U).float(), ws.t_solve(Vh.T).float()  # M = P diag(S) Qᵀ
    U1, S1, V1h = factor_low_rank(P, S, Q)
    A, B = balanced_factors(U1, S1, V1h)
    return finish_one_step(weight, A, B, stats=stats, scaling=scaling, opts=opts, svd=svd, seed=seed,
                           info={"svd": used, "target": opts.target, "reg": opts.reg, "reg_mode": opts.reg_mode,
                                 "h_sigma": S.tolist()})


def whitened_spectrum(weight: torch.Tensor, stats, opts: LoraFAOptions) -> torch.Tensor:
    """The singular values of the whitened target (H̃, or C^{-1/2}ḠΣ^{-1/2} for `natural`): LoRA-FA's spectrum for
    data-aware ranks (SPEC §6)."""
    return torch.linalg.svdvals(whitened_target(stats, opts)[0])
