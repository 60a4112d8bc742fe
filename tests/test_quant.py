"""Quantized bases (lorafa.quant): bitsandbytes 4-bit and int8 layers, read and re-quantized one at a time, on CPU.

How the tiny quantized models are made (checked with transformers 5.24 and bitsandbytes 0.50.2, CPU only):
- a whole model: save a tiny Llama (`tiny_assets.save_tiny_causal_lm`) and reload it with
  `from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_compute_dtype=torch.float32), device_map="cpu", dtype=torch.float32)`; `load_in_8bit=True` works the same
  way. transformers quantizes while loading, so no GPU is involved.
- one layer: build `bnb.nn.Linear4bit` / `bnb.nn.Linear8bitLt(has_fp16_weights=False)`, load a float layer's
  state_dict, then `.to("cpu")`: bitsandbytes quantizes on the first `.to(device)`, CPU included.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

from lorafa import init_factors  # noqa: E402
from lorafa.quant import check_quantized_model, dequantized_weight, quant_kind, requantize_  # noqa: E402

from tiny_assets import save_tiny_causal_lm  # noqa: E402

NF4_REL_ERR, FP4_REL_ERR, INT8_REL_ERR = 0.12, 0.15, 0.01  # measured ~0.09, ~0.12 (Gaussian-like), ~0.006


def load_tiny_bnb(folder: str, **bnb_kwargs):
    """A tiny Llama reloaded through transformers' bitsandbytes integration, on CPU, in fp32."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(**bnb_kwargs)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu",
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """Hidden size 64: every row holds a whole 64-value block. bitsandbytes ≥ 0.49 on CPU quantizes a matrix whose
    rows are not whole blocks wrongly (measured on 0.49.2–0.50.2: relative error 0.37 for 32 × 32, 0.25 for 64 × 96,
    against 0.09 for 64 × 64 and on 0.47), and its repacked CPU kernel fails on such a layer; real models' rows are
    whole blocks. Hence hidden 64 and intermediate 128 here."""
    return save_tiny_causal_lm(str(tmp_path_factory.mktemp("tiny_llama")), hidden=64)


@pytest.fixture(scope="module")
def nf4_model(tiny_folder):
    return load_tiny_bnb(tiny_folder, load_in_4bit=True, bnb_4bit_quant_type="nf4",
                         bnb_4bit_compute_dtype=torch.float32)


def weight_like(m=64, n=128, seed=0, decay=0.5):
    """A random m × n weight with a power-law spectrum σ_i ∝ i^-decay and entries of size ~0.02, like real layers."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, m, generator=g))
    s = torch.arange(1, m + 1, dtype=torch.float32).pow(-decay)
    w = (u * s) @ v.T
    return w * (0.02 * (m * n) ** 0.5 / w.norm())


def layer_4bit(w, quant_type="nf4", double_quant=False, dtype=torch.float32, bias=True, **params):
    """A bitsandbytes Linear4bit holding `w` quantized (params: blocksize=, quant_storage= for Params4bit)."""
    m, n = w.shape
    q = bnb.nn.Linear4bit(n, m, bias=bias, compute_dtype=torch.float32, compress_statistics=double_quant,
                          quant_type=quant_type)
    q.weight = bnb.nn.Params4bit(w.to(dtype), requires_grad=False, compress_statistics=double_quant,
                                 quant_type=quant_type, module=q, **params)
    if bias:
        q.bias = nn.Parameter(torch.linspace(-0.1, 0.1, m))
    return q.to("cpu")  # quantizes here


def layer_int8(w, has_fp16_weights=False):
    m, n = w.shape
    q = bnb.nn.Linear8bitLt(n, m, has_fp16_weights=has_fp16_weights)
    q.load_state_dict({"weight": w.to(torch.float16), "bias": torch.linspace(-0.1, 0.1, m)})
    return q.to("cpu")


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm()) if a.shape == b.shape else float("inf")


class QuantLinear(nn.Module):  # stands in for auto_gptq's GPTQ layer: recognised by the module defining it
    __module__ = "auto_gptq.nn_modules.qlinear.qlinear_cuda"

    def __init__(self):
        super().__init__()
        self.qweight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int32), requires_grad=False)


class WQLinear_GEMM(nn.Linear):  # AWQ's layer, with float weights: only its module says what it is  # noqa: N801
    __module__ = "awq.modules.linear.gemm"


class QTensor(torch.Tensor):  # optimum-quanto's weight tensor (a float tensor subclass)
    __module__ = "optimum.quanto.tensor.qtensor"


def test_quant_kind(nf4_model, tiny_folder):
    w = weight_like()
    assert quant_kind(nf4_model.model.layers[0].self_attn.q_proj) == "nf4"
    assert quant_kind(layer_4bit(w, "fp4", double_quant=True)) == "fp4"
    assert quant_kind(layer_int8(w)) == "int8"
    int8_model = load_tiny_bnb(tiny_folder, load_in_8bit=True)
    assert quant_kind(int8_model.model.layers[0].mlp.down_proj) == "int8"
    assert quant_kind(nn.Linear(4, 4)) is None
    assert quant_kind(nf4_model.lm_head) is None  # transformers keeps the head in float
    for fake, scheme in ((QuantLinear(), "GPTQ"), (WQLinear_GEMM(4, 4), "AWQ")):
        with pytest.raises(ValueError, match=scheme) as err:
            quant_kind(fake)
        assert "nf4" in str(err.value) and "LLM.int8" in str(err.value)
    odd = nn.Linear(4, 4)
    odd.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="unrecognised scheme storing torch.int8"):
        quant_kind(odd)


class MyQLinearAdapter(nn.Linear):  # a user's layer whose name contains a quantized layer's (QLinear)
    pass


class HQQStyleInt4Linear(nn.Linear):  # names of HQQ's and torchao's classes, in a user's module
    pass


class BitLinearQuantLinear(nn.Linear):  # BitNet's and GPTQ's class names
    pass


class Marlin(nn.Module):  # a user's module named like the GPTQ kernel, holding a plain float Linear's weight
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4, 4))


def test_quant_kind_goes_by_the_defining_package_not_the_class_name():
    """A user's float layer named like a quantized one is plain (it used to be refused as optimum-quanto, GPTQ, ...);
    a layer or weight from the quantization packages is refused naming the scheme; bitsandbytes' own Linear4bit (and
    a user's subclass of it) is still 4-bit."""
    for plain in (MyQLinearAdapter(4, 4), HQQStyleInt4Linear(4, 4), BitLinearQuantLinear(4, 4), Marlin()):
        assert quant_kind(plain) is None, type(plain).__name__
    user_weight = nn.Linear(4, 4)  # a tensor subclass named like quanto's, but the user's
    user_weight.weight = nn.Parameter(type("QTensorView", (torch.Tensor,), {})(torch.zeros(4, 4)))
    assert quant_kind(user_weight) is None
    quanto = nn.Linear(4, 4)
    quanto.weight = nn.Parameter(torch.zeros(4, 4).as_subclass(QTensor))
    with pytest.raises(ValueError, match="optimum-quanto"):
        quant_kind(quanto)
    quanto_layer = type("QLinear", (nn.Linear,), {"__module__": "optimum.quanto.nn.qlinear"})(4, 4)
    with pytest.raises(ValueError, match="optimum-quanto"):
        quant_kind(quanto_layer)

    class MyLinear4bit(bnb.nn.Linear4bit):  # the user's subclass of the real class
        pass

    w = weight_like(8, 16)
    real = layer_4bit(w, "nf4")
    assert type(real) is bnb.nn.Linear4bit and quant_kind(real) == "nf4"
    sub = MyLinear4bit(16, 8, bias=False, compute_dtype=torch.float32, quant_type="fp4")
    sub.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="fp4", module=sub)
    assert quant_kind(sub.to("cpu")) == "fp4"


def test_peft_wrapped_layer(tiny_folder):
    from peft import LoraConfig, get_peft_model

    from lorafa.peft_bridge import quiet_checkpointing_rename

    model = load_tiny_bnb(tiny_folder, load_in_4bit=True, bnb_4bit_quant_type="nf4",
                          bnb_4bit_compute_dtype=torch.float32)
    with quiet_checkpointing_rename():
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert quant_kind(layer) == "nf4"
    assert torch.equal(dequantized_weight(layer), dequantized_weight(layer.get_base_layer()))
    requantize_(layer, weight_like(64, 64))
    d, x = dequantized_weight(layer), torch.randn(3, 64)
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    peft_model.train()  # in eval mode bitsandbytes may switch to its repacked bf16 CPU kernel (AVX512-BF16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ d.T + layer.scaling["default"] * (x @ lora_a.T) @ lora_b.T)


@pytest.mark.parametrize("double_quant", [False, True])
def test_requantized_model_saves_and_reloads(tiny_folder, tmp_path, double_quant):
    kw = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
              bnb_4bit_use_double_quant=double_quant)
    model, name = load_tiny_bnb(tiny_folder, **kw), "model.layers.0.self_attn.q_proj"
    requantize_(model.get_submodule(name), weight_like(64, 64))
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu", dtype=torch.float32)  # config saved
    reloaded = reloaded.get_submodule(name)
    assert torch.equal(dequantized_weight(reloaded), dequantized_weight(model.get_submodule(name)))


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)])
def test_dequantized_weight_4bit(quant_type, double_quant):
    w = weight_like()
    q = layer_4bit(w, quant_type, double_quant)
    d = dequantized_weight(q)
    assert d.dtype == torch.float32 and d.shape == w.shape
    assert torch.equal(d, F.dequantize_4bit(q.weight.data, q.weight.quant_state).float())
    assert rel(d, w) < (NF4_REL_ERR if quant_type == "nf4" else FP4_REL_ERR)
    x = torch.randn(3, w.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(q(x), x @ d.T + q.bias, rtol=1e-5, atol=1e-5)


def test_dequantized_weight_nf4_model(nf4_model, tiny_folder):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        w = plain.get_submodule(name).weight
        assert rel(dequantized_weight(nf4_model.get_submodule(name)), w) < NF4_REL_ERR


def test_dequantized_weight_int8_before_and_after_forward():
    w = weight_like()
    q = layer_int8(w)
    before = dequantized_weight(q)
    assert q.weight.CB is not None  # quantized, scales still on the weight
    torch.testing.assert_close(before, q.weight.CB.float() * q.weight.SCB.view(-1, 1) / 127)
    assert rel(before, w) < INT8_REL_ERR
    x = torch.randn(3, w.shape[1])
    with torch.no_grad():
        y = q(x)
    assert q.weight.CB is None and q.state.SCB is not None  # the first forward moved them to the layer's state
    assert torch.equal(dequantized_weight(q), before)
    assert rel(y, x @ before.T + q.bias) < 0.02  # the activations are int8-quantized as well
    fp16 = layer_int8(w, has_fp16_weights=True)
    assert torch.equal(dequantized_weight(fp16), fp16.weight.detach().float())


@pytest.mark.parametrize("quant_type,double_quant,blocksize,storage,dtype", [
    ("nf4", False, 64, torch.uint8, torch.float32),
    ("nf4", True, 64, torch.uint8, torch.float32),
    ("fp4", True, 128, torch.uint8, torch.bfloat16),
    ("nf4", True, 64, torch.bfloat16, torch.float32),
])
def test_requantize_4bit(quant_type, double_quant, blocksize, storage, dtype):
    q = layer_4bit(weight_like(seed=0), quant_type, double_quant, dtype, blocksize=blocksize, quant_storage=storage)
    old_state = q.weight.quant_state
    new = weight_like(seed=1)
    requantize_(q, new)
    p, s = q.weight, q.weight.quant_state
    assert isinstance(p, bnb.nn.Params4bit) and p.bnb_quantized and not p.requires_grad and q.quant_state is s
    assert (s.quant_type, s.blocksize, s.nested, s.dtype, p.dtype) == (quant_type, blocksize, double_quant, dtype,
                                                                       storage)
    assert (p.quant_type, p.blocksize, p.compress_statistics, p.quant_storage) == (quant_type, blocksize,
                                                                                   double_quant, storage)
    assert q.compute_dtype == torch.float32
    if double_quant:
        assert (s.state2.blocksize, s.absmax.dtype) == (old_state.state2.blocksize, old_state.absmax.dtype)
        assert torch.equal(s.state2.code, old_state.state2.code)
    d = dequantized_weight(q)
    expected = F.quantize_4bit(new.to(dtype), blocksize=blocksize, compress_statistics=double_quant,
                               quant_type=quant_type, quant_storage=storage)
    assert torch.equal(d, F.dequantize_4bit(*expected).float())  # exactly what bitsandbytes makes of W'
    assert rel(d, new) < (NF4_REL_ERR if quant_type == "nf4" else FP4_REL_ERR)
    x = torch.randn(5, new.shape[1])
    with torch.no_grad():
        y = q(x)
    if dtype == torch.float32:
        torch.testing.assert_close(y, x @ d.T + q.bias, rtol=1e-4, atol=1e-5)
    else:  # bitsandbytes >= 0.50 dequantizes straight to the input's dtype, skipping the rounding to bf16
        assert rel(y, x @ d.T + q.bias) < 2e-2


def tamper_nested_blocksize(q, blocksize=128):
    """Re-nest the layer's absmax with a nested blocksize bitsandbytes' quantize_4bit never uses (it uses 256):
    a valid layer that re-quantization cannot reproduce."""
    s = q.weight.quant_state
    absmax = F.dequantize_blockwise(s.absmax, s.state2) + s.offset
    s.offset = absmax.mean()
    s.absmax, s.state2 = F.quantize_blockwise(absmax - s.offset, blocksize=blocksize)


def test_requantize_refuses_irreproducible_double_quant():
    w = weight_like()
    q = layer_4bit(w, "nf4", double_quant=True)
    tamper_nested_blocksize(q)
    before, weight = dequantized_weight(q), q.weight
    assert rel(before, w) < NF4_REL_ERR  # the tampered layer is still a correct quantization
    with pytest.raises(ValueError, match="double-quantized.*nested blocksize|nested blocksize.*double-quantized"):
        requantize_(q, weight_like(seed=1))
    assert q.weight is weight and torch.equal(dequantized_weight(q), before)  # left unchanged
    with pytest.raises(ValueError, match="target 'q'.*nested blocksize"):
        check_quantized_model(nn.Sequential(), {"q": q}, method_needs_weight_grad=False, offset=True)
    assert check_quantized_model(nn.Sequential(), {"q": q}, method_needs_weight_grad=True, offset=False) == {"q": "nf4"}


@pytest.mark.parametrize("forward_first", [False, True])
def test_requantize_int8(forward_first):
    q, x = layer_int8(weight_like(seed=0)), torch.randn(5, 128)
    if forward_first:
        with torch.no_grad():
            q(x)
    new = weight_like(seed=1)
    requantize_(q, new)
    assert isinstance(q.weight, bnb.nn.Int8Params) and q.weight.dtype == torch.int8 and not q.state.has_fp16_weights
    d = dequantized_weight(q)
    assert rel(d, new) < INT8_REL_ERR
    with torch.no_grad():
        assert rel(q(x), x @ d.T + q.bias) < 0.02
    assert torch.equal(dequantized_weight(q), d)  # the same after the forward moved the scales


def test_requantize_int8_fp16_weights():
    q = layer_int8(weight_like(seed=0), has_fp16_weights=True)  # float weights, int8-quantized at each forward
    dtype, new = q.weight.dtype, weight_like(seed=1)
    requantize_(q, new)
    assert q.weight.dtype == dtype and q.state.has_fp16_weights and q.weight.requires_grad
    assert torch.equal(dequantized_weight(q), new.to(dtype).float())


def test_requantize_errors():
    with pytest.raises(ValueError, match="not quantized"):
        requantize_(nn.Linear(4, 4), torch.zeros(4, 4))
    q = layer_4bit(weight_like())
    with pytest.raises(ValueError, match=r"finite \(64, 128\)"):
        requantize_(q, torch.zeros(128, 64))
    with pytest.raises(ValueError, match="finite"):
        requantize_(q, torch.full((64, 128), float("nan")))


def test_cpu_packed_layout():
    """On AVX512-BF16 CPUs, an eval forward repacks a 4-bit weight for bitsandbytes' CPU kernel (absmax in bf16,
    double quantization undone). Repack by hand (this machine may lack the instructions) and read it back."""
    if not hasattr(F, "_convert_weight_packed_for_cpu"):
        pytest.skip("this bitsandbytes has no CPU packed layout (added in 0.49)")
    q = layer_4bit(weight_like(), "nf4", double_quant=True)
    before = dequantized_weight(q)
    q.weight.data, q.weight.quant_state = F._convert_weight_packed_for_cpu(q.weight.data, q.weight.quant_state)
    packed_data, packed_absmax = q.weight.data.clone(), q.weight.quant_state.absmax
    after = dequantized_weight(q)
    torch.testing.assert_close(after, before, rtol=2 ** -7, atol=0)  # only absmax's bf16 rounding differs
    assert torch.equal(q.weight.data, packed_data) and q.weight.quant_state.absmax is packed_absmax  # untouched
    assert q.weight.quant_state.packing_format_for_cpu
    new = weight_like(seed=1)
    requantize_(q, new)
    s = q.weight.quant_state
    assert s.nested and not getattr(s, "packing_format_for_cpu", False) and s.dtype == torch.float32
    assert rel(dequantized_weight(q), new) < NF4_REL_ERR


def test_check_quantized_model(nf4_model):
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "lm_head"]
    kinds = check_quantized_model(nf4_model, names, method_needs_weight_grad=True, offset=True)
    assert kinds == {names[0]: "nf4", names[1]: "nf4", "lm_head": None}
    with pytest.raises(ValueError, match="not found"):
        check_quantized_model(nf4_model, ["model.layers.0.self_attn.nope"], False, False)
    model = nn.Sequential(nn.Linear(4, 4), QuantLinear())
    with pytest.raises(ValueError, match="target '1'.*GPTQ"):
        check_quantized_model(model, ["0", "1"], method_needs_weight_grad=False, offset=False)
    pending = bnb.nn.Linear4bit(8, 8, quant_type="nf4")  # not moved to a device: never quantized
    with pytest.raises(ValueError, match="target 'p'.*not quantized yet"):
        check_quantized_model(model, {"p": pending}, method_needs_weight_grad=False, offset=True)


def test_qpissa_residual_quantizes_better(record_property):
    """QPiSSA on one layer: quantizing the residual W − s·B·A (PiSSA's principal part kept in float) loses less than
    quantizing W: ‖W − (dq(Q(W − sBA)) + sBA)‖ ≤ ‖W − dq(Q(W))‖."""
    w, r, s = weight_like(64, 128, decay=0.5), 8, 2.0
    q = layer_4bit(w, "nf4", double_quant=True)
    plain = float((w - dequantized_weight(q)).norm())
    res = init_factors("pissa", w, rank=r, scaling=s)
    sba = s * res.B @ res.A
    requantize_(q, w - sba)
    residual = float((w - (dequantized_weight(q) + sba)).norm())
    record_property("qpissa_errors", {"plain_nf4": plain / float(w.norm()), "residual": residual / float(w.norm())})
    assert residual < 0.85 * plain
