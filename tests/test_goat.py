"""GOAT as a PEFT LoRA variant (SPEC §9, `lorafa.goat`) on tiny models built from configs."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import batch_logits, lora_cfg, make_batches, tiny_gpt2, tiny_llama
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from lorafa.goat import (GOAT_FILE, GoatAuxTerm, GoatLinearVariant, GoatOptions, apply_goat, goat_aux_loss,
                         goat_factors, goat_layers, goat_scale, load_goat, save_goat)

TARGETS = ["q_proj", "v_proj"]


def goat_model(r=4, E=2, top_k=2, residual="routed", seed=0, dtype=torch.float32, **kw):
    pm = get_peft_model(tiny_llama(dtype=dtype), lora_cfg(TARGETS, r=r, alpha=2 * r), autocast_adapter_dtype=False)
    opts = GoatOptions(num_experts=E, top_k=top_k, residual=residual, **kw)
    apply_goat(pm, "default", None, opts, seed=seed)
    return pm, opts


def layer(pm, i=0, name="q_proj"):
    return getattr(pm.base_model.model.model.layers[i].self_attn, name)


def perturb(pm, seed=3, size=0.05):
    """Move every trainable GOAT tensor (experts and routers) away from its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(size * torch.randn(p.shape, generator=g).to(p.dtype))


def gates_by_hand(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Routing weights of one token: softmax, keep the k largest, renormalise."""
    p = torch.softmax(logits.double(), -1)
    keep = sorted(range(len(p)), key=lambda i: -float(p[i]))[:k]
    w = torch.zeros_like(p)
    w[keep] = p[keep] / p[keep].sum()
    return w


def reference(mod, x: torch.Tensor) -> torch.Tensor:
    """The GOAT layer's output, token by token, in fp64, from the formulas of lorafa.goat's docstring."""
    cfg = mod.lora_goat_config["default"]
    opts, s, E = cfg["options"], cfg["scale"], cfg["options"].num_experts
    W = mod.get_base_layer().weight.double()
    A, B = mod.lora_A["default"].weight.double(), mod.lora_B["default"].weight.double()
    A0, B0 = mod.lora_goat_A0["default"].double(), mod.lora_goat_B0["default"].double()
    R, re = mod.lora_router["default"].weight.double(), A.shape[0] // E
    rows = []
    for t in x.reshape(-1, x.shape[-1]).double():
        w = gates_by_hand(R @ t, opts.top_k)
        h = W @ t
        for i in range(E):
            sl = slice(i * re, (i + 1) * re)
            h = h + s * w[i] * (B[:, sl] @ (A[sl] @ t))
            h = h - s * (w[i] if opts.residual == "routed" else 1.0) * (B0[:, sl] @ (A0[sl] @ t))
        rows.append(h)
    return torch.stack(rows).reshape(*x.shape[:-1], -1)


@pytest.fixture(scope="module")
def batches():
    return make_batches(2)


# ------------------------------------------------------------------------------------------------- init
@pytest.mark.parametrize("top_k", [1, 2])
def test_routed_output_unchanged_at_init(top_k, batches):
    ref = batch_logits(tiny_llama(), batches)
    pm, _ = goat_model(top_k=top_k)
    assert len(goat_layers(pm)) == 4
    torch.testing.assert_close(batch_logits(pm, batches), ref, atol=1e-5, rtol=0)


def test_routed_unchanged_at_init_in_bf16(batches):
    ref = batch_logits(tiny_llama(dtype=torch.bfloat16), batches)
    pm, _ = goat_model(dtype=torch.bfloat16)
    assert layer(pm).lora_goat_A0["default"].dtype == torch.bfloat16
    assert torch.equal(batch_logits(pm, batches), ref)  # A·x and A⁰·x are the same computation: exact cancellation


def test_static_residual_is_the_authors_function(batches):
    pm, opts = goat_model(top_k=1, residual="static")
    mod = layer(pm)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = mod(x).double()
        W, R = mod.get_base_layer().weight.double(), mod.lora_router["default"].weight.double()
        s, E = mod.lora_goat_config["default"]["scale"], opts.num_experts
        A, B = mod.lora_A["default"].weight.double(), mod.lora_B["default"].weight.double()
        w = torch.stack([gates_by_hand(R @ t, 1) for t in x.reshape(-1, 32).double()]).reshape(2, 5, E)
        hand = x.double() @ W.T
        for i in range(E):  # at init A = A⁰, B = B⁰: h = W x + s Σ w_i B_iA_i x − s Σ B_iA_i x
            BA = B[:, 2 * i:2 * i + 2] @ A[2 * i:2 * i + 2]
            hand = hand + s * w[..., i:i + 1] * (x.double() @ BA.T) - s * (x.double() @ BA.T)
    torch.testing.assert_close(out, hand, atol=1e-5, rtol=1e-5)
    assert (out - x.double() @ W.T).abs().max() > 1e-3  # with top_k < E the static residual moves the output
    assert (batch_logits(pm, batches) - batch_logits(tiny_llama(), batches)).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["q_proj", "v_proj"])  # 32×32 and 16×32
def test_expert_inits_are_svd_slices(name):
    pm, opts = goat_model(r=4, E=2)
    mod = layer(pm, 1, name)
    W = mod.get_base_layer().weight.double()
    m, n = W.shape
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    s = math.sqrt(3 * n / 2)  # √(3ηn/(r/E)) with η = 1, r/E = 2
    assert mod.lora_goat_config["default"]["scale"] == pytest.approx(s)
    A, B = mod.lora_A["default"].weight.double(), mod.lora_B["default"].weight.double()
    step = min(m, n) // 2
    for i in range(2):
        for j in range(2):
            c, comp = 2 * i + j, i * step + j  # expert i: row c of A, component i·⌊k/E⌋ + j of W
            want = S[comp] / (s * opts.rho) * torch.outer(U[:, comp], Vh[comp])  # sign-free rank-one product
            torch.testing.assert_close(torch.outer(B[:, c], A[c]), want, atol=1e-6, rtol=1e-4)
            assert B[:, c].norm().item() == pytest.approx(A[c].norm().item(), rel=1e-5)  # √S' on both sides
    assert torch.equal(mod.lora_goat_A0["default"], mod.lora_A["default"].weight)
    assert torch.equal(mod.lora_goat_B0["default"], mod.lora_B["default"].weight)


def test_lora_scale_and_seeded_router():
    pm, _ = goat_model(expert_scale="lora")
    assert layer(pm).lora_goat_config["default"]["scale"] == layer(pm).scaling["default"] == 2.0
    assert goat_scale(32, 4, GoatOptions(num_experts=2, eta=2.0), None) == pytest.approx(math.sqrt(3 * 2 * 32 / 2))
    same, other = goat_model(seed=0)[0], goat_model(seed=1)[0]
    router = lambda p: layer(p, 1).lora_router["default"].weight  # noqa: E731
    assert torch.equal(router(pm), router(same)) and not torch.equal(router(pm), router(other))
    assert router(pm).abs().max() <= 1 / math.sqrt(32)  # PyTorch's default Linear init U(−1/√n, 1/√n)


# ------------------------------------------------------------------------------------------------- forward
def test_router_top_k_and_aux_loss_by_hand():
    pm, _ = goat_model(r=4, E=4, top_k=2)
    mod = layer(pm)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.0], [1.0, 0.0, 0.0, 2.0]])
    with torch.no_grad():
        mod.lora_router["default"].weight.zero_()
        mod.lora_router["default"].weight[:, :3] = logits.T  # token t = e_t, so its router logits are row t
        mod.lora_B["default"].weight.add_(0.1)  # so that B_iA_i − B_i⁰A_i⁰ ≠ 0 and the gates show in the output
    x = torch.eye(32)[:3]
    with torch.no_grad():
        out = mod(x)
    p = torch.softmax(logits, -1)
    chosen = [(0, 1), (1, 2), (3, 0)]  # the two largest logits of each token
    f = torch.tensor([2, 2, 1, 1]) / 3  # (token, slot) pairs per expert / tokens
    P = p.mean(0)
    aux = mod.lora_goat_aux["default"]
    assert aux.item() == pytest.approx(4 * float((f * P).sum()), rel=1e-6)
    assert goat_aux_loss(pm).item() == pytest.approx(aux.item())  # the only layer that ran
    s = mod.lora_goat_config["default"]["scale"]
    A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
    A0, B0 = mod.lora_goat_A0["default"], mod.lora_goat_B0["default"]
    for t, (a, b) in enumerate(chosen):
        w = {a: p[t, a] / (p[t, a] + p[t, b]), b: p[t, b] / (p[t, a] + p[t, b])}
        delta = sum(w[i] * (B[:, i] * A[i, t] - B0[:, i] * A0[i, t]) for i in (a, b))  # x = e_t picks column t
        torch.testing.assert_close(out[t], mod.get_base_layer().weight[:, t] + s * delta, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("residual,top_k", [("routed", 2), ("routed", 1), ("static", 2)])
def test_forward_equals_token_loop(residual, top_k):
    pm, _ = goat_model(r=8, E=4, top_k=top_k, residual=residual)
    perturb(pm, size=0.5)
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1))
    for mod in goat_layers(pm).values():
        with torch.no_grad():
            torch.testing.assert_close(mod(x).double(), reference(mod, x), atol=1e-5, rtol=1e-5)


def test_gradients_and_a_step(batches):
    pm, _ = goat_model()
    b = batches[0]
    before = batch_logits(pm, batches)
    pm.train()
    out = pm(**b)
    out.loss.backward(retain_graph=True)
    for mod in goat_layers(pm).values():  # routed residual: the task loss does not see the router at init
        assert torch.count_nonzero(mod.lora_router["default"].weight.grad) == 0
    (1e-3 * goat_aux_loss(pm)).backward()
    for name, p in pm.named_parameters():
        if any(k in name for k in ("lora_A", "lora_B", "lora_router")):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    for mod in goat_layers(pm).values():
        for buf in (mod.lora_goat_A0["default"], mod.lora_goat_B0["default"]):
            assert not buf.requires_grad and buf.grad is None
        assert "lora_goat_A0.default" not in dict(mod.named_parameters())
    torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1).step()
    assert (batch_logits(pm, batches) - before).abs().max() > 1e-4


def test_static_router_gets_task_gradient_at_init(batches):
    pm, _ = goat_model(top_k=1, residual="static")
    pm.train()
    pm(**batches[0]).loss.backward()
    assert layer(pm).lora_router["default"].weight.grad.abs().sum() > 0


def test_aux_loss_through_wrappers_and_term(batches):
    pm, opts = goat_model(E=2, top_k=2)
    with pytest.raises(ValueError, match="forward"):
        goat_aux_loss(pm)
    pm.train()
    pm(**batches[0])

    class Wrapper(nn.Module):  # what DDP / accelerate put around the model
        def __init__(self, module):
            super().__init__()
            self.module = module

    total = goat_aux_loss(pm)
    assert total.item() == pytest.approx(4 * 2.0)  # top_k = E: f_i = 1, Σ P_i = 1, per layer E·1
    for m in (Wrapper(pm), pm.base_model.model, pm.base_model):
        assert torch.equal(goat_aux_loss(m), total)
    assert torch.equal(goat_aux_loss(pm, "default"), total)
    with pytest.raises(ValueError, match="forward"):
        goat_aux_loss(pm, "other")
    term = GoatAuxTerm(opts.aux_loss_weight)
    assert term.name == "goat_aux" and term.weight(7) == 1e-3
    assert term(Wrapper(pm), batches[0], None, 0).requires_grad
    copy.deepcopy(pm)  # the recorded losses are non-leaf tensors, which torch cannot deepcopy: they are dropped
    with torch.no_grad():
        pm(**batches[0])
    with pytest.raises(ValueError, match="no gradient"):
        term(pm, batches[0], None, 0)


# ------------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("residual", ["routed", "static"])
def test_save_load_round_trip(residual, batches, tmp_path):
    pm, opts = goat_model(E=2, top_k=1, residual=residual)
    perturb(pm)
    ref = batch_logits(pm, batches)
    pm.save_pretrained(tmp_path)
    assert save_goat(pm, tmp_path) == str(tmp_path / GOAT_FILE)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    for name in goat_layers(pm):
        for k in ("lora_A.weight", "lora_B.weight", "lora_router.weight", "lora_goat_A0", "lora_goat_B0"):
            assert f"base_model.model.{name}.{k}" in keys
    meta = json.loads((tmp_path / GOAT_FILE).read_text())
    assert meta["format_version"] == 1 and GoatOptions(**meta["options"]) == opts
    assert set(meta["layers"]) == set(goat_layers(pm)) and not list(tmp_path.glob(".tmp*"))
    loaded = load_goat(tiny_llama(), tmp_path)
    assert torch.equal(batch_logits(loaded, batches), ref)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    trainable = load_goat(tiny_llama(), tmp_path, is_trainable=True)
    assert layer(trainable).lora_router["default"].weight.requires_grad and trainable.training
    assert torch.equal(layer(trainable).lora_goat_A0["default"], layer(pm).lora_goat_A0["default"])
    renamed = load_goat(tiny_llama(), tmp_path, adapter_name="other")
    assert torch.equal(batch_logits(renamed, batches), ref)


def test_load_errors(tmp_path):
    pm, _ = goat_model()
    with pytest.raises(ValueError, match="no adapter_config.json"):
        load_goat(tiny_llama(), tmp_path)
    pm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a GOAT adapter"):
        load_goat(tiny_llama(), tmp_path)
    save_goat(pm, tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    del weights["base_model.model.model.layers.0.self_attn.q_proj.lora_router.weight"]
    save_file(weights, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="missing.*lora_router"):
        load_goat(tiny_llama(), tmp_path)


def test_merge_is_refused():
    pm, _ = goat_model()
    assert not layer(pm).lora_variant["default"].supports_lora_conversion()
    for merge in (lambda: pm.merge_adapter(), lambda: pm.merge_and_unload(safe_merge=True)):
        with pytest.raises(ValueError, match="input-dependent"):
            merge()
    with pytest.raises(ValueError, match="apply_goat"):
        GoatLinearVariant.init(layer(pm), "default")


# ------------------------------------------------------------------------------------------------- bad input
def test_bad_options_and_ranks():
    with pytest.raises(ValueError, match="divisible by num_experts"):
        goat_model(r=6, E=4)
    with pytest.raises(ValueError, match="top_k"):
        GoatOptions(num_experts=2, top_k=3)
    for bad in ({"rho": 0}, {"eta": -1}, {"aux_loss_weight": -1}, {"expert_scale": "x"}, {"residual": "x"},
                {"num_experts": 0}):
        with pytest.raises(ValueError, match="GoatOptions"):
            GoatOptions(**bad)
    with pytest.raises(ValueError, match="overlap or exceed"):
        GoatOptions(num_experts=2).check(rank=32, m=16, n=32)  # r/E = 16 > ⌊16/2⌋
    with pytest.raises(ValueError, match="overlap or exceed"):
        goat_factors(torch.randn(16, 32), 32, GoatOptions(num_experts=2), 1.0)
    pm = get_peft_model(tiny_llama(), lora_cfg(TARGETS, r=4))
    with pytest.raises(ValueError, match="missing for"):
        apply_goat(pm, "default", {"model.layers.0.self_attn.q_proj": None}, GoatOptions(num_experts=2))


def test_unsupported_layers():
    gpt2 = get_peft_model(tiny_gpt2(), lora_cfg(["c_attn"], r=4))  # Conv1D, fan_in_fan_out
    with pytest.raises(ValueError, match="nn.Linear.*Conv1D"):
        apply_goat(gpt2, "default", None, GoatOptions(num_experts=2))
    dora = get_peft_model(tiny_llama(), lora_cfg(TARGETS, r=4, use_dora=True))
    with pytest.raises(ValueError, match="DoraLinearVariant"):
        apply_goat(dora, "default", None, GoatOptions(num_experts=2))


@pytest.mark.parametrize("model, lcfg, phrase", [
    (tiny_gpt2, lambda: lora_cfg(["c_attn"], r=8), r"GOAT supports nn.Linear layers .* is a Conv1D .* leave it out"),
    (tiny_llama, lambda: lora_cfg(TARGETS, r=8, lora_bias=True), r"GOAT needs LoRA without a bias"),
])
def test_initialize_refuses_what_goat_cannot_run_before_wrapping_the_model(model, lcfg, phrase):
    """apply_goat's own refusals (Conv1D, a LoRA bias) come after get_peft_model has wrapped the model in place;
    initialize checks them first, so the caller's model is left as it was."""
    from lorafa import InitConfig, initialize

    base = model()
    with pytest.raises(ValueError, match=phrase):
        initialize(base, lcfg(), InitConfig(method="goat", num_experts=2), progress=False)
    assert not hasattr(base, "peft_config") and not any("lora" in n for n, _ in base.named_modules())
