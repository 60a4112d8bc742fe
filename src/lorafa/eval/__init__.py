"""Evaluation: GSM8K accuracy with batched greedy generation, sharded over processes (SPEC §7)."""

from .gsm8k import answers_match, evaluate_gsm8k, extract_answer, generate, load_gsm8k_examples

__all__ = ["answers_match", "evaluate_gsm8k", "extract_answer", "generate", "load_gsm8k_examples"]
