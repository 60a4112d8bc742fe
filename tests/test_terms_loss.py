"""TermsTrainer's task loss is transformers.Trainer's own: label smoothing, compute_loss_func and the token-count
normalisation over an accumulated batch (num_items_in_batch), with the terms added on the same scale."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainerCallback, TrainingArguments

from lorafa.terms import TermsTrainer

from conftest import make_batches, tiny_llama


def _rows() -> list[dict]:
    """Single examples of different lengths and different numbers of labelled tokens."""
    return [{k: v[i] for k, v in b.items()} for b in make_batches(2, bsz=4, seq=12, seed=3) for i in range(4)]


def _collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


class ZeroTerm:
    """A term whose weight is 0 at every step (it must then change nothing)."""

    name = "zero"

    def weight(self, step):
        return 0.0

    def __call__(self, model, batch, outputs, step):
        raise AssertionError("a term of weight 0 is not evaluated")


class LogitsTerm:
    """A per-micro-batch term that depends on the batch: the mean squared logit."""

    name = "logits"

    def __init__(self, w):
        self.w = w

    def weight(self, step):
        return self.w

    def __call__(self, model, batch, outputs, step):
        return outputs.logits.float().pow(2).mean()


class TaskWeightedLogitsTerm(LogitsTerm):
    """The same, declaring a weight on the task loss."""

    def __init__(self, w, task_w, name="logits"):
        super().__init__(w)
        self.task_w, self.name = task_w, name

    def task_weight(self, step):
        return self.task_w


class Grads(TrainerCallback):
    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters()}


def _sequential(cls):
    class InOrder(cls):  # a fixed micro-batch order (the hand computation groups the examples as the Trainer does)
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    return InOrder


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, learning_rate=0.1,
                lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                seed=0, max_grad_norm=0.0, logging_steps=1, remove_unused_columns=False)
    return TrainingArguments(**{**base, **kw})


def _build(cls, tmp_path, args_kw=None, **kw):
    model = tiny_llama(seed=0).train()
    grads = Grads(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = _sequential(cls)(model=model, args=_args(tmp_path, **(args_kw or {})), train_dataset=_rows(),
                               data_collator=_collate, optimizers=(optimizer, None), callbacks=[grads], **kw)
    return trainer, model, grads


def _loss_func(outputs, labels, num_items_in_batch=None):
    """A user loss unlike the model's: 1.5 × the summed shifted cross-entropy over the accumulated batch's tokens."""
    logits = outputs.logits[:, :-1].float()
    target = labels[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                            reduction="sum")
    n = num_items_in_batch if num_items_in_batch is not None else (target != -100).sum()
    return 1.5 * total / n


@pytest.mark.parametrize("setting", ["label_smoothing", "compute_loss_func"])
def test_with_a_zero_weight_term_the_loss_is_the_trainers_loss(tmp_path, setting):
    kw = {"compute_loss_func": _loss_func} if setting == "compute_loss_func" else {}
    args_kw = {"label_smoothing_factor": 0.5} if setting == "label_smoothing" else {}
    plain, pm, _ = _build(Trainer, tmp_path / "plain", args_kw, **kw)
    terms, tm, _ = _build(TermsTrainer, tmp_path / "terms", args_kw, terms=[ZeroTerm()], **kw)
    batch = _collate(_rows()[:2])
    want = plain.compute_loss(pm, dict(batch))
    got = terms.compute_loss(tm, dict(batch))
    # and differs from the model's own mean cross-entropy (else the test could not tell)
    assert abs(want.item() - pm(**batch).loss.item()) > 1e-3
    assert torch.equal(got, want), (got.item(), want.item())


@pytest.mark.parametrize("no_terms", [False, True], ids=["zero_weight_term", "no_terms"])
@pytest.mark.parametrize("setting", ["plain", "label_smoothing", "compute_loss_func"])
def test_with_a_zero_weight_term_accumulated_training_is_the_trainers(tmp_path, setting, no_terms):
    """gradient_accumulation_steps=2, micro-batches with unequal numbers of label tokens: the same gradients, the
    same trained weights and the same logged loss as a plain Trainer; with no terms at all, the same logs too (and
    no step records)."""
    kw = {"compute_loss_func": _loss_func} if setting == "compute_loss_func" else {}
    args_kw = {"gradient_accumulation_steps": 2, **({"label_smoothing_factor": 0.5}
                                                    if setting == "label_smoothing" else {})}
    counts = [int((_collate(_rows()[i:i + 2])["labels"][:, 1:] != -100).sum()) for i in (0, 2)]
    assert counts[0] != counts[1], counts  # else a per-micro-batch mean equals the accumulated one
    plain, pm, pg = _build(Trainer, tmp_path / "plain", args_kw, **kw)
    rows = []
    terms, tm, tg = _build(TermsTrainer, tmp_path / "terms", args_kw, terms=[] if no_terms else [ZeroTerm()],
                           step_log=rows.append, **kw)
    plain.train()
    terms.train()
    if no_terms:
        strip = [[{k: v for k, v in h.items() if k not in ("train_runtime", "train_samples_per_second",
                                                          "train_steps_per_second")} for h in t.state.log_history]
                 for t in (plain, terms)]
        assert strip[0] == strip[1] and rows == []
    assert pg.grads.keys() == tg.grads.keys()
    for n in pg.grads:
        assert torch.equal(pg.grads[n], tg.grads[n]), n
    for (n, p), (_, q) in zip(pm.named_parameters(), tm.named_parameters()):
        assert torch.equal(p, q), n
    logged = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (plain, terms)]
    assert logged[0] == logged[1]


def test_terms_and_the_task_weight_under_accumulation_are_the_hand_computed_objective(tmp_path):
    """loss = w_task · (token mean of the task loss over the accumulated batch) + w · (mean of the term over the
    micro-batches), by autograd here; and the step's logged values are those two means."""
    rows_log = []
    trainer, model, grads = _build(TermsTrainer, tmp_path, {"gradient_accumulation_steps": 2},
                                   terms=[TaskWeightedLogitsTerm(0.3, 0.5)], step_log=rows_log.append)
    trainer.train()

    ref = tiny_llama(seed=0).train()
    micro = [_collate(_rows()[i:i + 2]) for i in (0, 2)]
    n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    task_sum, term_sum = 0.0, 0.0
    for b in micro:
        out = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        logits = out.logits[:, :-1].float()
        task_sum = task_sum + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1),
                                              ignore_index=-100, reduction="sum")
        term_sum = term_sum + out.logits.float().pow(2).mean()
    task, term = task_sum / n_tokens, term_sum / 2
    (0.5 * task + 0.3 * term).backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(grads.grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    (row,) = rows_log
    assert row["task_weight"] == 0.5 and row["logits_weight"] == 0.3
    assert row["task_loss"] == pytest.approx(task.item(), rel=1e-5)
    assert row["logits_loss"] == pytest.approx(term.item(), rel=1e-5)


def test_the_task_weight_is_the_product_of_the_terms_declarations(tmp_path):
    trainer, _, _ = _build(TermsTrainer, tmp_path, terms=[TaskWeightedLogitsTerm(0.3, 0.5, "a"), LogitsTerm(0.1),
                                                           TaskWeightedLogitsTerm(0.2, 0.25, "b")])
    assert trainer.task_weight(0) == 0.125
    assert _build(TermsTrainer, tmp_path / "none")[0].task_weight(3) == 1.0
    with pytest.raises(TypeError, match="task_weight"):
        _build(TermsTrainer, tmp_path / "old", terms=[LogitsTerm(0.3)], task_weight=lambda step: 0.5)


def test_the_terms_see_the_labels_when_the_trainer_pops_them(tmp_path):
    seen = []

    class LabelsTerm(LogitsTerm):
        def __call__(self, model, batch, outputs, step):
            seen.append("labels" in batch)
            return super().__call__(model, batch, outputs, step)

    trainer, model, _ = _build(TermsTrainer, tmp_path, {"label_smoothing_factor": 0.1}, terms=[LabelsTerm(1.0)])
    trainer.compute_loss(model, _collate(_rows()[:2]))
    assert seen == [True]
