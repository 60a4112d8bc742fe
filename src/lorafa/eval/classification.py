"""Accuracy of a sequence classifier on labelled examples."""

from __future__ import annotations

import torch

from ..stats.distributed import world


@torch.no_grad()
def classification_accuracy(model, collate, examples: list[dict], batch_size: int = 64) -> dict:
    """Fraction of `examples` ({"text", "label"}) whose argmax logit equals the label.

    Under torch.distributed each process scores its shard and the counts are summed.

    Returns:
        {"accuracy", "correct", "n"} over all examples.
    """
    if not examples:
        raise ValueError("No examples to evaluate: the test split is empty.")
    rank, world_size = world()
    shard = examples[rank::world_size]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(shard), batch_size):
        batch = {k: v.to(device) for k, v in collate(shard[i : i + batch_size]).items()}
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    model.train(was_training)
    if world_size > 1:
        t = torch.tensor([correct], device=device)
        torch.distributed.all_reduce(t)
        correct = int(t.item())
    return {"accuracy": correct / len(examples), "correct": correct, "n": len(examples)}
