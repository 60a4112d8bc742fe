"""The cyclic task / realignment schedule of SPEC §5: each optimiser step's phase and its two loss weights."""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import check_number, check_positive_int

PHASES = ("warmup", "task", "align")


@dataclass(frozen=True)
class CyclicSchedule:
    """Optimiser steps 0, 1, 2, ...: `warmup_steps` of task-phase weights, then cycles of `task_steps` task steps
    (loss weights (1, task_lambda)) followed by `align_steps` realignment steps ((align_task_weight, align_lambda)).

    `task_steps=0` aligns at every step (plain distillation with weight `align_lambda`).

    Raises:
        ValueError: a negative length or weight, `align_steps` < 1 (the teacher would never be used).
    """

    task_steps: int
    align_steps: int
    task_lambda: float = 0.0
    align_lambda: float = 1.0
    align_task_weight: float = 1.0
    warmup_steps: int = 0

    def __post_init__(self):
        for name in ("task_steps", "align_steps", "warmup_steps"):
            check_positive_int(name, getattr(self, name), low=0)
        if self.align_steps < 1:
            raise ValueError("align_steps must be >= 1: with no realignment steps the teacher is never used (drop the "
                             "alignment instead)")
        for name in ("task_lambda", "align_lambda", "align_task_weight"):
            check_number(name, getattr(self, name), low=0)  # a bool or a string is refused, not read as 1

    @property
    def cycle(self) -> int:
        return self.task_steps + self.align_steps

    def phase(self, step: int) -> str:
        """"warmup", "task" or "align" for optimiser step `step` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return "warmup"
        return "task" if (step - self.warmup_steps) % self.cycle < self.task_steps else "align"

    def weights(self, step: int) -> tuple[float, float]:
        """(w_task, λ) for step `step`."""
        if self.phase(step) == "align":
            return float(self.align_task_weight), float(self.align_lambda)
        return 1.0, float(self.task_lambda)

    def task_phase_starts(self, step: int) -> bool:
        """Whether `step` begins a task phase that follows a realignment phase (when a teacher refresh happens)."""
        return step > 0 and self.phase(step) == "task" and self.phase(step - 1) == "align"

    def check_fits(self, max_steps: int) -> None:
        """Raise ValueError if a run of `max_steps` optimiser steps would never reach a realignment step."""
        first_align = self.warmup_steps + self.task_steps
        if max_steps <= first_align:
            raise ValueError(f"the alignment schedule's first realignment step is step {first_align} (warmup_steps="
                             f"{self.warmup_steps} + task_steps={self.task_steps}), but the run has {max_steps} steps: "
                             "shorten the phases or train longer")

    @classmethod
    def constant(cls, lambda_: float = 1.0, task_weight: float = 1.0) -> "CyclicSchedule":
        """Every step aligns: loss = task_weight · L_task + λ · D (plain distillation)."""
        return cls(task_steps=0, align_steps=1, align_lambda=lambda_, align_task_weight=task_weight)
