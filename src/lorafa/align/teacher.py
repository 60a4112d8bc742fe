"""Teachers (SPEC §5): a frozen model run under no_grad on the student's batch, or the student's own base.

A `ModelTeacher` holds any HF model (by id or path, or already loaded) in eval mode with gradients off, on its own
device and dtype; its outputs move to the student's device. `SelfTeacher` runs the student with its adapters
disabled: the original model, at no extra weights, as long as the init left the base weights unchanged. A
`ModelTeacher` with the student's architecture can be refreshed: an EMA of the student's merged weights, or a reload
from a checkpoint path.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

logger = logging.getLogger("lorafa.align")
TEACHER_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
# PEFT inits that rewrite the base weights (their disabled-adapter model is not the original)
_OFFSET_PEFT_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _inputs(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if k in TEACHER_INPUTS and v is not None}


def _outputs(out, device, hidden: bool) -> dict:
    res = {"logits": out.logits.to(device)}
    if hidden:
        res["hidden_states"] = tuple(h.to(device) for h in out.hidden_states)
    return res


class _Teacher:
    """What both teachers share: the wrapped model's depth and output size (for the term's checks)."""

    model: nn.Module

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def vocab_size(self) -> int:
        return _output_size(self.model)


class ModelTeacher(_Teacher):
    """A frozen model. `model`: an nn.Module (moved to `device`, set to eval, gradients off) or an HF id / path
    loaded with `kind` ("causal_lm" | "classification", `num_labels` for the latter) in `dtype`."""

    def __init__(self, model, device=None, dtype=None, kind: str = "causal_lm", num_labels: int | None = None):
        self.source = model if isinstance(model, str) else None
        self.kind, self.num_labels, self.dtype = kind, num_labels, dtype
        self.tokenizer = None  # loaded with a teacher given by id or path
        if isinstance(model, str):
            model, self.tokenizer = self._load(model)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = self._freeze(model.to(self.device))

    def _load(self, name_or_path: str):
        from ..models import load_causal_lm, load_sequence_classifier

        if self.kind == "causal_lm":
            return load_causal_lm(name_or_path, dtype=self.dtype)
        if self.kind == "classification":
            return load_sequence_classifier(name_or_path, num_labels=self.num_labels, dtype=self.dtype)
        raise ValueError(f"teacher kind must be causal_lm or classification, got {self.kind!r}")

    @staticmethod
    def _freeze(model: nn.Module) -> nn.Module:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    @torch.no_grad()
    def __call__(self, batch: dict, out_device, hidden: bool = False) -> dict:
        """{"logits", and with `hidden` "hidden_states"} of the teacher on the batch, on `out_device`."""
        out = self.model(**_inputs(batch, self.device), output_hidden_states=hidden)
        return _outputs(out, out_device, hidden)

    @torch.no_grad()
    def refresh_ema(self, student, mu: float) -> None:
        """T ← μ·T + (1 − μ)·(the student's merged weights W + s·B·A), parameter by parameter (SPEC §5: an EMA of A
        and B separately would not be an EMA of B·A).

        Raises:
            ValueError: the teacher's parameters are not the student base model's (names or shapes differ).
        """
        merged = dict(merged_weights(student))
        own = dict(self.model.named_parameters())
        if set(own) != set(merged) or any(own[k].shape != merged[k].shape for k in own):
            extra, missing = sorted(set(own) - set(merged))[:3], sorted(set(merged) - set(own))[:3]
            raise ValueError("an EMA refresh needs a teacher with the student's architecture; parameters only in the "
                             f"teacher: {extra}, only in the student: {missing} (or shapes differ)")
        for name, p in own.items():
            p.mul_(mu).add_(merged[name].to(p.device, p.dtype), alpha=1 - mu)

    def reload(self, path: str | None = None) -> None:
        """Load the teacher again from `path` (default: where it was loaded from), e.g. a checkpoint that another
        job keeps updating."""
        path = path or self.source
        if path is None:
            raise ValueError("this teacher was given as a model object: pass the checkpoint path to reload from")
        self.model = self._freeze(self._load(path)[0].to(self.device))


class SelfTeacher(_Teacher):
    """The student's base model: the student run with its adapters disabled, in eval mode, under no_grad.

    Raises:
        ValueError: the init rewrote the base weights (then the disabled-adapter model is not the original): use
            an init that leaves the base unchanged, or a ModelTeacher of the base model's id.
    """

    def __init__(self, peft_model):
        from ..peft_bridge import init_record

        record = init_record(peft_model)
        if record is not None:
            offset, method = record.subtracted, record.init_config.method
        else:
            init = getattr(peft_model.peft_config[peft_model.active_adapter], "init_lora_weights", True)
            offset, method = isinstance(init, str) and init.startswith(_OFFSET_PEFT_INITS), init
        if offset:
            raise ValueError(f"self-alignment runs the student with its adapters disabled, which is the original model "
                             f"only if the init left the base weights unchanged; {method!r} offset them. Use an init "
                             "that does not (lora, lora_one, lora_fa with offset=none, eva), or align.teacher=<the "
                             "base model's id or path>.")
        self.model = peft_model

    @torch.no_grad()
    def __call__(self, batch: dict, out_device, hidden: bool = False) -> dict:
        was_training = self.model.training
        self.model.eval()  # no dropout in the teacher
        try:
            with self.model.disable_adapter():
                out = self.model(**_inputs(batch, out_device), output_hidden_states=hidden)
        finally:
            self.model.train(was_training)
        return _outputs(out, out_device, hidden)


def merged_weights(peft_model):
    """(name, tensor) of the student's merged model W + ΔW, named as in the base model (no PEFT prefixes), one
    tensor at a time; the adapters' own parameters are not included."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            adapter = peft_model.active_adapter
            if adapter in module.lora_A:
                deltas[f"{name}.base_layer.weight"] = lambda m=module, a=adapter: m.get_delta_weight(a)
    for name, p in peft_model.named_parameters():
        if "lora_" in name or ".original_module." in name:  # the adapters; a modules_to_save copy replaces the original
            continue
        delta = deltas.get(name)
        value = p.detach() if delta is None else p.detach() + delta().to(p.dtype)
        yield _base_name(name), value


def _base_name(name: str) -> str:
    name = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", name.replace(".base_layer.", "."))


def _output_size(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        return head.weight.shape[0]
    return model.config.num_labels
