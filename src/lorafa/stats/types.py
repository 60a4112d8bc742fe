"""The value the statistics pass hands to the init methods."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerStats:
    """Statistics of one target layer, all fp32, in the SPEC's `m × n` (out × in) orientation.

    Attributes:
        grad: G, mean over batches of the gradient of the batch's mean-token loss w.r.t. W (m × n).
        in_cov: Σ = XᵀX / N over non-padding tokens (n × n); may be the same tensor object for layers reading the
            same input.
        out_cov: C = JᵀJ / N, J the gradient of the loss w.r.t. the layer output (m × m).
        n_tokens: N, the non-padding tokens seen by this layer (all processes).
        n_batches: batches averaged into `grad` (all processes).
    """

    grad: torch.Tensor | None = None
    in_cov: torch.Tensor | None = None
    out_cov: torch.Tensor | None = None
    n_tokens: int = 0
    n_batches: int = 0

    @property
    def cross(self) -> torch.Tensor | None:
        """Ḡ = JᵀX / N. Equal to Σ_b ∇L_b / N = G · n_batches / N, so it is derived, not stored twice."""
        if self.grad is None or self.n_tokens == 0:
            return None
        return self.grad * (self.n_batches / self.n_tokens)

    def kinds(self) -> set[str]:
        """The statistic kinds this record can serve (`grad`, `act`, `kfac`)."""
        out = set()
        if self.grad is not None:
            out.add("grad")
        if self.in_cov is not None:
            out.add("act")
        if self.grad is not None and self.in_cov is not None and self.out_cov is not None and self.n_tokens > 0:
            out.add("kfac")
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in (("grad", self.grad), ("in_cov", self.in_cov), ("out_cov", self.out_cov)) if v is not None}
