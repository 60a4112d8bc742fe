"""The alignment loss term (SPEC §5): λ(step) · D(φ(student(x)), ψ(teacher(x))), for `lorafa.terms.TermsTrainer`
or a user's own loop; and `aligned_loss`, the dual objective L_task + λ·D that a teacher-aware init computes its
statistics and line search on."""

from __future__ import annotations

import os

from torch import nn

from ..checks import is_real
from .divergence import (HIDDEN_KINDS, LOGIT_KINDS, causal_lm_mask, check_divergence_args, hidden_divergence,
                         logit_divergence, mean_pool)
from .mapping import TruncateVocab, check_layer_map, default_layer_map
from .schedule import CyclicSchedule

TARGETS = ("logits", "hidden", "pooled")


class AlignmentTerm:
    """One named loss term aligning the student to a teacher.

    Args:
        teacher: a `ModelTeacher` or `SelfTeacher` (anything with `__call__(batch, out_device, hidden)`).
        kind: fkl | rkl | jsd for target="logits"; mse | cosine for "hidden" and "pooled".
        temperature, beta: τ and the jsd β (logits only).
        schedule: a `CyclicSchedule` (default: align at every step with λ = 1).
        target: "logits" (default, SPEC §5: usually the better target for LoRA students), "hidden" (the layer map's
            hidden states) or "pooled" (the last hidden state's mean over the attention mask).
        layer_map: (student, teacher) indices into `hidden_states` for target="hidden" (default: the last layers).
        student_map, teacher_map: φ and ψ (nn.Modules on the last dimension; default identity).
        refresh: None, ("ema", μ) or ("checkpoint", path): what happens to the teacher at each task phase's start
            (EMA: of the student's merged weights, so not for GOAT students, which have none).
        name: the term's name in the logs.
        about: what `report` returns for a run's results (default: kind, target and temperature).

    Logit positions: those the task loss scores (`causal_lm_mask(labels)`) when the batch has per-token labels, else
    the attended ones (the attention mask), else all.

    Raises:
        ValueError: a bad kind, τ, β, target, layer map or refresh; widths or vocabularies that differ without a
            mapping (checked here, before training, from the two models' sizes when both are known); TruncateVocab
            on hidden states; an EMA refresh of a student without merged weights (GOAT).
    """

    def __init__(self, teacher, kind: str | None = None, temperature: float = 1.0, beta: float = 0.5,
                 schedule: CyclicSchedule | None = None, target: str = "logits", layer_map=None,
                 student_map: nn.Module | None = None, teacher_map: nn.Module | None = None, refresh=None,
                 name: str = "align", student=None, about: dict | None = None):
        if target not in TARGETS:
            raise ValueError(f"alignment target must be one of {', '.join(TARGETS)}, got {target!r}")
        kind = kind or ("fkl" if target == "logits" else "mse")
        check_divergence_args(kind, temperature, beta, LOGIT_KINDS if target == "logits" else HIDDEN_KINDS)
        self.teacher, self.kind, self.temperature, self.beta = teacher, kind, temperature, beta
        self.schedule = schedule or CyclicSchedule.constant()
        self.target, self.name = target, name
        self.about = dict(about) if about is not None else {"kind": kind, "target": target, "temperature": temperature}
        if target != "logits" and any(isinstance(m, TruncateVocab) for m in (student_map, teacher_map)):
            raise ValueError(f"TruncateVocab keeps the first logits of a padded vocabulary; on {target} states it "
                             "would drop features, which are not aligned by index across models: use a LinearMap "
                             "(projection=learned) for hidden states of other widths")
        self.student_map, self.teacher_map = student_map or nn.Identity(), teacher_map or nn.Identity()
        self.refresh = _check_refresh(refresh, teacher, student)
        self.layer_map = None
        if target == "hidden":
            s_depth = student.config.num_hidden_layers if student is not None else None
            t_depth = teacher.num_layers
            if layer_map is None:
                if s_depth is None:
                    raise ValueError("target='hidden' without a layer_map needs the student (to know its depth)")
                layer_map = default_layer_map(s_depth, t_depth)
            self.layer_map = check_layer_map(layer_map, s_depth if s_depth is not None else t_depth, t_depth)
        if student is not None and target == "logits":
            self._check_vocab(student)

    @property
    def needs_hidden(self) -> bool:
        return self.target != "logits"

    def weight(self, step: int) -> float:
        return self.schedule.weights(step)[1]

    def task_weight(self, step: int) -> float:
        """The schedule's weight on the task loss at `step` (align_task_weight in realignment phases, else 1)."""
        return self.schedule.weights(step)[0]

    def phase(self, step: int) -> str:
        return self.schedule.phase(step)

    def parameters(self):
        """The trainable parameters of φ and ψ (learned projections): give them to the optimiser."""
        return [p for m in (self.student_map, self.teacher_map) for p in m.parameters() if p.requires_grad]

    def report(self, folder: str, save: bool = True) -> dict:
        """What the alignment was (`about`), for a run's results, and where a learned projection was saved: beside
        the adapter in `folder`, written when `save` (the main process)."""
        from .mapping import LinearMap, save_mapping

        report = dict(self.about)
        if isinstance(self.student_map, LinearMap) and save:
            report["projection"] = save_mapping(self.student_map, folder)
        return report

    def on_step_begin(self, model, step: int) -> None:
        if self.refresh is None or not self.schedule.task_phase_starts(step):
            return
        how, arg = self.refresh
        if how == "ema":
            self.teacher.refresh_ema(model, arg)
        else:
            self.teacher.reload(arg)

    def __call__(self, model, batch: dict, outputs, step: int):
        """D between the student's `outputs` (from `model(**batch)`, with hidden states for the hidden targets) and
        the teacher's on the same batch."""
        logits = outputs["logits"]
        teacher = self.teacher(batch, logits.device, hidden=self.needs_hidden)
        labels = batch.get("labels")
        causal = logits.dim() == 3 and labels is not None and labels.shape == logits.shape[:2]
        attention = batch.get("attention_mask")
        if self.target == "logits":
            # the task loss's positions; without labels, the attended ones (padding is no position of the text)
            mask = causal_lm_mask(labels) if causal else _attention_mask(attention, logits)
            return logit_divergence(self.student_map(logits), self.teacher_map(teacher["logits"]), mask, self.kind,
                                    self.temperature, self.beta)
        s_hidden, t_hidden = outputs["hidden_states"], teacher["hidden_states"]
        if self.target == "pooled":
            return hidden_divergence(self.student_map(mean_pool(s_hidden[-1], attention)),
                                     self.teacher_map(mean_pool(t_hidden[-1], attention)), None, self.kind)
        mask = causal_lm_mask(labels) if causal else (attention.bool() if attention is not None else None)
        losses = [hidden_divergence(self.student_map(s_hidden[i]), self.teacher_map(t_hidden[j]), mask, self.kind)
                  for i, j in self.layer_map]
        return sum(losses) / len(losses)

    def _check_vocab(self, student) -> None:
        from .teacher import _output_size

        s, t = _output_size(student), self.teacher.n_outputs
        s_out, t_out = _mapped_size(self.student_map, s), _mapped_size(self.teacher_map, t)
        if s_out != t_out:
            raise ValueError(f"the student has {s} outputs and the teacher {t} (after the mappings: {s_out} and "
                             f"{t_out}): a teacher with another vocabulary or label set needs a mapping (TruncateVocab "
                             "for a padded vocabulary, LinearMap otherwise)")


def _attention_mask(attention, logits):
    """The attention mask as a boolean mask over per-token logits ([batch, seq, vocab]); None for per-sequence
    logits (a classifier's [batch, labels]) or without a mask."""
    if attention is None or logits.dim() != 3 or tuple(attention.shape) != tuple(logits.shape[:2]):
        return None
    return attention.bool()


def _mapped_size(mapping: nn.Module, size: int) -> int:
    if isinstance(mapping, nn.Identity):
        return size
    if hasattr(mapping, "size"):  # TruncateVocab
        return min(size, mapping.size)
    if hasattr(mapping, "weight"):  # LinearMap
        return mapping.weight.shape[0]
    return size


def _check_refresh(refresh, teacher, student=None):
    if refresh is None:
        return None
    if not (isinstance(refresh, (tuple, list)) and len(refresh) == 2 and refresh[0] in ("ema", "checkpoint")):
        raise ValueError(f"refresh must be None, ('ema', mu) or ('checkpoint', path); got {refresh!r}")
    how, arg = refresh
    if how == "ema":
        if not (is_real(arg) and 0 <= arg < 1):
            raise ValueError(f"the EMA refresh needs mu, a number in [0, 1), got {arg!r}")
    elif not (isinstance(arg, (str, os.PathLike)) and str(arg)):
        raise ValueError(f"refresh=('checkpoint', path) needs the path (or HF id) to reload the teacher from, got "
                         f"{arg!r}")
    if not hasattr(teacher, "refresh_ema"):
        raise ValueError("a refreshed teacher must be a separate model (ModelTeacher), not the student's own base")
    if how == "ema" and student is not None:
        from .teacher import check_mergeable

        check_mergeable(student, "refresh=('ema', mu)")
    return how, arg


def aligned_loss(align, lambda_: float, loss_fn=None):
    """`loss_fn(model, batch)` = L_task + λ · D(model, teacher), the dual objective of SPEC §5 at the init.

    Args:
        align: a `lorafa.align.AlignmentTerm` (its teacher must be a separate model: against the model itself D and
            its gradient are 0 at the start).
        lambda_: λ.
        loss_fn: the task loss (default `model(**batch).loss`).
    """
    if not hasattr(align, "teacher") or not hasattr(align.teacher, "refresh_ema"):
        raise ValueError("align_init needs an AlignmentTerm with a separate teacher model (ModelTeacher): against "
                         "the base model itself the alignment gradient is 0 at the start")

    def loss(model, batch):
        out = model(**batch, **({"output_hidden_states": True} if align.needs_hidden else {}))
        task = loss_fn(model, batch) if loss_fn is not None else out.loss
        return task + lambda_ * align(model, batch, out, 0)

    return loss
