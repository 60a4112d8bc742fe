"""GOAT (ICML 2025, "Make LoRA Great Again") as a PEFT LoRA variant, SPEC §9: E experts of rank r/E initialised from
SVD slices of W, mixed per token by a top-k softmax router trained with a load-balancing loss.

The base weight is never modified: the offset the authors fold into W (W_res = W − s·Σ_i B_i⁰A_i⁰) is applied in the
forward from frozen copies A⁰, B⁰ saved with the adapter, so the adapter loads on the pristine base:

    residual="routed" (default): h = W x + s·Σ_i w_i(x)·(B_iA_i − B_i⁰A_i⁰) x  (exactly unchanged at init)
    residual="static" (authors): h = W x + s·Σ_i w_i(x)·B_iA_i x − s·Σ_i B_i⁰A_i⁰ x

Stock `PeftModel.from_pretrained` cannot rebuild the router (PEFT has no GOAT variant): it would silently load the
experts as plain LoRA (it reports missing keys, not unexpected ones). Save with `save_pretrained` + `save_goat`, load
with `load_goat`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import load_peft_weights, set_peft_model_state_dict
from torch import nn

from .checks import check_number, check_positive_int
from .fsio import write_json

GOAT_FILE = "goat.json"
FORMAT_VERSION = 1
# the "lora_" prefix matters: PEFT's LoraModel never targets a module whose name contains it, so a router is not
# wrapped itself when another adapter targets "all-linear"
_KEYS = ("lora_A", "lora_B", "lora_router", "lora_goat_A0", "lora_goat_B0")


@dataclass(frozen=True)
class GoatOptions:
    """E experts of rank r/E, top-k routing, singular values ÷ (s·ρ), scale √(3ηn/(r/E)) ("goat") or PEFT's α/r
    ("lora"), the residual of the module docstring, and the load-balancing loss weight."""

    num_experts: int = 8
    top_k: int = 2
    rho: float = 10.0
    eta: float = 1.0
    expert_scale: str = "goat"
    residual: str = "routed"
    aux_loss_weight: float = 1e-3

    def __post_init__(self):
        # numbers: a bool, a string or a non-finite value is refused, never read as 1 or left to fail later
        check_positive_int("GoatOptions: num_experts", self.num_experts)
        check_positive_int("GoatOptions: top_k", self.top_k)
        check_number("GoatOptions: rho (InitConfig's goat_rho)", self.rho, low=0, low_open=True)
        check_number("GoatOptions: eta", self.eta, low=0, low_open=True)
        check_number("GoatOptions: aux_loss_weight", self.aux_loss_weight, low=0)  # 0: no balancing loss
        E, k = self.num_experts, self.top_k
        for ok, what in [(k <= E, f"top_k must be in [1, num_experts={E}] (lower top_k or raise num_experts)"),
                         (self.expert_scale in ("goat", "lora"), "expert_scale must be 'goat' or 'lora'"),
                         (self.residual in ("routed", "static"), "residual must be 'routed' or 'static'")]:
            if not ok:
                raise ValueError(f"GoatOptions: {what}; got {self}")

    def check(self, rank: int, m: int, n: int) -> None:
        """Raises ValueError unless r splits into E experts whose slices fit disjointly in an m×n weight's spectrum."""
        E, k = self.num_experts, min(m, n)
        if rank % E:
            raise ValueError(f"GOAT splits r into E experts of rank r/E: choose r divisible by num_experts "
                             f"(r={rank}, num_experts={E})")
        if rank // E > k // E:
            raise ValueError(f"GOAT's expert i takes singular pairs [i·⌊k/E⌋, i·⌊k/E⌋ + r/E) of a {m}×{n} weight "
                             f"(k={k}): r/E={rank // E} > ⌊k/E⌋={k // E} would overlap or exceed the spectrum. "
                             "Lower r or num_experts.")


def goat_scale(n: int, rank: int, opts: GoatOptions, lora_scaling: float | None = None) -> float:
    """Per-expert scale s: √(3·η·n/(r/E)) for expert_scale="goat", else PEFT's `lora_scaling` (α/r or α/√r).

    Raises:
        ValueError: expert_scale="lora" without lora_scaling.
    """
    if opts.expert_scale == "goat":
        return math.sqrt(3.0 * opts.eta * n / (rank // opts.num_experts))
    if lora_scaling is None:
        raise ValueError("expert_scale='lora' uses the layer's PEFT scaling: pass lora_scaling")
    return float(lora_scaling)


def goat_factors(weight: torch.Tensor, rank: int, opts: GoatOptions, scaling: float):
    """Expert inits from the exact SVD W = U S Vᵀ (m×n, out×in): expert i takes pairs [i·⌊k/E⌋, +r/E) with
    S' = S/(s·ρ), B_i = U·√S', A_i = √S'·Vᵀ, in rows [i·r/E, (i+1)·r/E) of A and the same columns of B.

    fp32 SVD on the weight's device: the slices only pick a starting subspace (exactness at init comes from the frozen
    copies A⁰, B⁰, not from the SVD), and fp64 is slow on most GPUs.

    Returns:
        (A (r×n), B (m×r)), fp32.
    Raises:
        ValueError: see GoatOptions.check.
    """
    m, n = weight.shape
    opts.check(rank, m, n)
    E = opts.num_experts
    U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    idx = (torch.arange(E)[:, None] * (min(m, n) // E) + torch.arange(rank // E)[None, :]).flatten().to(S.device)
    root = (S[idx] / (scaling * opts.rho)).sqrt()
    return root[:, None] * Vh[idx], U[:, idx] * root


def _balance_loss(probs: torch.Tensor, idx: torch.Tensor, E: int) -> torch.Tensor:
    """E·Σ_i f_i·P_i; f_i: (token, slot) pairs sent to expert i per token (no gradient), P_i: mean probability."""
    probs = probs.reshape(-1, E)
    f = F.one_hot(idx.reshape(-1), E).sum(0).to(probs.dtype) / probs.shape[0]
    return E * (f * probs.mean(0)).sum()


class _LastValues(dict):
    """The last forward's aux losses; a deepcopy of the model drops them (torch cannot deepcopy non-leaf tensors)."""

    def __deepcopy__(self, memo):
        return _LastValues()


class GoatLinearVariant(LoraVariant):
    """The GOAT forward on a PEFT `lora.Linear`; installed by `apply_goat`/`load_goat`, not by a LoraConfig flag."""

    def supports_lora_conversion(self) -> bool:
        return False  # the update depends on the input through the router

    @staticmethod
    def init(module: LoraLinear, adapter_name: str, options: GoatOptions | None = None, A=None, B=None,
             scale: float | None = None, router_weight: torch.Tensor | None = None, **kwargs) -> None:
        """Write A, B into lora_A/B, keep frozen copies A⁰, B⁰, add the router n → E (no bias), store options, scale.

        Raises:
            ValueError: called without GOAT's arguments, or A, B of the wrong shape.
        """
        if options is None or A is None or B is None or scale is None:
            raise ValueError("GOAT is installed with lorafa.goat.apply_goat (or load_goat), not by a LoraConfig flag")
        lora_A, lora_B = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        if tuple(A.shape) != tuple(lora_A.shape) or tuple(B.shape) != tuple(lora_B.shape):
            raise ValueError(f"GOAT factors of shapes {tuple(A.shape)}, {tuple(B.shape)} do not fit the layer's "
                             f"lora_A {tuple(lora_A.shape)} / lora_B {tuple(lora_B.shape)}")
        if not hasattr(module, "lora_router"):
            # adapter_layer_names: PEFT sets requires_grad per adapter; other_param_names: PEFT moves the buffers to
            # the base layer's device and drops every entry on delete_adapter; both are saved by being on the layer
            module.lora_router = nn.ModuleDict()
            module.lora_goat_A0, module.lora_goat_B0 = BufferDict(persistent=True), BufferDict(persistent=True)
            module.lora_goat_config, module.lora_goat_aux = {}, _LastValues()
            module.adapter_layer_names = module.adapter_layer_names + ("lora_router",)
            module.other_param_names = module.other_param_names + (
                "lora_goat_A0", "lora_goat_B0", "lora_goat_config", "lora_goat_aux")
        with torch.no_grad():
            lora_A.copy_(A)
            lora_B.copy_(B)
        # copies of the stored values (after the cast to the adapter dtype), so "routed" cancels exactly at init
        module.lora_goat_A0[adapter_name] = lora_A.detach().clone()
        module.lora_goat_B0[adapter_name] = lora_B.detach().clone()
        router = nn.Linear(module.in_features, options.num_experts, bias=False).to(lora_A.device, lora_A.dtype)
        if router_weight is not None:
            router.weight.data.copy_(router_weight)
        module.lora_router[adapter_name] = router.requires_grad_(lora_A.requires_grad)  # as PEFT set the adapter
        module.lora_goat_config[adapter_name] = {"scale": float(scale), "options": options}
        module.lora_goat_aux.pop(adapter_name, None)

    @staticmethod
    def forward(module: LoraLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs):
        """result + the GOAT update of the module docstring; records the layer's load-balancing loss."""
        cfg = module.lora_goat_config[active_adapter]
        opts, s = cfg["options"], cfg["scale"]
        A, B = module.lora_A[active_adapter].weight, module.lora_B[active_adapter].weight
        A0, B0 = module.lora_goat_A0[active_adapter], module.lora_goat_B0[active_adapter]
        # routing in fp32: the top-k choice is sensitive to rounding, and the router's E outputs are cheap
        probs = F.linear(x.float(), module.lora_router[active_adapter].weight.float()).softmax(-1)
        top, idx = probs.topk(opts.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        module.lora_goat_aux[active_adapter] = _balance_loss(probs, idx, opts.num_experts)
        # expert i's r/E coordinates of A·x take its weight: one elementwise product instead of E small matmuls
        gates = gates.to(A.dtype).repeat_interleave(A.shape[0] // opts.num_experts, dim=-1)
        update = F.linear(F.linear(module.lora_dropout[active_adapter](x), A) * gates, B)
        z0 = F.linear(x, A0)  # the residual sees x without dropout, like the base weight it stands for
        update = update - F.linear(z0 * gates if opts.residual == "routed" else z0, B0)
        return result + update * s

    @staticmethod
    def _no_merge(*args, **kwargs):
        raise ValueError("A GOAT adapter cannot be merged: its router makes the update input-dependent, so no single "
                         "weight equals it. Keep the adapter unmerged (load it with lorafa.goat.load_goat).")

    merge_safe = merge_unsafe = unmerge = _no_merge


def _inner(model: nn.Module) -> nn.Module:
    while isinstance(getattr(model, "module", None), nn.Module):  # DDP / accelerate wrappers
        model = model.module
    model = model.base_model if isinstance(model, PeftModel) else model
    return model.model if isinstance(model, BaseTuner) else model


def _target_layers(peft_model: PeftModel, adapter_name: str) -> dict[str, LoraLinear]:
    config = peft_model.peft_config.get(adapter_name)
    if not isinstance(config, LoraConfig):
        raise ValueError(f"GOAT needs a LoRA adapter {adapter_name!r}; the model has {sorted(peft_model.peft_config)}")
    if config.init_lora_weights not in (True, False, "gaussian") or config.lora_bias:
        raise ValueError("GOAT needs the unmodified base and no LoRA bias: init_lora_weights=True, lora_bias=False")
    layers = {}
    for name, module in _inner(peft_model).named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in (*module.lora_A, *module.lora_embedding_A):
            continue
        base = module.get_base_layer()
        if not isinstance(module, LoraLinear) or not isinstance(base, nn.Linear) or module.fan_in_fan_out:
            raise ValueError(f"GOAT supports nn.Linear layers (weight out×in) only; {name} wraps a "
                             f"{type(base).__name__} (fan_in_fan_out={getattr(module, 'fan_in_fan_out', None)}): "
                             "leave it out of target_modules")
        other = module.lora_variant.get(adapter_name)
        if other is not None and not isinstance(other, GoatLinearVariant):
            raise ValueError(f"{name} already runs the LoRA variant {type(other).__name__}; GOAT replaces the LoRA "
                             "forward and cannot be combined with it (turn off use_dora / kasa_config / ...)")
        layers[name] = module
    if not layers:
        raise ValueError(f"Adapter {adapter_name!r} has no LoRA layer to turn into GOAT")
    return layers


def _install(module: LoraLinear, adapter_name: str, options, A, B, scale: float, router_weight=None) -> None:
    module.lora_variant[adapter_name] = GoatLinearVariant()
    GoatLinearVariant.init(module, adapter_name, options=options, A=A, B=B, scale=scale, router_weight=router_weight)


def apply_goat(peft_model: PeftModel, adapter_name: str = "default", factors: dict | None = None,
               options: GoatOptions | None = None, seed: int = 0) -> dict[str, float]:
    """Turn every LoRA layer of `adapter_name` (added with init_lora_weights=True) into a GOAT layer; bases untouched.

    Args:
        factors: {name in peft_model.base_model.model.named_modules(): (A (r×n), B (m×r))} from `goat_factors` with
            the layer's `goat_scale`; None computes them from the base weights. options: default GoatOptions().
        seed: routers start from PyTorch's default Linear init U(−1/√n, 1/√n), drawn layer after layer from
            torch.Generator().manual_seed(seed), so they do not depend on the global RNG.
    Returns:
        {layer name: scale s}.
    Raises:
        ValueError: a non-nn.Linear or fan_in_fan_out layer, another variant, a bad rank, factors for other layers.
    """
    options = options or GoatOptions()
    layers = _target_layers(peft_model, adapter_name)
    if factors is not None and set(factors) != set(layers):
        raise ValueError(f"GOAT factors given for unknown layers {sorted(set(factors) - set(layers))}, missing for "
                         f"{sorted(set(layers) - set(factors))}: give one (A, B) per LoRA layer of the adapter")
    gen, scales = torch.Generator().manual_seed(seed), {}
    for name, module in layers.items():
        r, n, m = module.r[adapter_name], module.in_features, module.out_features
        options.check(r, m, n)
        s = goat_scale(n, r, options, module.scaling[adapter_name])
        A, B = factors[name] if factors is not None else goat_factors(module.get_base_layer().weight, r, options, s)
        router = (torch.rand(options.num_experts, n, generator=gen) * 2 - 1) / math.sqrt(n)
        _install(module, adapter_name, options, A, B, s, router)
        scales[name] = s
    return scales


def goat_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The GOAT layers of a PeftModel, a DDP/accelerate wrapper of it, or its inner model, by module name."""
    return {n: m for n, m in _inner(model).named_modules()
            if any(isinstance(v, GoatLinearVariant) for v in getattr(m, "lora_variant", {}).values())}


def goat_aux_loss(model: nn.Module, adapter_name: str | None = None) -> torch.Tensor:
    """Σ over GOAT layers (their active adapters, or `adapter_name`) of the load-balancing loss E·Σ_i f_i·P_i of the
    last forward that ran the layer's GOAT branch; it carries the gradient to the routers.

    Raises:
        ValueError: no GOAT layer, or none has run a forward yet.
    """
    # active adapters only: an inactive adapter's value is stale, its graph already freed by an earlier backward
    values = [v for m in goat_layers(model).values() for a, v in m.lora_goat_aux.items()
              if a == adapter_name or (adapter_name is None and a in m.active_adapters)]
    if not values:
        raise ValueError("No GOAT layer has run a forward yet (or the model has none): call the model on a batch "
                         "before asking for the GOAT load-balancing loss")
    return torch.stack([v.to(values[0].device) for v in values]).sum()


def save_goat(peft_model: PeftModel, path: str | os.PathLike, adapter_name: str = "default") -> str:
    """Write goat.json (format version, options, per-layer scales, target layers) atomically into `path`, the folder of
    the adapter's adapter_config.json (PEFT's save_pretrained(p) puts a non-default adapter in p/<name>). PEFT's
    `save_pretrained` writes the tensors: experts, routers and A⁰, B⁰.

    Returns:
        The path of goat.json.
    Raises:
        ValueError: the adapter has no GOAT layer.
    """
    layers = {n: m for n, m in goat_layers(peft_model).items() if adapter_name in m.lora_goat_config}
    if not layers:
        raise ValueError(f"Adapter {adapter_name!r} has no GOAT layer: install it with lorafa.goat.apply_goat")
    options = next(iter(layers.values())).lora_goat_config[adapter_name]["options"]  # apply_goat: one per adapter
    out = os.path.join(os.fspath(path), GOAT_FILE)
    write_json(out, {"format": "lorafa-goat", "format_version": FORMAT_VERSION, "options": asdict(options),
                     "layers": {n: {"scale": m.lora_goat_config[adapter_name]["scale"]} for n, m in layers.items()}})
    return out


def load_goat(base_model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
              is_trainable: bool = False) -> PeftModel:
    """Rebuild a GOAT PeftModel on the original base (wrapped in place, as by get_peft_model) from a folder written
    by save_pretrained + save_goat. Stock `PeftModel.from_pretrained` cannot: PEFT has no GOAT variant, it would load
    the experts as plain LoRA without router and residual.

    Args:
        is_trainable: False: inference mode, frozen adapter, model in eval mode.
    Raises:
        ValueError: not a GOAT adapter (no goat.json), an unknown format, other target layers, or a GOAT tensor
            missing from or unexpected in the checkpoint.
    """
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise ValueError(f"{path} holds no PEFT adapter (no adapter_config.json): pass the folder save_pretrained wrote")
    if not os.path.isfile(os.path.join(path, GOAT_FILE)):
        raise ValueError(f"{path} is not a GOAT adapter (no {GOAT_FILE}): save with save_pretrained + "
                         "lorafa.goat.save_goat, or load a plain LoRA adapter with PeftModel.from_pretrained")
    meta_path = os.path.join(path, GOAT_FILE)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{meta_path} is not valid JSON ({err}): the GOAT adapter is damaged (an interrupted copy?); "
                         "save it again with save_adapter (or save_pretrained + lorafa.goat.save_goat)") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} holds {type(meta).__name__}, not the GOAT record save_goat writes: save the "
                         "adapter again with save_adapter")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{GOAT_FILE} has format version {meta.get('format_version')!r}; lorafa reads "
                         f"{FORMAT_VERSION}: load it with the lorafa version that wrote it")
    try:
        options = GoatOptions(**meta["options"])
        scales = {name: float(entry["scale"]) for name, entry in meta["layers"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{meta_path} is not a GOAT record this lorafa can read ({type(err).__name__}: {err}): it "
                         "was edited or damaged; save the adapter again with save_adapter") from None
    config = LoraConfig.from_pretrained(path)
    config.inference_mode = not is_trainable  # a config read back from disk may say True whatever is asked now
    config.init_lora_weights = False  # every adapter tensor comes from the checkpoint
    model = get_peft_model(base_model, config, adapter_name=adapter_name)
    layers = _target_layers(model, adapter_name)
    if set(layers) != set(scales):
        raise ValueError(f"{GOAT_FILE} lists layers {sorted(scales)} but the config targets {sorted(layers)}")
    for name, module in layers.items():
        A, B = (torch.zeros_like(getattr(module, k)[adapter_name].weight) for k in ("lora_A", "lora_B"))
        _install(module, adapter_name, options, A, B, scales[name])  # placeholders until loaded
    loaded = set_peft_model_state_dict(model, load_peft_weights(path), adapter_name=adapter_name)
    wanted = {f"base_model.model.{n}.{k}.{adapter_name}" + (".weight" if k in _KEYS[:3] else "")
              for n in layers for k in _KEYS}
    missing = sorted(wanted & set(loaded.missing_keys))
    if missing or loaded.unexpected_keys:
        raise ValueError(f"{path} does not hold this GOAT adapter: missing {missing}, unexpected "
                         f"{sorted(loaded.unexpected_keys)}")
    return model if is_trainable else model.eval()


class GoatAuxTerm:
    """GOAT's load-balancing loss as a lorafa.terms.TermsTrainer term: weight aux_loss_weight, value goat_aux_loss."""

    name = "goat_aux"

    def __init__(self, aux_loss_weight: float = 1e-3, adapter_name: str | None = None):
        self.aux_loss_weight, self.adapter_name = float(aux_loss_weight), adapter_name

    def weight(self, step: int) -> float:
        return self.aux_loss_weight

    def __call__(self, model, batch, outputs, step) -> torch.Tensor:
        """The summed loss. Raises ValueError when trainable routers would get no gradient from it (a forward without
        autograd, e.g. reentrant gradient checkpointing, records the loss without a graph)."""
        value = goat_aux_loss(model, self.adapter_name)
        trainable = any(p.requires_grad for m in goat_layers(model).values() for p in m.lora_router.parameters())
        if torch.is_grad_enabled() and trainable and not value.requires_grad:
            raise ValueError("GOAT's load-balancing loss has no gradient: the forward ran without autograd (no_grad "
                             "or reentrant checkpointing); use gradient_checkpointing_kwargs={'use_reentrant': False}")
        return value
