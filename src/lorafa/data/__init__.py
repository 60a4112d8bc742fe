"""Datasets (a registry of tasks, local files) and collators (prompt/answer and text/label examples to batches)."""

from .collate import PROMPT_TEMPLATE, CausalLMCollator, ClassificationCollator, format_prompt
from .datasets import KNOWN_DATASETS, LoadOptions, TaskData, final_number, load_task, read_rows, split_rows, split_validation

__all__ = [
    "PROMPT_TEMPLATE",
    "CausalLMCollator",
    "ClassificationCollator",
    "format_prompt",
    "KNOWN_DATASETS",
    "LoadOptions",
    "TaskData",
    "final_number",
    "load_task",
    "read_rows",
    "split_rows",
    "split_validation",
]
