"""Prompt/answer examples to HF-style training batches (labels −100 on prompt and padding tokens)."""

from .collate import PROMPT_TEMPLATE, CausalLMCollator, format_prompt

__all__ = ["PROMPT_TEMPLATE", "CausalLMCollator", "format_prompt"]
