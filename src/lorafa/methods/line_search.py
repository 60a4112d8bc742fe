"""The length of the init step chosen by the loss (scale="line_search", SPEC §2.5): one global factor on every
layer's step, tried by forward passes over the statistics batches (or `search_batches`).

Unlike the methods beside it this is not a pure function of W and the statistics: it runs the model, with the steps
added through forward hooks, so no weight is changed.
"""

from __future__ import annotations

import logging
import math

import torch

from ..stats.collect import fsdp_sharded
from ..zero3 import gather_zero3
from ..stats.distributed import all_gather_objects, all_reduce_sum_
from ..targets import layer_rank_and_scaling

logger = logging.getLogger(__name__)


LINE_SEARCH_MAX_DOUBLINGS = 8  # up to 256× the starting steps
LINE_SEARCH_MAX_HALVINGS = 10  # down to 1/1024 of them


@torch.no_grad()
def line_search(model, targets, results, lora_config, batches, loss_fn=None, *, offset: bool,
                max_batches: int | None = None) -> dict:
    """Choose one global factor g on every layer's init step by the loss on the statistics batches (forward passes
    only, SPEC §2.5), and apply it to `results`.

    g = 1 (the steps as computed: `stable` or `kfac`) is tried first, then doubled while the loss falls (only if g = 1
    lowers it), else halved until the loss stops falling below the model's loss before the init; the lowest loss tried
    is kept, so on these batches the result is never worse than g = 1 nor
    than the model before the init (g = 0, a candidate when the base is offset; without an offset both factors would
    be zero and could not train, so there the smallest g tried is 2^-10). The steps are applied through forward
    hooks (x ↦ y + g·c·s·(x Aᵀ) Bᵀ), so the weights are never modified and nothing is rounded.

    Returns:
        {"tried": [[g, loss], ...], "chosen": g, "loss_before": loss at g = 0, "loss_chosen": ...}.
    """
    batches = list(batches)[: max_batches] if max_batches is not None else list(batches)
    if not batches:
        raise ValueError("scale='line_search' got no statistics batches for this process.")
    # under FSDP2 or ZeRO-3 each forward gathers weights on every rank: a rank with fewer batches runs blank passes
    blank = max(all_gather_objects(len(batches))) - len(batches) if fsdp_sharded(model) else 0
    deltas = {}
    for name, res in results.items():
        _, s = layer_rank_and_scaling(lora_config, name)
        B, A, c = res.initial_update(s)
        deltas[name] = (A, B, c * s)
    g_now = {"g": 0.0}

    def hook(module, args, out, name):
        A, B, coef = deltas[name]
        x = args[0]
        return out + (g_now["g"] * coef) * ((x @ A.to(x.device, x.dtype).T) @ B.to(x.device, x.dtype).T)

    handles = [m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n)) for n, m in targets.items()]
    was = model.training
    model.eval()
    tried: dict[float, float] = {}

    @torch.no_grad()  # forward only: no graph (the target weights still require grad here)
    def loss_at(g: float) -> float:
        if g not in tried:
            g_now["g"] = g
            total = torch.zeros(2, dtype=torch.float64, device=next(model.parameters()).device)
            with gather_zero3(model):  # a ZeRO-3 model: each module's weights whole while it runs
                for i, b in enumerate(batches + batches[:1] * blank):  # the blank passes are not counted
                    b = {k: v.to(total.device) if torch.is_tensor(v) else v for k, v in b.items()}
                    loss = (loss_fn(model, b) if loss_fn else model(**b).loss).double()
                    total += torch.stack([loss, torch.ones_like(loss)]) * (i < len(batches))
            all_reduce_sum_(total)
            tried[g] = float(total[0] / total[1])
            if not math.isfinite(tried[g]):
                tried[g] = math.inf
        return tried[g]

    try:
        before = loss_at(0.0)
        # up only while the steps help: where g = 1 already raises the loss, a longer step is never looked for
        # (far past the minimum the loss is not unimodal: measured 15.0 at g = 1 and 12.7 at g = 2, 1.4 at g = 0)
        if loss_at(1.0) < before and loss_at(2.0) < loss_at(1.0):
            for k in range(2, LINE_SEARCH_MAX_DOUBLINGS + 1):
                if loss_at(2.0 ** k) >= loss_at(2.0 ** (k - 1)):
                    break
        else:
            for k in range(1, LINE_SEARCH_MAX_HALVINGS + 1):
                if loss_at(2.0 ** -k) >= loss_at(2.0 ** (1 - k)) and loss_at(2.0 ** -k) < before:
                    break
        best = min((g for g in tried if g > 0), key=lambda g: tried[g])
        if offset and before < tried[best]:
            best = 0.0
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    for res in results.values():
        res.scale_step(best)
        res.info.update(step_norm=res.info.get("step_norm", 0.0) * best, global_factor=best)
        if res.subtract:
            res.info["offset_scale"] = res.offset_scale
    logger.info("lorafa line search: factor %g (loss %.4f; %.4f before the init, %.4f at factor 1)", best,
                tried[best], before, tried[1.0])
    return {"tried": sorted([g, v] for g, v in tried.items()), "chosen": best, "loss_before": before,
            "loss_chosen": tried[best], "loss_at_1": tried[1.0]}
