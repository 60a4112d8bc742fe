"""What training adds to the task loss: named terms with step-dependent weights, summed by one Trainer subclass.

    loss(step) = w_task(step) · L_task + Σ_i w_i(step) · term_i(model, batch, outputs, step)

A term is any object with `name`, `weight(step) -> float` and `__call__(model, batch, outputs, step) -> scalar`;
optionally `needs_hidden` (the student's forward returns hidden states), `phase(step) -> str`, `on_step_begin(model,
step)` (e.g. a teacher refresh) and `parameters()` (trainable tensors of the term itself, e.g. a learned projection:
give them to the optimiser; under several processes their gradients are averaged here, since they live outside the
DDP-wrapped model). A term whose weight is 0 at a step is not evaluated at that step.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
from transformers import Trainer, TrainerCallback


class TermsTrainer(Trainer):
    """HF Trainer whose training loss is the weighted sum above; evaluation losses stay the task loss alone.

    Args (besides Trainer's):
        terms: the loss terms.
        task_weight: step -> w_task (default 1).
        step_log: called after every optimiser step with {"step", "phase", "task_loss", "task_weight",
            "<name>_loss", "<name>_weight"} (means over the step's micro-batches, this process's values).

    The task loss is the Trainer's own (`Trainer.compute_loss`: label smoothing, `compute_loss_func`, and the
    token-count normalisation over the accumulated batch, `num_items_in_batch`, when the model or `compute_loss_func`
    takes it), so with every term's weight 0 and w_task = 1 the loss and the gradients are exactly a plain Trainer's.
    The terms are per-micro-batch values; they enter each accumulated step as the mean over its micro-batches, scaled
    as the task loss is: when the Trainer treats the task loss as already normalised over the accumulated batch (and
    so does not divide it by the accumulation steps), the terms are divided by the accumulation steps here.
    """

    def __init__(self, *args, terms=(), task_weight: Callable[[int], float] | None = None,
                 step_log: Callable[[dict], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.terms = list(terms)
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names) or "task" in names:
            raise ValueError(f"loss term names must be distinct and not 'task', got {names}")
        self.task_weight = task_weight or (lambda step: 1.0)
        self.step_log = step_log
        self._step_sums: dict[str, list[float]] = defaultdict(list)
        self._log_sums: dict[str, list[float]] = defaultdict(list)
        self.add_callback(_TermsCallback(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        step = self.state.global_step
        active = [(t, t.weight(step)) for t in self.terms] if model.training else []
        active = [(t, w) for t, w in active if w]
        hidden = any(getattr(t, "needs_hidden", False) for t, _ in active)
        # the Trainer's own task loss; a copy of the inputs, since it pops "labels" (label smoothing,
        # compute_loss_func) and the terms read the batch as the collator made it
        task_inputs = {**inputs, **({"output_hidden_states": True} if hidden else {})}
        task, outputs = super().compute_loss(model, task_inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        if not model.training:
            return (task, outputs) if return_outputs else task
        # what training_step then does with the loss: divide it by the accumulation steps unless the task loss is
        # already normalised over the accumulated batch; the terms are per-micro-batch values, so in that case they
        # are divided here, and the task loss is logged as its micro-batch share times the accumulation steps
        accum = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        scaled = self._task_loss_is_scaled_for_ga(num_items_in_batch)
        term_scale = 1.0 / accum if scaled else 1.0
        w_task = float(self.task_weight(step))
        loss = task * w_task
        values = {"task_loss": task.detach() * (accum if scaled else 1)}
        for term, w in active:
            value = term(model, inputs, outputs, step)
            loss = loss + (w * term_scale) * value
            values[f"{term.name}_loss"] = value.detach()
        for k, v in values.items():
            self._step_sums[k].append(float(v))
        return (loss, outputs) if return_outputs else loss

    def _task_loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Whether `Trainer.training_step` takes the loss as already scaled for gradient accumulation (the rule of
        transformers >= 4.56: `loss_is_scaled_for_ga` when a subclass sets it, else normalised by num_items_in_batch
        in the model or by compute_loss_func)."""
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return bool(explicit)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)

    def step_row(self, step: int) -> dict:
        """The record of optimiser step `step` (0-based schedule index), built from the values summed so far."""
        row = {"step": step + 1, "task_weight": float(self.task_weight(step))}
        phase = next((t.phase(step) for t in self.terms if hasattr(t, "phase")), None)
        if phase is not None:
            row["phase"] = phase
        for t in self.terms:
            row[f"{t.name}_weight"] = float(t.weight(step))
        for k, vals in self._step_sums.items():
            row[k] = sum(vals) / len(vals)
            self._log_sums[k].append(row[k])
        self._step_sums.clear()
        return row

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self._log_sums:  # a training log: add each term's mean since the last one
            logs = {**logs, **{k: sum(v) / len(v) for k, v in self._log_sums.items()}}
            self._log_sums.clear()
        return super().log(logs, *args, **kwargs)

    def term_parameters(self) -> list[torch.nn.Parameter]:
        return [p for t in self.terms if hasattr(t, "parameters") for p in t.parameters() if p.requires_grad]


class _TermsCallback(TrainerCallback):
    def __init__(self, trainer: TermsTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # DDP broadcasts the model's parameters from rank 0 when it wraps the model, not the terms' own (a learned
        # projection initialised from each process's random state): start every process from rank 0's
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            with torch.no_grad():
                for p in self.trainer.term_parameters():
                    torch.distributed.broadcast(p.data, src=0)

    def on_step_begin(self, args, state, control, **kwargs):
        for t in self.trainer.terms:
            if hasattr(t, "on_step_begin"):
                t.on_step_begin(self.trainer.model, state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # the terms' own parameters are outside the DDP-wrapped model: average their gradients across processes
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            for p in self.trainer.term_parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad /= world

    def on_step_end(self, args, state, control, **kwargs):
        row = self.trainer.step_row(state.global_step - 1)
        if self.trainer.step_log is not None and state.is_world_process_zero:
            self.trainer.step_log(row)


def method_terms(init_config) -> list:
    """The loss terms a method brings to training (SPEC §9): KaSA's regulariser, GOAT's load-balancing loss."""
    from .methods.registry import METHODS, make_options

    variant = METHODS[init_config.method].variant
    if variant == "kasa":
        from .kasa import KasaTerm

        return [KasaTerm()]
    if variant == "goat":
        from .goat import GoatAuxTerm

        opts = make_options("goat", **init_config.method_options())
        return [GoatAuxTerm(opts.aux_loss_weight)] if opts.aux_loss_weight > 0 else []
    return []
