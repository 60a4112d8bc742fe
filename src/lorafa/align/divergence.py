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

from ..checks import check_number, check_positive_int, is_real

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
    """Raise ValueError for an unknown kind, τ that is not a number > 0 or β outside (0, 1) (the bad input of
    SPEC §5)."""
    if kind not in kinds:
        raise ValueError(f"divergence kind must be one of {', '.join(kinds)}; got {kind!r}")
    check_number("temperature", temperature, low=0, low_open=True)
    if kind == "jsd":
        if not is_real(beta) or not 0 < beta < 1:
            raise ValueError(f"jsd needs beta, a number in (0, 1), got {beta!r}: beta = 0 and 1 are not limits of the "
                             "mixture; use kind='fkl' or 'rkl' for those")


def _select(x: torch.Tensor, mask: torch.Tensor | None, what: str) -> torch.Tensor:
    """The rows of x (positions × features) that the mask keeps, flattened to 2-D."""
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    if mask.shape != x.shape[:-1]:
        raise ValueError(f"{what}: the mask has shape {tuple(mask.shape)}, the positions {tuple(x.shape[:-1])}")
    return x[mask.to(x.device, torch.bool)]


def _plogr(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p·(log p − log q) with 0·log 0 = 0: a token that p gives probability 0 (a −inf logit) adds nothing, and its
    gradient is 0 (not NaN). A NaN p stays NaN, so bad inputs are not hidden."""
    return p * torch.where(p == 0, 0.0, log_p - log_q)


def _position_divergence(s: torch.Tensor, t: torch.Tensor, kind: str, temperature: float, beta: float) -> torch.Tensor:
    """Σ over the vocabulary of one kind's divergence, for each row of a chunk (fp32)."""
    log_s = F.log_softmax(s.float() / temperature, dim=-1)
    log_t = F.log_softmax(t.float() / temperature, dim=-1)
    if kind == "fkl":  # KL(p_T || p_S)
        return _plogr(log_t.exp(), log_t, log_s).sum(-1)
    if kind == "rkl":  # KL(p_S || p_T)
        return _plogr(log_s.exp(), log_s, log_t).sum(-1)
    # M = (1 - β) p_S + β p_T, in log space; β KL(p_T || M) + (1 - β) KL(p_S || M). Where both logits are −inf, M = 0
    # and both terms are 0; logsumexp then gets finite stand-ins, as its gradient at all −inf inputs is NaN
    both = (log_s == -math.inf) & (log_t == -math.inf)
    log_m = torch.logsumexp(torch.stack([torch.where(both, 0.0, log_s + math.log(1 - beta)),
                                         torch.where(both, 0.0, log_t + math.log(beta))]), dim=0)
    return beta * _plogr(log_t.exp(), log_t, log_m).sum(-1) + (1 - beta) * _plogr(log_s.exp(), log_s, log_m).sum(-1)


def _bad(x: torch.Tensor) -> torch.Tensor:
    """Rows of x holding a NaN or +inf."""
    return (torch.isnan(x) | (x == math.inf)).any(-1)


def _dtype_hint(dtype: torch.dtype) -> str:
    half = " (they are float16, which overflows above 65504)" if dtype == torch.float16 else ""
    return (f"{half}. A teacher run in float16 can overflow: load it in bf16 or fp32 (ModelTeacher(..., dtype=torch."
            "bfloat16), ++align.teacher_dtype=bf16)")


def _explain_nonfinite(s: torch.Tensor, t: torch.Tensor, kind: str, what: str, teacher_dtype: torch.dtype) -> None:
    """Raise ValueError saying why a divergence over rows s, t is not finite (called only when it is not)."""
    n = s.shape[0]
    bad_t, bad_s = _bad(t), _bad(s)
    if bad_t.any():
        raise ValueError(f"{what}: the teacher's outputs contain NaN or +inf at {int(bad_t.sum())} of the {n} "
                         f"positions used{_dtype_hint(teacher_dtype)}; or check the teacher checkpoint itself.")
    if bad_s.any():
        raise ValueError(f"{what}: the student's outputs contain NaN or +inf at {int(bad_s.sum())} of the {n} "
                         "positions used: the training diverged (lower the learning rate) or the student overflows in "
                         "float16 (train in bf16 or fp32).")
    if s.dim() == 2 and kind in LOGIT_KINDS:
        empty_t, empty_s = (t == -math.inf).all(-1), (s == -math.inf).all(-1)
        if empty_t.any() or empty_s.any():
            who = "teacher" if empty_t.any() else "student"
            raise ValueError(f"{what}: the {who} gives every logit −inf at {int((empty_t | empty_s).sum())} positions "
                             "(no distribution): mask those positions out.")
        zero, other = ("teacher", "student") if kind == "rkl" else ("student", "teacher")
        raise ValueError(f"{what}: {kind} is infinite: the {zero} gives probability 0 (logit −inf) to tokens the "
                         f"{other} gives positive probability. Use kind='jsd' (always finite) "
                         f"{'or fkl ' if kind == 'rkl' else 'or rkl ' if kind == 'fkl' else ''}or mask those tokens.")
    raise ValueError(f"{what}: the result is not finite (the inputs are finite: an overflow in the distance)"
                     f"{_dtype_hint(teacher_dtype)}")


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
        chunk_size: positions per fp32 chunk, an integer >= 1.

    Returns:
        A scalar (fp32). 0 when the mask keeps no position. A token that a distribution gives probability 0 (a −inf
        logit) adds 0 to that distribution's p·log(p/q) terms.

    Raises:
        ValueError: unknown kind, τ <= 0, β outside (0, 1), chunk_size < 1, or shapes that differ; a NaN or +inf in
            either input at a position used, or a result that is not finite (e.g. rkl where the teacher gives
            probability 0 to a token the student does not): the message says which, with a hint on the teacher's
            dtype (a float16 teacher can overflow).
    """
    check_divergence_args(kind, temperature, beta)
    check_positive_int("chunk_size", chunk_size)
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
    if not torch.isfinite(total):
        _explain_nonfinite(s.detach(), t, kind, "logit_divergence", teacher_logits.dtype)
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

    Raises:
        ValueError: a bad kind or shapes that differ; a result that is not finite (NaN or inf in the inputs: the
            message says whose).
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
        value = (s - t).pow(2).mean(-1).mean()
    else:
        value = (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    if not torch.isfinite(value):
        _explain_nonfinite(s.detach(), t, kind, "hidden_divergence", teacher_hidden.dtype)
    return value


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of [batch, seq, features] hidden states over the attended positions: [batch, features]."""
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)
