"""KaSA (PEFT's variant) and GOAT (lorafa.goat) through lorafa's initialize / save_adapter, and their loss terms."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.config import KasaConfig

import lorafa
from lorafa import InitConfig
from lorafa.kasa import KasaTerm, kasa_loss

from conftest import batch_logits, lora_cfg, make_batches, tiny_llama

TARGETS = ["q_proj", "v_proj"]


def _layers(model) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _kasa(r=2, **options):
    base = tiny_llama()
    original = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith(tuple(TARGETS))}
    pm = lorafa.initialize(base, lora_cfg(TARGETS, r=r, alpha=2 * r), InitConfig(method="kasa", **options))
    return pm, original


# ----------------------------------------------------------------------------------------------------------- KaSA
def test_kasa_truncates_the_base_and_forward_is_the_hand_formula():
    pm, original = _kasa(r=2)
    layer = _layers(pm)["base_model.model.model.layers.0.self_attn.q_proj"]
    W0 = original["model.layers.0.self_attn.q_proj"].double()
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    k = S.numel()
    truncated = (U[:, : k - 2] * S[: k - 2]) @ Vh[: k - 2]  # the r = 2 smallest pairs dropped
    W = layer.get_base_layer().weight.detach().double()
    torch.testing.assert_close(W, truncated, atol=1e-5, rtol=0)
    with torch.no_grad():  # a nonzero update, so the diagonal enters the output
        layer.lora_B["default"].weight.normal_()
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    sigma, s = layer.lora_diag["default"].detach(), layer.scaling["default"]
    x = torch.randn(5, layer.in_features)
    expected = x @ W.float().T + s * (x @ A.T * sigma) @ B.T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_kasa_loss_is_the_regulariser_by_hand(tmp_path):
    from transformers import TrainingArguments

    from lorafa.terms import TermsTrainer, method_terms

    pm, _ = _kasa(r=2, kasa_beta=0.3, kasa_gamma=0.7)
    with torch.no_grad():  # B = 0 at init: a trained B, so ‖BᵀB − I‖ depends on it
        for layer in _layers(pm).values():
            layer.lora_B["default"].weight.normal_()
            layer.lora_diag["default"].normal_()
    expected = 0.0
    for layer in _layers(pm).values():  # in float64, from the factors
        A, B = layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double()
        sigma, eye = layer.lora_diag["default"].detach().double(), torch.eye(2, dtype=torch.float64)
        expected += (0.3 * (sigma ** 2).sum() + 0.7 * (torch.linalg.norm(B.T @ B - eye)
                                                      + torch.linalg.norm(A @ A.T - eye))).item()
    assert len(_layers(pm)) == 4
    value = kasa_loss(pm)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    # the term the runner adds for method="kasa": weight 1, value the regulariser
    (term,) = method_terms(InitConfig(method="kasa", kasa_beta=0.3, kasa_gamma=0.7))
    assert isinstance(term, KasaTerm) and term.weight(0) == 1.0 and term.weight(1000) == 1.0
    assert term(pm, None, None, 0).item() == pytest.approx(expected, rel=1e-6)
    # and in training: the loss is the task loss plus the regulariser
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no")
    trainer = TermsTrainer(model=pm, args=args, terms=[term])
    batch = make_batches(1, bsz=2)[0]
    pm.train()
    with torch.no_grad():
        total = trainer.compute_loss(pm, dict(batch))
        task = pm(**batch).loss
    assert total.item() == pytest.approx(task.item() + expected, rel=1e-6)
    value.backward()  # the regulariser trains σ, A and B
    layer = next(iter(_layers(pm).values()))
    assert layer.lora_diag["default"].grad.abs().sum() > 0 and layer.lora_A["default"].weight.grad.abs().sum() > 0


def test_kasa_adapter_loads_on_the_original_base(tmp_path):
    pm, _ = _kasa(r=2)
    with torch.no_grad():
        for layer in _layers(pm).values():
            layer.lora_B["default"].weight.normal_(std=0.1)
    batches = make_batches(2)
    trained = batch_logits(pm, batches)
    path = lorafa.save_adapter(pm, tmp_path / "kasa")
    meta = json.load(open(os.path.join(path, "lorafa_init.json")))
    assert "truncat" in meta["base_truncated"] and meta["converted_to_original_base"] is False
    assert json.load(open(os.path.join(path, "adapter_config.json")))["kasa_config"]["beta"] == 1e-4
    loaded = PeftModel.from_pretrained(tiny_llama(), path)  # stock PEFT on the pristine base
    torch.testing.assert_close(batch_logits(loaded, batches), trained, atol=1e-5, rtol=1e-5)


def test_kasa_errors():
    with pytest.raises(ValueError, match="cannot share a layer"):
        lorafa.initialize(tiny_llama(), lora_cfg(TARGETS, kasa_config=KasaConfig()), InitConfig(method="pissa"))
    with pytest.raises(ValueError, match="method='kasa'"):
        lorafa.initialize(tiny_llama(), lora_cfg(TARGETS, kasa_config=KasaConfig()), InitConfig(method="lora"))
    with pytest.raises(ValueError, match="offset"):
        InitConfig(method="kasa", offset="subtract")
    with pytest.raises(ValueError, match="r < min"):
        lorafa.initialize(tiny_llama(), lora_cfg(["k_proj"], r=16, alpha=16), InitConfig(method="kasa"))
    with pytest.raises(ValueError, match="kasa_beta"):
        InitConfig(method="kasa", kasa_beta=-1.0)
    with pytest.raises(ValueError, match="no KaSA layer"):
        kasa_loss(lorafa.initialize(tiny_llama(), lora_cfg(TARGETS), InitConfig(method="lora")))


# ----------------------------------------------------------------------------------------------------------- GOAT
def test_goat_through_initialize_keeps_the_output_and_round_trips(tmp_path):
    from lorafa.goat import goat_layers, load_goat

    batches = make_batches(2)
    base = batch_logits(tiny_llama(), batches)
    pm = lorafa.initialize(tiny_llama(), lora_cfg(TARGETS, r=4, alpha=8), InitConfig(method="goat", num_experts=2))
    assert len(goat_layers(pm)) == 4
    torch.testing.assert_close(batch_logits(pm, batches), base, atol=1e-5, rtol=0)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    trained = batch_logits(pm, batches)
    path = lorafa.save_adapter(pm, tmp_path / "goat")
    assert "load_goat" in json.load(open(os.path.join(path, "lorafa_init.json")))["load_with"]
    torch.testing.assert_close(batch_logits(load_goat(tiny_llama(), path), batches), trained, atol=1e-6, rtol=0)


def test_goat_errors_before_the_model_changes():
    with pytest.raises(ValueError, match="divisible"):
        lorafa.initialize(tiny_llama(), lora_cfg(TARGETS, r=4, alpha=8), InitConfig(method="goat", num_experts=3))
    with pytest.raises(ValueError, match="top_k"):
        InitConfig(method="goat", num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="offset"):
        InitConfig(method="goat", offset="subtract")
