"""Choosing the learning rate from the model's response at the init (SPEC §11, issue 23).

`suggest_lr(model, batches, rule=...)` measures how the loss of the trainable (adapter) parameters responds on a few
batches and turns that into a rate. Each rule is also a function of its own (`polyak`, `adam_step`, `lambda_max`,
`range_test`, all in `RULES`), returning an `LrSuggestion`: the rate and the evidence (what was measured, the rule's
number, seconds), so a benchmark can compare them and refit their constants from the evidence alone.

- `polyak`: Polyak's step size for the optimiser's first update d (below): the rate at which the first-order model
  L − η·gᵀd reaches the loss's floor (0 for cross-entropy), η = (L − floor)/gᵀd; rate = c·η. One gradient (for
  Adam gᵀd ≈ |g|₁), no curvature, so no double backward.
- `anchored`: default LoRA's rate, carried over to this model's adapters by the first step's reach. gᵀd is the
  first-order loss decrease per unit rate; the same number for a PEFT default LoRA on the same layers and at the
  same point (A drawn as PEFT draws it, B = 0, rsLoRA scaling alpha/√r) comes from the same backward pass (hooks
  on the LoRA layers: s·Σ dy ⊗ (A·x)), so rate = c·(gᵀd of default LoRA)/(gᵀd). c is the rate default LoRA trains
  at: the rule measures only how much further (or less far) this init's first step reaches than default LoRA's.
  Pass your own LoRA rate as c if you know it. One gradient, no double backward. With schedule-free AdamW
  (optimizer="schedulefree") c is that optimiser's own default rate, 0.0025.
- `adam_step`: the quadratic model of the mean loss along the optimiser's first update. Adam's first bias-corrected
  step is −η·d with d = g/(|g| + eps) (≈ sign g; zero where g is zero); SGD's is −η·g (d = g). Then
  L(θ − ηd) ≈ L − η·gᵀd + ½η²·dᵀHd is least at η* = gᵀd / dᵀHd, one Hessian-vector product. Rate = c·η*.
  The exact Hessian can have dᵀHd ≤ 0 along d (seen on tiny random models): the quadratic model then has no
  minimum, and the rule uses the Gauss-Newton curvature dᵀGd (G = Jᵀ·∂²ℓ/∂z²·J over the logits z: for softmax
  cross-entropy Jᵀ(diag p − ppᵀ)J, never negative); the evidence says which curvature was used and why.
- `lambda_max`: rate = c / λ_max, λ_max the top eigenvalue of H (or G) over the trainable parameters, by Lanczos on
  Hessian-vector products.
- `range_test`: a few optimiser steps at each rate of a geometric grid, each from the init; rate = the rate with
  the lowest loss after those steps, divided by a divisor.

Curvature needs double backward, which the fused CPU attention kernel (sdpa) lacks: while a rule runs, the model's
HF attention implementation is switched to eager (`set_attn_implementation`), and the model is put in eval mode
(no dropout: the measurement is deterministic). Afterwards the model is exactly as it was: each module's training
flag, the attention implementation, requires_grad, the trainable values and every `.grad` (nothing is written to
`.grad` but by the range test's own optimiser, and those are put back).

Each rule's constant is fitted on ONE preset with default LoRA only, then held fixed for every other init and
preset (issue 23): anchored's (ANCHORED_C), polyak's (POLYAK_C) and adam_step's (ADAM_STEP_C) are; lambda_max and
range_test keep the value their comment justifies.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .checks import check_choice, check_positive_int
from .stats.collect import batch_to_device, checked_loss, default_loss
from .stats.distributed import all_gather_objects, world

logger = logging.getLogger(__name__)

# polyak's, anchored's and adam_step's constants, fitted on ONE preset with default LoRA only and held fixed for every
# init and preset: (LoRA's grid-best rate) / (the rule's raw number) on the classification preset
# (benchmarks/results/rate_cls/fit.json, 3 seeds). The other rules' constants are not fitted (their cost rules them
# out as defaults: docs/learning_rate.md).
POLYAK_C = 0.0387  # rate = c·(L − floor)/gᵀd
ADAM_STEP_C = 0.216  # rate = c·η*
ANCHORED_C = 0.003  # rate = c·(gᵀd of a default LoRA on the same layers)/(gᵀd): c is default LoRA's rate
# anchored's c for schedule-free AdamW (optimizer="schedulefree"): its own default rate (schedulefree's
# AdamWScheduleFree, lr=0.0025), the rate its authors give for default settings. Not fitted: default LoRA trained
# with it at that rate matched or beat AdamW at its tuned rate on the presets it was run on (docs/learning_rate.md).
SCHEDULE_FREE_C = 0.0025
ANCHOR_ALPHA = 16.0  # the reference LoRA's lora_alpha, rsLoRA scaling alpha/√r (the fitting preset's)
LAMBDA_MAX_C = 1.0  # rate = c/λ_max; 1: gradient descent's best step along the top eigenvector (2/λ_max diverges)
RANGE_DIVISOR = 10.0  # rate = (rate of the lowest loss after RANGE_STEPS steps) / 10: the classic LR-finder rule
RANGE_STEPS = 3  # optimiser steps per rate of the range test
RANGE_GRID = (1e-6, 1.0, 2.0)  # the range test's rates: lr_min, lr_max, factor between neighbours
LANCZOS_STEPS = 20  # Lanczos iterations (Hessian-vector products on every batch) for λ_max
MAX_BATCHES = 2  # batches used (the first ones given)

DEFAULT_RULE = "anchored"  # suggest_lr's, the runner's (model.lr_rule) and initialize_trainer's
OPTIMIZERS = ("adamw", "sgd", "schedulefree")  # schedulefree: schedule-free AdamW (its first step is Adam's)
ADAM_LIKE = ("adamw", "schedulefree")
CURVATURES = ("hessian", "gauss_newton")


@dataclass
class LrSuggestion:
    """A suggested learning rate and what it was computed from.

    Attributes:
        lr: the rate (a positive float).
        evidence: what was measured (JSON-serialisable): the rule, the optimiser, the batches used, the mean loss at
            the init, the rule's own numbers (η*, gᵀd, dᵀHd or dᵀGd, λ_max, the range test's curve), its constant,
            and `seconds`.
    """

    lr: float
    evidence: dict = field(default_factory=dict)


# -- the model's loss and its curvature products ----------------------------------------------------------------
def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


class _Probe:
    """The model, its trainable parameters and the batches; the mean loss over the batches and its curvature
    products (the products are means over the batches, as the loss is)."""

    def __init__(self, model, batches: list[dict], loss_fn: Callable | None):
        self.model, self.given_loss_fn, self.loss_fn = model, loss_fn, loss_fn or default_loss
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("The model has no trainable parameters (none with requires_grad): suggest_lr measures "
                             "the loss's response to the trainable (adapter) parameters. Call it on the PeftModel "
                             "that lorafa.initialize or peft.get_peft_model returns.")
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.batches = [batch_to_device(b, self.params[0].device) for b in batches]

    @property
    def size(self) -> int:
        return sum(p.numel() for p in self.params)

    def _loss(self, i: int, batch: dict, strict: bool = True) -> torch.Tensor:
        loss = checked_loss(self.loss_fn(self.model, batch), self.given_loss_fn)  # a one-element tensor
        if strict and not torch.isfinite(loss):
            raise ValueError(f"The loss on batch {i} is {loss.item()}, not a finite number: check the batch (labels "
                             "that are all -100 give nan) and the model's weights before choosing a rate.")
        return loss.reshape(())

    def mean_loss(self, strict: bool = True) -> float:
        with torch.no_grad():
            return sum(self._loss(i, b, strict).item() for i, b in enumerate(self.batches)) / len(self.batches)

    def gradient(self, strict: bool = True) -> tuple[float, list[torch.Tensor]] | None:
        """(mean loss, its gradient); with strict=False, None where the loss or gradient is not finite."""
        total, grads = 0.0, [torch.zeros_like(p) for p in self.params]
        for i, batch in enumerate(self.batches):
            loss = self._loss(i, batch, strict)
            if not torch.isfinite(loss):
                return None
            for acc, g in zip(grads, torch.autograd.grad(loss, self.params, allow_unused=True)):
                if g is not None:
                    acc.add_(g, alpha=1 / len(self.batches))
            total += loss.item() / len(self.batches)
        if not all(torch.isfinite(g).all() for g in grads):
            if not strict:
                return None
            bad = [n for n, g in zip(self.names, grads) if not torch.isfinite(g).all()]
            raise ValueError(f"The gradient is not finite in {len(bad)} trainable parameter(s) ({bad[:3]}...): "
                             "check the model's weights and the batches before choosing a rate.")
        return total, grads

    def hvp(self, v: list[torch.Tensor]) -> list[torch.Tensor]:
        """H·v, by double backward on each batch."""
        out = [torch.zeros_like(p) for p in self.params]
        for i, batch in enumerate(self.batches):
            loss = self._loss(i, batch)
            with _double_backward_hint():
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                pairs = [(g, x) for g, x in zip(grads, v) if g is not None and g.requires_grad]
                if not pairs:  # the loss is (at most) linear in the parameters: no curvature
                    continue
                gv = sum((g * x).sum() for g, x in pairs)
                hv = torch.autograd.grad(gv, self.params, allow_unused=True)
            for acc, h in zip(out, hv):
                if h is not None:
                    acc.add_(h, alpha=1 / len(self.batches))
        return out

    def _gauss_newton_parts(self, i: int, batch: dict, v: list[torch.Tensor]):
        """(z, u, ∂²ℓ/∂z²·u) for u = J·v, J the Jacobian of the logits z: Jv by the double-backward trick (the vjp
        Jᵀw is linear in w, so Jv = ∂(vᵀJᵀw)/∂w)."""
        with _captured_logits(self.model) as seen:
            loss = self._loss(i, batch)
        z = _the_logits(seen)
        w = torch.zeros_like(z, requires_grad=True)
        with _double_backward_hint():
            vjp = torch.autograd.grad(z, self.params, grad_outputs=w, create_graph=True, allow_unused=True)
            s = sum((g * x).sum() for g, x in zip(vjp, v) if g is not None)
            u = torch.autograd.grad(s, w, allow_unused=True)[0] if isinstance(s, torch.Tensor) else None
        u = torch.zeros_like(z) if u is None else u.detach()
        try:
            dz = torch.autograd.grad(loss, z, create_graph=True)[0]
        except RuntimeError as e:
            raise ValueError("The Gauss-Newton curvature needs a loss computed from the model's logits (the "
                             f"`logits` of the model's output), but this loss does not use them ({e}). Use "
                             "curvature='hessian'.") from e
        hu = torch.autograd.grad(dz, z, grad_outputs=u, retain_graph=True, allow_unused=True)[0]
        return z, u, (torch.zeros_like(z) if hu is None else hu)

    def gnvp(self, v: list[torch.Tensor]) -> list[torch.Tensor]:
        """G·v = Jᵀ·∂²ℓ/∂z²·J·v."""
        out = [torch.zeros_like(p) for p in self.params]
        for i, batch in enumerate(self.batches):
            z, _, hu = self._gauss_newton_parts(i, batch, v)
            for acc, g in zip(out, torch.autograd.grad(z, self.params, grad_outputs=hu, allow_unused=True)):
                if g is not None:
                    acc.add_(g, alpha=1 / len(self.batches))
        return out

    def quadratic(self, d: list[torch.Tensor], curvature: str) -> float:
        """dᵀHd or dᵀGd (mean over the batches)."""
        if curvature == "hessian":
            return _dot(d, self.hvp(d))
        total = 0.0
        for i, batch in enumerate(self.batches):
            _, u, hu = self._gauss_newton_parts(i, batch, d)
            total += float((u.double() * hu.double()).sum()) / len(self.batches)
        return total


@contextmanager
def _captured_logits(model):
    seen = []
    handle = model.register_forward_hook(lambda module, args, out: seen.append(getattr(out, "logits", None)))
    try:
        yield seen
    finally:
        handle.remove()


def _the_logits(seen: list) -> torch.Tensor:
    logits = [z for z in seen if isinstance(z, torch.Tensor) and z.requires_grad]
    if len(logits) != 1:
        raise ValueError(f"The Gauss-Newton curvature needs the logits of exactly one forward pass of the model per "
                         f"batch (an output with `logits`); loss_fn made {len(seen)} call(s) with {len(logits)} "
                         "differentiable logits. Use curvature='hessian', or a loss_fn that calls the model once.")
    return logits[0]


@contextmanager
def _double_backward_hint():
    try:
        yield
    except RuntimeError as e:
        if "derivative for" in str(e) and "not implemented" in str(e):
            raise ValueError(f"An operation of this model has no double backward ({e}); curvature needs one. Load "
                             "the model with attn_implementation='eager' (suggest_lr switches HF models itself; this "
                             "model has no set_attn_implementation), or use rule='range_test'.") from e
        raise


# -- leaving the model as it was ---------------------------------------------------------------------------------
def _outermost_hf_models(model) -> list:
    tops, prefixes = [], []
    for name, module in model.named_modules():
        if hasattr(module, "set_attn_implementation") and getattr(module, "config", None) is not None:
            if not any(name == p or name.startswith(p + ".") for p in prefixes):
                tops.append(module)
                prefixes.append(name)
    return tops


def _attention_configs(model) -> list:
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            configs[id(config)] = config
            for key in getattr(config, "sub_configs", None) or {}:
                sub = getattr(config, key, None)
                if sub is not None and hasattr(sub, "_attn_implementation"):
                    configs[id(sub)] = sub
    return list(configs.values())


def _set_attention(config, value) -> None:
    # the internal attribute is the exact stored value (transformers 4.x and 5.x); 5.x's property setter would
    # also overwrite the sub-configs
    if hasattr(config, "_attn_implementation_internal"):
        config._attn_implementation_internal = value
    else:
        config._attn_implementation = value


@contextmanager
def _probing(model, eager: bool):
    """Eval mode (and eager attention for double backward) while a rule runs; afterwards every training flag,
    attention implementation, requires_grad, trainable value and .grad as it was."""
    training = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    grads = [(p, p.grad, p.requires_grad) for p in params]
    values = [(p, p.detach().clone()) for p in params if p.requires_grad]
    configs = [(c, c._attn_implementation) for c in _attention_configs(model)] if eager else []
    try:
        model.eval()
        if eager:
            for top in _outermost_hf_models(model):
                if top.config._attn_implementation != "eager":
                    top.set_attn_implementation("eager")
            for config, _ in configs:  # a model without set_attn_implementation (older transformers)
                if config._attn_implementation not in ("eager", None):
                    _set_attention(config, "eager")
        with torch.enable_grad():
            yield
    finally:
        for config, value in configs:
            _set_attention(config, value)
        for module, flag in training:
            module.training = flag
        with torch.no_grad():
            for p, value in values:
                p.copy_(value)
        for p, grad, requires in grads:
            p.grad = grad
            p.requires_grad_(requires)


# -- the rules ---------------------------------------------------------------------------------------------------
def _adam_direction(g: list[torch.Tensor], optimizer: str, eps: float) -> list[torch.Tensor]:
    """Adam's first bias-corrected step per unit rate, m̂/(√v̂ + eps) = g/(|g| + eps) (schedule-free AdamW's too: its
    first step moves z, and so y, by the same); SGD's is g."""
    return [x / (x.abs() + eps) for x in g] if optimizer in ADAM_LIKE else g


def _first_step(probe: _Probe, optimizer: str, eps: float) -> tuple[list[torch.Tensor], list[torch.Tensor], float,
                                                                    dict]:
    """The gradient g, the optimiser's first update per unit rate d, gᵀd (the first-order loss decrease per unit
    rate) and the evidence they share (loss, |g|, gᵀd, eps)."""
    loss, g = probe.gradient()
    d = _adam_direction(g, optimizer, eps)
    gd = _dot(g, d)
    if not gd > 0:
        raise ValueError("The gradient is zero on these batches, so the first step goes nowhere and has no rate to "
                         "choose: check that the loss depends on the trainable parameters.")
    return g, d, gd, {"loss": loss, "grad_norm": math.sqrt(_dot(g, g)), "g_dot_d": gd, "eps": eps}


def _polyak(probe: _Probe, optimizer: str, seed: int, *, eps: float = 1e-8, floor: float = 0.0,
            c: float = POLYAK_C) -> tuple[float, dict]:
    _, d, gd, ev = _first_step(probe, optimizer, eps)
    if not ev["loss"] > floor:
        raise ValueError(f"The mean loss on these batches ({ev['loss']:.4g}) is not above floor={floor}: Polyak's "
                         "step has nothing left to descend. Give a floor below the loss (the loss's least value; "
                         "0 for cross-entropy), or use rule='adam_step'.")
    ev.update(floor=floor, c=c, eta_polyak=(ev["loss"] - floor) / gd)
    return c * ev["eta_polyak"], ev


def _reference_layers(model) -> list[tuple[str, torch.nn.Module, str]]:
    """(name, LoRA layer, adapter) for every active adapter of every PEFT LoRA layer; ValueError for a layer kind
    whose default-LoRA reference is not defined here (embeddings, convolutions)."""
    from peft.tuners.lora import LoraLayer

    found, other = [], []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            if adapter in getattr(module, "lora_embedding_A", {}) or (
                    adapter in module.lora_A and not isinstance(module.lora_A[adapter], torch.nn.Linear)):
                other.append(f"{name} ({type(module).__name__})")
            elif adapter in module.lora_A:
                found.append((name, module, adapter))
    if other:
        raise ValueError(f"rule='anchored' compares with a default LoRA of linear layers, but {len(other)} LoRA "
                         f"layer(s) are not linear ({other[:3]}...). Use rule='polyak'.")
    if not found:
        raise ValueError("rule='anchored' compares the model's adapters with a default PEFT LoRA on the same layers, "
                         "but the model has no active PEFT LoRA layer. Use rule='polyak' for other trainable "
                         "parameters.")
    return found


def _reference_a(layers: list, seed: int) -> dict[str, torch.Tensor]:
    """The reference LoRA's A per "layer/adapter": PEFT's default draw (torch's kaiming_uniform_ with a = √5, i.e.
    uniform on ±1/√in), float32 on the layer's device, from one generator seeded with `seed`, layer by layer in
    module order."""
    gen, out = torch.Generator().manual_seed(seed), {}
    for name, module, adapter in layers:
        a = torch.empty(module.r[adapter], module.in_features, dtype=torch.float64)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        out[f"{name}/{adapter}"] = a.to(device=module.lora_A[adapter].weight.device, dtype=torch.float32)
    return out


@contextmanager
def _reference_gradients(model, seed: int, alpha: float):
    """While active, every forward and backward through a LoRA layer adds to `acc[name]` the gradient that a default
    PEFT LoRA B (zero, with A drawn as PEFT draws it: uniform on ±1/√in, rsLoRA scaling alpha/√r) would get at this
    point: s·Σ_tokens dy ⊗ (A·x), with x the layer's input and dy the gradient of its output. Nothing of the model
    changes; A is drawn from a generator seeded with `seed` (the same draw for the same seed and layers)."""
    layers = _reference_layers(model)
    draws = _reference_a(layers, seed)
    acc, handles = {}, []

    def hook(key, a, scale):
        def forward(module, args, kwargs, out):
            if not (isinstance(out, torch.Tensor) and out.requires_grad):
                return
            x = args[0] if args else kwargs["x"]
            z = x.detach().reshape(-1, a.shape[1]).to(a) @ a.T  # (tokens, r): A·x

            def backward(dy):
                part = scale * dy.detach().reshape(-1, dy.shape[-1]).to(z).T @ z  # (out, r)
                acc[key] = part if key not in acc else acc[key] + part
            out.register_hook(backward)
        return forward

    for name, module, adapter in layers:
        key = f"{name}/{adapter}"
        handles.append(module.register_forward_hook(hook(key, draws[key], alpha / math.sqrt(module.r[adapter])),
                                                    with_kwargs=True))
    try:
        yield acc, layers
    finally:
        for h in handles:
            h.remove()


def _anchored(probe: _Probe, optimizer: str, seed: int, *, eps: float = 1e-8, alpha: float = ANCHOR_ALPHA,
              c: float | None = None) -> tuple[float, dict]:
    if c is None:  # default LoRA's rate with this optimiser
        c = SCHEDULE_FREE_C if optimizer == "schedulefree" else ANCHORED_C
    if not alpha > 0:
        raise ValueError(f"anchored's alpha (the reference LoRA's lora_alpha) must be positive, got {alpha}")
    with _reference_gradients(probe.model, seed, alpha) as (acc, layers):
        g, d, gd, ev = _first_step(probe, optimizer, eps)
    n = len(probe.batches)
    ref = [x / n for x in acc.values()]  # the gradient is the mean over the batches, so is the reference's
    adapter_params = {id(p) for _, module, _ in layers for name, p in module.named_parameters()
                      if not name.startswith("base_layer")}
    others = [(g, x) for g, x, p in zip(g, d, probe.params) if id(p) not in adapter_params]
    other_gd = _dot([g for g, _ in others], [x for _, x in others])
    ref_gd = _dot(ref, _adam_direction(ref, optimizer, eps)) + other_gd
    if not ref_gd > 0:
        raise ValueError("The default-LoRA reference's gradient is zero on these batches (the LoRA layers' outputs "
                         "get no gradient): check that the loss depends on them.")
    ev.update(alpha=alpha, c=c, ref_g_dot_d=ref_gd, other_g_dot_d=other_gd, ratio=ref_gd / gd)
    return c * ev["ratio"], ev


def _adam_step(probe: _Probe, optimizer: str, seed: int, *, eps: float = 1e-8, curvature: str = "auto",
               c: float = ADAM_STEP_C) -> tuple[float, dict]:
    check_choice("curvature", curvature, ("auto",) + CURVATURES)
    _, d, gd, ev = _first_step(probe, optimizer, eps)
    ev["c"] = c
    if curvature in ("auto", "hessian"):
        ev["dHd"] = probe.quadratic(d, "hessian")
        used = "hessian"
        if not ev["dHd"] > 0:
            if curvature == "hessian":
                raise ValueError(f"dᵀHd = {ev['dHd']:.4g} <= 0 along the first step: the quadratic model has no "
                                 "minimum. Use curvature='gauss_newton' (or 'auto', which falls back to it).")
            ev["fallback"] = f"dᵀHd = {ev['dHd']:.4g} <= 0: the quadratic model along d has no minimum"
            logger.info("adam_step: %s; using the Gauss-Newton curvature dᵀGd", ev["fallback"])
    if curvature == "gauss_newton" or "fallback" in ev:
        ev["dGd"] = probe.quadratic(d, "gauss_newton")
        used = "gauss_newton"
        if not ev["dGd"] > 0:
            raise ValueError(f"dᵀGd = {ev['dGd']:.4g} along the first step: no positive curvature to set a rate by. "
                             "Use rule='range_test'.")
    ev["curvature"] = used
    ev["eta_star"] = gd / ev["dHd" if used == "hessian" else "dGd"]
    return c * ev["eta_star"], ev


def _lambda_max(probe: _Probe, optimizer: str, seed: int, *, curvature: str = "hessian", c: float = LAMBDA_MAX_C,
                steps: int = LANCZOS_STEPS) -> tuple[float, dict]:
    # hessian-eigenthings' Lanczos (full reorthogonalisation, seeded start) on lorafa's own products: the same
    # Hessian- and Gauss-Newton-vector products as adam_step, with their device handling and error messages.
    try:
        from hessian_eigenthings import LambdaOperator, lanczos
    except ImportError as e:
        raise ImportError("rule='lambda_max' needs the hessian-eigenthings package: pip install 'lorafa[curvature]' "
                          "(or pip install 'hessian-eigenthings>=1.0.0a5').") from e

    check_choice("curvature", curvature, CURVATURES)
    check_positive_int("steps", steps)
    product = probe.hvp if curvature == "hessian" else probe.gnvp
    shapes = [p.shape for p in probe.params]
    sizes = [p.numel() for p in probe.params]

    def matvec(v: torch.Tensor) -> torch.Tensor:
        parts = [x.reshape(s) for x, s in zip(torch.split(v, sizes), shapes)]
        return torch.cat([x.reshape(-1) for x in product(parts)])

    loss = probe.mean_loss()
    first = probe.params[0]
    operator = LambdaOperator(matvec, size=probe.size, device=first.device, dtype=first.dtype)
    result = lanczos(operator, k=1, max_iter=min(steps, probe.size), which="LA", seed=seed)
    top = float(result.eigenvalues[0])
    ev = {"loss": loss, "curvature": curvature, "lambda_max": top, "c": c, "lanczos_steps": result.iterations,
          "residual": float(result.residuals[0]), "converged": bool(result.converged[0])}
    if not top > 0:
        raise ValueError(f"The top eigenvalue of the {curvature} is {top:.4g} <= 0: no curvature to set a rate by. "
                         "Use curvature='gauss_newton' or rule='range_test'.")
    return c / top, ev


def _range_test(probe: _Probe, optimizer: str, seed: int, *, lr_min: float = RANGE_GRID[0],
                lr_max: float = RANGE_GRID[1], factor: float = RANGE_GRID[2], steps: int = RANGE_STEPS,
                divisor: float = RANGE_DIVISOR, eps: float = 1e-8, weight_decay: float = 0.0) -> tuple[float, dict]:
    check_positive_int("steps", steps)
    if not (0 < lr_min < lr_max and factor > 1):
        raise ValueError(f"range_test needs 0 < lr_min < lr_max and factor > 1, got lr_min={lr_min}, "
                         f"lr_max={lr_max}, factor={factor}.")
    start = [p.detach().clone() for p in probe.params]
    l0 = probe.mean_loss()
    n = int(math.floor(math.log(lr_max / lr_min) / math.log(factor) + 1e-9)) + 1
    curve = []
    for lr in (lr_min * factor ** k for k in range(n)):
        opt = (torch.optim.AdamW(probe.params, lr=lr, eps=eps, weight_decay=weight_decay) if optimizer == "adamw"
               else torch.optim.SGD(probe.params, lr=lr, weight_decay=weight_decay))
        loss = _steps(probe, opt, steps)
        with torch.no_grad():
            for p, value in zip(probe.params, start):
                p.copy_(value)
            for p in probe.params:
                p.grad = None
        curve.append([lr, loss if math.isfinite(loss) else None])  # None: diverged
        if not loss <= l0:  # diverged, or above the initial loss: larger rates say nothing more
            break
    best_lr, best = min(curve, key=lambda r: math.inf if r[1] is None else r[1])
    ev = {"loss": l0, "curve": curve, "best_lr": best_lr, "best_loss": best, "steps": steps, "divisor": divisor}
    if not best < l0:
        raise ValueError(f"No rate from lr_min={lr_min} up lowered the loss after {steps} steps (from {l0:.4g}): "
                         "lower lr_min.")
    if best_lr == curve[-1][0]:  # the grid ended before any rate did worse than the init
        raise ValueError(f"The loss still fell at lr_max={lr_max} (the grid's edge), so the best rate is not "
                         "bracketed: raise lr_max.")
    if best_lr == curve[0][0]:
        raise ValueError(f"The lowest loss is at lr_min={lr_min} (the grid's edge), so the best rate is not "
                         "bracketed: lower lr_min.")
    return best_lr / divisor, ev


def _steps(probe: _Probe, opt, steps: int) -> float:
    """`steps` full-batch steps (the gradient of the mean loss over the batches), then the mean loss; inf where a
    loss or gradient stops being finite."""
    for _ in range(steps):
        out = probe.gradient(strict=False)
        if out is None:
            return math.inf
        for p, g in zip(probe.params, out[1]):
            p.grad = g
        opt.step()
    loss = probe.mean_loss(strict=False)
    return loss if math.isfinite(loss) else math.inf


# -- the public entry points -------------------------------------------------------------------------------------
def _rule(impl: Callable, needs_double_backward: bool) -> Callable:
    name = impl.__name__.lstrip("_")
    allowed = [p for p in inspect.signature(impl).parameters if p not in ("probe", "optimizer", "seed")]

    def run(model, batches: Iterable[dict], optimizer: str = "adamw", *, seed: int = 0,
            loss_fn: Callable | None = None, max_batches: int = MAX_BATCHES, reference=None,
            **options) -> LrSuggestion:
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise TypeError(f"{name} has no option(s) {unknown}; its options are {allowed}.")
        optimizer = {"adam": "adamw", "schedule_free_adamw": "schedulefree"}.get(optimizer, optimizer)
        check_choice("optimizer", optimizer, OPTIMIZERS)
        if optimizer == "schedulefree" and name != "anchored":
            raise ValueError(f"{name} models AdamW's or SGD's step with a constant fitted for AdamW under a decaying "
                             "schedule; for schedule-free AdamW use rule='anchored' (its c defaults to schedule-free "
                             f"AdamW's own rate, {SCHEDULE_FREE_C}).")
        check_positive_int("max_batches", max_batches)
        for key, value in options.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name}'s option {key} must be finite, got {value}")
        batches = list(itertools.islice(batches, max_batches))
        if not batches:
            raise ValueError("suggest_lr needs at least one batch (HF-style dicts with input_ids, attention_mask and "
                             "labels); got none.")
        t = time.perf_counter()
        with _probing(model, eager=needs_double_backward):
            probe = _Probe(model, batches, loss_fn)
            lr, evidence = impl(probe, optimizer, seed, **options)
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"{name} gave the rate {lr}, not a positive finite number (evidence: {evidence}).")
        evidence = {"rule": name, "optimizer": optimizer, "lr": lr, **evidence, "n_batches": len(batches),
                    "n_params": probe.size, "dtype": str(probe.params[0].dtype).removeprefix("torch."),
                    "seed": seed, "seconds": round(time.perf_counter() - t, 3)}
        if reference is not None:  # the reference's known rate, times this model's number over the reference's
            ref, ref_lr = _check_reference(reference, evidence)
            lr = ref_lr * lr / ref.lr
            evidence.update(lr=lr, reference={"lr": ref_lr, "suggested": ref.lr, "n_params": ref.evidence.get(
                "n_params"), "ratio": lr / ref_lr})
        if world()[1] > 1:  # every process trains at one rate: the main process's (round-off cannot split them)
            lr, evidence = all_gather_objects((lr, evidence))[0]
        logger.info("suggest_lr: %s gives %.3g (%.1f s)", name, lr, evidence["seconds"])
        return LrSuggestion(lr=lr, evidence=evidence)

    run.__name__ = run.__qualname__ = name
    run.options = tuple(allowed)  # the rule's own options (besides max_batches)
    run.__doc__ = (f"`suggest_lr(model, batches, optimizer, rule={name!r}, ...)`: the rule on its own, with the same "
                   f"arguments; its options are {allowed}. Returns an LrSuggestion.")
    return run


REFERENCE_KEYS = ("rule", "optimizer", "c", "divisor", "floor", "eps", "curvature", "alpha")  # must match the reference's


def _check_reference(reference, evidence: dict) -> tuple[LrSuggestion, float]:
    """(the reference's LrSuggestion, its known rate), checked: the same rule, optimiser and constants, so the
    constant cancels in the ratio."""
    if not (isinstance(reference, (tuple, list)) and len(reference) == 2 and isinstance(reference[0], LrSuggestion)):
        raise TypeError("reference must be a pair (LrSuggestion of the reference model, the rate that model trains "
                        f"well at), got {reference!r}")
    ref, ref_lr = reference
    if isinstance(ref_lr, bool) or not isinstance(ref_lr, (int, float)) or not (math.isfinite(ref_lr) and ref_lr > 0):
        raise ValueError(f"reference's rate must be a positive number, got {ref_lr!r}")
    differ = {k: (evidence.get(k), ref.evidence.get(k)) for k in REFERENCE_KEYS
              if evidence.get(k) != ref.evidence.get(k)}
    if differ:
        raise ValueError(f"The reference was suggested with other settings ({differ}, as (here, reference)): suggest "
                         "both with the same rule, optimizer and options, so the ratio compares like with like.")
    return ref, float(ref_lr)


polyak = _rule(_polyak, needs_double_backward=False)
anchored = _rule(_anchored, needs_double_backward=False)
adam_step = _rule(_adam_step, needs_double_backward=True)
lambda_max = _rule(_lambda_max, needs_double_backward=True)
range_test = _rule(_range_test, needs_double_backward=False)
RULES: dict[str, Callable[..., LrSuggestion]] = {"polyak": polyak, "anchored": anchored, "adam_step": adam_step,
                                                  "lambda_max": lambda_max, "range_test": range_test}


def suggest_lr(model, batches: Iterable[dict], optimizer: str = "adamw", *, rule: str = DEFAULT_RULE, seed: int = 0,
               loss_fn: Callable | None = None, reference=None, **options) -> LrSuggestion:
    """A learning rate for training `model`'s trainable parameters, from the loss's response on `batches`.

    Works on any PEFT LoRA model after any init (lorafa's `initialize`, PEFT's `get_peft_model`, PEFT's LoRA-GA): the
    trainable parameters are those with requires_grad. The result depends only on the model, the batches, the
    options and `seed`: the same inputs give the same rate and evidence, except `seconds` (on a GPU, up to the
    round-off of CUDA's nondeterministic backward kernels unless `torch.use_deterministic_algorithms(True)`). The
    model is left as it was (see the module docstring). Use batches the statistics pass did not see (the runner and
    `initialize_trainer(..., learning_rate="auto")` take the 2 batches after them).

    The rules (`rule=`) and their constants (module-level; anchored's, polyak's and adam_step's are fitted on one preset with
    default LoRA only and held fixed, the others are not fitted):
        "polyak": c·(L − floor)/gᵀd, Polyak's step size along the optimiser's first update d (one
            gradient). Options:
            eps (the optimiser's, 1e-8), floor (the loss's least value, 0), c (POLYAK_C).
        "anchored" (default): c·(gᵀd of a default PEFT LoRA on the same layers at the same point)/(gᵀd) (one gradient;
            the reference's A drawn with `seed`). c is the rate default LoRA trains at. Options: eps (1e-8),
            alpha (the reference's lora_alpha with rsLoRA scaling, ANCHOR_ALPHA = 16), c (ANCHORED_C for AdamW
            and SGD; SCHEDULE_FREE_C, schedule-free AdamW's own default rate, for optimizer="schedulefree").
        "adam_step": c·η*, η* = gᵀd / dᵀHd along the optimiser's first update d (Adam: g/(|g| + eps);
            SGD: g); dᵀHd ≤ 0 falls back to the Gauss-Newton dᵀGd (recorded). Options: eps (the optimiser's,
            1e-8), curvature ("auto" | "hessian" | "gauss_newton"), c (ADAM_STEP_C).
        "lambda_max": c / λ_max of H (or G) by Lanczos. Options: curvature ("hessian" | "gauss_newton"), c
            (LAMBDA_MAX_C = 1), steps (LANCZOS_STEPS = 20 products on every batch).
        "range_test": the rate with the lowest mean loss after `steps` optimiser steps from the init (each rate from
            the init again), over rates lr_min·factor^k up to lr_max (stopping at the first that ends above the
            initial loss), divided by `divisor`. Options: lr_min, lr_max, factor (RANGE_GRID = 1e-6, 1, 2), steps
            (RANGE_STEPS = 3), divisor (RANGE_DIVISOR = 10), eps, weight_decay (0).

    Args:
        model: a PEFT model (or any torch module) whose trainable parameters are to be trained.
        batches: HF-style dicts (input_ids, attention_mask, labels); the first `max_batches` (default 2) are used.
        optimizer: "adamw" (also "adam"), "sgd", or "schedulefree" (schedule-free AdamW, `schedulefree`'s
            AdamWScheduleFree; also "schedule_free_adamw"; rule "anchored" only): whose first step the rule models.
        rule: "anchored" (default) | "polyak" | "adam_step" | "lambda_max" | "range_test" (see RULES).
        seed: the seed of any random choice (lambda_max's Lanczos start vector, anchored's reference A).
        loss_fn: `loss_fn(model, batch) -> scalar tensor`; default `model(**batch).loss`.
        reference: a pair (LrSuggestion of a reference model, the rate it trains well at): the rate returned is that
            rate × (this model's number / the reference's), the rule's constant cancelling. E.g. your usual rate for
            plain PEFT LoRA, carried over to another init: suggest on a default-LoRA model of the same base and
            data, then pass (that suggestion, your LoRA rate) here. The reference must come from the same rule,
            optimiser and options (else ValueError). The evidence keeps the reference's numbers and the ratio.
        **options: max_batches, and the rule's options above.

    Under torch.distributed every process calls it (on the same batches) and every process gets the main
    process's suggestion.

    Returns:
        An LrSuggestion: `.lr` and `.evidence` (a dict: the rule, the optimiser, the mean loss at the init, the
        rule's numbers, the constant, the batches and trainable parameters counted, the dtype, the seed, seconds).

    Raises:
        ValueError: no trainable parameters, no batches, a non-finite loss or gradient, a zero gradient, a loss not
            above polyak's floor, no positive curvature, an unbracketed range test, anchored on a model without
            PEFT LoRA layers (or with non-linear ones), an unknown rule, optimiser or option value.
        TypeError: an option the rule does not have, a batch that is not a dict, a loss_fn that returns no scalar,
            a reference that is not a (LrSuggestion, rate) pair.
    """
    check_choice("rule", rule, tuple(RULES))
    return RULES[rule](model, batches, optimizer, seed=seed, loss_fn=loss_fn, reference=reference, **options)
