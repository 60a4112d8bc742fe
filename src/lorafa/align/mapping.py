"""Mappings φ/ψ applied to the last dimension of the aligned outputs (SPEC §5), and layer maps for hidden states.

A learned `LinearMap` trains with the adapters (pass `parameters()` to the optimiser) and is saved beside them with
`save_mapping`; `load_mapping` rebuilds it. A fixed one (`learned=False`, or `TruncateVocab`) has no trainable state.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..checks import check_positive_int
from ..fsio import write_atomic, write_json

MAPPING_FILE = "align_mapping.safetensors"
MAPPING_CONFIG = "align_mapping.json"


class LinearMap(nn.Module):
    """x ↦ x·Pᵀ with P of shape [out_features, in_features]: identity-initialised when the widths match, else
    orthonormal rows/columns (so the map starts norm-preserving). `weight` fixes P; `learned=False` freezes it."""

    def __init__(self, in_features: int, out_features: int, learned: bool = True, weight: torch.Tensor | None = None,
                 dtype=torch.float32):
        super().__init__()
        if weight is None:
            weight = torch.empty(out_features, in_features, dtype=dtype)
            if in_features == out_features:
                nn.init.eye_(weight)
            else:
                nn.init.orthogonal_(weight)
        if tuple(weight.shape) != (out_features, in_features):
            raise ValueError(f"LinearMap weight has shape {tuple(weight.shape)}, expected ({out_features}, "
                             f"{in_features})")
        self.weight = nn.Parameter(weight.clone(), requires_grad=learned)
        self.learned = learned

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"LinearMap expects {self.weight.shape[1]} features, got {x.shape[-1]}")
        return x.to(self.weight.dtype) @ self.weight.T

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, learned={self.learned}"


class TruncateVocab(nn.Module):
    """Keeps the first `size` logits: a teacher whose vocabulary is the student's plus padding rows (the same
    tokenizer with the embedding matrix rounded up) aligns after this, on the teacher side."""

    def __init__(self, size: int):
        super().__init__()
        check_positive_int("TruncateVocab size", size)  # the number of logits kept
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < self.size:
            raise ValueError(f"TruncateVocab({self.size}) got only {x.shape[-1]} logits")
        return x[..., : self.size]


def save_mapping(mapping: LinearMap, folder: str) -> str:
    """Write a LinearMap's weight and shape to `folder` (beside an adapter), each file under a temporary name first.

    Returns:
        The weights file's path.
    """
    from safetensors.torch import save_file

    if not isinstance(mapping, LinearMap):
        raise TypeError(f"only a LinearMap has weights to save, got {type(mapping).__name__}")
    weight = {"weight": mapping.weight.detach().cpu().contiguous()}
    path = write_atomic(os.path.join(folder, MAPPING_FILE), lambda tmp: save_file(weight, tmp))
    write_json(os.path.join(folder, MAPPING_CONFIG), {"in_features": mapping.weight.shape[1],
                                                      "out_features": mapping.weight.shape[0],
                                                      "learned": mapping.learned}, indent=None)
    return path


def load_mapping(folder: str, device=None) -> LinearMap:
    """The LinearMap `save_mapping` wrote to `folder`."""
    from safetensors.torch import load_file

    config_path, weights_path = os.path.join(folder, MAPPING_CONFIG), os.path.join(folder, MAPPING_FILE)
    if not (os.path.exists(config_path) and os.path.exists(weights_path)):
        raise FileNotFoundError(f"{folder} has no saved alignment mapping ({MAPPING_CONFIG}, {MAPPING_FILE})")
    with open(config_path) as f:
        config = json.load(f)
    weight = load_file(weights_path, device=str(device or "cpu"))["weight"]
    return LinearMap(config["in_features"], config["out_features"], learned=config["learned"], weight=weight)


def default_layer_map(student_layers: int, teacher_layers: int, pairs: int = 1) -> list[tuple[int, int]]:
    """`pairs` (student, teacher) indices into `hidden_states` (0 = embeddings, L = the last layer), spread evenly
    over depth and always including the last layers: e.g. 30 and 60 layers, 3 pairs -> (10, 20), (20, 40), (30, 60)."""
    if not 1 <= pairs <= student_layers:
        raise ValueError(f"pairs must be in [1, {student_layers}] (the student's depth), got {pairs}")
    return [(round(student_layers * k / pairs), round(teacher_layers * k / pairs)) for k in range(1, pairs + 1)]


def check_layer_map(layer_map, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Validate (student, teacher) indices into `hidden_states` (each model has depth + 1 of them).

    Raises:
        ValueError: an index past either model's depth, a negative one, or an empty map.
    """
    pairs = [tuple(p) for p in layer_map]
    if not pairs:
        raise ValueError("the layer map is empty: give at least one (student, teacher) pair")
    for p in pairs:
        if len(p) != 2 or not all(isinstance(i, int) for i in p):
            raise ValueError(f"layer map entries are (student, teacher) integer pairs, got {p!r}")
        s, t = p
        if not 0 <= s <= student_layers:
            raise ValueError(f"layer map ({s}, {t}): the student has hidden states 0..{student_layers}")
        if not 0 <= t <= teacher_layers:
            raise ValueError(f"layer map ({s}, {t}): the teacher has hidden states 0..{teacher_layers}")
    return pairs
