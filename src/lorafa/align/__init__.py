"""Functional alignment with a teacher (SPEC §5): divergences, mappings, the cyclic schedule, teachers and the loss
term that `lorafa.terms.TermsTrainer` (or a user's own loop) adds to the task loss."""

from .divergence import causal_lm_mask, hidden_divergence, logit_divergence, mean_pool
from .mapping import LinearMap, TruncateVocab, check_layer_map, default_layer_map, load_mapping, save_mapping
from .schedule import CyclicSchedule
from .teacher import ModelTeacher, SelfTeacher, merged_weights
from .term import AlignmentTerm

__all__ = ["AlignmentTerm", "CyclicSchedule", "LinearMap", "ModelTeacher", "SelfTeacher", "TruncateVocab",
           "causal_lm_mask", "check_layer_map", "default_layer_map", "hidden_divergence", "load_mapping",
           "logit_divergence", "mean_pool", "merged_weights", "save_mapping"]
