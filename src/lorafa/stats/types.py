"""The value the statistics pass hands to the init methods."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .sketch import GradSketch


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
        grad_sketch: instead of `grad`, the streaming sketch of G (`collect_stats(..., sketch=k)`); the init methods
            use its rank-k reconstruction (`densified`).
        fisher_weight: Σ_b T_b·N_b over the batches (T_b: the loss tokens of batch b, over which its loss is a mean;
            N_b: its non-padding tokens), recorded with `kfac`; it turns C (built from gradients of *mean* losses)
            into the curvature of the loss (`kfac_curvature`). 0 when unknown (batches without labels).
    """

    grad: torch.Tensor | None = None
    in_cov: torch.Tensor | None = None
    out_cov: torch.Tensor | None = None
    n_tokens: int = 0
    n_batches: int = 0
    grad_sketch: GradSketch | None = None
    fisher_weight: int = 0

    def densified(self) -> LayerStats:
        """A copy whose `grad` is the sketch's rank-k reconstruction (self if `grad` is already dense)."""
        if self.grad is not None or self.grad_sketch is None:
            return self
        return dataclasses.replace(self, grad=self.grad_sketch.reconstruct(), grad_sketch=None)

    @property
    def cross(self) -> torch.Tensor | None:
        """Ḡ = JᵀX / N. Equal to Σ_b ∇L_b / N = G · n_batches / N, so it is derived, not stored twice."""
        if self.grad is None or self.n_tokens == 0:
            return None
        return self.grad * (self.n_batches / self.n_tokens)

    def kinds(self) -> set[str]:
        """The statistic kinds this record can serve (`grad`, `act`, `kfac`)."""
        out = set()
        has_grad = self.grad is not None or self.grad_sketch is not None
        if has_grad:
            out.add("grad")
        if self.in_cov is not None:
            out.add("act")
        if has_grad and self.in_cov is not None and self.out_cov is not None and self.n_tokens > 0:
            out.add("kfac")
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors held, by kind (a sketch as `grad_sketch.y` and `grad_sketch.z`)."""
        sk = self.grad_sketch
        pairs = (("grad", self.grad), ("in_cov", self.in_cov), ("out_cov", self.out_cov),
                 ("grad_sketch.y", sk.y if sk else None), ("grad_sketch.z", sk.z if sk else None))
        return {k: v for k, v in pairs if v is not None}


def held_bytes(stats) -> int:
    """The bytes a statistics dict holds, each tensor once (layers reading one input share one Σ tensor)."""
    seen, total = set(), 0
    for st in stats.values():
        for t in st.tensors().values():
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def check_stats_dict(stats) -> None:
    """Raise unless `stats` is what collect_stats and load_stats return: a mapping of module name -> LayerStats.

    Raises:
        TypeError: not a mapping, or a value that is not a LayerStats (named by its key).
    """
    from collections.abc import Mapping

    if not isinstance(stats, Mapping):
        raise TypeError(f"stats must be a dict of module name -> LayerStats (as collect_stats and load_stats return "
                        f"it), got {type(stats).__name__}")
    for name, value in stats.items():
        if not isinstance(value, LayerStats):
            raise TypeError(f"stats[{name!r}] is a {type(value).__name__}, not a LayerStats: pass the dict "
                            "collect_stats or load_stats returns (module name -> LayerStats)")
