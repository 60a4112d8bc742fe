"""Inits driven by the input covariance Σ (SPEC §2): CorDA and EVA."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import InitResult, SvdMode, _exact, check_rank


@dataclass
class CordaOptions:
    corda_method: str = "ipm"  # ipm: top-r pairs (instruction-previewed); kpm: bottom-r (knowledge-preserved)
    reg: float = 0.01  # Σ + reg·mean(diag Σ)·I, so that Σ⁻¹ exists (PEFT's CorDA starts from the same 0.01)

    def __post_init__(self):
        if self.corda_method not in ("ipm", "kpm"):
            raise ValueError(f"corda_method must be 'ipm' or 'kpm', got {self.corda_method!r}")
        if not self.reg > 0:
            raise ValueError(f"corda's reg (InitConfig's corda_reg) must be > 0 (Σ must be invertible), got {self.reg}")


def corda_init(weight: torch.Tensor, stats, *, rank: int, scaling: float, opts: CordaOptions, svd: SvdMode = "auto",
               seed: int = 0) -> InitResult:
    """SVD(W Σ) = U S V̂ᵀ, V = (V̂ᵀ Σ⁻¹)ᵀ; B = U √(S/s), A = √(S/s) Vᵀ over the top (ipm) or bottom (kpm) r; subtracted."""
    m, n = weight.shape
    check_rank(rank, m, n)
    if svd == "randomized" and opts.corda_method == "kpm":
        raise ValueError("corda kpm needs the smallest singular pairs; use svd='exact' or 'auto'.")
    cov = stats.in_cov.double()
    cov = cov + opts.reg * cov.diagonal().mean() * torch.eye(n, dtype=cov.dtype, device=cov.device)
    U, S, Vh = _exact((weight.double() @ cov).float())
    pick = slice(0, rank) if opts.corda_method == "ipm" else slice(-rank, None)
    U, S, Vh = U[:, pick], S[pick], Vh[pick]
    V = torch.linalg.solve(cov, Vh.double().T).float()  # Σ⁻¹ V̂ (Σ symmetric), i.e. (V̂ᵀ Σ⁻¹)ᵀ
    root = torch.sqrt(S / scaling)
    return InitResult(A=root[:, None] * V.T, B=U * root[None, :], subtract=True,
                      info={"svd": "exact", "corda_method": opts.corda_method})


@dataclass
class EvaOptions:
    """rho: EVA's rank redistribution (SPEC §6): a layer takes at most round(rho·r) of the budget r × layers,
    assigned by a global ranking of the explained-variance ratios; rho = 1 keeps every layer at r (PCA init)."""

    rho: float = 2.0

    def __post_init__(self):
        if not self.rho >= 1:
            raise ValueError(f"eva's rho (InitConfig's eva_rho) must be >= 1 (1: no redistribution), got {self.rho}")


def eva_init(weight: torch.Tensor, stats, *, rank: int, scaling: float, opts: EvaOptions, svd: SvdMode = "auto",
             seed: int = 0) -> InitResult:
    """A = the r leading principal directions of the layer inputs (eigenvectors of Σ), B = 0. No offset."""
    m, n = weight.shape
    check_rank(rank, m, n)
    evals, evecs = torch.linalg.eigh(stats.in_cov.double())
    top = torch.argsort(evals, descending=True)[:rank]
    explained = (evals[top] / evals.clamp_min(0).sum()).float()
    A = evecs[:, top].T.float().contiguous()
    return InitResult(A=A, B=torch.zeros(m, rank, device=weight.device), subtract=False,
                      info={"svd": "exact", "explained_variance": explained.tolist()})


def input_spectrum(weight: torch.Tensor, stats, opts) -> torch.Tensor:
    """The eigenvalues of Σ, descending (the layer inputs' variances along their principal directions): EVA's
    spectrum, whose normalised values are the explained-variance ratios it redistributes ranks by."""
    return torch.linalg.eigvalsh(stats.in_cov.double()).flip(0).clamp_min(0).float()
