"""Shared pieces of the init methods: the result type, seeded SVDs, and the gradient methods' scales."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

SvdMode = Literal["auto", "exact", "randomized"]
EXACT_SVD_MAX_DIM = 128  # `auto`: exact SVD when min(m, n) is at most this (576²: 83 ms exact vs 5 ms randomized)
RANDOMIZED_NITER = 4  # the range finder's power iterations (svd="randomized"; where svd="auto" starts)
MAX_NITER = 16  # svd="auto": beyond this many power iterations the exact SVD is cheaper (benchmarks/svd_accuracy.py)
# svd="auto": the predicted top-k subspace error (`range_finder_error`) the range finder must reach. 1e-3 / 50: on
# SmolLM2 the measured error was at most 50× the prediction (where σ_k ≈ σ_{k+1}), median 2.5× (docs/notes.md)
RANDOMIZED_TOL = 2e-5
SCALES = ("stable", "gd_scale", "unit", "weight_svd")
STEP_SCALES = SCALES + ("kfac", "line_search")  # lora_one and lora_fa: the init is a step, whose length these choose
SCALE_ALIASES = {"gd": "gd_scale", "weights": "weight_svd", "weight_svd": "weight_svd", "gd_scale": "gd_scale",
                 "stable": "stable", "unit": "unit", "kfac": "kfac", "line_search": "line_search"}


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
    offset_scale: float = 1.0  # with `subtract`: the base becomes W − offset_scale·s·B·A (SPEC §2.5 "partial")
    step: float | None = None  # one-step methods: the model starts at W + step·s·B̂·Â, ‖B̂Â‖₂ = 1 (line search scales it)

    def initial_update(self, scaling: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(B, A, c) with the model's change at init = c·s·B·A (c = 1 − offset_scale with an offset, else 1)."""
        return self.B, self.A, (1.0 - self.offset_scale) if self.subtract else 1.0

    def scale_step(self, g: float) -> None:
        """Multiply the change the init makes to the model's function by g ≥ 0 (the line search's global factor)."""
        if self.subtract:
            self.offset_scale = 1.0 - g * (1.0 - self.offset_scale)
        else:
            if not g > 0:
                raise ValueError("a step factor of 0 would zero both factors of a no-offset init (they could not train)")
            self.A, self.B = self.A * g ** 0.5, self.B * g ** 0.5
        if self.step is not None:
            self.step *= g


def normalize_scale(scale: str, allowed: tuple[str, ...] = SCALES) -> str:
    """Map a scale name (PEFT's or the LoRA-GA authors' spelling) to ours; raise on unknown names or ones the method
    does not have."""
    key = str(scale).lower()
    if key not in SCALE_ALIASES or SCALE_ALIASES[key] not in allowed:
        raise ValueError(f"Unknown scale {scale!r}; choose from {allowed} (aliases: gd, weightS)."
                         + (" kfac and line_search are for lora_one and lora_fa." if key in STEP_SCALES else ""))
    return SCALE_ALIASES[key]


def check_rank(rank: int, m: int, n: int, pairs_per_rank: int = 1, what: str = "") -> None:
    limit = min(m, n) // pairs_per_rank
    if not isinstance(rank, int) or isinstance(rank, bool):  # True is no rank 1, 2.0 no rank 2
        raise ValueError(f"rank {rank!r} is invalid for a {m}×{n} weight{what}: it must be an integer 1 ≤ r ≤ "
                         f"{limit}, not a {type(rank).__name__}.")
    if rank < 1 or rank > limit:
        need = f"{pairs_per_rank}·r singular pairs" if pairs_per_rank > 1 else "r ≤ min(m, n)"
        raise ValueError(
            f"rank {rank} is invalid for a {m}×{n} weight{what}: needs {need}, so r ≤ {limit}. Lower lora_r or set a "
            "rank_pattern entry for this layer."
        )


def _exact(M: torch.Tensor):
    M64 = M.double() if max(M.shape) <= 512 else M  # fp64 is affordable for small matrices
    U, S, Vh = torch.linalg.svd(M64, full_matrices=False)
    return U.float(), S.float(), Vh.float()


def _start(M: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Orthonormal basis of M Ω, Ω an n × q Gaussian drawn on the CPU from `seed` (q = min(2k + 10, m, n))."""
    q = min(2 * k + 10, *M.shape)
    omega = torch.randn(M.shape[1], q, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(M)
    return torch.linalg.qr(M @ omega).Q


def _power(M: torch.Tensor, Q: torch.Tensor, niter: int) -> torch.Tensor:
    for _ in range(niter):
        Q = torch.linalg.qr(M @ torch.linalg.qr(M.T @ Q).Q).Q
    return Q


def _ritz(M: torch.Tensor, Q: torch.Tensor):
    """All q Ritz triplets of M on span(Q) (the top k are the range finder's top-k SVD)."""
    u, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)
    return Q @ u, S, Vh


def _range_finder(M: torch.Tensor, k: int, seed: int, niter: int):
    return _ritz(M, _power(M, _start(M, k, seed), niter))


def randomized_svd(M: torch.Tensor, k: int, seed: int = 0, niter: int = RANDOMIZED_NITER):
    """Top-k SVD by a seeded range finder with `niter` re-orthonormalised power iterations (q = 2k + 10).

    The test matrix is drawn on the CPU from `seed` and moved to M's device, so every process and device gets the
    same subspace for the same M.
    """
    U, S, Vh = _range_finder(M, k, seed, niter)
    return U[:, :k], S[:k], Vh[:k]


def _ritz_ratio(S: torch.Tensor, k: int) -> float:
    ratio = float(S[-1] / S[k - 1]) if float(S[k - 1]) > 0 else math.inf
    return ratio if math.isfinite(ratio) else math.inf


def range_finder_error(S: torch.Tensor, k: int, niter: int = RANDOMIZED_NITER) -> float:
    """(σ̂_q / σ̂_k)^(2·niter+1) from the range finder's q Ritz values S: the rate at which subspace iteration with q
    columns converges to the top-k subspace (Halko, Martinsson & Tropp 2011, §4.5): a predictor of the largest
    principal-angle sine against the exact SVD (benchmarks/svd_accuracy.py). inf when σ̂_k is 0 or not finite.
    """
    ratio = _ritz_ratio(S, k)
    return ratio ** (2 * niter + 1) if ratio < math.inf else math.inf


def iterations_needed(S: torch.Tensor, k: int, tol: float = RANDOMIZED_TOL) -> float:
    """The fewest power iterations p with (σ̂_q / σ̂_k)^(2p+1) ≤ tol (inf when the Ritz values never decay)."""
    ratio = _ritz_ratio(S, k)
    if ratio == 0:
        return 0
    return math.inf if ratio >= 1 else max(0, math.ceil((math.log(tol) / math.log(ratio) - 1) / 2))


def _auto_randomized(M: torch.Tensor, k: int, seed: int):
    """The range finder, given more power iterations (up to MAX_NITER) while its Ritz values predict a top-k
    subspace error above RANDOMIZED_TOL; None where even MAX_NITER would not do."""
    p, Q = RANDOMIZED_NITER, _power(M, _start(M, k, seed), RANDOMIZED_NITER)
    while True:
        U, S, Vh = _ritz(M, Q)
        need = iterations_needed(S, k)
        if need <= p:
            return U[:, :k], S[:k], Vh[:k]
        if need > MAX_NITER:
            return None
        Q, p = _power(M, Q, need - p), need  # more iterations sharpen σ̂_q, so the need is checked again


def top_svd(M: torch.Tensor, k: int, svd: SvdMode = "auto", seed: int = 0):
    """The k leading singular triplets of M (fp32), and which SVD was used ("exact" or "randomized").

    Args:
        M: the m × n matrix.
        k: how many triplets.
        svd: "exact"; "randomized" (the range finder with RANDOMIZED_NITER power iterations, whatever its accuracy);
            or "auto": exact when min(m, n) is at most EXACT_SVD_MAX_DIM or the range finder would need nearly all
            of it; otherwise the range finder with as many power iterations (≤ MAX_NITER) as its Ritz values say
            it needs for a top-k subspace error ≤ RANDOMIZED_TOL (`range_finder_error`), and exact where that is
            more, as for slowly decaying spectra (SmolLM2's weights).
        seed: the range finder's seed.

    Returns:
        (U m×k, S k, Vh k×n, used).

    Raises:
        ValueError: an unknown `svd`.
    """
    if svd not in ("auto", "exact", "randomized"):
        raise ValueError(f"svd must be 'auto', 'exact' or 'randomized', got {svd!r}")
    M = M.float()
    if svd == "randomized":
        return (*randomized_svd(M, k, seed), "randomized")
    if svd == "auto" and min(M.shape) > EXACT_SVD_MAX_DIM and 2 * k + 10 < min(M.shape):
        found = _auto_randomized(M, k, seed)
        if found is not None:
            return (*found, "randomized")
    U, S, Vh = _exact(M)
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
