"""Functional alignment (SPEC §5): divergences against hand computations, the schedule, teachers, the loss term and
the Trainer that sums the terms."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import VOCAB, lora_cfg, make_batches, tiny_llama

from lorafa.align import (AlignmentTerm, CyclicSchedule, LinearMap, ModelTeacher, SelfTeacher, TruncateVocab,
                          causal_lm_mask, check_layer_map, default_layer_map, hidden_divergence, load_mapping,
                          logit_divergence, merged_weights, save_mapping)


def _softmax(xs, tau):
    m = max(x / tau for x in xs)
    e = [math.exp(x / tau - m) for x in xs]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _hand(s_rows, t_rows, kind, tau, beta):
    """τ² · mean over rows of the divergence, with plain floats."""
    vals = []
    for s, t in zip(s_rows, t_rows):
        ps, pt = _softmax(s, tau), _softmax(t, tau)
        if kind == "fkl":
            vals.append(_kl(pt, ps))
        elif kind == "rkl":
            vals.append(_kl(ps, pt))
        else:
            m = [(1 - beta) * a + beta * b for a, b in zip(ps, pt)]
            vals.append(beta * _kl(pt, m) + (1 - beta) * _kl(ps, m))
    return tau ** 2 * sum(vals) / len(vals)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("tau,beta", [(1.0, 0.5), (2.0, 0.3)])
def test_logit_divergence_matches_a_hand_computation_with_a_mask(kind, tau, beta):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    keep = [(b, p) for b in range(2) for p in range(3) if mask[b, p]]
    want = _hand([s[b, p].tolist() for b, p in keep], [t[b, p].tolist() for b, p in keep], kind, tau, beta)
    got = logit_divergence(s, t, mask, kind=kind, temperature=tau, beta=beta)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # no mask: every position
    rows = [(b, p) for b in range(2) for p in range(3)]
    want_all = _hand([s[b, p].tolist() for b, p in rows], [t[b, p].tolist() for b, p in rows], kind, tau, beta)
    assert logit_divergence(s, t, None, kind=kind, temperature=tau, beta=beta).item() == pytest.approx(want_all,
                                                                                                          rel=1e-5)
    assert logit_divergence(s, s.clone(), mask, kind=kind).item() == pytest.approx(0.0, abs=1e-6)


def test_logit_divergence_chunks_give_the_same_value_and_gradient():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 7, 11, generator=g, requires_grad=True)
    t = torch.randn(3, 7, 11, generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.3
    grads = []
    for chunk in (1, 4, 10_000):
        s.grad = None
        v = logit_divergence(s, t, mask, kind="jsd", temperature=1.5, chunk_size=chunk)
        v.backward()
        grads.append((v.item(), s.grad.clone()))
    for v, gr in grads[1:]:
        assert v == pytest.approx(grads[0][0], rel=1e-6)
        torch.testing.assert_close(gr, grads[0][1])
    assert grads[0][1][~mask].abs().max() == 0  # masked-out positions get no gradient


def test_logit_divergence_bad_input():
    s = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match="temperature"):
        logit_divergence(s, s, temperature=0)
    for beta in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="beta"):
            logit_divergence(s, s, kind="jsd", beta=beta)
    with pytest.raises(ValueError, match="kind"):
        logit_divergence(s, s, kind="kl")
    with pytest.raises(ValueError, match="mapping"):
        logit_divergence(s, torch.zeros(2, 3, 6))
    with pytest.raises(ValueError, match="mask"):
        logit_divergence(s, s, torch.ones(2, 4, dtype=torch.bool))


def test_hidden_divergence_matches_a_hand_computation():
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]])
    t = torch.tensor([[[0.0, 1.0], [0.0, 1.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, True, False]])
    # mse: mean over kept positions of the mean over features: ((1 + 1) / 2 + (0 + 1) / 2) / 2
    assert hidden_divergence(s, t, mask, "mse").item() == pytest.approx((1.0 + 0.5) / 2)
    # cosine: 1 − cos: orthogonal (1) and parallel (0)
    assert hidden_divergence(s, t, mask, "cosine").item() == pytest.approx(0.5)
    assert hidden_divergence(s, t, None, "mse").item() == pytest.approx((1.0 + 0.5 + (36 + 25) / 2) / 3)
    with pytest.raises(ValueError, match="kind"):
        hidden_divergence(s, t, mask, "fkl")


def test_causal_lm_mask_keeps_the_positions_whose_next_label_counts():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, 9, 10]])
    assert causal_lm_mask(labels).tolist() == [[False, True, True, False, False], [True, True, True, True, False]]


def test_cyclic_schedule_phases_and_weights_at_every_step():
    s = CyclicSchedule(task_steps=3, align_steps=2, task_lambda=0.1, align_lambda=2.0, align_task_weight=0.5,
                       warmup_steps=2)
    phases = [s.phase(i) for i in range(12)]
    assert phases == ["warmup"] * 2 + ["task"] * 3 + ["align"] * 2 + ["task"] * 3 + ["align"] * 2
    assert [s.weights(i) for i in (0, 2, 5, 6, 7)] == [(1.0, 0.1), (1.0, 0.1), (0.5, 2.0), (0.5, 2.0), (1.0, 0.1)]
    assert [i for i in range(12) if s.task_phase_starts(i)] == [7]
    s.check_fits(6)
    with pytest.raises(ValueError, match="first realignment step"):
        s.check_fits(5)
    assert [CyclicSchedule.constant(0.3).weights(i) for i in range(3)] == [(1.0, 0.3)] * 3
    for bad in ({"align_steps": 0}, {"task_lambda": -1.0}, {"task_steps": -1}, {"align_lambda": float("nan")}):
        with pytest.raises(ValueError):
            CyclicSchedule(**{"task_steps": 1, "align_steps": 1, **bad})


def test_layer_maps():
    assert default_layer_map(30, 60, pairs=3) == [(10, 20), (20, 40), (30, 60)]
    assert check_layer_map([[2, 2]], 2, 4) == [(2, 2)]
    with pytest.raises(ValueError, match="teacher has hidden states 0..2"):
        check_layer_map([(1, 3)], 2, 2)
    with pytest.raises(ValueError, match="student"):
        check_layer_map([(5, 1)], 2, 2)


def _student(seed=0, **cfg):
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(seed), lora_cfg(["q_proj", "v_proj"], **cfg))
    with torch.no_grad():  # non-zero B, so the adapters change the function
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def test_gradients_reach_the_adapters_and_the_projection_never_the_teacher():
    student, teacher_model = _student(), tiny_llama(seed=3)
    before = copy.deepcopy(teacher_model.state_dict())
    teacher = ModelTeacher(teacher_model)
    proj = LinearMap(VOCAB, VOCAB)
    term = AlignmentTerm(teacher, kind="jsd", student_map=proj, student=student)
    params = [p for p in student.parameters() if p.requires_grad] + term.parameters()
    opt = torch.optim.SGD(params, lr=0.1)
    student.train()
    lora = [p for n, p in student.named_parameters() if "lora_" in n]
    for batch in make_batches(2):
        # the gradients the term must give: jsd (β = 0.5) written out in plain autograd, on the whole batch at once
        out = student(**batch)
        with torch.no_grad():
            log_t = torch.log_softmax(teacher_model(input_ids=batch["input_ids"],
                                                    attention_mask=batch["attention_mask"]).logits, -1)
        log_s = torch.log_softmax(out.logits @ proj.weight.T, -1)
        log_m = torch.log(0.5 * log_s.exp() + 0.5 * log_t.exp())
        per = 0.5 * (log_t.exp() * (log_t - log_m)).sum(-1) + 0.5 * (log_s.exp() * (log_s - log_m)).sum(-1)
        ref = out.loss + per[causal_lm_mask(batch["labels"])].mean()
        want = torch.autograd.grad(ref, lora + [proj.weight])

        out = student(**batch)
        loss = out.loss + term(student, batch, out, step=0)
        loss.backward()
        for p, g in zip(lora + [proj.weight], want):
            assert g.abs().max() > 0
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)
        assert all(p.grad is None and not p.requires_grad for p in teacher_model.parameters())
        opt.step()
        opt.zero_grad()
    for k, v in teacher_model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert not teacher_model.training


def test_self_teacher_is_the_base_model_and_refuses_an_offset_base():
    from peft import get_peft_model

    base = tiny_llama()
    reference = copy.deepcopy(base)
    student = _student()
    batch = make_batches(1)[0]
    student.train()
    got = SelfTeacher(student)(batch, torch.device("cpu"))["logits"]
    want = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, want)
    assert student.training  # back to the student's mode
    pissa = get_peft_model(tiny_llama(), lora_cfg(["q_proj"], init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="offset"):
        SelfTeacher(pissa)


def test_ema_refresh_moves_the_teacher_toward_the_merged_student():
    student = _student()
    teacher = ModelTeacher(tiny_llama())
    batch = make_batches(1)[0]
    w0 = dict(teacher.model.named_parameters())["model.layers.0.self_attn.q_proj.weight"].clone()
    merged = dict(merged_weights(student))
    teacher.refresh_ema(student, mu=0.25)
    w1 = dict(teacher.model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(w1, 0.25 * w0 + 0.75 * merged["model.layers.0.self_attn.q_proj.weight"])
    teacher.refresh_ema(student, mu=0.0)  # now exactly the merged student
    student.eval()
    torch.testing.assert_close(teacher(batch, torch.device("cpu"))["logits"],
                               student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                               rtol=1e-5, atol=1e-5)
    other = ModelTeacher(tiny_llama_wide())
    with pytest.raises(ValueError, match="architecture"):
        other.refresh_ema(student, mu=0.5)


def tiny_llama_wide():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_vocabulary_mismatch_needs_a_mapping():
    from transformers import LlamaConfig, LlamaForCausalLM

    student = _student()
    cfg = LlamaConfig(vocab_size=VOCAB + 8, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    padded = ModelTeacher(LlamaForCausalLM(cfg))
    with pytest.raises(ValueError, match="mapping"):
        AlignmentTerm(padded, student=student)
    term = AlignmentTerm(padded, teacher_map=TruncateVocab(VOCAB), student=student)
    batch = make_batches(1)[0]
    out = student(**batch)
    with torch.no_grad():  # the teacher's first VOCAB logits, at the positions the task loss scores
        t_out = padded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             output_hidden_states=True)
    t_logits = t_out.logits[..., :VOCAB]
    mask = causal_lm_mask(batch["labels"])
    rows = mask.nonzero().tolist()
    want = _hand([out.logits[b, p].tolist() for b, p in rows], [t_logits[b, p].tolist() for b, p in rows], "fkl",
                 1.0, 0.5)
    assert term(student, batch, out, 0).item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="teacher has hidden states 0..3"):
        AlignmentTerm(padded, target="hidden", layer_map=[(2, 4)], student=student)
    hidden = AlignmentTerm(padded, target="hidden", layer_map=[(2, 3)], student=student)
    assert hidden.layer_map == [(2, 3)]
    out = student(**batch, output_hidden_states=True)
    # mse: mean over the scored positions of the mean over features of (h_S[2] − h_T[3])²
    s_h, t_h = out.hidden_states[2], t_out.hidden_states[3]
    want = sum(((s_h[b, p] - t_h[b, p]) ** 2).mean().item() for b, p in rows) / len(rows)
    assert hidden(student, batch, out, 0).item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="refresh"):
        AlignmentTerm(SelfTeacher(student), refresh=("ema", 0.9))


def test_a_saved_projection_reloads_with_the_same_outputs(tmp_path):
    proj = LinearMap(6, 4)
    with torch.no_grad():
        proj.weight.add_(torch.randn_like(proj.weight))
    save_mapping(proj, str(tmp_path))
    again = load_mapping(str(tmp_path))
    x = torch.randn(3, 6)
    torch.testing.assert_close(again(x), proj(x), rtol=0, atol=0)
    assert again.learned and again.weight.requires_grad
    assert sorted(p.name for p in tmp_path.iterdir()) == ["align_mapping.json", "align_mapping.safetensors"]


def test_terms_trainer_sums_the_weighted_terms_and_logs_every_step(tmp_path):
    from transformers import TrainingArguments

    from lorafa.terms import TermsTrainer

    student = _student()
    teacher = ModelTeacher(tiny_llama(seed=5))
    schedule = CyclicSchedule(task_steps=2, align_steps=1, align_lambda=0.5, align_task_weight=0.25, warmup_steps=1)
    term = AlignmentTerm(teacher, kind="fkl", schedule=schedule, student=student)
    rows = []
    data = [{k: v[i] for k, v in b.items()} for b in make_batches(3, bsz=2) for i in range(2)]

    def collate(examples):
        return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, max_steps=6, learning_rate=1e-3,
                             logging_steps=2, report_to=[], use_cpu=True, save_strategy="no", lr_scheduler_type="constant")
    # the term declares the task loss's weight (its schedule's): no task_weight= on the trainer
    trainer = TermsTrainer(model=student, args=args, train_dataset=data, data_collator=collate, terms=[term],
                           step_log=rows.append)
    # the loss at a realignment step is w_task · task + λ · D, evaluated by hand on one batch
    batch = collate(data[:1])
    trainer.state.global_step = 3
    student.train()
    torch.manual_seed(0)
    got = trainer.compute_loss(student, dict(batch))
    out = student(**batch)
    want = 0.25 * out.loss + 0.5 * term(student, batch, out, 3)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    trainer._step_sums.clear()
    trainer.state.global_step = 0
    trainer.train()
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["phase"] for r in rows] == ["warmup", "task", "task", "align", "task", "task"]
    assert [r["align_weight"] for r in rows] == [0, 0, 0, 0.5, 0, 0]
    assert [r["task_weight"] for r in rows] == [1, 1, 1, 0.25, 1, 1]
    assert ["align_loss" in r for r in rows] == [False, False, False, True, False, False]
    assert all(math.isfinite(r["task_loss"]) for r in rows)
    logged = [h for h in trainer.state.log_history if "loss" in h and "task_loss" in h]
    assert logged and "align_loss" in logged[1]  # steps 3-4 hold the realignment step


def test_align_init_equals_the_init_from_an_independent_gradient_of_the_combined_loss():
    """InitConfig(align_init=True): the statistics pass's G is the mean gradient of L_task + λ·D over the batches,
    so the init equals lora_one's from that gradient computed here with plain autograd."""
    from lorafa import InitConfig, initialize
    from lorafa.stats import LayerStats

    batches, lam = make_batches(2), 0.7
    teacher = ModelTeacher(tiny_llama(seed=2))
    term = AlignmentTerm(teacher, kind="jsd", temperature=2.0)
    targets = ["q_proj", "v_proj"]
    got = initialize(tiny_llama(), lora_cfg(targets), InitConfig(method="lora_one", align_init=True,
                                                                 align_lambda=lam, iters=2, bsz=4),
                     batches=batches, align=term, progress=False)

    base = tiny_llama()
    names = [n for n, m in base.named_modules() if n.split(".")[-1] in targets]
    grads = {n: torch.zeros_like(base.get_submodule(n).weight) for n in names}
    for b in batches:
        out = base(**b)
        loss = out.loss + lam * logit_divergence(out.logits, teacher.model(input_ids=b["input_ids"],
                                                                            attention_mask=b["attention_mask"]).logits,
                                                 causal_lm_mask(b["labels"]), "jsd", 2.0)
        gs = torch.autograd.grad(loss, [base.get_submodule(n).weight for n in names])
        for n, g in zip(names, gs):
            grads[n] += g / len(batches)
    stats = {n: LayerStats(grad=grads[n], n_batches=len(batches)) for n in names}
    want = initialize(base, lora_cfg(targets), InitConfig(method="lora_one", iters=2, bsz=4), stats=stats,
                      progress=False)
    got_w = {n: p for n, p in got.named_parameters() if "lora_" in n}
    for n, p in want.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(got_w[n], p, rtol=1e-4, atol=1e-6)
    plain = initialize(tiny_llama(), lora_cfg(targets), InitConfig(method="lora_one", iters=2, bsz=4),
                       batches=batches, progress=False)
    diff = max((dict(plain.named_parameters())[n] - p).abs().max().item() for n, p in got_w.items())
    assert diff > 1e-5  # the teacher changed the init (beyond the 1e-6 tolerance of the equality above)


def test_align_init_bad_input():
    from lorafa import InitConfig, initialize

    with pytest.raises(ValueError, match="uses no gradient"):
        InitConfig(method="eva", align_init=True)
    with pytest.raises(ValueError, match="align_lambda"):
        InitConfig(method="lora_fa", align_init=True, align_lambda=-1.0)
    batches = make_batches(1)
    with pytest.raises(ValueError, match="needs the teacher"):
        initialize(tiny_llama(), lora_cfg(["q_proj"]), InitConfig(method="lora_one", align_init=True, iters=1),
                   batches=batches, progress=False)
    term = AlignmentTerm(ModelTeacher(tiny_llama(seed=2)))
    with pytest.raises(ValueError, match="used by InitConfig"):
        initialize(tiny_llama(), lora_cfg(["q_proj"]), InitConfig(method="lora_one", iters=1), batches=batches,
                   align=term, progress=False)
    student = _student()
    with pytest.raises(ValueError, match="separate teacher"):
        initialize(tiny_llama(), lora_cfg(["q_proj"]), InitConfig(method="lora_one", align_init=True, iters=1),
                   batches=batches, align=AlignmentTerm(SelfTeacher(student)), progress=False)
