"""Model-level tests of `lorafa.initialize` and `lorafa.save_adapter` (SPEC §0, §2, §3) on tiny models."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import pytest
import torch
from conftest import batch_logits as logits
from conftest import make_batches, tiny_gpt2, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lorafa
from lorafa import InitConfig
from lorafa.methods import METHODS

R = 2
TARGETS = ["q_proj", "v_proj"]
SUBTRACTING = ["pissa", "milora", "lora_ga", "corda"]
ZERO_B = ["lora", "eva"]
NO_OFFSET = ["lora_one", "lora_fa", "extract"]  # real update at init
ALL_METHODS = sorted(m for m, spec in METHODS.items() if spec.variant is None)  # kasa, goat: test_variants.py
ALLOWED_FILES = {"adapter_model.safetensors", "adapter_config.json", "lorafa_init.json", "README.md"}


# ------------------------------------------------------------------------------------------------- helpers
def lora_config(r=R, alpha=None, targets=TARGETS, **kw) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, target_modules=list(targets),
                      lora_dropout=0.0, **kw)


def lora_layers(model) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def short(name: str) -> str:
    """PEFT module name -> name in the base model (strip 'base_model.model.')."""
    return name.removeprefix("base_model.model.")


def snapshot(model) -> dict[str, tuple[torch.Tensor, bool]]:
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def assert_untouched(model, snap) -> None:
    """Weights, dtypes and requires_grad flags as before; no LoRA layer injected; not turned into a PEFT model."""
    now = dict(model.named_parameters())
    assert set(now) == set(snap)
    for n, (t, rg) in snap.items():
        assert now[n].dtype == t.dtype and torch.equal(now[n].detach(), t), f"{n} was modified"
        assert now[n].requires_grad == rg, f"{n}.requires_grad was changed"
    assert not lora_layers(model)
    assert not hasattr(model, "peft_config")
    assert not any("lora_" in n for n, _ in model.named_modules())


def tuned_for(method):
    """extract's fine-tune: the tiny model with every Linear perturbed (the other methods take none)."""
    if InitConfig(method=method).method != "extract":
        return {}
    tuned = tiny_llama()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for m in tuned.modules():
            if isinstance(m, nn.Linear):
                m.weight.add_(0.05 * torch.randn(m.weight.shape, generator=g))
    return {"tuned": tuned}


def init(model, method, batches, cfg=None, **init_kw):
    return lorafa.initialize(model, cfg or lora_config(), InitConfig(method=method, **init_kw), batches=batches,
                             progress=False, **tuned_for(method))


def train(pm, batches, steps=4, lr=0.5) -> None:
    params = [p for p in pm.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in pm.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD(params, lr=lr)
    pm.train()
    for i in range(steps):
        b = batches[i % len(batches)]
        loss = pm(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()


def saved_files(path) -> set[str]:
    return set(os.listdir(path))


def assert_clean_dir(path, initial=False) -> None:
    names = saved_files(path)
    assert not [n for n in names if n.startswith(".lorafa-tmp-")], names
    expected = ALLOWED_FILES | ({"initial_adapter"} if initial else set())
    assert names <= expected, names - expected
    assert {"adapter_model.safetensors", "adapter_config.json", "lorafa_init.json"} <= names
    if initial:
        assert os.path.isdir(os.path.join(path, "initial_adapter"))
    for n in names - {"initial_adapter"}:
        assert os.path.isfile(os.path.join(path, n)) and os.path.getsize(os.path.join(path, n)) > 0


@pytest.fixture(scope="module")
def mbatches():
    return make_batches()


@pytest.fixture(scope="module")
def base_logits(mbatches):
    return logits(tiny_llama(), mbatches)


# -------------------------------------------------------------------------------------- init preserves outputs
@pytest.mark.parametrize("method", ALL_METHODS)
def test_init_fp32_outputs(method, mbatches, base_logits):
    model = tiny_llama()
    orig = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    pm = init(model, method, mbatches)
    out = logits(pm, mbatches)
    layers = lora_layers(pm)
    assert len(layers) == 2 * len(TARGETS)  # 2 decoder layers
    for name, layer in layers.items():
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert A.shape == (R, layer.in_features) and B.shape == (layer.out_features, R)
        W0, W = orig[short(name)], layer.get_base_layer().weight.detach()
        s = layer.scaling["default"]
        if method in SUBTRACTING:
            assert B.abs().max() > 0 and A.abs().max() > 0
            assert not torch.equal(W, W0)
            torch.testing.assert_close(W, W0 - s * B.detach() @ A.detach(), atol=1e-6, rtol=0)
        else:
            assert torch.equal(W, W0), "no-offset methods must leave the base weight alone"
        if method in ZERO_B:
            assert torch.count_nonzero(B) == 0 and A.abs().max() > 0
        if method in NO_OFFSET:
            assert A.norm() > 0 and B.norm() > 0
    diff = (out - base_logits).abs().max().item()
    if method in NO_OFFSET:
        assert diff > 1e-4, f"{method}'s adapter should change the output, diff={diff}"
    else:
        assert diff < 1e-5, f"{method} changed the output at init by {diff}"


@pytest.mark.parametrize("dtype, eps", [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)])
@pytest.mark.parametrize("method", SUBTRACTING)
def test_init_half_precision_preserves_outputs(method, dtype, eps, mbatches):
    model = tiny_llama().to(dtype)
    ref = logits(model, mbatches)
    orig = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    pm = init(model, method, mbatches)
    out = logits(pm, mbatches)
    assert torch.isfinite(out).all()
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel < 4 * eps, f"relative error {rel} = {rel / eps:.2f} ulp(1)"
    for name, layer in lora_layers(pm).items():
        base = layer.get_base_layer()
        A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        assert base.weight.dtype == dtype
        s = layer.scaling["default"]
        expected = (orig[short(name)].float() - s * (B.float() @ A.float())).to(dtype)
        assert torch.equal(base.weight.detach(), expected), f"{name}: base weight is not cast(W - s·B·A)"


@pytest.mark.parametrize("method", ["pissa", "lora_ga"])
def test_offset_uses_cast_factors_with_bf16_adapters(method, mbatches):
    """PEFT upcasts adapters of a bf16 base to fp32 by default; without that (adapters stored in bf16) the offset
    must be computed from the bf16-rounded A and B that the layer actually holds, not from the fp32 factors."""
    model = tiny_llama().to(torch.bfloat16)
    ref = logits(model, mbatches)
    orig = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    fp32 = lorafa.compute_init(model, lora_config(), InitConfig(method=method), batches=mbatches, progress=False)
    pm = lorafa.initialize(model, lora_config(), InitConfig(method=method), batches=mbatches, progress=False,
                           autocast_adapter_dtype=False)
    mismatch_vs_fp32 = 0
    for name, layer in lora_layers(pm).items():
        A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        assert A.dtype == B.dtype == torch.bfloat16
        s = layer.scaling["default"]
        W0 = orig[short(name)].float()
        expected = (W0 - s * (B.float() @ A.float())).to(torch.bfloat16)
        assert torch.equal(layer.get_base_layer().weight.detach(), expected), name
        res = fp32[short(name)]
        mismatch_vs_fp32 += int((expected != (W0 - s * (res.B @ res.A)).to(torch.bfloat16)).sum())
    assert mismatch_vs_fp32 > 0  # the two rules really differ here, so the check above discriminates
    rel = ((logits(pm, mbatches) - ref).abs().max() / ref.abs().max()).item()
    assert rel < 4 * 2.0**-8


# ----------------------------------------------------------------------------------------- save / load
def _round_trip(make_model, method, batches, cfg, tmp_path, *, atol=1e-5, rtol=0.0, lr=0.5, **init_kw):
    """init -> train -> save_adapter -> PeftModel.from_pretrained(pristine) reproduces the trained model."""
    pristine_logits = logits(make_model(), batches)
    pm = lorafa.initialize(make_model(), cfg, InitConfig(method=method, **init_kw), batches=batches, progress=False,
                           **tuned_for(method))
    init_logits = logits(pm, batches)
    train(pm, batches, lr=lr)
    trained = logits(pm, batches)
    moved = (trained - init_logits).abs().max().item()
    assert moved > 1e-3 * max(1.0, init_logits.abs().max().item()), f"training barely moved the outputs ({moved})"
    out_dir = tmp_path / "adapter"
    assert lorafa.save_adapter(pm, out_dir) == os.fspath(out_dir)
    assert_clean_dir(out_dir)
    saved_cfg = json.loads((out_dir / "adapter_config.json").read_text())
    record = json.loads((out_dir / "lorafa_init.json").read_text())
    assert record["init_config"]["method"] == InitConfig(method=method).method
    # the trained model's own config is left as it was
    assert pm.peft_config["default"].r == cfg.r and pm.peft_config["default"].use_rslora == cfg.use_rslora

    loaded = PeftModel.from_pretrained(make_model(), os.fspath(out_dir))
    got = logits(loaded, batches)
    torch.testing.assert_close(got, trained, atol=atol, rtol=rtol)
    assert (got - pristine_logits).abs().max() > 10 * atol  # the adapter is really applied
    subtracts = METHODS[InitConfig(method=method).method].subtracts
    trained_layers, loaded_layers = lora_layers(pm), lora_layers(loaded)
    assert set(trained_layers) == set(loaded_layers)
    for name, layer in trained_layers.items():
        r = layer.r["default"]
        assert loaded_layers[name].r["default"] == (2 * r if subtracts else r), name
        assert math.isclose(loaded_layers[name].scaling["default"], layer.scaling["default"], rel_tol=1e-6), name
    assert saved_cfg["r"] == (2 * cfg.r if subtracts else cfg.r)
    assert record["converted_to_original_base"] is subtracts
    return pm, loaded, saved_cfg


@pytest.mark.parametrize("method", ALL_METHODS)
def test_round_trip_every_method(method, mbatches, tmp_path):
    _, _, saved = _round_trip(tiny_llama, method, mbatches, lora_config(), tmp_path)
    if method in SUBTRACTING:
        assert saved["lora_alpha"] == 2 * (2 * R)  # α' = 2α keeps s = α/r
    else:
        assert saved["lora_alpha"] == 2 * R


@pytest.mark.parametrize("method", ["pissa", "lora_fa"])
def test_round_trip_rslora(method, mbatches, tmp_path):
    cfg = lora_config(r=4, alpha=8, use_rslora=True)
    _, _, saved = _round_trip(tiny_llama, method, mbatches, cfg, tmp_path)
    assert saved["use_rslora"] is True
    if method in SUBTRACTING:  # α' = α·√2 keeps s = α/√r
        assert saved["r"] == 8 and math.isclose(saved["lora_alpha"], 8 * math.sqrt(2), rel_tol=1e-6)


@pytest.mark.parametrize("method", ["lora_ga", "lora_one"])
def test_round_trip_rank_and_alpha_pattern(method, mbatches, tmp_path):
    cfg = lora_config(r=2, alpha=4, rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 16})
    pm, loaded, _ = _round_trip(tiny_llama, method, mbatches, cfg, tmp_path)
    mult = 2 if method in SUBTRACTING else 1
    for name, layer in lora_layers(pm).items():
        r_expected, s_expected = (4, 4 / 4) if name.endswith("q_proj") else (2, 16 / 2)
        assert layer.r["default"] == r_expected
        assert math.isclose(layer.scaling["default"], s_expected)
        assert lora_layers(loaded)[name].r["default"] == mult * r_expected


@pytest.mark.parametrize("method", ["pissa", "lora_ga", "lora_fa"])
def test_round_trip_rslora_with_rank_pattern(method, mbatches, tmp_path):
    """PEFT refuses to convert rsLoRA + rank_pattern itself; lorafa rewrites the config so the result still loads."""
    cfg = lora_config(r=2, alpha=4, use_rslora=True, rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 16})
    pm, loaded, _ = _round_trip(tiny_llama, method, mbatches, cfg, tmp_path)
    for name, layer in lora_layers(pm).items():
        r_expected, alpha = (4, 4) if name.endswith("q_proj") else (2, 16)
        assert math.isclose(layer.scaling["default"], alpha / math.sqrt(r_expected))
    # save_adapter restored the model's own config after its temporary rewrite
    config = pm.peft_config["default"]
    assert config.use_rslora is True and dict(config.rank_pattern) == {"q_proj": 4}
    assert dict(config.alpha_pattern) == {"v_proj": 16}


@pytest.mark.parametrize("method", ["pissa", "lora_ga", "lora_fa"])
def test_round_trip_gpt2_conv1d(method, mbatches, tmp_path):
    ref = logits(tiny_gpt2(), mbatches)
    pm = init(tiny_gpt2(), method, mbatches, cfg=lora_config(targets=["c_attn"]))
    layers = lora_layers(pm)
    assert len(layers) == 2 and all(short(n).endswith("attn.c_attn") for n in layers)
    diff = (logits(pm, mbatches) - ref).abs().max().item()
    assert diff < 1e-5 if method in SUBTRACTING else diff > 1e-4
    # Conv1D stores W transposed (in, out): the offset must follow that layout
    for layer in layers.values():
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert A.shape == (R, 32) and B.shape == (96, R)
    _round_trip(tiny_gpt2, method, mbatches, lora_config(targets=["c_attn"]), tmp_path)


@pytest.mark.parametrize("method", ["pissa", "lora_ga", "lora_fa"])
def test_round_trip_bf16(method, mbatches, tmp_path):
    def make():
        return tiny_llama().to(torch.bfloat16)

    scale = logits(make(), mbatches).abs().max().item()
    # The loaded model computes W + ΔW where the trained one computed W' + sBA: bf16 rounding of W' differs.
    _round_trip(make, method, mbatches, lora_config(), tmp_path, atol=4 * 2.0**-8 * scale, lr=1.0)


# ------------------------------------------------------------------------------------------ saved files
def test_save_initial_and_clean_directory(mbatches, base_logits, tmp_path):
    pm = init(tiny_llama(), "pissa", mbatches)
    initial = {n: (l.lora_A["default"].weight.detach().clone(), l.lora_B["default"].weight.detach().clone())
               for n, l in lora_layers(pm).items()}
    modified_base = {short(n) + ".weight": l.get_base_layer().weight.detach().clone() for n, l in lora_layers(pm).items()}
    train(pm, mbatches)
    out = tmp_path / "run"
    lorafa.save_adapter(pm, out, save_initial=True)
    assert_clean_dir(out, initial=True)
    init_dir = out / "initial_adapter"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= saved_files(init_dir)
    assert not [n for n in saved_files(init_dir) if n.startswith(".lorafa-tmp-")]

    # the initial adapter is relative to the *modified* base: on it, it reproduces the pristine model's outputs
    base = tiny_llama()
    missing, unexpected = base.load_state_dict(modified_base, strict=False)
    assert not unexpected
    init_model = PeftModel.from_pretrained(base, os.fspath(init_dir))
    for name, layer in lora_layers(init_model).items():
        torch.testing.assert_close(layer.lora_A["default"].weight, initial[name][0], atol=0, rtol=0)
        torch.testing.assert_close(layer.lora_B["default"].weight, initial[name][1], atol=0, rtol=0)
    torch.testing.assert_close(logits(init_model, mbatches), base_logits, atol=1e-5, rtol=0)

    # saving again into the same folder overwrites cleanly
    lorafa.save_adapter(pm, out, save_initial=True)
    assert_clean_dir(out, initial=True)


@pytest.mark.parametrize("method", ["pissa", "lora_fa"])
def test_round_trip_named_adapter(method, mbatches, tmp_path):
    pm = lorafa.initialize(tiny_llama(), lora_config(), InitConfig(method=method), batches=mbatches,
                           adapter_name="mine", progress=False)
    train(pm, mbatches)
    trained = logits(pm, mbatches)
    lorafa.save_adapter(pm, tmp_path)
    assert_clean_dir(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), os.fspath(tmp_path))
    torch.testing.assert_close(logits(loaded, mbatches), trained, atol=1e-5, rtol=0)


def test_save_no_offset_method_is_plain(mbatches, tmp_path):
    pm = init(tiny_llama(), "lora_fa", mbatches)
    lorafa.save_adapter(pm, tmp_path)
    assert_clean_dir(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == R


# ------------------------------------------------------------------------------------ stats= vs batches=
def test_lora_fa_precomputed_stats_match_batches(mbatches):
    stats = lorafa.collect_stats(tiny_llama(), mbatches, TARGETS, kinds=("kfac",), progress=False)
    a = lorafa.initialize(tiny_llama(), lora_config(), InitConfig(method="lora_fa"), stats=stats, progress=False)
    b = init(tiny_llama(), "lora_fa", mbatches)
    la, lb = lora_layers(a), lora_layers(b)
    assert set(la) == set(lb)
    for name in la:
        for part in ("lora_A", "lora_B"):
            wa, wb = getattr(la[name], part)["default"].weight, getattr(lb[name], part)["default"].weight
            assert wa.abs().max() > 0
            torch.testing.assert_close(wa, wb, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------- InitConfig
def test_init_config_method_spellings():
    assert InitConfig(method="LoRA-FA").method == "lora_fa"
    assert InitConfig(method="LoRA-One").method == "lora_one"
    assert InitConfig(method="LoRA-GA").method == "lora_ga"
    c = InitConfig(method="A2rBr")
    assert (c.method, c.direction) == ("lora_ga", "A2rBr")
    with pytest.raises(ValueError, match="Unknown init method 'nope'.*lora_fa"):
        InitConfig(method="nope")


def test_init_config_lora_ga_options_and_weight_alias():
    c = InitConfig(method="lora_ga", direction="ArB2r", scale="stable", stable_gamma=16)
    assert c.method_options() == {"direction": "ArB2r", "scale": "stable", "stable_gamma": 16}
    w = InitConfig(method="lora_ga", weight="stable")
    assert w.scale == "stable" and w.weight is None
    assert InitConfig(method="lora_one", weight="gd").scale == "gd"
    with pytest.raises(ValueError, match="disagree"):
        InitConfig(method="lora_ga", scale="unit", weight="stable")


def test_init_config_rejects_options_the_method_lacks():
    with pytest.raises(ValueError, match=r"\['direction'\].*pissa does not have.*options are"):
        InitConfig(method="pissa", direction="ArB2r")
    with pytest.raises(ValueError, match=r"lora_one does not have.*'scale'.*'stable_gamma'"):
        InitConfig(method="lora_one", direction="ArB2r")
    with pytest.raises(ValueError, match="direction"):
        InitConfig(method="lora_ga", direction="sideways")


@pytest.mark.parametrize("key, value", [("offset", "sometimes"), ("svd", "approximate"), ("sample", "last")])
def test_init_config_rejects_unknown_choices(key, value):
    with pytest.raises(ValueError, match=f"{key} must be one of"):
        InitConfig(method="pissa", **{key: value})


def test_offset_none_for_pissa_keeps_base(mbatches, base_logits):
    model = tiny_llama()
    snap = {n: p.detach().clone() for n, p in model.named_parameters()}
    pm = init(model, "pissa", mbatches, offset="none")
    for name, layer in lora_layers(pm).items():
        assert torch.equal(layer.get_base_layer().weight, snap[short(name) + ".weight"])
        assert layer.lora_B["default"].weight.abs().max() > 0
    assert (logits(pm, mbatches) - base_logits).abs().max() > 1e-3  # W + s·B·A with B·A = [W]_r
    tmp_record = lorafa.saving.init_record(pm)
    assert tmp_record.subtracted is False


def test_offset_subtract_for_lora_one_preserves(mbatches, base_logits, tmp_path):
    pm = init(tiny_llama(), "lora_one", mbatches, offset="subtract")
    assert (logits(pm, mbatches) - base_logits).abs().max() < 1e-5
    assert lorafa.saving.init_record(pm).subtracted is True
    train(pm, mbatches)
    trained = logits(pm, mbatches)
    lorafa.save_adapter(pm, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 2 * R
    loaded = PeftModel.from_pretrained(tiny_llama(), os.fspath(tmp_path))
    torch.testing.assert_close(logits(loaded, mbatches), trained, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------- errors leave model intact
def _expect_error(model, cfg, init_config, match, *, batches=None, stats=None, exc=ValueError):
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        lorafa.initialize(model, cfg, init_config, batches=batches, stats=stats, progress=False)
    assert_untouched(model, snap)


@pytest.mark.parametrize("method", ["pissa", "lora_fa"])
def test_error_unknown_target(method, mbatches):
    _expect_error(tiny_llama(), lora_config(targets=["q_prj", "v_proj"]), InitConfig(method=method),
                  r"'q_prj' \(close: \[.*'q_proj'", batches=mbatches)


def test_error_non_linear_target(mbatches):
    _expect_error(tiny_llama(), lora_config(targets=["embed_tokens"]), InitConfig(method="pissa"),
                  r"embed_tokens.*Embedding.*nn\.Linear", batches=mbatches)


@pytest.mark.parametrize("method", ["pissa", "lora_ga", "lora_fa", "corda"])
def test_error_rank_too_large(method, mbatches):
    _expect_error(tiny_llama(), lora_config(r=64), InitConfig(method=method), r"rank 64 is invalid .*r ≤",
                  batches=mbatches)


def test_error_stats_missing_for_a_target(mbatches):
    stats = lorafa.collect_stats(tiny_llama(), mbatches, ["q_proj"], kinds=("grad",), progress=False)
    _expect_error(tiny_llama(), lora_config(), InitConfig(method="lora_ga"),
                  r"No statistics for target modules .*v_proj", stats=stats)


def test_error_stats_wrong_kind(mbatches):
    stats = lorafa.collect_stats(tiny_llama(), mbatches, TARGETS, kinds=("grad",), progress=False)
    _expect_error(tiny_llama(), lora_config(), InitConfig(method="lora_fa"), r"needs 'kfac' statistics", stats=stats)


def test_error_stats_wrong_shape(mbatches):
    torch.manual_seed(0)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    stats = lorafa.collect_stats(wide.eval(), mbatches, TARGETS, kinds=("kfac",), progress=False)
    _expect_error(tiny_llama(), lora_config(), InitConfig(method="lora_fa"),
                  r"statistics for 'model\.layers\.0\.self_attn\.q_proj' have shape .* another model", stats=stats)


def test_error_nan_in_stats(mbatches):
    stats = lorafa.collect_stats(tiny_llama(), mbatches, TARGETS, kinds=("grad",), progress=False)
    bad = "model.layers.1.self_attn.v_proj"
    grad = stats[bad].grad.clone()
    grad[0, 0] = float("nan")
    stats[bad] = dataclasses.replace(stats[bad], grad=grad)
    _expect_error(tiny_llama(), lora_config(), InitConfig(method="lora_ga"), rf"'{re.escape(bad)}'.*NaN",
                  stats=stats)


@pytest.mark.parametrize("method", ["lora_ga", "lora_one", "lora_fa", "corda", "eva"])
def test_error_needs_statistics(method):
    needs = METHODS[method].needs
    _expect_error(tiny_llama(), lora_config(), InitConfig(method=method), rf"{method} needs '{needs}' statistics")


def test_error_conflicting_init_lora_weights(mbatches):
    _expect_error(tiny_llama(), lora_config(init_lora_weights="pissa"), InitConfig(method="pissa"),
                  "init_lora_weights", batches=mbatches)
    _expect_error(tiny_llama(), lora_config(init_lora_weights=False), InitConfig(method="lora_fa"),
                  "init_lora_weights", batches=mbatches)


def test_error_dora_with_data_aware_init(mbatches):
    _expect_error(tiny_llama(), lora_config(use_dora=True), InitConfig(method="lora_fa"), "use_dora",
                  batches=mbatches)


@pytest.mark.parametrize("change, phrase", [
    (dict(r=0), r"lora_config.r=0: the LoRA rank r must be an integer >= 1"),
    (dict(r=-2), r"lora_config.r=-2: the LoRA rank r must be an integer >= 1"),
    (dict(rank_pattern={"q_proj": 0}), r"lora_config.rank_pattern\['q_proj'\]=0: each rank .* integer >= 1"),
    (dict(rank_pattern={"v_proj": 2.0}), r"lora_config.rank_pattern\['v_proj'\]=2.0"),
    (dict(alpha=-1), r"lora_config.lora_alpha=-1: .* must be a finite number > 0"),
    (dict(alpha_pattern={"q_proj": float("nan")}), r"lora_config.alpha_pattern\['q_proj'\]=nan"),
])
def test_error_bad_rank_or_alpha_before_any_work(change, phrase):
    """r and the alphas are checked before the statistics pass (no batches are given: the check comes first), by
    compute_init too; they used to fail as a ZeroDivisionError or a 'scaling must be > 0' naming neither."""
    for fn in (lorafa.initialize, lorafa.compute_init):
        model = tiny_llama()
        with pytest.raises(ValueError, match=phrase):
            fn(model, lora_config(**change), InitConfig(method="lora_fa"), progress=False)
        assert not hasattr(model, "peft_config")


def test_init_config_may_be_a_dict_of_its_fields(mbatches):
    """As initialize_trainer does: a dict is InitConfig(**dict); a string or another type is a TypeError."""
    pm = lorafa.initialize(tiny_llama(), lora_config(), {"method": "lora_ga", "iters": 2}, batches=mbatches,
                           progress=False)
    assert lorafa.saving.init_record(pm).init_config == InitConfig(method="lora_ga", iters=2)
    with pytest.raises(TypeError, match=r"got str \('pissa'\): write InitConfig\(method='pissa'\)"):
        lorafa.initialize(tiny_llama(), lora_config(), "pissa", progress=False)
    with pytest.raises(TypeError, match=r"init_config must be a lorafa.InitConfig .* got list"):
        lorafa.compute_init(tiny_llama(), lora_config(), ["pissa"], progress=False)


def test_error_stats_that_are_not_layer_stats(mbatches):
    stats = lorafa.collect_stats(tiny_llama(), mbatches, TARGETS, kinds=("kfac",), progress=False)
    with pytest.raises(TypeError, match=r"stats\['model.layers.0.self_attn.q_proj'\] is a Tensor, not a LayerStats"):
        lorafa.initialize(tiny_llama(), lora_config(), InitConfig(method="lora_fa"), progress=False,
                          stats={**stats, "model.layers.0.self_attn.q_proj": torch.zeros(2)})
    with pytest.raises(TypeError, match=r"stats must be a dict of module name -> LayerStats .* got list"):
        lorafa.initialize(tiny_llama(), lora_config(), InitConfig(method="lora_fa"), progress=False,
                          stats=list(stats.values()))


@pytest.mark.parametrize("method", ["pissa", "lora_fa"])
def test_error_integer_weight(method, mbatches):
    model = tiny_llama()
    q = model.model.layers[0].self_attn.q_proj
    q.weight = nn.Parameter(torch.zeros(q.out_features, q.in_features, dtype=torch.int8), requires_grad=False)
    _expect_error(model, lora_config(), InitConfig(method=method), r"q_proj.*int8.*not support", batches=mbatches)


def test_error_peft_model_as_base(mbatches):
    pm = get_peft_model(tiny_llama(), lora_config())
    with pytest.raises(TypeError, match="not a PeftModel"):
        lorafa.initialize(pm, lora_config(), InitConfig(method="pissa"), progress=False)


def test_error_save_adapter_foreign_model(tmp_path):
    pm = get_peft_model(tiny_llama(), lora_config())
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="initial_adapter="):
        lorafa.save_adapter(pm, out)
    assert not out.exists()


# ------------------------------------------------------------------------------- the initial adapter on disk (SPEC §3)
@pytest.mark.parametrize("method", ["pissa", "lora_fa"])
def test_initial_adapter_dir_lets_a_copy_or_another_process_save(method, mbatches, tmp_path):
    """With initialize(initial_adapter_dir=) the record is on disk: a deepcopy, or a model rebuilt elsewhere, saves
    an adapter that reproduces the trained model on the pristine base; no A₀/B₀ stay in memory."""
    import copy

    init_dir = tmp_path / "initial_adapter"
    pm = lorafa.initialize(tiny_llama(), lora_config(), InitConfig(method=method), batches=mbatches, progress=False,
                           initial_adapter_dir=init_dir)
    assert lorafa.saving.init_record(pm).initial_state is None
    assert {"adapter_model.safetensors", "adapter_config.json", "lorafa_init.json"} <= saved_files(init_dir)
    assert not [n for n in saved_files(tmp_path) if n.startswith(".lorafa-initial-")]
    record = lorafa.read_initial_adapter(init_dir)
    assert record.init_config.method == method and record.subtracted is (method == "pissa")
    assert len(record.infos) == len(lora_layers(pm)) and all("svd" in i for i in record.infos.values() if i)
    train(pm, mbatches)
    twin = copy.deepcopy(pm)
    trained = logits(twin, mbatches)
    with pytest.raises(ValueError, match="initial_adapter="):
        lorafa.save_adapter(twin, tmp_path / "no")
    out = lorafa.save_adapter(twin, tmp_path / "adapter", initial_adapter=init_dir)
    loaded = PeftModel.from_pretrained(tiny_llama(), out)
    torch.testing.assert_close(logits(loaded, mbatches), trained, atol=1e-5, rtol=0)


def test_initial_adapter_holds_the_initial_factors(mbatches, base_logits, tmp_path):
    init_dir = tmp_path / "init"
    pm = lorafa.initialize(tiny_llama(), lora_config(), InitConfig(method="lora_fa"), batches=mbatches,
                           progress=False, initial_adapter_dir=init_dir)
    at_init = logits(pm, mbatches)
    loaded = PeftModel.from_pretrained(tiny_llama(), os.fspath(init_dir))  # no offset: on the original base
    torch.testing.assert_close(logits(loaded, mbatches), at_init, atol=1e-6, rtol=0)
    assert (at_init - base_logits).abs().max() > 1e-4  # LoRA-FA starts as a real update


def test_read_initial_adapter_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="initial_adapter_dir"):
        lorafa.read_initial_adapter(tmp_path)


def test_whiteners_are_released_after_init(mbatches):
    """The fp64 factors of C and Σ live only during compute_init (issue: they used to outlive it)."""
    import gc
    import weakref

    from lorafa.methods import lora_fa

    made = []
    original = lora_fa.Whitener.__init__

    def spy(self, *a, **k):
        original(self, *a, **k)
        made.append(weakref.ref(self))

    lora_fa.Whitener.__init__ = spy
    try:
        pm = init(tiny_llama(), "lora_fa", mbatches)
    finally:
        lora_fa.Whitener.__init__ = original
    gc.collect()
    assert made and all(r() is None for r in made)
    assert lora_fa._SCOPE.get() is None
    # a shared Σ (q/k/v read one input) is factored once per group, not once per module
    n_layers = len(lora_layers(pm))
    assert len(made) < 2 * n_layers


def test_iters_caps_the_batches_used(mbatches):
    """InitConfig.iters bounds the statistics pass when batches= is given (here 2 of 3 batches)."""
    pm = init(tiny_llama(), "lora_one", mbatches, iters=2)
    stats = lorafa.collect_stats(tiny_llama(), mbatches[:2], TARGETS, progress=False)
    ref = lorafa.initialize(tiny_llama(), lora_config(), InitConfig(method="lora_one"), stats=stats, progress=False)
    for (k1, v1), (k2, v2) in zip(pm.state_dict().items(), ref.state_dict().items()):
        assert k1 == k2
        torch.testing.assert_close(v1, v2)
