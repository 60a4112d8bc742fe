"""LoRA-Pro (ICLR 2025, SPEC §9): LoRA's factor gradients replaced by the pair whose full-weight step fits g best.

With ΔW = s·B·A (A: r × n, B: m × r) the factor gradients are g_A = s·Bᵀg and g_B = s·g·Aᵀ, g the m × n gradient
of W. A step (δA, δB) moves W by s·(B·δA + δB·A) to first order, so LoRA-Pro steps along the pair whose image
s·(B·g̃_A + g̃_B·A) is the orthogonal projection of g onto the tangent space {B·X + Y·A}, the least-norm one of them:

    g̃_A = (1/s²)(BᵀB)⁻¹ g_A + X·A,   g̃_B = (1/s²)[I − B(BᵀB)⁻¹Bᵀ] g_B (AAᵀ)⁻¹ − B·X,
    BᵀB·X + X·AAᵀ = −(1/s²)(BᵀB)⁻¹ g_A Aᵀ.

The pairs with the same image differ by (Z·A, −B·Z); the Sylvester equation is the stationarity condition of
‖g̃_A‖² + ‖g̃_B‖² along them (and of the distance to (g_A, g_B): g_A·Aᵀ = Bᵀ·g_B cancels). g is never formed.
Checked against an fp64 brute-force least-squares, least-norm solution in tests/test_lora_pro.py.

Damping: BᵀB and AAᵀ are replaced everywhere by G + λI with λ = damping·tr(G)/r (relative, so the rule does not
depend on the factors' scale). A factor whose damped Gram matrix still has λ_min ≤ 1e-10·λ_max is refused (ValueError):
any damping above about r·1e-10 regularises every nonzero factor. B = 0 (PEFT's default init) is exact: g_A = 0 and the
tangent space is {Y·A}, so g̃_A = 0, g̃_B = (1/s²) g_B (AAᵀ)⁻¹.
"""

from __future__ import annotations

import math

import torch
from peft.tuners.lora import LoraLayer

from .checks import check_number

DEFAULT_DAMPING = 1e-6
_RCOND = 1e-10  # damped Gram eigenvalue ratio below which a factor counts as rank-deficient


def _check_inputs(A, B, grad_A, grad_B, scaling, damping) -> None:
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"A must be r × n and B m × r (ΔW = s·B·A), got A {tuple(A.shape)}, B {tuple(B.shape)}.")
    if grad_A.shape != A.shape or grad_B.shape != B.shape:
        raise ValueError(f"Gradient shapes {tuple(grad_A.shape)}, {tuple(grad_B.shape)} do not match A "
                         f"{tuple(A.shape)}, B {tuple(B.shape)}.")
    if not (math.isfinite(scaling) and scaling != 0):
        raise ValueError(f"The LoRA scaling s must be finite and nonzero, got {scaling}.")
    check_number("damping", damping, low=0)  # relative damping; a string or a bool is refused
    for label, t in (("A", A), ("B", B), ("grad_A", grad_A), ("grad_B", grad_B)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{label} has NaN or inf entries: LoRA-Pro cannot project a non-finite step. Lower the "
                             "learning rate, or train in fp32/bf16 rather than fp16.")


def _damped_eigh(G: torch.Tensor, damping: float, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    r = G.shape[0]
    lam = damping * float(torch.trace(G)) / r
    evals, evecs = torch.linalg.eigh(G + lam * torch.eye(r, dtype=G.dtype, device=G.device))
    if not float(evals[0]) > _RCOND * float(evals[-1]):
        raise ValueError(f"{what} (Gram eigenvalues {float(evals[0]):.3g} to {float(evals[-1]):.3g} after damping "
                         f"λ = {lam:.3g}): raise damping (relative, e.g. {DEFAULT_DAMPING:g} or more), or initialise "
                         "the adapter with full-rank factors.")
    return evals, evecs


@torch.no_grad()
def lora_pro_gradients(A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor, scaling: float,
                       damping: float = DEFAULT_DAMPING) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Pro's adjusted factor gradients (g̃_A, g̃_B) from the LoRA gradients (module docstring).

    Computed in fp64: the Gram matrices square the factors' condition numbers, and everything here costs
    O((m + n)·r²), negligible next to the backward pass, so fp32's lost digits buy nothing. The Sylvester equation
    is solved in the eigenbases of the two r × r Gram matrices.

    Args:
        A, B: the factors, r × n and m × r (ΔW = s·B·A).
        grad_A, grad_B: their gradients, s·Bᵀg and s·g·Aᵀ.
        scaling: s.
        damping: relative damping of BᵀB and AAᵀ (module docstring); 0 for the exact formulas.

    Returns:
        (g̃_A, g̃_B), in the dtypes of grad_A and grad_B.

    Raises:
        ValueError: mismatched shapes, non-finite inputs, zero s, rank-deficient A or nonzero B beyond the
            damping, or B = 0 with grad_A ≠ 0 (then grad_A is no s·Bᵀg).
    """
    _check_inputs(A, B, grad_A, grad_B, scaling, damping)
    s2 = float(scaling) ** 2
    a, b, ga, gb = (t.detach().double() for t in (A, B, grad_A, grad_B))
    ev_a, V = _damped_eigh(a @ a.T, damping, f"A ({tuple(A.shape)}) has linearly dependent rows")
    inv_a = (V / ev_a) @ V.T
    if not bool(b.any()):
        if bool(ga.any()):
            raise ValueError("B is zero but grad_A is not, so grad_A is not s·Bᵀg: a loss term acting on A directly "
                             "is no full-weight gradient that LoRA-Pro could project.")
        return torch.zeros_like(grad_A), (gb @ inv_a / s2).to(grad_B.dtype)
    ev_b, U = _damped_eigh(b.T @ b, damping, f"B ({tuple(B.shape)}) has linearly dependent columns")
    inv_b = (U / ev_b) @ U.T
    p = inv_b @ ga / s2
    q = gb @ inv_a / s2
    q = q - b @ (inv_b @ (b.T @ q))
    rhs = U.T @ (-p @ a.T) @ V  # the Sylvester equation in the eigenbases is diagonal
    x = U @ (rhs / (ev_b[:, None] + ev_a[None, :])) @ V.T
    return (p + x @ a).to(grad_A.dtype), (q - b @ x).to(grad_B.dtype)


def lora_pro_pairs(model, adapter_name: str = "default") -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """(module name, A, B, s) for every trainable LoRA pair of `adapter_name`.

    Raises:
        ValueError: a layer whose ΔW is not s·B·A with 2-D factors (DoRA, other variants, convolutions), a pair
            with one factor frozen, or no trainable pair at all.
    """
    pairs = []
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
            continue
        A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        if not (A.requires_grad or B.requires_grad):
            continue
        if not (A.requires_grad and B.requires_grad):
            raise ValueError(f"{name}: LoRA-Pro moves A and B together, but one of them is frozen.")
        if adapter_name in getattr(layer, "lora_variant", {}) or A.ndim != 2 or B.ndim != 2:
            raise ValueError(f"{name}: LoRA-Pro needs ΔW = s·B·A with 2-D factors; this layer is a LoRA variant "
                             "(DoRA, KaSA, GOAT, ...) or a convolution. Use a plain optimiser for it.")
        pairs.append((name, A, B, float(layer.scaling[adapter_name])))
    if not pairs:
        raise ValueError(f"The model has no trainable LoRA (A, B) pairs of adapter {adapter_name!r} for LoRA-Pro.")
    return pairs


def lora_pro_param_groups(model, pairs, adapter_name: str = "default") -> list[dict]:
    """The param groups of a LoRA-Pro optimiser: the factors (`lora_pro=True`), then the other trainable parameters.

    Raises:
        ValueError: a trainable `lora_` parameter that is no factor of `pairs` (embedding LoRA, DoRA magnitudes,
            another adapter), which LoRA-Pro cannot project and should not silently train plainly.
    """
    factors = {id(t) for _, A, B, _ in pairs for t in (A, B)}
    lora, other = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in factors:
            lora.append(p)
        elif "lora_" in name:
            raise ValueError(f"{name} is a trainable LoRA parameter but not an A/B factor of adapter "
                             f"{adapter_name!r} that LoRA-Pro can project: freeze it, or train without LoRA-Pro.")
        else:  # classifier heads (modules_to_save), biases: plain updates, in a group of their own
            other.append(p)
    return [{"params": lora, "lora_pro": True}] + ([{"params": other, "lora_pro": False}] if other else [])


def check_lora_pro_groups(optimizer: torch.optim.Optimizer, pairs) -> None:
    """Raise ValueError unless the LoRA-Pro param groups (`lora_pro=True`) hold whole (A, B) pairs and nothing else.

    A factor in a plain group, or another parameter in a LoRA-Pro group (say through `add_param_group`), would
    train with an update that LoRA-Pro did not plan.
    """
    factors = {id(t) for _, A, B, _ in pairs for t in (A, B)}
    group_of = {}
    for i, group in enumerate(optimizer.param_groups):
        ids = [id(p) for p in group["params"]]
        if group.get("lora_pro"):
            stray = sum(k not in factors for k in ids)
            if stray:
                raise ValueError(f"Param group {i} is a LoRA-Pro group but holds {stray} parameters that are not LoRA "
                                 "factors: give them a plain group of their own (lora_pro=False).")
            group_of.update(dict.fromkeys(ids, i))
        elif any(k in factors for k in ids):
            raise ValueError(f"Param group {i} holds LoRA factors but is no LoRA-Pro group (lora_pro=True): LoRA-Pro "
                             "must adjust every factor's gradient.")
    for name, A, B, _ in pairs:
        if id(A) not in group_of or group_of.get(id(A)) != group_of.get(id(B)):
            raise ValueError(f"{name}: A and B must both be in one LoRA-Pro param group.")


def in_layer(name: str, fn, *args):
    """fn(*args), a ValueError from it prefixed with the layer's name."""
    try:
        return fn(*args)
    except ValueError as e:
        raise ValueError(f"LoRA-Pro at {name}: {e}") from e


def with_gradients(pairs) -> list:
    """The pairs whose A and B both have a gradient now.

    Raises:
        ValueError: a pair with only one of them, or none with any (the gradients are not in `.grad`, as under
            FSDP or DeepSpeed, or the step came without a backward pass).
    """
    out = [pair for pair in pairs if pair[1].grad is not None or pair[2].grad is not None]
    for name, A, B, _ in out:
        if A.grad is None or B.grad is None:
            raise ValueError(f"LoRA-Pro at {name}: only one of A, B has a gradient; LoRA-Pro needs both.")
    if not out:
        raise ValueError("No LoRA factor has a gradient at this step: LoRA-Pro reads them from .grad after the "
                         "backward pass (one process or DDP; FSDP and DeepSpeed keep them elsewhere).")
    return out
