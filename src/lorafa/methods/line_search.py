"""The length of the init step chosen by the loss (scale="line_search", SPEC §2.5): one global factor on every
layer's step, tried by forward passes over the statistics batches (or `search_batches`); and the step's guard
(`guard_batches`), which only ever shortens a step that does not clearly lower the loss on examples outside the
statistics sample.

Unlike the methods beside it this is not a pure function of W and the statistics: it runs the model, with the steps
added through forward hooks, so no weight is changed.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager

import torch

from ..stats.collect import fsdp_sharded, reshard_fsdp
from ..zero3 import gather_zero3
from ..stats.distributed import all_gather_objects, all_reduce_sum_
from ..targets import layer_rank_and_scaling

logger = logging.getLogger(__name__)


LINE_SEARCH_MAX_DOUBLINGS = 8  # up to 256× the starting steps
LINE_SEARCH_MAX_HALVINGS = 10  # down to 1/1024 of them


def _example_slices(batch: dict) -> list[dict]:
    """One-example slices of a batch (every tensor whose first dimension is the batch's size is sliced; other values
    pass through), so that any loss_fn gives one loss per example."""
    sizes = {v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0}
    if len(sizes) != 1:
        raise ValueError("the init step's guard needs per-example losses: every tensor in a guard batch must have the "
                         f"batch's size as its first dimension (found first dimensions {sorted(sizes)}).")
    n = sizes.pop()
    return [{k: v[i: i + 1] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}
            for i in range(n)]


@contextmanager
def _step_losses(model, targets, results, lora_config, batches, loss_fn, *, per_example: bool = False):
    """Yields (loss_at, tried, losses_at): loss_at(g) is the mean loss over `batches` (over every process's) with g
    times each layer's init step added through forward hooks (x ↦ y + g·c·s·(x Aᵀ) Bᵀ; no weight is modified,
    nothing is rounded), in eval mode and without a graph; `tried` holds every {g: loss} computed. With
    `per_example`, each example is its own forward pass (`_example_slices`), loss_at(g) is the mean over examples and
    losses_at(g) gives this process's per-example losses (float64, in order; else it is None)."""
    if not batches:
        raise ValueError("the init step's line search / guard got no batches for this process.")
    reshard_fsdp(model)  # an FSDP2 root left unsharded by an earlier forward would not count as sharded
    units = [u for b in batches for u in _example_slices(b)] if per_example else list(batches)
    # under FSDP2 or ZeRO-3 each forward gathers weights on every rank: a rank with fewer passes runs blank ones
    blank = max(all_gather_objects(len(units))) - len(units) if fsdp_sharded(model) else 0
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
    each: dict[float, torch.Tensor] = {}
    device = next(model.parameters()).device

    @torch.no_grad()  # forward only: no graph (the target weights still require grad here)
    def losses_at(g: float) -> torch.Tensor:
        if g not in each:
            g_now["g"] = g
            out = []
            with gather_zero3(model):  # a ZeRO-3 model: each module's weights whole while it runs
                for i, b in enumerate(units + units[:1] * blank):  # the blank passes are not counted
                    b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
                    loss = (loss_fn(model, b) if loss_fn else model(**b).loss).double()
                    if i < len(units):
                        out.append(loss.reshape(()))
            each[g] = torch.stack(out)
        return each[g]

    def loss_at(g: float) -> float:
        if g not in tried:
            losses = losses_at(g)
            total = torch.stack([losses.sum(), torch.tensor(float(len(losses)), dtype=torch.float64,
                                                            device=losses.device)])
            all_reduce_sum_(total)
            tried[g] = float(total[0] / total[1])
            if not math.isfinite(tried[g]):
                tried[g] = math.inf
        return tried[g]

    try:
        yield loss_at, tried, (losses_at if per_example else None)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
        reshard_fsdp(model)  # the offset written after these passes must reach the shards


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
    with _step_losses(model, targets, results, lora_config, batches, loss_fn) as (loss_at, tried, _):
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
    for res in results.values():
        res.scale_step(best)
        res.info.update(step_norm=res.info.get("step_norm", 0.0) * best, global_factor=best)
        if res.subtract:
            res.info["offset_scale"] = res.offset_scale
    logger.info("lorafa line search: factor %g (loss %.4f; %.4f before the init, %.4f at factor 1)", best,
                tried[best], before, tried[1.0])
    return {"tried": sorted([g, v] for g, v in tried.items()), "chosen": best, "loss_before": before,
            "loss_chosen": tried[best], "loss_at_1": tried[1.0]}


GUARD_Z = 1.645  # one-sided 95% normal quantile: a step is kept only if it lowers the loss at that confidence


def _paired_bound(losses: torch.Tensor, before: torch.Tensor) -> tuple[float, float, int]:
    """(mean, upper, n) of the paired per-example differences losses − before, over every process's examples: the
    mean change and its one-sided upper confidence bound mean + GUARD_Z·sd/√n. Examples whose loss before is not
    finite (e.g. no supervised token) are left out; a non-finite loss after, on any other, makes both bounds inf."""
    ok = torch.isfinite(before)
    d = losses[ok] - before[ok]
    bad = (~torch.isfinite(d)).any()
    d = torch.where(torch.isfinite(d), d, torch.zeros_like(d))
    sums = torch.stack([d.sum(), (d * d).sum(), torch.tensor(float(d.numel()), dtype=torch.float64, device=d.device),
                        bad.to(torch.float64)])
    all_reduce_sum_(sums)
    total, squares, n, bad = (float(v) for v in sums)
    if bad or n == 0:
        return math.inf, math.inf, int(n)
    mean = total / n
    var = max(squares / n - mean * mean, 0.0) * n / (n - 1) if n > 1 else math.inf
    return mean, mean + GUARD_Z * math.sqrt(var / n), int(n)


def guard_step(model, targets, results, lora_config, batches, loss_fn=None, *, can_offset: bool) -> dict:
    """The init step's guard: the step is kept only where it lowers the loss on `batches` (examples outside the
    statistics sample) beyond their noise.

    Each example of `batches` is its own forward pass, so every factor g of the step gets paired per-example changes
    against the model before the init (g = 0); g is kept only if their mean's one-sided upper confidence bound,
    mean + GUARD_Z·sd/√n, is ≤ 0 (under FSDP2/ZeRO-3 the sums are over every process's examples). A mean change
    below zero that the examples cannot tell from noise does not keep the step: on other examples it can as well be
    a rise. g = 1 (the step as computed) is tried first; where it is not kept, the step is halved until it is
    (g = 2^-k, k ≤ 10), else g = 0. The model then starts at W + g·step: the factors keep their scale and the base
    is offset by the rest of the step, W − (1 − g)·s·B·A (as offset="partial" does; the saved adapter loads on the
    original base). A quantized base takes no offset: there both factors shrink by √g instead (g ≥ 2^-10, the
    smallest tried; the returned "raises" says whether even that one's mean loss is above the loss before).

    Returns:
        {"loss_before", "loss_step" (at g = 1), "chosen" (g), "loss_chosen", "tried" ([g, mean loss, upper bound of
        the mean change]), "examples", "z", "remedy" (None: kept; "offset" or "shrink"), "raises" (the chosen step's
        mean loss above the loss before), "seconds" (the check's wall time)}.
    """
    t0 = time.perf_counter()
    batches = list(batches)
    bounds: dict[float, tuple[float, float, int]] = {}
    with _step_losses(model, targets, results, lora_config, batches, loss_fn, per_example=True) as (
            loss_at, tried, losses_at):
        before, at_step = loss_at(0.0), loss_at(1.0)

        def lowers(g: float) -> bool:
            bounds[g] = _paired_bound(losses_at(g), losses_at(0.0))
            loss_at(g)
            return bounds[g][1] <= 0.0

        best = 1.0
        if not lowers(1.0):
            best = 0.0 if can_offset else 2.0 ** -LINE_SEARCH_MAX_HALVINGS
            # every halving is tried: far past the minimum the loss along the step is not quadratic, so the trend
            # of the first few says little (tiny model, stable_gamma=0.01: g = 1 to 1/128 within the noise or above,
            # 2^-8 clearly lower); at most 12 passes over the guard's examples
            for k in range(1, LINE_SEARCH_MAX_HALVINGS + 1):
                if lowers(2.0 ** -k):
                    best = 2.0 ** -k
                    break
    remedy = None if best == 1.0 else "offset" if can_offset else "shrink"
    for res in results.values():
        if remedy == "offset" and not res.subtract:  # the factors keep their scale; the base takes the rest
            res.subtract, res.offset_scale = True, 1.0 - best
            if res.step is not None:
                res.step *= best
        elif remedy is not None:
            res.scale_step(best)
        if remedy is not None:
            res.info.update(step_norm=res.info.get("step_norm", 0.0) * best, guard_factor=best)
            if res.subtract:
                res.info["offset_scale"] = res.offset_scale
    loss = tried.get(best, before)
    out = {"loss_before": before, "loss_step": at_step, "chosen": best, "loss_chosen": loss,
           "tried": sorted([g, v, bounds[g][1] if g in bounds else 0.0] for g, v in tried.items()),
           "examples": bounds[1.0][2], "z": GUARD_Z, "remedy": remedy, "raises": loss > before,
           "seconds": time.perf_counter() - t0}
    if remedy is None:
        logger.info("lorafa guard: the init step lowers the held-out loss from %.4f to %.4f (upper bound of the "
                    "change %+.4f over %d examples)", before, at_step, bounds[1.0][1], bounds[1.0][2])
    else:
        logger.warning("lorafa guard: the init step does not clearly lower the held-out loss (%.4f before, %.4f with "
                       "it; upper bound of the change %+.4f over %d examples); its factor is now %g (%s; loss %.4f)",
                       before, at_step, bounds[1.0][1], bounds[1.0][2], best, remedy, loss)
    return out
