"""The runner's `align.*` section -> a checked teacher and alignment term (SPEC §5). Every check that needs no model
runs in `check_align_section`, when the config is parsed; the rest when the teacher is loaded, before the
statistics pass."""

from __future__ import annotations

import torch

from ..checks import check_number
from .divergence import HIDDEN_KINDS, LOGIT_KINDS, check_divergence_args
from .mapping import LinearMap, TruncateVocab
from .schedule import CyclicSchedule
from ..methods.registry import METHODS, base_change, changes_base, resolve_method
from .teacher import ModelTeacher, SelfTeacher, _output_size
from .term import TARGETS, AlignmentTerm

MODES = ("none", "distill", "self", "cyclic")
PROJECTIONS = ("none", "truncate", "learned")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_LEARNED_PARAMS = 16_000_000  # a vocabulary × vocabulary logit map would be billions


def uses_self_teacher(a) -> bool:
    return a.mode == "self" or (a.mode == "cyclic" and a.teacher is None)


def schedule_of(a) -> CyclicSchedule:
    if a.mode == "cyclic":
        return CyclicSchedule(task_steps=a.task_steps, align_steps=a.align_steps, task_lambda=a.task_lambda,
                              align_lambda=a.lambda_, align_task_weight=a.align_task_weight,
                              warmup_steps=a.warmup_steps)
    return CyclicSchedule.constant(a.lambda_, a.align_task_weight)


def check_align_section(a, init_configs=()) -> None:
    """Raise ValueError for any `align.*` setting that cannot work, with what to do instead.

    Args:
        a: the AlignSection.
        init_configs: the run's InitConfigs (a self teacher needs inits that leave the base weights unchanged, an EMA
            refresh students with merged weights).
    """
    if a.mode not in MODES:
        raise ValueError(f"align.mode must be one of {', '.join(MODES)}, got {a.mode!r} (select with +align=...)")
    if a.mode == "none":
        if a.teacher is not None:
            raise ValueError("align.teacher is set but align.mode is none: select +align=distill (or cyclic)")
        if any(c.align_init for c in init_configs):
            raise ValueError("init.align_init=true initialises toward a teacher: select +align=distill (or cyclic) "
                             "with ++align.teacher=...")
        return
    if a.mode == "distill" and a.teacher is None:
        raise ValueError("align.mode=distill needs a teacher: ++align.teacher=<HF id or path> (or +align=self to align "
                         "to the base model)")
    if a.mode == "self" and a.teacher is not None:
        raise ValueError("align.mode=self aligns to the student's own base model: drop align.teacher, or use "
                         "+align=distill")
    if a.target not in TARGETS:
        raise ValueError(f"align.target must be one of {', '.join(TARGETS)}, got {a.target!r}")
    for name, low, high in (("lambda_", 0, None), ("temperature", 0, None), ("beta", 0, 1), ("task_lambda", 0, None),
                            ("align_task_weight", 0, None), ("ema_mu", 0, 1)):
        check_number(f"align.{name}", getattr(a, name), low=low, high=high, high_open=name == "ema_mu")
    check_divergence_args(a.kind, a.temperature, a.beta, LOGIT_KINDS if a.target == "logits" else HIDDEN_KINDS)
    if a.layer_map is not None and a.target != "hidden":
        raise ValueError("align.layer_map is for align.target=hidden")
    if a.projection not in PROJECTIONS:
        raise ValueError(f"align.projection must be one of {', '.join(PROJECTIONS)}, got {a.projection!r}")
    if a.projection == "truncate" and a.target != "logits":
        raise ValueError(f"align.projection=truncate keeps the first logits of a padded vocabulary; on align.target="
                         f"{a.target} it would drop hidden features, which are not aligned by index across models: use "
                         "++align.projection=learned for hidden states of other widths")
    if a.teacher_dtype is not None and a.teacher_dtype not in DTYPES:
        raise ValueError(f"align.teacher_dtype must be one of {', '.join(DTYPES)} or null, got {a.teacher_dtype!r}")
    schedule_of(a)  # λ >= 0, phase lengths
    if a.refresh is not None:
        if a.refresh not in ("ema", "checkpoint"):
            raise ValueError(f"align.refresh must be ema, checkpoint or null, got {a.refresh!r}")
        if a.mode != "cyclic" or a.teacher is None:
            raise ValueError("align.refresh renews a separate teacher at each task phase's start: it needs "
                             "+align=cyclic with ++align.teacher=...")
        if a.refresh == "ema":
            for c in init_configs:
                if not METHODS[resolve_method(c.method)[0]].mergeable:
                    raise ValueError(f"align.refresh=ema makes the teacher an EMA of the student's merged weights, "
                                     f"but a {c.method} student has none (its router makes the update input-"
                                     "dependent): use ++align.refresh=checkpoint or drop align.refresh")
    if any(c.align_init for c in init_configs) and (a.mode == "none" or uses_self_teacher(a)):
        raise ValueError("init.align_init=true initialises toward a teacher: it needs +align=distill or cyclic with "
                         "++align.teacher=... (against the base model itself the alignment gradient is 0)")
    if uses_self_teacher(a):
        for c in init_configs:
            if changes_base(c):
                raise ValueError(f"aligning to the base model runs the student with its adapters disabled, which is "
                                 f"the original model only if the init leaves the base weights unchanged; "
                                 f"{base_change(c)}. Use an init that does not, or "
                                 "++align.teacher=<the base model's id or path>.")


def load_teacher(a, task_kind: str, num_labels: int | None, student_dtype, device, student_tokenizer):
    """The ModelTeacher of `align.teacher` (None for a self teacher), frozen on `device`.

    Raises:
        ValueError: the teacher's tokenizer is not the student's (lorafa aligns the two models position by position
            on the student's tokens).
    """
    if a.mode == "none" or uses_self_teacher(a):
        return None
    dtype = DTYPES[a.teacher_dtype] if a.teacher_dtype else student_dtype
    teacher = ModelTeacher(a.teacher, device=device, dtype=dtype, kind=task_kind, num_labels=num_labels)
    tok = teacher.tokenizer
    if tok is not None and student_tokenizer is not None and tok.get_vocab() != student_tokenizer.get_vocab():
        raise ValueError(f"the teacher {a.teacher!r} has another tokenizer than the student: the teacher runs on the "
                         "student's token ids, position by position, so the two must share a tokenizer. Pick a teacher "
                         "of the student's family.")
    return teacher


def build_term(a, student, teacher, max_steps: int) -> AlignmentTerm:
    """The alignment term for a run of `max_steps` optimiser steps (a self teacher when `teacher` is None).

    Raises:
        ValueError: phases that do not fit the run; widths or vocabularies that differ without a projection.
    """
    schedule = schedule_of(a)
    schedule.check_fits(max_steps)
    teacher = teacher if teacher is not None else SelfTeacher(student)
    s_size, t_size = _sizes(a.target, student, teacher)
    student_map = teacher_map = None
    if a.projection == "truncate":
        n = min(s_size, t_size)
        student_map, teacher_map = TruncateVocab(n), TruncateVocab(n)
    elif a.projection == "learned":
        if s_size * t_size > MAX_LEARNED_PARAMS:
            raise ValueError(f"a learned projection {s_size} -> {t_size} has {s_size * t_size:,} parameters: map hidden "
                             "states (align.target=hidden or pooled), or use projection=truncate for a padded "
                             "vocabulary")
        device = next(p.device for p in student.parameters())
        student_map = LinearMap(s_size, t_size).to(device)
    elif s_size != t_size:
        raise ValueError(f"the student's {a.target} have width {s_size} and the teacher's {t_size}: set "
                         "++align.projection=truncate (a padded vocabulary) or learned")
    refresh = None if a.refresh is None else (a.refresh, a.ema_mu if a.refresh == "ema" else a.teacher)
    about = {"mode": a.mode, "teacher": a.teacher or "base model (adapters disabled)", "kind": a.kind,
             "target": a.target, "lambda": a.lambda_, "temperature": a.temperature}
    return AlignmentTerm(teacher, kind=a.kind, temperature=a.temperature, beta=a.beta, schedule=schedule,
                         target=a.target, layer_map=a.layer_map, student_map=student_map, teacher_map=teacher_map,
                         refresh=refresh, student=student, about=about)


class AlignmentTerms:
    """The `align.*` section's loss terms for one training run: none for align.mode=none, else one AlignmentTerm,
    built on its first use and the same object after. With init.align_init the init asks first (its dual objective,
    on the base model) and training reuses that term, so a learned projection is trained from, and saved as, the one
    the init aligned with; otherwise training builds it on the PeftModel (a self teacher needs the adapters).

    Args:
        a: the AlignSection; teacher: the loaded ModelTeacher (None: a self teacher); max_steps: the run's optimiser
            steps (the schedule must reach a realignment step).
    """

    def __init__(self, a, teacher, max_steps: int):
        self.section, self.teacher, self.max_steps = a, teacher, max_steps
        self._term = None

    def term(self, student) -> AlignmentTerm:
        """The alignment term (built on `student` the first time)."""
        if self._term is None:
            self._term = build_term(self.section, student, self.teacher, self.max_steps)
        return self._term

    def terms(self, student) -> list:
        """The terms training adds: [] for align.mode=none, else [the alignment term]."""
        return [] if self.section.mode == "none" else [self.term(student)]


def _sizes(target: str, student, teacher) -> tuple[int, int]:
    if target == "logits":
        return _output_size(student), teacher.n_outputs
    return student.config.hidden_size, teacher.model.config.hidden_size
