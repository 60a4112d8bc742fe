"""Divergences between a student's and a teacher's outputs (SPEC §5), over the positions the task loss uses.

Logit divergences are computed in fp32 over chunks of positions, each chunk under activation checkpointing when the
student's logits need a gradient: the graph then holds only the logits themselves, never the fp32 log-probabilities
of all positions at once (a 49k vocabulary at 1k tokens is 200 MB per fp32 copy).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOGIT_KINDS = ("fkl", "rkl", "jsd")
HIDDEN_KINDS = ("mse", "cosine")
IGNORE_INDEX = -100


def causal_lm_mask(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The logit positions a causal LM's task loss uses: t such that the next label, labels[t + 1], is not ignored.

    Args:
        labels: [batch, seq] token ids with `ignore_index` where no loss is taken (prompt, padding).

    Returns:
        A boolean [batch, seq] mask over the logits' positions (the last position is never used).
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != ignore_index
    return mask


def check_divergence_args(kind: str, temperature: float = 1.0, beta: float = 0.5, kinds=LOGIT_KINDS) -> None:
    """Raise ValueError for an unknown kind, τ <= 0 or β outside (0, 1) (the bad input of SPEC §5)."""
    if kind not in kinds:
        raise ValueError(f"divergence kind must be one of {', '.join(kinds)}; got {kind!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if kind == "jsd" and not 0 < beta < 1:
        raise ValueError(f"jsd needs beta in (0, 1), got {beta!r}: beta = 0 and 1 are not limits of the mixture; use "
                         "kind='fkl' or 'rkl' for those")


def _select(x: torch.Tensor, mask: torch.Tensor | None, what: str) -> torch.Tensor:
    """The rows of x (positions × features) that the mask keeps, flattened to 2-D."""
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    if mask.shape != x.shape[:-1]:
        raise ValueError(f"{what}: the mask has shape {tuple(mask.shape)}, the positions {tuple(x.shape[:-1])}")
    return x[mask.to(x.device, torch.bool)]


def _position_divergence(s: torch.Tensor, t: torch.Tensor, kind: str, temperature: float, beta: float) -> torch.Tensor:
    """Σ over the vocabulary of one kind's divergence, for each row of a chunk (fp32)."""
    log_s = F.log_softmax(s.float() / temperature, dim=-1)
    log_t = F.log_softmax(t.float() / temperature, dim=-1)
    if kind == "fkl":  # KL(p_T || p_S)
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if kind == "rkl":  # KL(p_S || p_T)
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    # M = (1 - β) p_S + β p_T, in log space; β KL(p_T || M) + (1 - β) KL(p_S || M)
    log_m = torch.logsumexp(torch.stack([log_s + math.log(1 - beta), log_t + math.log(beta)]), dim=0)
    return beta * (log_t.exp() * (log_t - log_m)).sum(-1) + (1 - beta) * (log_s.exp() * (log_s - log_m)).sum(-1)


def logit_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
                     kind: str = "fkl", temperature: float = 1.0, beta: float = 0.5,
                     chunk_size: int = 512) -> torch.Tensor:
    """τ² · the mean over masked positions of a divergence between the softmaxes of logits / τ (SPEC §5).

    Args:
        student_logits: [..., vocab]; gradients flow into it.
        teacher_logits: [..., vocab], the same shape (map one of them first if the vocabularies differ).
        mask: boolean over the leading dimensions (e.g. `causal_lm_mask(labels)`); None uses every position.
        kind: "fkl" (KL(p_T‖p_S)), "rkl" (KL(p_S‖p_T)) or "jsd" (β·KL(p_T‖M) + (1−β)·KL(p_S‖M), M the β-mixture).
        temperature: τ > 0.
        beta: the jsd mixture weight, in (0, 1).
        chunk_size: positions per fp32 chunk.

    Returns:
        A scalar (fp32). 0 when the mask keeps no position.

    Raises:
        ValueError: unknown kind, τ <= 0, β outside (0, 1), or shapes that differ.
    """
    check_divergence_args(kind, temperature, beta)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: a teacher with another vocabulary needs a mapping "
                         "(lorafa.align.TruncateVocab, LinearMap)")
    s = _select(student_logits, mask, "logit_divergence")
    t = _select(teacher_logits.detach().to(s.device), mask, "logit_divergence")
    if s.shape[0] == 0:
        return student_logits.sum().float() * 0.0
    total = s.new_zeros((), dtype=torch.float32)
    for i in range(0, s.shape[0], chunk_size):
        args = (s[i:i + chunk_size], t[i:i + chunk_size], kind, temperature, beta)
        if s.requires_grad and torch.is_grad_enabled():  # recompute the chunk's fp32 intermediates in backward
            per = checkpoint(_position_divergence, *args, use_reentrant=False)
        else:
            per = _position_divergence(*args)
        total = total + per.sum()
    return temperature ** 2 * total / s.shape[0]


def hidden_divergence(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor | None = None,
                      kind: str = "mse") -> torch.Tensor:
    """The mean over masked positions of a distance between hidden states (SPEC §5).

    Args:
        student_hidden: [..., features]; gradients flow into it.
        teacher_hidden: [..., features], the same shape (map one of them first if the widths differ).
        mask: boolean over the leading dimensions; None uses every position.
        kind: "mse" (mean over features of the squared difference) or "cosine" (1 − cosine similarity).

    Returns:
        A scalar (fp32). 0 when the mask keeps no position.
    """
    check_divergence_args(kind, kinds=HIDDEN_KINDS)
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"student hidden states {tuple(student_hidden.shape)} and teacher's "
                         f"{tuple(teacher_hidden.shape)} differ: map one of them (lorafa.align.LinearMap)")
    s = _select(student_hidden, mask, "hidden_divergence").float()
    t = _select(teacher_hidden.detach().to(s.device), mask, "hidden_divergence").float()
    if s.shape[0] == 0:
        return student_hidden.sum().float() * 0.0
    if kind == "mse":
        return (s - t).pow(2).mean(-1).mean()
    return (1 - F.cosine_similarity(s, t, dim=-1)).mean()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of [batch, seq, features] hidden states over the attended positions: [batch, features]."""
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)
