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

The second section holds LoRA-Pro's optimisers (SPEC §9, math in lorafa.lora_pro): the runner's
`model.optimizer=lora_pro` and the benchmark's `+lora_pro` flag.
"""

from __future__ import annotations

import math

import torch
from peft.tuners.lora import LoraLayer

from .lora_pro import (DEFAULT_DAMPING, check_lora_pro_groups, in_layer, lora_pro_gradients, lora_pro_pairs,
                       lora_pro_param_groups, with_gradients)
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


# -- LoRA-Pro (SPEC §9): the factor gradients' full-weight step projected onto the LoRA tangent space ---------------
# The math is lorafa.lora_pro; here the optimisers that use it (the runner's model.optimizer=lora_pro).


class LoraProGradients:
    """Replaces the LoRA gradients by LoRA-Pro's before each step of any optimiser (moments="factor").

    Args:
        pairs: `lorafa.lora_pro.lora_pro_pairs(model)`.
        damping: relative damping of BᵀB and AAᵀ (lorafa.lora_pro).
    """

    def __init__(self, pairs, damping: float = DEFAULT_DAMPING):
        self.pairs, self.damping = pairs, damping

    @torch.no_grad()
    def adjust(self, optimizer: torch.optim.Optimizer) -> None:
        check_lora_pro_groups(optimizer, self.pairs)
        for name, A, B, s in with_gradients(self.pairs):
            new_A, new_B = in_layer(name, lora_pro_gradients, A, B, A.grad, B.grad, s, self.damping)
            A.grad.copy_(new_A)
            B.grad.copy_(new_B)


def _adam_direction(state: dict, grad: torch.Tensor, group: dict) -> torch.Tensor:
    """Folds `grad` into the fp32 moments in `state` and returns AdamW's bias-corrected m̂ / (√v̂ + ε)."""
    beta1, beta2 = group["betas"]
    grad = grad.float()
    if not state:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
    state["step"] += 1
    t = float(state["step"])
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    return (m / (1 - beta1 ** t)) / (v / (1 - beta2 ** t)).sqrt_().add_(group["eps"])


class LoraProAdamW(torch.optim.Optimizer):
    """LoRA-Pro's AdamW with moments of the full m × n equivalent gradient (moments="full", the paper's algorithm).

    Per LoRA pair and step: (g̃_A, g̃_B) = lora_pro_gradients(g_A, g_B); the equivalent gradient
    g̃ = s(B·g̃_A + g̃_B·A) enters m × n first and second moments (fp32, kept in the state of B); AdamW's direction
    u = m̂ / (√v̂ + ε) is treated as a full gradient, projected back with lora_pro_gradients(s·Bᵀu, s·u·Aᵀ), and
    the factors step along it at rate lr. Weight decay is decoupled and applied to A and B (each × (1 − lr·λ)): the
    reference code also decays the frozen base weight, which an adapter cannot hold. Param groups without
    `lora_pro=True` (classifier heads, biases) get plain AdamW.
    """

    def __init__(self, params, pairs, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 damping: float = DEFAULT_DAMPING):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, lora_pro=False))
        self.pairs, self.damping = pairs, damping

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        check_lora_pro_groups(self, self.pairs)
        for group in self.param_groups:
            for p in [] if group["lora_pro"] else group["params"]:
                if p.grad is not None:
                    u = _adam_direction(self.state[p], p.grad, group)
                    p.mul_(1 - group["lr"] * group["weight_decay"]).add_(u.to(p.dtype), alpha=-group["lr"])
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for name, A, B, s in with_gradients(self.pairs):
            in_layer(name, self._pair_step, A, B, s, group_of[id(B)])
        return loss

    def _pair_step(self, A, B, s: float, group: dict) -> None:
        tA, tB = lora_pro_gradients(A, B, A.grad.float(), B.grad.float(), s, self.damping)
        a, b = A.detach().float(), B.detach().float()
        u = _adam_direction(self.state[B], s * (b @ tA + tB @ a), group)
        uA, uB = lora_pro_gradients(A, B, s * (b.T @ u), s * (u @ a.T), s, self.damping)
        for p, step in ((A, uA), (B, uB)):
            p.mul_(1 - group["lr"] * group["weight_decay"]).add_(step.to(p.dtype), alpha=-group["lr"])


def create_lora_pro_optimizer(peft_model, optimizer_cls=torch.optim.AdamW, *, lr: float,
                              damping: float = DEFAULT_DAMPING, moments: str = "factor", adapter_name: str = "default",
                              param_groups=(), **kwargs) -> torch.optim.Optimizer:
    """An optimiser that trains every LoRA pair of `adapter_name` with LoRA-Pro's adjusted gradients (SPEC §9).

    The LoRA factors form one param group marked `lora_pro=True`; every other trainable parameter (a classifier
    head in modules_to_save, biases) forms a plain group and trains with the plain update. A LoRA-Pro group holding
    anything but whole (A, B) pairs, or a factor in a plain group (e.g. through `add_param_group`), is a ValueError
    at the next step; other trainable `lora_` parameters (embedding LoRA, DoRA magnitudes) are refused here.

    moments="factor" (default): `optimizer_cls` (e.g. AdamW) steps on (g̃_A, g̃_B), rewritten before each step by
    a step pre-hook, so its state is r × n and m × r per layer, as for plain LoRA; this is the reference code's
    default ("efficient") mode too. moments="full": LoraProAdamW, the paper's AdamW on the m × n equivalent
    gradient, which keeps 2·m·n fp32 numbers per layer (full fine-tuning's optimiser memory for those weights, what
    LoRA exists to avoid); optimizer_cls must then be torch.optim.AdamW. Both work with any init (B = 0 or not).

    Args:
        peft_model: the PeftModel (or a model with PEFT LoRA layers injected).
        optimizer_cls: the optimiser for moments="factor".
        lr: the learning rate of every group.
        damping: relative damping of BᵀB and AAᵀ (lorafa.lora_pro).
        moments: "factor" or "full".
        adapter_name: the adapter to train.
        param_groups: further plain groups after the model's (parameters outside it, e.g. a loss term's learned
            projection, each group with its own lr / weight_decay if given).
        **kwargs: to the optimiser (weight_decay, betas, eps, ...).

    Returns:
        The optimiser; with moments="factor" its `lora_pro` attribute is the LoraProGradients hook object.

    Raises:
        ValueError: an unknown `moments`, optimizer_cls other than AdamW with moments="full", or the model's
            trainable parameters as `lora_pro_pairs` and the grouping above refuse them.
    """
    if moments not in ("factor", "full"):
        raise ValueError(f"moments must be 'factor' or 'full', got {moments!r}.")
    if not (math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be a finite number ≥ 0, got {damping}.")
    pairs = lora_pro_pairs(peft_model, adapter_name)
    groups = lora_pro_param_groups(peft_model, pairs, adapter_name) + [dict(g) for g in param_groups]
    if moments == "full":
        if optimizer_cls is not torch.optim.AdamW:
            raise ValueError("moments='full' is LoRA-Pro's own AdamW on the m × n equivalent gradient: pass "
                             f"optimizer_cls=torch.optim.AdamW (got {optimizer_cls.__name__}), or moments='factor'.")
        return LoraProAdamW(groups, pairs, lr=lr, damping=damping, **kwargs)
    optimizer = optimizer_cls(groups, lr=lr, **kwargs)
    hook = LoraProGradients(pairs, damping)
    optimizer.register_step_pre_hook(lambda opt, args, kw: hook.adjust(opt))
    optimizer.lora_pro = hook
    return optimizer
