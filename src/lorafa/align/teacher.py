"""Teachers (SPEC §5): a frozen model run under no_grad on the student's batch, or the student's own base.

A `ModelTeacher` holds any HF model (by id or path, or already loaded) in eval mode with gradients off, in its own
dtype, on the device it is given (one loaded by id or path without a device follows the student: it moves to the
student's device at its first use); its outputs move to the student's device. `SelfTeacher` runs the student with
its adapters disabled: the original model, at no extra weights, as long as the init left the base weights unchanged
(no offset, no KaSA truncation). A `ModelTeacher` with the student's architecture can be refreshed: an EMA of the
student's merged weights, or a reload from a checkpoint path. The EMA runs on an fp32 master copy when the teacher is
in half precision (bf16 cannot hold the small steps (1 − μ)·(merged − T) of a μ close to 1), and refuses students
whose adapters have no merged weights (GOAT).
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from ..checks import is_real, parse_device

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


def _teacher_device(device) -> torch.device | None:
    """ModelTeacher's `device` as a torch.device (None stays None); a string that names no device is refused."""
    return parse_device(device, "ModelTeacher's device is where the teacher runs: None (a model stays where it is, "
                                "one loaded by id or path follows the student), 'cpu', 'cuda', 'cuda:1', ... (a torch "
                                "device)")


class _Teacher:
    """What both teachers share: the wrapped model's depth and output size (for the term's checks)."""

    model: nn.Module

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def n_outputs(self) -> int:
        """The size of the output the term compares: the vocabulary of a causal LM, `num_labels` of a classifier."""
        return _output_size(self.model)


class ModelTeacher(_Teacher):
    """A frozen model. `model`: an nn.Module (moved to `device`, set to eval, gradients off) or an HF id / path
    loaded with `kind` ("causal_lm" | "classification", `num_labels` for the latter) in `dtype`.

    `device`: where the teacher runs. None: an nn.Module stays where it is; a model loaded by id or path follows the
    student, moved at its first use to the device of the student's outputs (`self.device` is None until then)."""

    def __init__(self, model, device=None, dtype=None, kind: str = "causal_lm", num_labels: int | None = None):
        device = _teacher_device(device)  # before loading anything
        self.source = model if isinstance(model, str) else None
        self.kind, self.num_labels, self.dtype = kind, num_labels, dtype
        self.tokenizer = None  # loaded with a teacher given by id or path
        self._master = None  # fp32 copies of a half-precision teacher's parameters, for the EMA refresh
        if isinstance(model, str):
            model, self.tokenizer = self._load(model)
            self.device = device
        else:
            self.device = device if device is not None else next(model.parameters()).device
        self.model = self._freeze(model.to(self.device) if self.device is not None else model)

    def _place(self, device) -> None:
        """A teacher that follows the student goes to the student's device at its first use."""
        if self.device is None:
            self.device = torch.device(device)
            self.model.to(self.device)

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
        self._place(out_device)
        out = self.model(**_inputs(batch, self.device), output_hidden_states=hidden)
        return _outputs(out, out_device, hidden)

    @torch.no_grad()
    def refresh_ema(self, student, mu: float) -> None:
        """T ← μ·T + (1 − μ)·(the student's merged weights W + ΔW), parameter by parameter (SPEC §5: an EMA of A
        and B separately would not be an EMA of B·A). A half-precision (bf16/fp16) teacher keeps an fp32 master copy
        of its parameters (4 bytes per parameter, on its device) that the EMA runs on; its own weights are the master
        rounded to its dtype. The merged weights are formed in fp32.

        Raises:
            ValueError: μ outside [0, 1); the teacher's parameters are not the student base model's (names or shapes
                differ); a student layer whose adapter PEFT cannot merge (GOAT: the router makes the update
                input-dependent, so no merged weight exists).
        """
        if not (is_real(mu) and 0 <= mu < 1):
            raise ValueError(f"the EMA refresh needs mu, a number in [0, 1), got {mu!r}")
        merged = dict(merged_weights(student, dtype=torch.float32, what="an EMA teacher refresh"))
        own = dict(self.model.named_parameters())
        if set(own) != set(merged) or any(own[k].shape != merged[k].shape for k in own):
            extra, missing = sorted(set(own) - set(merged))[:3], sorted(set(merged) - set(own))[:3]
            raise ValueError("an EMA refresh needs a teacher with the student's architecture; parameters only in the "
                             f"teacher: {extra}, only in the student: {missing} (or shapes differ)")
        half = any(p.dtype in (torch.float16, torch.bfloat16) for p in own.values())
        if half and self._master is None:
            self._master = {k: p.detach().float().clone() for k, p in own.items()}
        for name, p in own.items():
            if half:
                m = self._master[name]
                m.mul_(mu).add_(merged[name].to(m.device), alpha=1 - mu)
                p.copy_(m)
            else:
                p.mul_(mu).add_(merged[name].to(p.device, p.dtype), alpha=1 - mu)

    def reload(self, path: str | None = None) -> None:
        """Load the teacher again from `path` (default: where it was loaded from), e.g. a checkpoint that another
        job keeps updating. Drops the EMA's fp32 master copy."""
        path = path or self.source
        if path is None:
            raise ValueError("this teacher was given as a model object: pass the checkpoint path to reload from")
        model = self._load(path)[0]
        self.model = self._freeze(model.to(self.device) if self.device is not None else model)
        self._master = None


class SelfTeacher(_Teacher):
    """The student's base model: the student run with its adapters disabled, in eval mode, under no_grad.

    Raises:
        ValueError: the model has no LoRA adapter (then there is nothing to disable: the teacher would be the
            student itself); the init changed the base weights, so the disabled-adapter model is not the original:
            an offset (−s·B·A) or KaSA's truncation. Use an init that leaves the base unchanged, or a ModelTeacher
            of the base model's id.
    """

    def __init__(self, peft_model):
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        if not isinstance(peft_model, PeftModel) or not any(isinstance(m, LoraLayer)
                                                            for m in peft_model.modules()):
            raise ValueError(f"SelfTeacher needs the student as a PEFT model with LoRA adapters (it runs it with them "
                             f"disabled), got a {type(peft_model).__name__} with none: add the adapters first "
                             "(lorafa.initialize / get_peft_model), or use ModelTeacher for a separate model.")
        change = base_change(peft_model)
        if change:
            raise ValueError(f"self-alignment runs the student with its adapters disabled, which is the original model "
                             f"only if the init left the base weights unchanged; {change}. Use an init that does "
                             "not (lora, lora_one, lora_fa with offset=none, eva, goat), or a separate teacher: "
                             "ModelTeacher / align.teacher=<the base model's id or path>.")
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


def base_change(peft_model) -> str:
    """How the model's base weights differ from the original model's, in words ("" when they do not): an init that
    offsets them (lorafa's record, or a PEFT offset init such as pissa) or KaSA's truncation (lorafa's kasa, or PEFT's
    kasa_config on any layer)."""
    from peft.tuners.lora.variants import KasaLinearVariant

    from ..methods.registry import base_change as init_change
    from ..saving import init_record

    record = init_record(peft_model)
    if record is not None:
        if record.subtracted:
            return f"{record.init_config.method!r} offset them by −s·B·A"
        change = init_change(record.init_config)
        if change:
            return change
    else:
        init = getattr(peft_model.peft_config[peft_model.active_adapter], "init_lora_weights", True)
        if isinstance(init, str) and init.startswith(_OFFSET_PEFT_INITS):
            return f"{init!r} offset them"
    kasa = [n for n, m in peft_model.named_modules()
            if any(isinstance(v, KasaLinearVariant) for v in getattr(m, "lora_variant", {}).values())]
    if kasa:
        return f"KaSA truncated them (dropped each weight's r smallest singular pairs; e.g. {kasa[0]})"
    return ""


def unmergeable_layers(peft_model) -> list[str]:
    """The LoRA layers whose update no merged weight equals (GOAT's router makes it input-dependent)."""
    from ..goat import GoatLinearVariant

    return [n for n, m in peft_model.named_modules()
            if any(isinstance(v, GoatLinearVariant) for v in getattr(m, "lora_variant", {}).values())]


def check_mergeable(peft_model, what: str) -> None:
    """Raise ValueError if the student has layers whose adapters have no merged weight (for `what`, in words)."""
    bad = unmergeable_layers(peft_model)
    if bad:
        raise ValueError(f"{what} needs the student's merged weights W + ΔW, but {len(bad)} layers (e.g. {bad[0]}) are "
                         "GOAT layers: the router makes their update input-dependent, so no merged weight equals "
                         "the student. Use refresh=('checkpoint', path) or no refresh with GOAT.")


def merged_weights(peft_model, dtype: torch.dtype | None = None, what: str = "merging"):
    """(name, tensor) of the student's merged model W + ΔW, named as in the base model (no PEFT prefixes), one
    tensor at a time; the adapters' own parameters are not included. A layer with a LoRA variant (KaSA's
    B·diag(σ)·A, DoRA) is merged by the variant's own rule, as PEFT's merge does.

    Args:
        dtype: the tensors' dtype (default: each parameter's own; fp32 keeps small updates to a bf16 weight).
        what: what the merged weights are for, in the error's words.

    Raises:
        ValueError: a layer no merged weight equals (GOAT).
    """
    from peft.tuners.lora import LoraLayer

    check_mergeable(peft_model, what)  # raised when the first tensor is asked for, before any is yielded
    merges = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            adapter = peft_model.active_adapter
            if adapter in module.lora_A:
                variant = getattr(module, "lora_variant", {}).get(adapter)
                if variant is not None:
                    merge = lambda w, m=module, a=adapter, v=variant: v.merge_safe(m, a, w.clone())  # noqa: E731
                else:
                    merge = lambda w, m=module, a=adapter: w + m.get_delta_weight(a).to(w.dtype)  # noqa: E731
                merges[f"{name}.base_layer.weight"] = merge
    for name, p in peft_model.named_parameters():
        if "lora_" in name or ".original_module." in name:  # the adapters; a modules_to_save copy replaces the original
            continue
        value = p.detach() if dtype is None else p.detach().to(dtype)
        merge = merges.get(name)
        yield _base_name(name), value if merge is None else merge(value).to(value.dtype)


def _base_name(name: str) -> str:
    name = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", name.replace(".base_layer.", "."))


def _output_size(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        return head.weight.shape[0]
    return model.config.num_labels
