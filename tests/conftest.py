"""Tiny models built from configs (no downloads) and batches shaped like a causal-LM fine-tuning set."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 64


@torch.no_grad()
def batch_logits(model, batches) -> torch.Tensor:
    """The model's logits on every batch, concatenated, in eval mode and fp32."""
    model.eval()
    return torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                      for b in batches]).float()


def lora_cfg(targets, r=2, alpha=4, **kw):
    """A PEFT LoraConfig on `targets` without dropout (the tests compare outputs exactly)."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, **kw)


def tiny_llama(seed: int = 0, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(seed: int = 0, dtype=torch.float32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def make_batches(n_batches: int = 3, bsz: int = 4, seq: int = 12, seed: int = 1) -> list[dict]:
    """Right-padded batches; prompt tokens (first 3) and padding carry label -100."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, VOCAB, (bsz, seq), generator=g)
        lengths = torch.randint(seq // 2, seq + 1, (bsz,), generator=g)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        labels = ids.clone()
        labels[mask == 0] = -100
        labels[:, :3] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def batches():
    return make_batches()


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests without CUDA. LORAFA_TEST_DEVICE (default "cuda") is the device tests/test_gpu.py
    uses; set to "cpu" it runs those tests on the CPU (the 2-process one with gloo), so they are not skipped."""
    import os

    device = torch.device(os.environ.get("LORAFA_TEST_DEVICE", "cuda"))
    if device.type != "cuda" or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False); "
                                   "LORAFA_TEST_DEVICE=cpu runs the gpu tests on the CPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
