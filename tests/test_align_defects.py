"""Issue 25's alignment defects, each against an independent computation: self-alignment with a changed base (KaSA),
non-finite logits, the EMA refresh in bf16 and of variants (KaSA, GOAT), the mask without labels, bad options."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import VOCAB, lora_cfg, make_batches, tiny_llama

from lorafa import InitConfig, initialize
from lorafa.align import (AlignmentTerm, ModelTeacher, SelfTeacher, TruncateVocab, hidden_divergence,
                          logit_divergence, merged_weights)
from lorafa.align.build import check_align_section
from lorafa.runconfig import AlignSection

TARGETS = ["q_proj", "v_proj"]


def _nonzero_b(model, std=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# -- 3. self-alignment needs the original base ------------------------------------------------------------------------
def test_self_teacher_refuses_kasa_whose_base_is_truncated():
    """KaSA does not subtract, but truncates W: with the adapters disabled the model is not the original."""
    original = tiny_llama()
    kasa = initialize(tiny_llama(), lora_cfg(TARGETS), InitConfig(method="kasa"), progress=False)
    batch = make_batches(1)[0]
    with torch.no_grad(), kasa.disable_adapter():
        disabled = _logits(kasa, batch)
    assert (disabled - _logits(original, batch)).abs().max() > 1e-3  # the reason for the refusal
    with pytest.raises(ValueError, match="truncat"):
        SelfTeacher(kasa)
    # PEFT's own KaSA (no lorafa record) is refused too
    from peft import get_peft_model
    from peft.tuners.lora.config import KasaConfig

    peft_kasa = get_peft_model(tiny_llama(), lora_cfg(TARGETS, kasa_config=KasaConfig()))
    with pytest.raises(ValueError, match="truncat"):
        SelfTeacher(peft_kasa)


def test_self_teacher_accepts_goat_and_is_the_original_model():
    """GOAT leaves W unchanged (its residual is in the forward): the disabled-adapter model is the original."""
    goat = initialize(tiny_llama(), lora_cfg(TARGETS, r=4, alpha=8), InitConfig(method="goat", num_experts=2),
                      progress=False)
    batch = make_batches(1)[0]
    got = SelfTeacher(goat)(batch, torch.device("cpu"))["logits"]
    torch.testing.assert_close(got, _logits(tiny_llama(), batch), rtol=0, atol=0)


def test_the_runner_refuses_self_alignment_with_a_base_changing_init():
    with pytest.raises(ValueError, match="truncates them"):
        check_align_section(AlignSection(mode="self"), [InitConfig(method="kasa")])
    with pytest.raises(ValueError, match="truncates them"):
        check_align_section(AlignSection(mode="cyclic"), [InitConfig(method="kasa")])
    with pytest.raises(ValueError, match="offsets them"):
        check_align_section(AlignSection(mode="self"), [InitConfig(method="pissa")])
    for ok in ("lora", "goat", "lora_one"):
        check_align_section(AlignSection(mode="self"), [InitConfig(method=ok)])


def test_the_registry_marks_the_methods_that_change_the_base():
    from lorafa.methods.registry import METHODS, changes_base

    assert {n for n, m in METHODS.items() if changes_base(InitConfig(method=n))} == {
        n for n, m in METHODS.items() if m.subtracts} | {"kasa"}
    assert not changes_base(InitConfig(method="lora_fa")) and changes_base(InitConfig(method="lora_fa",
                                                                                       offset="subtract"))
    assert [n for n, m in METHODS.items() if not m.mergeable] == ["goat"]


# -- 4. non-finite logits ---------------------------------------------------------------------------------------------
def _hand(s_rows, t_rows, kind, beta=0.5):
    """The divergence with plain floats, terms with p = 0 left out (0·log 0 = 0); −inf logits have p = 0."""
    def softmax(xs):
        m = max(xs)
        e = [math.exp(x - m) if x != -math.inf else 0.0 for x in xs]
        return [v / sum(e) for v in e]

    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)

    vals = []
    for s, t in zip(s_rows, t_rows):
        ps, pt = softmax(s), softmax(t)
        if kind == "fkl":
            vals.append(kl(pt, ps))
        else:
            m = [(1 - beta) * a + beta * b for a, b in zip(ps, pt)]
            vals.append(beta * kl(pt, m) + (1 - beta) * kl(ps, m))
    return sum(vals) / len(vals)


@pytest.mark.parametrize("kind", ["fkl", "jsd"])
def test_minus_inf_teacher_logits_count_as_probability_zero(kind):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 6, generator=g, requires_grad=True)
    t = torch.randn(2, 3, 6, generator=g)
    t[0, 1, :3] = -math.inf  # e.g. a teacher that masks tokens
    t[1, 2, 5] = -math.inf
    want = _hand(s.detach().reshape(6, 6).tolist(), t.reshape(6, 6).tolist(), kind)
    got = logit_divergence(s, t, kind=kind, chunk_size=4)
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.backward()
    assert torch.isfinite(s.grad).all()
    # jsd: −inf on both sides of a token is a token neither model can emit: a value and gradient still
    s2 = s.detach().clone()
    s2[0, 1, 0] = -math.inf
    s2.requires_grad_(True)
    v = logit_divergence(s2, t, kind="jsd")
    v.backward()
    assert v.item() == pytest.approx(_hand(s2.detach().reshape(6, 6).tolist(), t.reshape(6, 6).tolist(), "jsd"),
                                     rel=1e-5)
    assert torch.isfinite(s2.grad).all() and float(s2.grad[0, 1, 0]) == 0.0  # a token no one can emit: no pull


def test_infinite_or_nan_divergences_raise_with_what_to_do():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 6, generator=g), torch.randn(2, 3, 6, generator=g)
    masked = t.clone()
    masked[0, 0, 2] = -math.inf
    with pytest.raises(ValueError, match="rkl is infinite.*teacher gives probability 0"):
        logit_divergence(s, masked, kind="rkl")
    for bad in (math.nan, math.inf):
        t_bad = t.clone()
        t_bad[1, 1, 3] = bad
        for kind in ("fkl", "rkl", "jsd"):
            with pytest.raises(ValueError, match="teacher's outputs contain NaN or \\+inf at 1 of the 6 positions"
                                                 ".*bf16"):
                logit_divergence(s, t_bad, kind=kind)
    # an fp16 teacher that overflowed: the message says so
    fp16 = t.half()
    fp16[0, 2, 0] = math.inf
    with pytest.raises(ValueError, match="float16, which overflows"):
        logit_divergence(s, fp16)
    s_bad = s.clone()
    s_bad[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="student's outputs"):
        logit_divergence(s_bad, t)
    all_inf = t.clone()
    all_inf[0, 0] = -math.inf
    with pytest.raises(ValueError, match="every logit −inf"):
        logit_divergence(s, all_inf)
    # a NaN at a position the mask leaves out is not used, so it is no error
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 1] = False
    t_bad = t.clone()
    t_bad[1, 1, 3] = math.nan
    assert logit_divergence(s, t_bad, mask).item() == pytest.approx(logit_divergence(s, t, mask).item())
    h = torch.randn(1, 3, 4, generator=g)
    h_bad = h.clone().half()
    h_bad[0, 0, 0] = math.inf
    with pytest.raises(ValueError, match="hidden_divergence.*float16"):
        hidden_divergence(h, h_bad)


# -- 5. EMA refresh of a bf16 teacher ---------------------------------------------------------------------------------
def test_ema_refresh_of_a_bf16_teacher_keeps_the_small_updates():
    """100 refreshes at μ = 0.99 of a bf16 teacher toward a bf16 student: the teacher equals the exact EMA (in fp64)
    up to bf16's rounding of it. Updating the bf16 weights in place loses most of each small step (66% error)."""
    from peft import get_peft_model

    student = _nonzero_b(get_peft_model(tiny_llama(), lora_cfg(TARGETS)), std=0.01).to(torch.bfloat16)
    teacher = ModelTeacher(tiny_llama(seed=3, dtype=torch.bfloat16))
    t0 = {k: p.double().clone() for k, p in teacher.model.named_parameters()}
    # the student's merged weights, computed here in fp64 from its parameters
    params = dict(student.named_parameters())
    merged, delta = {}, {}
    for k in t0:
        layer = k.rsplit(".", 1)[0]
        if layer.split(".")[-1] in TARGETS:
            pre = f"base_model.model.{layer}"
            b, a = params[f"{pre}.lora_B.default.weight"], params[f"{pre}.lora_A.default.weight"]
            delta[k] = 2.0 * b.double() @ a.double()
            merged[k] = params[f"{pre}.base_layer.weight"].double() + delta[k]
        else:
            merged[k] = params[f"base_model.model.{k}"].double()
            delta[k] = torch.zeros_like(merged[k])
    mu, n = 0.99, 100
    for _ in range(n):
        teacher.refresh_ema(student, mu)
    num = den = 0.0
    for k, p in teacher.model.named_parameters():
        assert p.dtype == torch.bfloat16
        exact = mu ** n * t0[k] + (1 - mu ** n) * merged[k]
        err = p.double() - exact
        # bf16's rounding of the exact value, and of the adapter's delta (PEFT forms it in the adapter's dtype)
        assert (err.abs() <= 2 ** -8 * (exact.abs() + delta[k].abs()) + 1e-7).all(), k
        num, den = num + err.pow(2).sum().item(), den + (exact - t0[k]).pow(2).sum().item()
    assert math.sqrt(num / den) < 0.05  # of the update (was 0.66)


def test_a_reload_drops_the_ema_master_copy(tmp_path):
    from peft import get_peft_model

    from tiny_assets import char_tokenizer

    tiny_llama(seed=3, dtype=torch.bfloat16).save_pretrained(tmp_path / "t")
    char_tokenizer().save_pretrained(tmp_path / "t")
    student = _nonzero_b(get_peft_model(tiny_llama(), lora_cfg(TARGETS))).to(torch.bfloat16)
    teacher = ModelTeacher(str(tmp_path / "t"), dtype=torch.bfloat16)
    teacher.refresh_ema(student, 0.0)  # now the student
    teacher.reload()
    reloaded = {k: p.double().clone() for k, p in teacher.model.named_parameters()}
    teacher.refresh_ema(student, 0.5)  # from the reloaded weights, not from the old master copy
    merged = dict(merged_weights(student, dtype=torch.float64))
    for k, p in teacher.model.named_parameters():
        want = 0.5 * reloaded[k] + 0.5 * merged[k]
        assert (p.double() - want).abs().max() <= 2 ** -8 * want.abs().max() + 1e-7, k


# -- 6. EMA refresh of variants ---------------------------------------------------------------------------------------
def test_ema_refresh_from_a_kasa_student_is_the_kasa_function():
    """μ = 0: the teacher becomes the student's merged KaSA model, W_truncated + s·B·diag(σ)·A, so it computes the
    student's function (PEFT's plain delta s·B·A misses diag(σ))."""
    student = _nonzero_b(initialize(tiny_llama(), lora_cfg(TARGETS), InitConfig(method="kasa"), progress=False))
    teacher = ModelTeacher(tiny_llama(seed=4))
    teacher.refresh_ema(student, 0.0)
    batch = make_batches(1)[0]
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(teacher(batch, torch.device("cpu"))["logits"], _logits(student, batch),
                                   rtol=1e-5, atol=1e-5)


def test_ema_refresh_refuses_a_goat_student():
    goat = initialize(tiny_llama(), lora_cfg(TARGETS, r=4, alpha=8), InitConfig(method="goat", num_experts=2),
                      progress=False)
    teacher = ModelTeacher(tiny_llama(seed=4))
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    with pytest.raises(ValueError, match="GOAT layers.*checkpoint"):
        teacher.refresh_ema(goat, 0.5)
    for k, v in teacher.model.state_dict().items():
        assert torch.equal(v, before[k])  # nothing half-refreshed
    with pytest.raises(ValueError, match="GOAT"):
        list(merged_weights(goat))
    with pytest.raises(ValueError, match="GOAT"):
        AlignmentTerm(teacher, refresh=("ema", 0.9), student=goat)
    with pytest.raises(ValueError, match="goat student has none"):
        check_align_section(AlignSection(mode="cyclic", teacher="t", refresh="ema"), [InitConfig(method="goat")])
    AlignmentTerm(teacher, refresh=("checkpoint", "some/path"), student=goat)  # a reload needs no merge


# -- 9. logits without labels -----------------------------------------------------------------------------------------
def test_logit_alignment_without_labels_uses_the_attention_mask():
    from peft import get_peft_model

    student = _nonzero_b(get_peft_model(tiny_llama(), lora_cfg(TARGETS)))
    teacher_model = tiny_llama(seed=5)
    term = AlignmentTerm(ModelTeacher(teacher_model), kind="fkl", student=student)
    batch = {k: v for k, v in make_batches(1)[0].items() if k != "labels"}
    assert (batch["attention_mask"] == 0).any()
    student.eval()
    with torch.no_grad():
        got = term(student, batch, student(**batch), 0)
        want = logit_divergence(_logits(student, batch), _logits(teacher_model, batch),
                                batch["attention_mask"].bool(), "fkl")
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        # the padded positions' token ids do not matter (right padding: no attended position sees them)
        other = dict(batch, input_ids=torch.where(batch["attention_mask"].bool(), batch["input_ids"],
                                                  (batch["input_ids"] + 7) % VOCAB))
        assert term(student, other, student(**other), 0).item() == pytest.approx(got.item(), rel=1e-5)


# -- 12. bad input ----------------------------------------------------------------------------------------------------
def test_numeric_options_are_checked_with_a_clear_message():
    s = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got '0.5' \\(str\\): write it "
                                         "without quotes"):
        logit_divergence(s, s, temperature="0.5")
    with pytest.raises(ValueError, match="temperature"):
        logit_divergence(s, s, temperature=True)
    with pytest.raises(ValueError, match="beta"):
        logit_divergence(s, s, kind="jsd", beta="0.5")
    for chunk in (-1, 0, 1.5, True, "4"):
        with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
            logit_divergence(s, s, chunk_size=chunk)
    with pytest.raises(ValueError, match="temperature"):
        AlignmentTerm(ModelTeacher(tiny_llama()), temperature="0.5")
    for field, value in (("temperature", "0.5"), ("beta", "0.5"), ("ema_mu", "0.5"), ("lambda_", "1"),
                         ("ema_mu", 1.0), ("beta", 0.0)):
        a = AlignSection(mode="cyclic", teacher="t", refresh="ema", kind="jsd", **{field: value})
        with pytest.raises(ValueError, match=f"align.{field}|beta"):
            check_align_section(a)


def test_a_teacher_loaded_by_id_follows_the_students_device(tmp_path):
    """ModelTeacher(path) without a device runs where the student's outputs are (the README's example), moved there
    at its first use; given a device, it stays there."""
    from tiny_assets import save_tiny_causal_lm

    path = save_tiny_causal_lm(str(tmp_path / "t"))
    teacher = ModelTeacher(path)
    assert teacher.device is None
    batch = make_batches(1)[0]
    out = teacher(batch, torch.device("cpu"))
    assert teacher.device == torch.device("cpu") and out["logits"].device == torch.device("cpu")
    assert ModelTeacher(path, device="cpu").device == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_teacher_loaded_by_id_moves_to_the_students_gpu(tmp_path):
    from peft import get_peft_model
    from tiny_assets import save_tiny_causal_lm

    path = save_tiny_causal_lm(str(tmp_path / "t"))
    teacher = ModelTeacher(path)
    student = get_peft_model(tiny_llama(), lora_cfg(TARGETS)).cuda()
    term = AlignmentTerm(teacher)
    batch = {k: (v % 64).cuda() if k == "input_ids" else v.cuda() for k, v in make_batches(1)[0].items()}
    term(student, batch, student(**batch), 0)
    assert next(teacher.model.parameters()).device.type == "cuda"


def test_refresh_self_teacher_and_truncate_bad_input():
    from peft import get_peft_model

    teacher = ModelTeacher(tiny_llama())
    for refresh in (("checkpoint", None), ("checkpoint", ""), ("ema", "0.9"), ("ema", 1.0), ("ema", True)):
        with pytest.raises(ValueError, match="path|mu"):
            AlignmentTerm(teacher, refresh=refresh)
    with pytest.raises(ValueError, match="needs the student as a PEFT model with LoRA adapters"):
        SelfTeacher(tiny_llama())
    student = get_peft_model(tiny_llama(), lora_cfg(TARGETS))
    for target in ("hidden", "pooled"):
        with pytest.raises(ValueError, match="TruncateVocab"):
            AlignmentTerm(teacher, target=target, teacher_map=TruncateVocab(16), student=student)
        with pytest.raises(ValueError, match="projection=truncate"):
            check_align_section(AlignSection(mode="distill", teacher="t", target=target, kind="mse",
                                             projection="truncate"))
    check_align_section(AlignSection(mode="distill", teacher="t", projection="truncate"))  # logits: its use
