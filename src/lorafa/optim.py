"""Training the factors with the statistics the init already has: a K-FAC preconditioner for (A, B) (SPEC §2.5).

For ΔW = s·B·A, K-FAC's Fisher of the layer is F = κ·(C ⊗ Σ) (C, Σ: the output-gradient and input covariances,
κ = Σ_b T_b N_b / batches, docs/notes.md "kfac step"). Restricted to each factor it is block-diagonal in the same
Kronecker form: F_A = κ s²·(Bᵀ C B) ⊗ Σ and F_B = κ s²·C ⊗ (A Σ Aᵀ). The preconditioned gradients are

    ∇A ← (Bᵀ C_λ B)⁻¹ ∇A Σ_λ⁻¹ / (κ s²),    ∇B ← C_λ⁻¹ ∇B (A Σ_λ Aᵀ)⁻¹ / (κ s²),

with relative damping C_λ = C + λ·tr(C)/m·I (likewise Σ), so that SGD at learning rate 1 takes the K-FAC natural
gradient (Gauss-Newton) step of each factor (both factors together: lr 0.5 for one step of the product). PEFT's Riemannian preconditioner is the C = Σ = I case (SPEC §4).
The factors' current values enter every step (B and A change as they train); C⁻¹ and Σ⁻¹ are computed once.

Measured not to help (docs/benchmarks.md, "The K-FAC preconditioner in training"): with AdamW it ends worse than
plain AdamW on the same init on both presets, and with SGD it diverges on the causal LM at every rate tried (0.05 down
to 7e-4) and barely trains the classifier. So it is not part of lorafa's public API or the runner; it stays here for
the benchmark's `+kfac` / `+kfac_sgd` flags, so that the measurement can be repeated.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer

from .stats.types import LayerStats


def _damping(cov: torch.Tensor, reg: float) -> float:
    return reg * float(torch.trace(cov.double())) / cov.shape[0]


def _damped_inverse(cov: torch.Tensor, reg: float) -> torch.Tensor:
    d = cov.shape[0]
    cov = cov.double()
    damped = cov + _damping(cov, reg) * torch.eye(d, dtype=cov.dtype, device=cov.device)
    chol, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        raise ValueError("A damped covariance is not positive definite: raise kfac_reg (relative damping λ).")
    return torch.cholesky_inverse(chol)


class KFACPreconditioner:
    """Rewrites the gradients of every LoRA (A, B) pair before the optimiser's step (an optimizer step pre-hook).

    Args:
        peft_model: the PeftModel whose adapters are trained.
        stats: module name (as in the base model) -> LayerStats with K-FAC factors (kinds=("kfac",)).
        reg: relative damping λ of C, Σ and of the r × r factor blocks.
        adapter_name: the adapter to precondition.
    """

    def __init__(self, peft_model, stats: dict[str, LayerStats], reg: float = 1e-3, adapter_name: str = "default"):
        if not reg > 0:
            raise ValueError(f"kfac_reg must be > 0 (C and Σ are inverted), got {reg}")
        self.reg, self.layers, inverses = reg, [], {}
        for name, layer in peft_model.base_model.model.named_modules():
            if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
                continue
            st = stats.get(name)
            if st is None or st.out_cov is None or st.in_cov is None:
                raise ValueError(f"No K-FAC statistics for {name!r}: collect kinds=('kfac',) over the adapted modules.")
            if not st.fisher_weight > 0:
                raise ValueError(f"The statistics for {name!r} lack the loss-token counts (fisher_weight): recompute "
                                 "them with batches that carry labels.")
            key = id(st.in_cov)  # q/k/v share Σ: invert it once
            if key not in inverses:
                inverses[key] = _damped_inverse(st.in_cov, reg).float()
            A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            kappa = st.fisher_weight / st.n_batches * layer.scaling[adapter_name] ** 2
            self.layers.append((A, B, _damped_inverse(st.out_cov, reg).float().to(B.device),
                                inverses[key].to(A.device), st.out_cov.float().to(B.device),
                                st.in_cov.float().to(A.device), kappa,
                                _damping(st.out_cov, reg), _damping(st.in_cov, reg)))
        if not self.layers:
            raise ValueError("The model has no LoRA layers to precondition.")

    @staticmethod
    def _block_inverse(M: torch.Tensor, lam: float) -> torch.Tensor:
        r = M.shape[0]
        return torch.linalg.inv(M.double() + lam * torch.eye(r, dtype=torch.float64, device=M.device)).float()

    @torch.no_grad()
    def precondition(self) -> None:
        for A, B, C_inv, S_inv, C, S, kappa, lam_c, lam_s in self.layers:
            gA, gB = A.grad, B.grad
            if gA is None or gB is None:
                continue
            Af, Bf = A.detach().float(), B.detach().float()
            left = self._block_inverse(Bf.T @ C @ Bf, lam_c)  # (Bᵀ C B + λ_C I)⁻¹, r × r
            right = self._block_inverse(Af @ S @ Af.T, lam_s)  # (A Σ Aᵀ + λ_Σ I)⁻¹, r × r
            new_A = left @ gA.float() @ S_inv / kappa
            new_B = C_inv @ gB.float() @ right / kappa
            gA.copy_(new_A.to(gA.dtype))
            gB.copy_(new_B.to(gB.dtype))

    def attach(self, optimizer: torch.optim.Optimizer):
        """Precondition before each `optimizer.step()`; returns the hook handle."""
        return optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.precondition())


def create_kfac_optimizer(peft_model, stats: dict[str, LayerStats], optimizer_cls=torch.optim.SGD, *, lr: float,
                          reg: float = 1e-3, adapter_name: str = "default", **kwargs) -> torch.optim.Optimizer:
    """An optimiser over the trainable parameters whose LoRA gradients are K-FAC preconditioned before each step.

    Use SGD. Each factor's preconditioned gradient is its own full Gauss-Newton step, and A and B move together, so
    their steps add up: lr ≈ 0.5 is one full step, smaller is safer early on. AdamW normalises each coordinate
    afterwards, which undoes most of the preconditioning.
    """
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = optimizer_cls(params, lr=lr, **kwargs)
    pre = KFACPreconditioner(peft_model, stats, reg=reg, adapter_name=adapter_name)
    pre.attach(optimizer)
    optimizer.kfac_preconditioner = pre
    return optimizer
