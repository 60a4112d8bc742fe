"""KaSA (ICLR 2025) through PEFT's own variant (`LoraConfig(kasa_config=KasaConfig(...))`), SPEC §9.

PEFT truncates each adapted weight to its k − r largest singular pairs when the adapter is added and trains
ΔW = s·B·diag(σ)·A, but leaves the paper's regulariser β·Σσ² + γ·(‖BᵀB − I‖_F + ‖AAᵀ − I‖_F) to the training loop
(`LoraModel._get_kasa_loss`). `kasa_loss` is that value for any user loop; `KasaTerm` is the same as a loss term of
`lorafa.terms.TermsTrainer`, which the runner adds for `init.method=kasa`.

The truncation is destructive and happens again whenever PEFT adds the adapter: `PeftModel.from_pretrained` on the
*original* base truncates it the same way, so a saved KaSA adapter loads on the original base; merging bakes the
truncated base into the checkpoint.
"""

from __future__ import annotations

import dataclasses

import torch
from peft import LoraConfig
from peft.tuners.lora.config import KasaConfig

TRUNCATION_NOTE = ("KaSA truncated each adapted base weight to its k − r largest singular pairs. PEFT repeats the "
                   "truncation when it loads this adapter on the original base (PeftModel.from_pretrained), so the "
                   "adapter loads there; the base alone (adapter disabled or unloaded) stays truncated.")


def kasa_lora_config(lora_config: LoraConfig, beta: float, gamma: float) -> LoraConfig:
    """The LoraConfig with KaSA's variant on (PEFT's `kasa_config`), with these regulariser weights.

    Raises:
        ValueError: the LoraConfig already sets a kasa_config with other weights.
    """
    current = lora_config.kasa_config
    if current is not None and (current.beta, current.gamma) != (beta, gamma):
        raise ValueError(f"lora_config.kasa_config has beta={current.beta}, gamma={current.gamma} but the InitConfig "
                         f"asks for beta={beta}, gamma={gamma}: set them in one place (InitConfig's "
                         "kasa_beta/kasa_gamma).")
    return dataclasses.replace(lora_config, kasa_config=KasaConfig(beta=beta, gamma=gamma))


def _lora_model(model):
    model = getattr(model, "module", model)  # DDP / accelerate wrappers
    inner = getattr(model, "base_model", None)
    if inner is None or not hasattr(inner, "_get_kasa_loss"):
        raise TypeError(f"kasa_loss needs a PEFT LoRA model (PeftModel), got {type(model).__name__}")
    return inner


def kasa_loss(model, adapter_names=None) -> torch.Tensor:
    """KaSA's regulariser summed over the model's KaSA layers, with each adapter's own β and γ (PEFT's
    `_get_kasa_loss`, which is what lorafa uses): add it to the task loss in a training loop.

    Args:
        model: the PeftModel (or a DDP/accelerate wrapper of it).
        adapter_names: None (the active adapters), a name or a list of names.

    Raises:
        ValueError: the model has no KaSA layer, so the term would silently be 0.
    """
    value = _lora_model(model)._get_kasa_loss(adapter_names)
    if not torch.is_tensor(value):
        raise ValueError("The model has no KaSA layer for these adapters: build it with InitConfig(method='kasa') "
                         "(or LoraConfig(kasa_config=...)) before adding KaSA's regulariser.")
    return value


class KasaTerm:
    """KaSA's regulariser as a `TermsTrainer` term (weight 1: β and γ are inside the value)."""

    name = "kasa"

    def weight(self, step: int) -> float:
        return 1.0

    def __call__(self, model, batch, outputs, step) -> torch.Tensor:
        return kasa_loss(model)
