"""Streaming randomized sketch of a layer's mean gradient, accumulated without ever forming the m × n gradient.

For a linear layer the batch gradient is G_b = Δᵀ X (Δ: output gradients, X: inputs, one row per token). With fixed
Gaussian test matrices Ω (n × k) and Ψ (m × l), l ≥ k, the pass accumulates the two linear sketches

    Y = G Ω = Σ_b Δᵀ (X Ω)      (m × k)          Z = Ψᵀ G = Σ_b (Δ Ψ)ᵀ X      (l × n)

at O(tokens · (n·k + m·l)) cost and O(m·k + l·n) memory per layer. Both are linear in G, so they sum across batches
and processes. The rank-k approximation Ĝ = Q (ΨᵀQ)⁺ Z, Q = orth(Y), is the single-pass low-rank reconstruction of
Tropp, Yurtsever, Udell & Cevher (2017); its top singular subspaces approximate G's when G's spectrum decays.
Ω and Ψ are regenerated from (seed, shape), so every process and every layer of the same shape uses the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_SKETCH_SEED = 0


def gaussian_matrix(rows: int, cols: int, seed: int, device=None) -> torch.Tensor:
    """The fp32 Gaussian test matrix for (rows, cols, seed): identical on every process, generated on the CPU."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(rows) * 10_007 + int(cols)) % (2**63 - 1))
    return torch.randn(rows, cols, generator=g).to(device)


def sketch_sizes(k: int, l: int | None = None) -> tuple[int, int]:
    """(k, l) with the default l = 2k + 1 (Tropp et al.'s choice for the core), validated."""
    l = 2 * k + 1 if l is None else l
    if not (isinstance(k, int) and isinstance(l, int) and 1 <= k <= l):
        raise ValueError(f"Sketch sizes need integers 1 <= k <= l, got k={k!r}, l={l!r}.")
    return k, l


@dataclass
class GradSketch:
    """The two sketches of a layer's mean gradient G (m × n) and the seed of their test matrices.

    Attributes:
        y: G Ω, m × k.
        z: Ψᵀ G, l × n.
        seed: seed of Ω = gaussian_matrix(n, k, seed) and Ψ = gaussian_matrix(m, l, seed).
    """

    y: torch.Tensor
    z: torch.Tensor
    seed: int = DEFAULT_SKETCH_SEED

    @property
    def shape(self) -> tuple[int, int]:
        return self.y.shape[0], self.z.shape[1]

    def reconstruct(self) -> torch.Tensor:
        """Ĝ = Q (ΨᵀQ)⁺ Z, the rank-k approximation of G (m × n, fp32).

        Raises:
            ValueError: the sketch is zero (the layer's gradient was zero on every batch).
        """
        m, _ = self.shape
        y, z = self.y.float(), self.z.float()
        if not torch.any(y) or not torch.any(z):
            raise ValueError("The gradient sketch is zero: the loss does not depend on this layer on these batches.")
        q, _ = torch.linalg.qr(y)
        psi = gaussian_matrix(m, z.shape[0], self.seed, y.device)
        core = torch.linalg.lstsq(psi.T @ q, z).solution  # k × n
        return q @ core


def principal_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the column spaces of `a` and `b` (descending), in fp64."""
    qa, _ = torch.linalg.qr(a.double())
    qb, _ = torch.linalg.qr(b.double())
    return torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)


def subspace_agreement(exact: torch.Tensor, approx: torch.Tensor, r: int) -> dict[str, float]:
    """How well `approx` recovers the top-r singular subspaces of `exact` (both m × n).

    Returns:
        min_cos_left / min_cos_right: the smallest principal-angle cosine between the top-r left (right) singular
            subspaces; mean_cos2: the mean squared cosine over both sides (the subspaces' overlap, 1 = identical);
        captured: ‖U_aᵀ G V_a‖_F / ‖[G]_r‖_F, the share of the best rank-r part of G that the approximate
            subspaces capture (1 = as good as the exact ones); rel_err_rank_r: ‖[G]_r − [Ĝ]_r‖_F / ‖[G]_r‖_F.
    """
    g = exact.double()
    ue, se, vhe = torch.linalg.svd(g, full_matrices=False)
    ua, sa, vha = torch.linalg.svd(approx.double(), full_matrices=False)
    left = principal_cosines(ue[:, :r], ua[:, :r])
    right = principal_cosines(vhe[:r].T, vha[:r].T)
    er = (ue[:, :r] * se[:r]) @ vhe[:r]
    ar = (ua[:, :r] * sa[:r]) @ vha[:r]
    return {"min_cos_left": float(left.min()), "min_cos_right": float(right.min()),
            "mean_cos2": float(torch.cat([left, right]).pow(2).mean()),
            "captured": float(torch.linalg.norm(ua[:, :r].T @ g @ vha[:r].T) / torch.linalg.norm(se[:r])),
            "rel_err_rank_r": float(torch.linalg.norm(er - ar) / torch.linalg.norm(er))}
