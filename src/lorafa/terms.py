"""What training adds to the task loss: named terms with step-dependent weights, summed by one Trainer subclass.

    loss(step) = w_task(step) · L_task + Σ_i w_i(step) · term_i(model, batch, outputs, step)

A term is any object with `name`, `weight(step) -> float` and `__call__(model, batch, outputs, step) -> scalar`;
optionally `task_weight(step) -> float` (the term's weight on the task loss, e.g. the cyclic schedule's realignment
phases: w_task is the product of the terms' declarations, 1 without any), `needs_hidden` (the student's forward
returns hidden states), `phase(step) -> str`, `on_step_begin(model, step)` (e.g. a teacher refresh),
`parameters()` (trainable tensors of the term itself, e.g. a learned projection: `term_parameters(terms)` lists them
for the optimiser, which is built with them; under several processes their gradients are averaged here, since they
live outside the DDP-wrapped model) and `report(folder, save) -> dict` (what the term was, for a run's results;
`save`: whether this process writes the term's files beside the adapter in `folder`). A term whose weight is 0 at a
step is not evaluated at that step. Which terms a method brings comes from the method registry (`Method.terms`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
from transformers import Trainer, TrainerCallback


class TermsTrainer(Trainer):
    """HF Trainer whose training loss is the weighted sum above; evaluation losses stay the task loss alone.

    Args (besides Trainer's):
        terms: the loss terms (none: exactly HF's Trainer, and nothing is logged besides its own logs).
        step_log: called after every optimiser step with {"step", "phase", "task_loss", "task_weight",
            "<name>_loss", "<name>_weight"} (means over the step's micro-batches, this process's values), when
            there are terms.

    The task loss is the Trainer's own (`Trainer.compute_loss`: label smoothing, `compute_loss_func`, and the
    token-count normalisation over the accumulated batch, `num_items_in_batch`, when the model or `compute_loss_func`
    takes it), so with every term's weight 0 and w_task = 1 the loss and the gradients are exactly a plain Trainer's.
    The terms are per-micro-batch values; they enter each accumulated step as the mean over its micro-batches, scaled
    as the task loss is: when the Trainer treats the task loss as already normalised over the accumulated batch (and
    so does not divide it by the accumulation steps), the terms are divided by the accumulation steps here.
    """

    def __init__(self, *args, terms=(), step_log: Callable[[dict], None] | None = None, **kwargs):
        if "task_weight" in kwargs:
            raise TypeError("TermsTrainer takes no task_weight=: a term declares its weight on the task loss, "
                            "task_weight(step) (the product of the terms' declarations is used)")
        super().__init__(*args, **kwargs)
        self.terms = list(terms)
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names) or "task" in names:
            raise ValueError(f"loss term names must be distinct and not 'task', got {names}")
        self.step_log = step_log
        self._step_sums: dict[str, list[float]] = defaultdict(list)
        self._log_sums: dict[str, list[float]] = defaultdict(list)
        if self.terms:
            self.add_callback(_TermsCallback(self))

    def task_weight(self, step: int) -> float:
        """w_task at optimiser step `step`: the product of the terms' `task_weight(step)` (1 without any)."""
        w = 1.0
        for t in self.terms:
            if hasattr(t, "task_weight"):
                w *= float(t.task_weight(step))
        return w

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.terms:  # HF's Trainer, untouched
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
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
        w_task = self.task_weight(step)
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
        row = {"step": step + 1, "task_weight": self.task_weight(step)}
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
        return term_parameters(self.terms)


def term_parameters(terms) -> list[torch.nn.Parameter]:
    """The trainable parameters the terms declare (`parameters()`, e.g. a learned projection), for the optimiser."""
    return [p for t in terms if hasattr(t, "parameters") for p in t.parameters() if p.requires_grad]


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
    """The loss terms a method brings to training (SPEC §9: KaSA's regulariser, GOAT's load-balancing loss), as the
    method registry declares them (`Method.terms`, from the method's options); [] for a method that brings none."""
    from .methods.registry import METHODS, make_options, resolve_method

    spec = METHODS[resolve_method(init_config.method)[0]]
    if spec.terms is None:
        return []
    return list(spec.terms(make_options(spec.name, **init_config.method_options())))
