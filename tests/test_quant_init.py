"""Data-aware inits on bitsandbytes-quantized bases (SPEC §10), on CPU: the statistics pass on the 4-bit model, the
residual re-quantized from the full-precision weights, and adapters that load on the original base."""

from __future__ import annotations

import json

import pytest
import torch

F = pytest.importorskip("bitsandbytes").functional

from peft import LoraConfig, PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

import lorafa  # noqa: E402
from lorafa.quant import dequantized_weight  # noqa: E402
from lorafa.stats.collect import collect_stats  # noqa: E402

from conftest import batch_logits, make_batches, tiny_gpt2, tiny_llama  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def fp_folder(tmp_path_factory):
    """A small Llama (hidden 128, so every layer holds several 64-value nf4 blocks per row) saved in fp32."""
    from tiny_assets import save_llama128

    return save_llama128(str(tmp_path_factory.mktemp("llama128")))


def load(folder, **bnb):
    kw = {"quantization_config": BitsAndBytesConfig(**bnb), "device_map": "cpu"} if bnb else {}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()


def nf4(folder):
    return load(folder, load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def batches():
    return make_batches(n_batches=2)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_hook_gradient_equals_the_weight_gradient(make):
    """G built from each layer's input and output gradient (Σ Δᵀ X) is autograd's weight gradient, Conv1D included."""
    targets = ["q_proj", "down_proj"] if make is tiny_llama else ["c_attn", "c_fc"]
    b = make_batches()
    a = collect_stats(make(), b, targets, kinds=("kfac",), grad_from="weight", progress=False)
    h = collect_stats(make(), b, targets, kinds=("kfac",), grad_from="hooks", progress=False)
    for name in a:
        torch.testing.assert_close(h[name].grad, a[name].grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(h[name].out_cov, a[name].out_cov)
    with pytest.raises(ValueError, match="grad_from"):
        collect_stats(make(), b, targets, grad_from="weights", progress=False)


def test_statistics_pass_runs_on_the_4bit_model(fp_folder, batches):
    """The pass on the nf4 model equals the pass on a float model holding its dequantized weights: the gradient is
    the 4-bit model's own, taken with no weight gradient (a 4-bit weight has none)."""
    q = nf4(fp_folder)
    ref = load(fp_folder)
    named = dict(q.named_modules())
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in ALL:
                mod.weight.copy_(dequantized_weight(named[name]))
    sq = collect_stats(q, batches, ALL, kinds=("kfac",), progress=False)
    sr = collect_stats(ref, batches, ALL, kinds=("kfac",), progress=False)
    assert set(sq) == set(sr) and len(sq) == 14
    for name in sq:
        for key in ("grad", "in_cov", "out_cov"):
            a, b = getattr(sq[name], key), getattr(sr[name], key)
            assert rel(a, b) < 1e-4, (name, key, rel(a, b))
    assert all(p.grad is None for p in q.parameters())


@pytest.mark.parametrize("method", ["pissa", "milora", "lora_ga"])
def test_offset_init_requantizes_the_residual_of_the_full_precision_weight(fp_folder, batches, tmp_path, method,
                                                                          record_property):
    """Q(W − s·B·A) + s·B·A against W: exactly the residual's own quantization error. For PiSSA it is below the plain
    nf4 model's error Q(W) − W (QPiSSA's claim, measured). The saved adapter loads on the original base."""
    fp, plain = load(fp_folder), nf4(fp_folder)
    ref = batch_logits(fp, batches)
    plain_err = rel(batch_logits(plain, batches), ref)
    lora_config = LoraConfig(r=16, lora_alpha=16, target_modules=ALL, lora_dropout=0.0)
    pm = lorafa.initialize(nf4(fp_folder), lora_config, lorafa.InitConfig(method=method, iters=2), batches=batches,
                           base_weights=fp_folder, progress=False)
    init_err = rel(batch_logits(pm, batches), ref)
    record_property("output_error", {"plain_nf4": plain_err, method: init_err})
    fp_layers = dict(fp.named_modules())
    for name, layer in pm.base_model.model.named_modules():
        if not hasattr(layer, "lora_A"):
            continue
        w = fp_layers[name].weight.detach()
        delta = (layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
        stored = dequantized_weight(layer)
        state = layer.get_base_layer().weight.quant_state
        fresh = F.dequantize_4bit(*F.quantize_4bit(w - delta, blocksize=state.blocksize, quant_type="nf4"))
        torch.testing.assert_close(stored, fresh, rtol=0, atol=0)  # Q(W − s·B·A), W the full-precision weight
        assert rel(stored, w - delta) < 0.12  # nf4's error (measured ~0.09)
    if method == "pissa":  # the residual has the top singular directions removed: it quantizes better
        assert init_err < 0.85 * plain_err
    lorafa.save_adapter(pm, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load(fp_folder), tmp_path / "adapter")
    torch.testing.assert_close(batch_logits(loaded, batches), ref, rtol=1e-4, atol=1e-4)  # ΔW = 0 at the init


def test_trained_adapter_reproduces_the_4bit_model_on_the_original_base(fp_folder, batches, tmp_path):
    """After training, the adapter on the full-precision base differs from the trained 4-bit model by the residual's
    quantization error only: as far as the init did from W, not further."""
    fp = load(fp_folder)
    ref = batch_logits(fp, batches)
    pm = lorafa.initialize(nf4(fp_folder), LoraConfig(r=8, lora_alpha=16, target_modules=ALL, lora_dropout=0.0),
                           lorafa.InitConfig(method="pissa"), base_weights=fp_folder, progress=False)
    init_err = rel(batch_logits(pm, batches), ref)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    pm.train()
    for b in batches * 3:
        pm(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = batch_logits(pm, batches)
    assert rel(trained, ref) > 2 * init_err  # training moved the model well beyond the quantization error
    lorafa.save_adapter(pm, tmp_path / "adapter")
    loaded = batch_logits(PeftModel.from_pretrained(load(fp_folder), tmp_path / "adapter"), batches)
    assert rel(loaded, trained) < 1.3 * init_err
    meta = json.loads((tmp_path / "adapter" / "lorafa_init.json").read_text())
    assert meta["converted_to_original_base"] is True


def test_no_offset_method_leaves_the_quantized_base_untouched(fp_folder, batches):
    q = nf4(fp_folder)
    before = {n: p.detach().clone() for n, p in q.named_parameters()}
    pm = lorafa.initialize(q, LoraConfig(r=4, lora_alpha=8, target_modules=ALL, lora_dropout=0.0),
                           lorafa.InitConfig(method="lora_fa", iters=2), batches=batches, progress=False)
    after = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
             for n, p in pm.named_parameters() if "lora_" not in n}
    assert set(before) == set(after)
    for n, p in before.items():
        assert torch.equal(after[n], p), n
    b = next(m for m in pm.modules() if hasattr(m, "lora_B")).lora_B["default"].weight
    assert b.abs().sum() > 0


def test_guard_shrinks_the_factors_on_a_quantized_base(fp_folder, batches):
    """A 4-bit base takes no offset: where the step does not clearly lower the guard's loss (here the statistics'
    gradients are negated), both factors shrink by √g and the base is left as it was."""
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=ALL, lora_dropout=0.0)
    stats = collect_stats(nf4(fp_folder), batches, ALL, kinds=("kfac",), progress=False)
    for st in stats.values():
        st.grad = -st.grad
    init = lorafa.InitConfig(method="lora_fa", iters=2)
    ref = lorafa.initialize(nf4(fp_folder), lora, init, stats=stats, progress=False)
    q = nf4(fp_folder)
    before = {n: p.detach().clone() for n, p in q.named_parameters()}
    guard = make_batches(n_batches=2, seed=11)
    pm = lorafa.initialize(q, lora, init, stats=stats, guard_batches=guard, progress=False)
    g = lorafa.saving.init_record(pm).summary["guard"]
    assert g["remedy"] == "shrink" and 0.0 < g["chosen"] < 1.0 and g["tried"][-1][2] > 0  # g = 1: not clearly lower
    assert not lorafa.saving.init_record(pm).subtracted
    for n, p in pm.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(p, dict(ref.named_parameters())[n] * g["chosen"] ** 0.5)
        else:
            assert torch.equal(p, before[n.replace("base_model.model.", "").replace(".base_layer", "")]), n


def test_dequantized_start_is_allowed_when_asked(fp_folder, batches):
    """base_weights='dequantized': the factors come from Q(W) and the base becomes Q(Q(W) − s·B·A), a valid model
    whose error against W includes both quantizations (so it is never the silent default)."""
    fp = load(fp_folder)
    pm = lorafa.initialize(nf4(fp_folder), LoraConfig(r=8, lora_alpha=8, target_modules=ALL, lora_dropout=0.0),
                           lorafa.InitConfig(method="pissa"), base_weights="dequantized", progress=False)
    with_w = lorafa.initialize(nf4(fp_folder), LoraConfig(r=8, lora_alpha=8, target_modules=ALL, lora_dropout=0.0),
                               lorafa.InitConfig(method="pissa"), base_weights=fp, progress=False)
    ref = batch_logits(fp, make_batches(n_batches=1))
    assert rel(batch_logits(with_w, make_batches(n_batches=1)), ref) < rel(batch_logits(pm, make_batches(n_batches=1)),
                                                                           ref)


def test_bad_input(fp_folder, batches, tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=ALL, lora_dropout=0.0)
    with pytest.raises(ValueError, match="base_weights="):  # an offset method needs W
        lorafa.initialize(nf4(fp_folder), cfg, lorafa.InitConfig(method="pissa"), progress=False)
    with pytest.raises(ValueError, match="no target is quantized"):
        lorafa.initialize(load(fp_folder), cfg, lorafa.InitConfig(method="pissa"), base_weights=fp_folder,
                          progress=False)
    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    with pytest.raises(ValueError, match="base_weights's .* is 64 × 64"):
        lorafa.initialize(nf4(fp_folder), cfg, lorafa.InitConfig(method="pissa"), base_weights=other, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="safetensors"):
        lorafa.initialize(nf4(fp_folder), cfg, lorafa.InitConfig(method="pissa"), base_weights=tmp_path / "empty",
                          progress=False)
    for method in ("kasa", "goat"):
        with pytest.raises(ValueError, match="quantized layers"):
            lorafa.initialize(nf4(fp_folder), LoraConfig(r=4, lora_alpha=8, target_modules=ALL),
                              lorafa.InitConfig(method=method), base_weights=fp_folder, progress=False)


def test_int8_base(fp_folder, batches, tmp_path):
    """LLM.int8 layers take the same path: the pass, a re-quantized residual, an adapter for the original base."""
    fp = load(fp_folder)
    q = load(fp_folder, load_in_8bit=True)
    pm = lorafa.initialize(q, LoraConfig(r=8, lora_alpha=16, target_modules=ALL, lora_dropout=0.0),
                           lorafa.InitConfig(method="lora_ga", iters=2), batches=batches, base_weights=fp,
                           progress=False)
    ref = batch_logits(fp, batches)
    assert rel(batch_logits(pm, batches), ref) < 0.05  # int8's error is ~0.6 % per weight
    lorafa.save_adapter(pm, tmp_path / "a")
    torch.testing.assert_close(batch_logits(PeftModel.from_pretrained(load(fp_folder), tmp_path / "a"), batches), ref,
                               rtol=1e-4, atol=1e-4)


def test_runner_load_in_4bit(tmp_path):
    """`++model.load_in_4bit=true`: the main job's flow on a 4-bit base, the adapter loadable on the original base."""
    from test_runner import composed, local
    from tiny_assets import arithmetic_rows, save_tiny_causal_lm, write_jsonl

    from lorafa.cli import run_from_config

    model = save_tiny_causal_lm(str(tmp_path / "tiny-lm"), hidden=64)  # whole 64-value blocks per row (test_quant.py)
    write_jsonl(str(tmp_path / "gsm8k" / "train.jsonl"), arithmetic_rows(48, seed=0))
    write_jsonl(str(tmp_path / "gsm8k" / "test.jsonl"), arithmetic_rows(8, seed=1))
    rows = [{"query": r["question"], "response": r["answer"].replace("####", "The answer is:"), "type": "GSM_Rephrased"}
            for r in arithmetic_rows(48, seed=2)]
    write_jsonl(str(tmp_path / "metamath.jsonl"), rows)
    assets = {"model": model, "gsm8k": str(tmp_path / "gsm8k"), "metamath": str(tmp_path / "metamath.jsonl")}
    res = run_from_config(composed(["+init=svd", "++init.direction=pissa", "++model.load_in_4bit=true",
                                    *local(assets, tmp_path / "runs", steps=3)]))
    assert res["quantization"] == "bnb-nf4" and res["steps"] == 3
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
                                       res["adapter_dir"])
    assert any("lora_A" in n for n, _ in loaded.named_parameters())
    for bad, match in ((["++model.saving=true"], "saving"), (["++model.bnb_4bit_quant_type=int4"], "nf4 or fp4"),
                       (["+init=svd", "++init.direction=kasa"], "KaSA or GOAT")):
        with pytest.raises(ValueError, match=match):
            run_from_config(composed(["++model.load_in_4bit=true", *local(assets, tmp_path / "bad"), *bad]))


def _cpu_repacks() -> bool:
    """bitsandbytes ≥ 0.49 on an AVX512-BF16 CPU repacks a 4-bit layer at an eval forward without gradients."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


@pytest.mark.skipif(not _cpu_repacks(), reason="this CPU or bitsandbytes has no repacked 4-bit CPU kernel")
def test_statistics_and_training_after_an_evaluation_of_the_4bit_model(fp_folder, batches):
    """An evaluation first moves each Linear4bit to bitsandbytes' repacked CPU kernel, which has no backward: the
    statistics pass crashed on the missing output gradient, and training lost the gradient below each 4-bit layer.
    lorafa puts the layers back on the differentiable kernel: the same statistics as without the evaluation, and the
    same adapter gradients in training after another evaluation. The repacking rounds the block scales to bf16 for
    good (a relative 2⁻⁹ each), so the comparisons allow 1e-2; a lost gradient is off by 100%."""
    fresh, evaluated = nf4(fp_folder), nf4(fp_folder)
    before = batch_logits(evaluated, batches)  # eval, no grad: repacks
    layer = evaluated.model.layers[0].self_attn.q_proj
    assert layer.weight.quant_state.packing_format_for_cpu  # the case at hand really happened
    want = collect_stats(fresh, batches, ["q_proj", "down_proj"], kinds=("kfac",), progress=False)
    got = collect_stats(evaluated, batches, ["q_proj", "down_proj"], kinds=("kfac",), progress=False)
    assert not layer.weight.quant_state.packing_format_for_cpu
    for name in want:
        for key in ("grad", "in_cov", "out_cov"):
            assert rel(getattr(got[name], key), getattr(want[name], key)) < 1e-2, (name, key)
    assert rel(batch_logits(evaluated, batches), before) < 1e-2  # the same function (the packed kernel is bf16)

    lora = LoraConfig(r=2, lora_alpha=4, target_modules=ALL, lora_dropout=0.0)
    grads = []
    for model in (nf4(fp_folder), nf4(fp_folder)):
        pm = lorafa.initialize(model, lora, lorafa.InitConfig(method="lora_fa", iters=2), batches=batches,
                               progress=False)
        if len(grads):
            batch_logits(pm, batches)  # an evaluation between the init and training
        pm.train()
        pm(**batches[0]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 2 * len(ALL)
    for n in grads[0]:
        assert rel(grads[1][n], grads[0][n]) < 1e-2, n
