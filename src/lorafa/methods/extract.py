"""Extraction of a fine-tune into a LoRA adapter (SPEC §5, teacher-aware init (b)): the known functional target is
T = W_tuned − W, and its best rank-r approximation in the K-FAC metric ‖C_λ^{1/2} (ΔW − T) Σ_λ^{1/2}‖_F is

    ΔW = C_λ^{-1/2} [C_λ^{1/2} T Σ_λ^{1/2}]_r Σ_λ^{-1/2}.

`metric="input"` keeps C = I (only the layer inputs' covariance Σ: forward passes, no gradients), and
`metric="identity"` (C = Σ = I) is plain truncated-SVD extraction, [T]_r, as mergekit's LoRA extraction does. The
adapter starts at ΔW: s·B·A = ΔW with balanced factors (‖B‖ and ‖A‖ share the singular values' square roots), and the
base is not offset.

C from the task loss's gradients (the empirical Fisher) weighs output directions by how the data's labels pull on
them, which is not the model's own output curvature; `lorafa.stats.sampled_label_loss` gives the statistics pass
labels drawn from the model instead (the true Fisher), the usual K-FAC choice for a KL-type objective.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .common import InitResult, SvdMode, check_rank, top_svd
from .lora_fa import check_damping, factor_low_rank, whitener

logger = logging.getLogger(__name__)

METRICS = ("kfac", "input", "identity")
NEEDS = {"kfac": "kfac", "input": "act", "identity": None}


@dataclass
class ExtractOptions:
    """metric: kfac (C and Σ from a statistics pass with gradients) | input (Σ only: forward passes) | identity
    (plain SVD, no data); reg, reg_mode: the damping of C and Σ, as LoRA-FA's."""

    metric: str = "input"  # measured: docs/benchmarks.md (the SPEC's kfac was never the best)
    reg: float = 1e-6
    reg_mode: str = "relative"

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        check_damping(self.reg, self.reg_mode)

    def needs(self) -> str | None:
        return NEEDS[self.metric]


def _whitened(weight, tuned, stats, opts):
    """(H, the whiteners of C and Σ or None): H = F_Cᵀ T F_Σ (C_λ = F_C F_Cᵀ, Σ_λ = F_Σ F_Σᵀ), T F_Σ, or T."""
    target = tuned.float() - weight.float()
    if opts.metric == "identity":
        return target, None, None
    relative = opts.reg_mode == "relative"
    ws = whitener(stats.in_cov, opts.reg, relative, shared=True)
    if opts.metric == "input":
        return ws.t_mul(target.T).T.float(), None, ws
    wc = whitener(stats.out_cov, opts.reg, relative)
    return wc.t_mul(ws.t_mul(target.T).T).float(), wc, ws


def extract_init(weight: torch.Tensor, stats, *, rank: int, scaling: float, opts: ExtractOptions,
                 svd: SvdMode = "auto", seed: int = 0, tuned: torch.Tensor) -> InitResult:
    """The rank-r adapter closest to `tuned − weight` in the chosen metric, as s·B·A."""
    m, n = weight.shape
    check_rank(rank, m, n)
    h, wc, ws = _whitened(weight, tuned, stats, opts)
    U, S, Vh, used = top_svd(h, rank, svd, seed)
    if ws is not None:  # back from the whitened space: ΔW = P diag(S) Qᵀ, P = F_C^{-T} U (or U), Q = F_Σ^{-T} V
        P = wc.t_solve(U).float() if wc is not None else U
        U, S, Vh = factor_low_rank(P, S, ws.t_solve(Vh.T).float())
    root = torch.sqrt(S.clamp_min(0) / scaling)
    info = {"svd": used, "metric": opts.metric, "sigma": S.tolist(),
            "target_norm": float((tuned.float() - weight.float()).norm())}
    return InitResult(A=(root[:, None] * Vh).float(), B=(U * root[None, :]).float(), subtract=False, info=info)


def extract_spectrum(weight: torch.Tensor, stats, opts: ExtractOptions, tuned: torch.Tensor) -> torch.Tensor:
    """The singular values of the (whitened) target: extraction's spectrum for data-aware ranks (SPEC §6)."""
    return torch.linalg.svdvals(_whitened(weight, tuned, stats, opts)[0])


@torch.no_grad()
def check_difference(weights: dict, tuned: dict, *, tuned_arg: str = "tuned=", tuned_kind: str = "model",
                     targets_arg: str = "target_modules", warn: bool = True) -> list[str]:
    """The target layers on which the fine-tune equals the base: their extracted adapter is zero (B = A = 0) and
    cannot train. Raises when every target is unchanged (there is nothing to extract); otherwise names the unchanged
    ones in a warning (`warn`).

    Args:
        weights, tuned: {target name: a function giving the base's / the fine-tune's weight}, compared one layer at
            a time.
        tuned_arg, tuned_kind, targets_arg: how the caller names the fine-tune and the targets (for the messages;
            lorafa-extract: "--tuned", "checkpoint", "--targets").
    """
    same = [n for n in weights if torch.equal(tuned[n]().float(), weights[n]().float())]
    if weights and len(same) == len(weights):
        raise ValueError(f"The fine-tune equals the base on every target layer ({len(same)} of them): W_tuned − W "
                         "is zero, so there is nothing to extract (the adapter would be all zeros, B = A = 0, and "
                         f"could not train). Check that {tuned_arg} names the fine-tuned {tuned_kind}, not the base, "
                         f"and that {targets_arg} names layers the fine-tune changed.")
    if same and warn:
        logger.warning("lorafa extract: the fine-tune equals the base on %d of %d target layers (%s%s): their "
                       "adapters are zero (B = A = 0) and cannot train; leave them out of %s.", len(same),
                       len(weights), ", ".join(same[:4]), " ..." if len(same) > 4 else "", targets_arg)
    return same
