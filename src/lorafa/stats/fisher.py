"""A statistics-pass loss whose gradients give the true Fisher: labels drawn from the model's own predictions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sampled_label_loss(seed: int = 0, ignore_index: int = -100):
    """`loss_fn(model, batch)` for `collect_stats`: the cross-entropy of the model's logits against labels sampled
    from its own softmax, at the positions the task loss scores (the batch's labels say which). With kinds=("kfac",)
    the output-gradient covariance C is then the K-FAC factor of the model's Fisher information (the curvature of a KL
    to the model), not the empirical Fisher of the data's labels.

    Args:
        seed: the sampling generator's seed (advanced from batch to batch; reset by calling this again).
        ignore_index: the label value of unscored positions.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)

    def loss(model, batch):
        labels = batch.get("labels")
        if labels is None:
            raise ValueError("sampled_label_loss needs the batch's labels to know which positions are scored")
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        logits = out.logits
        if logits.dim() == 3:  # causal LM: logit t predicts label t + 1
            mask = torch.zeros_like(labels, dtype=torch.bool)
            mask[:, :-1] = labels[:, 1:] != ignore_index
            logits = logits[mask]
        probs = F.softmax(logits.detach().float(), dim=-1).cpu()
        sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)
        return F.cross_entropy(logits.float(), sampled)

    return loss
