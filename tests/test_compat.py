"""The LoRA-GA authors' API and PEFT's preprocess_loraga flow, run through lorafa.compat."""

from __future__ import annotations

import os

import peft
import pytest
import torch
from conftest import make_batches, tiny_gpt2, tiny_llama
from peft import LoraConfig, PeftModel

import lorafa
from lorafa.compat import (LoraGAConfig, LoraGAContext, estimate_gradient, get_peft_model, preprocess_loraga,
                           save_loraga_model_final, save_loraga_model_init)


def _train(model, batches, steps=3, lr=0.5):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for b in batches[:steps]:
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_estimate_gradient_matches_collect_stats():
    batches = make_batches()
    named_grad = estimate_gradient(model=tiny_llama(), dataloader=batches, accelerator=None, quant_flag=False)
    # every linear layer but the output head
    assert "lm_head" not in named_grad and "model.layers.1.mlp.down_proj" in named_grad
    stats = lorafa.collect_stats(tiny_llama(), batches, ["q_proj"], progress=False)
    for name, st in stats.items():
        torch.testing.assert_close(named_grad[name], st.grad)
    offloaded = estimate_gradient(model=tiny_llama(), dataloader=batches, quant_flag=True)
    assert all(g.device.type == "cpu" for g in offloaded.values())
    torch.testing.assert_close(offloaded["model.layers.0.self_attn.q_proj.weight".rsplit(".", 1)[0]],
                               named_grad["model.layers.0.self_attn.q_proj"])


@pytest.mark.parametrize("make_model,targets", [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"])])
def test_authors_readme_flow_round_trip(tmp_path, make_model, targets):
    batches = make_batches()
    model = make_model()
    before = _logits(model, batches[0])
    peft_config = LoraGAConfig(r=4, lora_alpha=8, target_modules=targets, direction="ArB2r", scale="stable",
                               stable_gamma=16)
    named_grad = estimate_gradient(model=model, dataloader=batches, accelerator=None, quant_flag=False)
    with LoraGAContext(model=model, named_grad=named_grad):
        model = get_peft_model(model=model, peft_config=peft_config)
    assert (_logits(model, batches[0]) - before).abs().max() < 1e-5  # offset keeps the function at init
    save_loraga_model_init(model, save_dir=str(tmp_path))
    assert os.path.isfile(tmp_path / "initial_adapter" / "adapter_model.safetensors")
    _train(model, batches)
    trained = _logits(model, batches[0])
    assert (trained - before).abs().max() > 1e-2
    save_loraga_model_final(model, save_dir=str(tmp_path))
    assert not (tmp_path / "initial_adapter").exists()
    loaded = PeftModel.from_pretrained(make_model(), str(tmp_path))
    assert loaded.peft_config["default"].r == 8
    torch.testing.assert_close(_logits(loaded, batches[0]), trained, atol=1e-5, rtol=1e-5)


def test_authors_config_matches_lorafa_lora_ga():
    """The compat path gives exactly lorafa's lora_ga with the same options and gradients."""
    batches = make_batches()
    named_grad = estimate_gradient(model=tiny_llama(), dataloader=batches)
    model = tiny_llama()
    with LoraGAContext(model=model, named_grad=named_grad):
        pm = get_peft_model(model, LoraGAConfig(r=2, lora_alpha=4, target_modules=["q_proj"], scale="gd",
                                                direction="A2rBr"))
    ref = lorafa.initialize(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]),
                            lorafa.InitConfig(method="lora_ga", direction="A2rBr", scale="gd_scale"),
                            batches=batches, progress=False)
    for (k1, v1), (k2, v2) in zip(pm.state_dict().items(), ref.state_dict().items()):
        assert k1 == k2
        torch.testing.assert_close(v1, v2)


def test_authors_api_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="LoraGAContext"):
        get_peft_model(model, LoraGAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="direction"):
        LoraGAConfig(r=2, target_modules=["q_proj"], direction="sideways")
    with pytest.raises(ValueError, match="save_loraga_model_init"):
        save_loraga_model_init(peft.get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])), "x")


def _peft_lora_ga_config(**ga):
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="lora_ga",
                      lora_ga_config=peft.LoraGAConfig(**{"direction": "ArB2r", "scale": "stable", "stable_gamma": 16, **ga}))


def test_peft_flow_matches_lorafa_and_caches(tmp_path):
    batches = make_batches()
    model = tiny_llama()

    def train_step():
        for b in batches:
            model.zero_grad()
            model(**b).loss.backward()

    cache = tmp_path / "grads.safetensors"
    preprocess_loraga(model, _peft_lora_ga_config(), train_step, cache_file=str(cache))
    assert cache.exists() and lorafa.read_stats_config(cache)["source"] == "preprocess_loraga"
    assert all(p.grad is None for p in model.parameters())  # nothing left on the modules
    pm = get_peft_model(model, _peft_lora_ga_config())
    assert pm.peft_config["default"].init_lora_weights is True  # a plain adapter config for stock PEFT
    ref = lorafa.initialize(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                            lorafa.InitConfig(method="lora_ga", direction="ArB2r", scale="stable", stable_gamma=16),
                            batches=batches, progress=False)
    for (k1, v1), (k2, v2) in zip(pm.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(v1, v2, atol=1e-6, rtol=1e-5)

    # a second model reads the cache instead of calling train_step
    def must_not_run():
        raise AssertionError("train_step should not run when the cache exists")

    model2 = tiny_llama()
    preprocess_loraga(model2, _peft_lora_ga_config(), must_not_run, cache_file=str(cache))
    pm2 = get_peft_model(model2, _peft_lora_ga_config())
    for v1, v2 in zip(pm.state_dict().values(), pm2.state_dict().values()):
        torch.testing.assert_close(v1, v2)


def test_peft_flow_paper_scaling_differs_from_peft():
    """SPEC §2.1: both factors scaled by m^{1/4}/√γ (PEFT scales B only, times diag(S))."""
    batches = make_batches()
    model = tiny_llama()
    preprocess_loraga(model, _peft_lora_ga_config(), lambda: [model(**b).loss.backward() for b in batches])
    pm = get_peft_model(model, _peft_lora_ga_config())
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    factor = 32 ** 0.25 / 16 ** 0.5
    torch.testing.assert_close(A.norm(dim=1), torch.full((4,), factor), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(B.norm(dim=0), torch.full((4,), factor), atol=1e-5, rtol=1e-5)


def test_peft_flow_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="lora_ga_config"):
        preprocess_loraga(model, LoraConfig(r=2, target_modules=["q_proj"]), lambda: None)
    with pytest.raises(ValueError, match="preprocess_loraga"):
        get_peft_model(model, _peft_lora_ga_config())
    with pytest.raises(ValueError, match="received no gradient"):
        preprocess_loraga(model, _peft_lora_ga_config(), lambda: None)  # a train_step that never calls backward


def test_plain_configs_pass_through_to_peft():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert isinstance(pm, PeftModel)
    assert lorafa.saving.init_record(pm) is None



# --- issue 8 item 10: every argument of peft.get_peft_model honoured or refused by name ---------------------------

def _preprocessed(dtype=torch.float32, peft_own=False):
    """A tiny llama after lorafa's (or PEFT's own) preprocess_loraga on one batch."""
    model, batch = tiny_llama(dtype=dtype), make_batches()[0]
    (peft.preprocess_loraga if peft_own else preprocess_loraga)(model, _peft_lora_ga_config(),
                                                                lambda: model(**batch).loss.backward())
    return model


def _lora_params(pm, adapter_name="default"):
    return {n: p for n, p in pm.named_parameters() if "lora_" in n and n.endswith(f".{adapter_name}.weight")}


def _no_ga_config():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="lora_ga")


def test_signature_matches_peft_get_peft_model():
    import inspect

    ours, theirs = inspect.signature(get_peft_model).parameters, inspect.signature(peft.get_peft_model).parameters
    assert [(p.name, p.default) for p in ours.values()] == [(p.name, p.default) for p in theirs.values()]
    with pytest.raises(TypeError, match="not_a_peft_argument"):
        get_peft_model(_preprocessed(), _peft_lora_ga_config(), not_a_peft_argument=1)


def test_lora_ga_config_none_raises_clear_error_like_peft():
    with pytest.raises(ValueError, match="lora_ga_config"):  # PEFT's own lora_ga init refuses it too
        peft.get_peft_model(_preprocessed(peft_own=True), _no_ga_config())
    model = _preprocessed()
    with pytest.raises(ValueError, match=r"lora_ga_config=peft\.LoraGAConfig\(\)"):
        get_peft_model(model, _no_ga_config())
    assert not any("lora_" in n for n, _ in model.named_parameters())  # refused before the model was touched
    assert _lora_params(get_peft_model(model, _peft_lora_ga_config()))  # and the gradients are still there


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast", [True, False])
def test_adapter_dtype_matches_peft_and_init_keeps_outputs(dtype, autocast):
    batch = make_batches()[0]
    original = tiny_llama(dtype=dtype)
    before = _logits(original, batch).float()
    theirs = peft.get_peft_model(_preprocessed(dtype, peft_own=True), _peft_lora_ga_config(),
                                 autocast_adapter_dtype=autocast)
    ours = get_peft_model(_preprocessed(dtype), _peft_lora_ga_config(), autocast_adapter_dtype=autocast)
    expected = {n: p.dtype for n, p in _lora_params(theirs).items()}
    assert len(expected) == 8 and {n: p.dtype for n, p in _lora_params(ours).items()} == expected
    assert set(expected.values()) == {torch.float32 if autocast else dtype}
    for name, layer in ours.base_model.model.named_modules():
        if isinstance(layer, peft.tuners.lora.LoraLayer):
            # the offset is W − s·B·A of the factors as stored in the adapter, rounded once to the base dtype
            A, B = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
            offset = (original.get_submodule(name).weight.float() - layer.scaling["default"] * B @ A).to(dtype)
            torch.testing.assert_close(layer.base_layer.weight, offset, rtol=torch.finfo(dtype).eps, atol=0)
    tol = 4 * torch.finfo(dtype).eps * before.abs().max().item() + 1e-6
    assert (_logits(ours, batch).float() - before).abs().max() < tol


def test_authors_config_honours_autocast_adapter_dtype():
    model, batches = tiny_llama(dtype=torch.bfloat16), make_batches()
    named_grad = estimate_gradient(model=tiny_llama(), dataloader=batches[:1])
    with LoraGAContext(model=model, named_grad=named_grad):
        pm = get_peft_model(model, LoraGAConfig(r=2, target_modules=["q_proj"]), autocast_adapter_dtype=False)
    assert {p.dtype for p in _lora_params(pm).values()} == {torch.bfloat16}


@pytest.mark.parametrize("argument", ["mixed", "low_cpu_mem_usage"])
def test_lora_ga_refuses_mixed_and_low_cpu_mem_usage_by_name(argument):
    model = _preprocessed()
    with pytest.raises(ValueError, match=f"{argument}=True"):
        get_peft_model(model, _peft_lora_ga_config(), **{argument: True})
    with LoraGAContext(model=model, named_grad={}), pytest.raises(ValueError, match=f"{argument}=True"):
        get_peft_model(model, LoraGAConfig(r=2, target_modules=["q_proj"]), **{argument: True})
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_lora_ga_honours_revision_and_adapter_name(tmp_path):
    config = _peft_lora_ga_config()
    config.revision = "v0"
    with pytest.warns(UserWarning, match="overwriting with revision v1"):  # PEFT's warning
        pm = get_peft_model(_preprocessed(), config, adapter_name="ga", revision="v1")
    assert config.revision == "v1" and pm.peft_config["ga"].revision == "v1"  # PEFT sets it on the given config
    assert _lora_params(pm, "ga") and not _lora_params(pm, "default")
    save_loraga_model_final(pm, str(tmp_path))
    assert peft.PeftConfig.from_pretrained(str(tmp_path)).revision == "v1"


def test_plain_configs_pass_every_argument_to_peft():
    plain = LoraConfig(r=2, target_modules=["q_proj"])
    assert isinstance(get_peft_model(tiny_llama(), plain, mixed=True), peft.PeftMixedModel)
    meta = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), low_cpu_mem_usage=True)
    assert {p.device.type for p in _lora_params(meta).values()} == {"meta"}
    bf16 = get_peft_model(tiny_llama(dtype=torch.bfloat16), LoraConfig(r=2, target_modules=["q_proj"]),
                          adapter_name="x", autocast_adapter_dtype=False, revision="v2")
    assert {p.dtype for p in _lora_params(bf16, "x").values()} == {torch.bfloat16}
    assert bf16.peft_config["x"].revision == "v2"
