"""Shared pieces of the init methods: the result type, seeded SVDs, and the gradient methods' scales."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

SvdMode = Literal["auto", "exact", "randomized"]
EXACT_SVD_MAX_DIM = 128  # `auto`: exact SVD when min(m, n) is at most this (576²: 83 ms exact vs 5 ms randomized)
RANDOMIZED_NITER = 4  # the range finder's power iterations
# `auto`: above this predicted subspace error the range finder's result is replaced by the exact SVD. 10× below the
# 1e-3 accuracy target: on SmolLM2 the measured error stays under ~3× the prediction (benchmarks/svd_accuracy.py)
RANDOMIZED_TOL = 1e-4
SCALES = ("stable", "gd_scale", "unit", "weight_svd")
SCALE_ALIASES = {"gd": "gd_scale", "weights": "weight_svd", "weight_svd": "weight_svd", "gd_scale": "gd_scale",
                 "stable": "stable", "unit": "unit"}


@dataclass
class InitResult:
    """What an init method returns for one layer.

    Attributes:
        A: r × n fp32 (PEFT's lora_A.weight).
        B: m × r fp32 (PEFT's lora_B.weight).
        subtract: the base weight becomes W − s·B·A so the model's function is unchanged at init.
        info: what was done (svd used, scale factors, ...), for logs.
    """

    A: torch.Tensor
    B: torch.Tensor
    subtract: bool
    info: dict = field(default_factory=dict)


def normalize_scale(scale: str) -> str:
    """Map a scale name (PEFT's or the LoRA-GA authors' spelling) to ours; raise on unknown names."""
    key = str(scale).lower()
    if key not in SCALE_ALIASES:
        raise ValueError(f"Unknown scale {scale!r}; choose from {SCALES} (aliases: gd, weightS).")
    return SCALE_ALIASES[key]


def check_rank(rank: int, m: int, n: int, pairs_per_rank: int = 1, what: str = "") -> None:
    limit = min(m, n) // pairs_per_rank
    if not isinstance(rank, int) or rank < 1 or rank > limit:
        need = f"{pairs_per_rank}·r singular pairs" if pairs_per_rank > 1 else "r ≤ min(m, n)"
        raise ValueError(
            f"rank {rank} is invalid for a {m}×{n} weight{what}: needs {need}, so r ≤ {limit}. Lower lora_r or set a "
            "rank_pattern entry for this layer."
        )


def _exact(M: torch.Tensor):
    M64 = M.double() if max(M.shape) <= 512 else M  # fp64 is affordable for small matrices
    U, S, Vh = torch.linalg.svd(M64, full_matrices=False)
    return U.float(), S.float(), Vh.float()


def _range_finder(M: torch.Tensor, k: int, seed: int, niter: int):
    """All q = min(2k + 10, m, n) Ritz triplets of the seeded range finder (the top k are its top-k SVD)."""
    m, n = M.shape
    q = min(2 * k + 10, m, n)
    omega = torch.randn(n, q, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(M)
    Q = torch.linalg.qr(M @ omega).Q
    for _ in range(niter):
        Q = torch.linalg.qr(M @ torch.linalg.qr(M.T @ Q).Q).Q
    u, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)
    return Q @ u, S, Vh


def randomized_svd(M: torch.Tensor, k: int, seed: int = 0, niter: int = RANDOMIZED_NITER):
    """Top-k SVD by a seeded range finder with `niter` re-orthonormalised power iterations (q = 2k + 10).

    The test matrix is drawn on the CPU from `seed` and moved to M's device, so every process and device gets the
    same subspace for the same M.
    """
    U, S, Vh = _range_finder(M, k, seed, niter)
    return U[:, :k], S[:k], Vh[:k]


def range_finder_error(S: torch.Tensor, k: int, niter: int = RANDOMIZED_NITER) -> float:
    """(σ̂_q / σ̂_k)^(2·niter+1) from the range finder's q Ritz values S: the rate at which subspace iteration with q
    columns converges to the top-k subspace (Halko, Martinsson & Tropp 2011, §4.5). It predicts the largest
    principal-angle sine against the exact SVD (benchmarks/svd_accuracy.py: within a small factor on SmolLM2's
    gradients, whitened cross terms and weights). inf when σ̂_k is 0 or not finite.
    """
    ratio = float(S[-1] / S[k - 1]) if float(S[k - 1]) > 0 else math.inf
    return ratio ** (2 * niter + 1) if math.isfinite(ratio) else math.inf


def top_svd(M: torch.Tensor, k: int, svd: SvdMode = "auto", seed: int = 0):
    """The k leading singular triplets of M (fp32), and which SVD was used ("exact" or "randomized").

    Args:
        M: the m × n matrix.
        k: how many triplets.
        svd: "exact", "randomized" (the range finder, whatever its accuracy), or "auto": exact when min(m, n) is at
            most EXACT_SVD_MAX_DIM or the range finder would need nearly all of it; otherwise the range finder,
            unless its Ritz values predict a top-k subspace error (`range_finder_error`) above RANDOMIZED_TOL, as
            for a slowly decaying spectrum (SmolLM2's weights): then exact.
        seed: the range finder's seed.

    Returns:
        (U m×k, S k, Vh k×n, used).

    Raises:
        ValueError: an unknown `svd`.
    """
    if svd not in ("auto", "exact", "randomized"):
        raise ValueError(f"svd must be 'auto', 'exact' or 'randomized', got {svd!r}")
    small = min(M.shape) <= EXACT_SVD_MAX_DIM or 2 * k + 10 >= min(M.shape)
    if svd == "randomized" or (svd == "auto" and not small):
        U, S, Vh = _range_finder(M.float(), k, seed, RANDOMIZED_NITER)
        if svd == "randomized" or range_finder_error(S, k) <= RANDOMIZED_TOL:
            return U[:, :k], S[:k], Vh[:k], "randomized"
    U, S, Vh = _exact(M.float())
    return U[:, :k], S[:k], Vh[:k], "exact"


def weight_svd_factor(weight: torch.Tensor, rank: int, scaling: float, svd: SvdMode, seed: int) -> float:
    """mean over i < r of √(σ_i(W)/s): the `weight_svd` scale's factor."""
    _, S, _, _ = top_svd(weight, rank, svd, seed)
    return float(torch.sqrt(S / scaling).mean())


def apply_scale(A, B, scale: str, *, scaling: float, gamma: float, weight, svd: SvdMode, seed: int,
                stable_factor: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Multiply both factors by the scale's factor; returns (A, B, factor).

    `stable_factor` is the method's `stable` factor (LoRA-GA: m^{1/4}/√γ; LoRA-One/LoRA-FA: 1/√γ).
    """
    scale = normalize_scale(scale)
    if scale == "stable":
        if not gamma > 0:
            raise ValueError(f"stable_gamma must be > 0, got {gamma}")
        factor = stable_factor
    elif scale == "gd_scale":
        factor = 1.0 / scaling
    elif scale == "unit":
        factor = 1.0
    else:
        factor = weight_svd_factor(weight, A.shape[0], scaling, svd, seed)
    if not math.isfinite(factor):
        raise ValueError(f"scale {scale!r} gave a non-finite factor {factor}")
    return A * factor, B * factor, factor
