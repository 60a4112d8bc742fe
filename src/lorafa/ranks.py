"""Data-aware rank (SPEC §6): turn every layer's spectrum into a per-layer rank under one global budget.

A layer's spectrum is whatever the method decomposes (the gradient G for lora_ga / lora_one, the whitened H̃ for
lora_fa, the input covariance Σ for eva, the extraction target). `allocate_ranks` applies one of four rules:

- `energy`: per layer the smallest k_l with Σ_{i≤k_l} σ_i² ≥ τ·Σσ_i²; ranks are then proportional to k_l.
- `effective`: per layer the effective rank exp(H(p)), p = σ/Σσ; ranks are then proportional to it.
- `budget`: a global top-k over every layer's normalised σ_i² (σ_i²/Σ_j σ_j² within the layer), as EVA does over
  explained variance.
- `importance` (GoRA): r_l ∝ I_l/ΣI, I_l = mean|W_l ⊙ G_l| computed by the caller.

`eva_ranks` is PEFT's own EVA redistribution (`peft.tuners.lora.eva`), reproduced so that lorafa's `eva` method
assigns exactly the ranks PEFT would. `rank_patterns` turns ranks into PEFT's `rank_pattern`/`alpha_pattern`;
`rank_table` and `write_ranks` record them beside the adapter.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from .fsio import write_atomic, write_json

RULES = ("energy", "effective", "budget", "importance")
BUDGET_BY = ("rank", "params")


# --------------------------------------------------------------------------------------------------------------------
# validation helpers


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_spectrum(name: str, values, what: str = "spectrum") -> torch.Tensor:
    """A 1-D float64 CPU copy of `values`, sorted descending; raise on empty, non-finite or negative entries."""
    try:
        t = torch.as_tensor(values).detach()
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"The {what} of {name!r} is not a 1-D array of numbers ({e}).") from e
    t = t.to(device="cpu", dtype=torch.float64)
    if t.ndim != 1:
        raise ValueError(f"The {what} of {name!r} has shape {tuple(t.shape)}: pass a 1-D tensor (one value per "
                         "singular direction).")
    if t.numel() == 0:
        raise ValueError(f"The {what} of {name!r} is empty: pass at least one value, or leave the layer out.")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"The {what} of {name!r} contains NaN or inf: check the statistics pass for that layer "
                         "(overflow in half precision, an empty batch).")
    if bool((t < 0).any()):
        raise ValueError(f"The {what} of {name!r} has negative entries: pass singular values (or explained-variance "
                         "ratios), which are ≥ 0.")
    return torch.sort(t, descending=True).values


def _check_names(what: str, given: Mapping, names: Sequence[str]) -> None:
    missing = [n for n in names if n not in given]
    unknown = [n for n in given if n not in set(names)]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing for {missing[:5]}{' …' if len(missing) > 5 else ''}")
        if unknown:
            parts.append(f"given for unknown layers {unknown[:5]}{' …' if len(unknown) > 5 else ''}")
        raise ValueError(f"{what} must have exactly one entry per layer in `spectra`: {'; '.join(parts)}.")


def _sizes(sizes, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    _check_names("sizes", sizes, names)
    out = {}
    for n in names:
        try:
            m, k = sizes[n]
        except (TypeError, ValueError) as e:
            raise ValueError(f"sizes[{n!r}] = {sizes[n]!r}: pass the weight's shape as a pair (m, n).") from e
        if not (_is_int(m) and _is_int(k) and m > 0 and k > 0):
            raise ValueError(f"sizes[{n!r}] = {sizes[n]!r}: both dimensions must be positive integers.")
        out[n] = (m, k)
    return out


def _importance(importance, names: Sequence[str]) -> dict[str, float]:
    _check_names("importance", importance, names)
    out = {}
    for n in names:
        v = importance[n]
        try:
            v = float(v.item() if isinstance(v, torch.Tensor) else v)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"importance[{n!r}] = {importance[n]!r}: pass one number per layer "
                             "(GoRA's mean|W ⊙ G|).") from e
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"importance[{n!r}] = {v}: importance must be finite and ≥ 0.")
        out[n] = v
    return out


# --------------------------------------------------------------------------------------------------------------------
# per-layer scores


def energy_rank(spectrum: torch.Tensor, tau: float) -> int:
    """The smallest k with Σ_{i≤k} σ_i² ≥ τ·Σσ_i² (0 for an all-zero spectrum).

    Args:
        spectrum: 1-D singular values, sorted descending.
        tau: the energy fraction, in (0, 1].

    Returns:
        k, between 1 and len(spectrum) for a non-zero spectrum.
    """
    cum = torch.cumsum(spectrum.to(torch.float64) ** 2, 0)
    total = float(cum[-1])
    if total == 0.0:
        return 0
    # the total is the last cumulative sum itself, so tau = 1 is reached exactly at the last non-zero value
    return min(int((cum < tau * total).sum()) + 1, spectrum.numel())


def effective_rank(spectrum: torch.Tensor) -> float:
    """exp of the Shannon entropy of p = σ/Σσ (Roy & Vetterli); 0.0 for an all-zero spectrum.

    Args:
        spectrum: 1-D singular values (≥ 0).

    Returns:
        A real number in [1, number of non-zero values], or 0.0.
    """
    s = spectrum.to(torch.float64)
    total = float(s.sum())
    if total == 0.0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def energy_captured(spectrum, rank: int) -> float | None:
    """Σ_{i<rank} σ_i² / Σσ_i² over the spectrum sorted descending; None for an all-zero spectrum."""
    s = torch.sort(torch.as_tensor(spectrum, dtype=torch.float64).reshape(-1), descending=True).values
    total = float((s ** 2).sum())
    if total == 0.0:
        return None
    return float((s[:rank] ** 2).sum()) / total


# --------------------------------------------------------------------------------------------------------------------
# budget meeting


def _water_fill(d: list[float], lo: list[int], hi: list[int], cost: list[int], budget: int) -> list[float]:
    """Real ranks x_l = clip(c·d_l, lo_l, hi_l) with Σ x_l·cost_l = budget.

    This is the fixed point of "scale proportionally, clip to the bounds, redistribute the rest among the unclipped
    layers", computed exactly: f(c) = Σ clip(c·d_l)·cost_l is piecewise linear and non-decreasing in c, with breaks
    at lo_l/d_l and hi_l/d_l, so we find the segment that contains the budget and interpolate. Layers with d_l = 0
    stay at lo_l unless every other layer is full; if all d_l are 0 the shares are equal.
    """
    n = len(d)
    if not any(v > 0 for v in d):
        d = [1.0] * n
    pos = [i for i in range(n) if d[i] > 0]
    zero = [i for i in range(n) if d[i] <= 0]
    full = sum(hi[i] * cost[i] for i in pos) + sum(lo[i] * cost[i] for i in zero)
    if budget >= full and zero:
        # the scored layers are all at their maximum; the rest of the budget goes equally to the unscored ones
        x = [float(hi[i]) if d[i] > 0 else 0.0 for i in range(n)]
        rest = budget - sum(hi[i] * cost[i] for i in pos)
        sub = _water_fill([1.0] * len(zero), [lo[i] for i in zero], [hi[i] for i in zero], [cost[i] for i in zero],
                          rest)
        for j, i in enumerate(zero):
            x[i] = sub[j]
        return x
    dt = torch.tensor(d, dtype=torch.float64)
    lot = torch.tensor(lo, dtype=torch.float64)
    hit = torch.tensor(hi, dtype=torch.float64)
    ct = torch.tensor(cost, dtype=torch.float64)
    p = dt > 0
    breaks = torch.cat([torch.zeros(1, dtype=torch.float64), lot[p] / dt[p], hit[p] / dt[p]]).unique()  # sorted

    def f(c: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.maximum(c[:, None] * dt[None, :], lot), hit) @ ct

    fb = f(breaks)
    k = int((fb < budget).sum())  # first break with f ≥ budget (exists: f(last break) = full ≥ budget)
    k = min(k, breaks.numel() - 1)
    if k == 0 or fb[k] == budget:
        c = breaks[k]
    else:
        c0, c1, f0, f1 = breaks[k - 1], breaks[k], fb[k - 1], fb[k]
        c = c0 + (budget - f0) * (c1 - c0) / (f1 - f0)
    x = torch.minimum(torch.maximum(c * dt, lot), hit)
    return [float(v) for v in x]


def _round_to_rank_budget(x: list[float], lo: list[int], hi: list[int], budget: int) -> list[int]:
    """Largest-remainder (Hamilton) rounding of real ranks within [lo, hi] to integers summing to `budget` exactly.

    Every layer gets floor(x_l); the budget left over goes one unit each to the layers with the largest fractional
    parts (ties: the earlier layer). Should floating point leave the floors above the budget, units are taken back
    from the layers with the smallest fractional parts.
    """
    r = [min(max(math.floor(v), lo[i]), hi[i]) for i, v in enumerate(x)]
    frac = [x[i] - r[i] for i in range(len(x))]
    left = budget - sum(r)
    while left > 0:
        order = sorted((i for i in range(len(r)) if r[i] < hi[i]), key=lambda i: (-frac[i], i))
        for i in order[:left]:
            r[i] += 1
            frac[i] -= 1.0
        left = budget - sum(r)
    while left < 0:
        order = sorted((i for i in range(len(r)) if r[i] > lo[i]), key=lambda i: (frac[i], i))
        for i in order[:-left]:
            r[i] -= 1
            frac[i] += 1.0
        left = budget - sum(r)
    return r


def _round_to_param_budget(x: list[float], lo: list[int], hi: list[int], cost: list[int], budget: int) -> list[int]:
    """Integer ranks with Σ r_l·cost_l ≤ budget that no single layer can grow within.

    Every layer gets floor(x_l); then, in order of largest fractional part (ties: the earlier layer), each layer
    gets one more unit if it fits in what is left; then, while some layer below its maximum still fits, the one
    furthest below its real share x_l (ties: the earlier layer) grows by one. At the end no layer can be incremented
    without exceeding the budget (maximal, not necessarily the closest packing, which is a knapsack problem).
    """
    n = len(x)
    r = [min(max(math.floor(v), lo[i]), hi[i]) for i, v in enumerate(x)]
    left = budget - sum(r[i] * cost[i] for i in range(n))
    for i in sorted(range(n), key=lambda i: (-(x[i] - r[i]), i)):
        if r[i] < hi[i] and x[i] > r[i] and cost[i] <= left:
            r[i] += 1
            left -= cost[i]
    while True:
        fits = [i for i in range(n) if r[i] < hi[i] and cost[i] <= left]
        if not fits:
            return r
        i = min(fits, key=lambda i: (-(x[i] - r[i]), i))
        r[i] += 1
        left -= cost[i]


def _greedy_top_k(values: list[torch.Tensor], lo: list[int], hi: list[int], cost: list[int], budget: int,
                  exact: bool) -> list[int]:
    """The `budget` rule: every layer takes its first lo_l entries, then entries are taken in decreasing order of
    value per unit of cost (ties: earlier layer, then earlier entry) while they fit; entries beyond hi_l are never
    taken. With unit costs (`exact`) this is a plain global top-k and meets the budget exactly."""
    n = len(values)
    r = list(lo)
    left = budget - sum(lo[i] * cost[i] for i in range(n))
    layer = torch.cat([torch.full((hi[i] - lo[i],), i, dtype=torch.long) for i in range(n)])
    score = torch.cat([values[i][lo[i]:hi[i]] / cost[i] for i in range(n)])
    # the pool is laid out layer by layer, entry by entry, so a stable sort breaks ties in that order; entries of
    # one layer are sorted and cost the same, so each layer takes a prefix
    order = layer[torch.argsort(score, descending=True, stable=True)]
    if exact:
        for i, k in enumerate(torch.bincount(order[:left], minlength=n).tolist()):
            r[i] += k
        return r
    smallest = min(cost)
    for i in order.tolist():
        if left < smallest:
            break
        if cost[i] <= left:
            r[i] += 1
            left -= cost[i]
    return r


# --------------------------------------------------------------------------------------------------------------------
# public API


def allocate_ranks(
    spectra: Mapping[str, torch.Tensor],
    budget: int,
    rule: str = "energy",
    r_min: int = 1,
    r_max: int | None = None,
    tau: float = 0.9,
    sizes: Mapping[str, tuple[int, int]] | None = None,
    budget_by: str = "rank",
    importance: Mapping[str, float] | None = None,
    caps: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Per-layer ranks from per-layer spectra under one global budget (SPEC §6).

    Every rule first gives each layer a real-valued target, then meets the budget within the bounds:

    - `energy`: d_l = the smallest k with Σ_{i≤k} σ_i² ≥ τ·Σσ_i²; `effective`: d_l = exp(entropy of σ/Σσ);
      `importance`: d_l = I_l (budget_by="rank") or I_l/(m_l+n_l) (budget_by="params": the parameter budget is
      split in proportion to I_l, as GoRA does). The real ranks are x_l = clip(c·d_l, r_min, r_max_l) with the one
      c that spends the budget exactly (the fixed point of clip-and-redistribute, computed exactly). Layers with
      d_l = 0 (an all-zero spectrum or importance) get r_min.
    - `budget`: every layer takes its first r_min normalised values σ_i²/Σ_j σ_j², then the largest remaining values
      over all layers are taken (at most r_max_l per layer); with budget_by="params" in order of value per
      parameter (m_l+n_l), skipping those that no longer fit.

    budget_by="rank": Σ r_l == budget exactly; real ranks are rounded by largest remainder (Hamilton): floors first,
    the leftover units to the largest fractional parts. budget_by="params": Σ r_l·(m_l+n_l) ≤ budget; floors first,
    then one more unit per layer in order of largest fractional part while it fits, then any layer that still fits
    (furthest below its share first), so no single layer can be incremented without exceeding the budget.
    Ties are broken by the order of `spectra`'s keys (earlier first). A layer gets 0 only when r_min = 0.

    Args:
        spectra: module name -> 1-D singular values (sorted here, descending; must be finite and ≥ 0).
        budget: Σ r_l (budget_by="rank") or Σ r_l·(m_l+n_l) (budget_by="params"); the caller chooses the default
            (SPEC: r × number of layers, or r·Σ(m_l+n_l)).
        rule: one of "energy", "effective", "budget", "importance".
        r_min: the smallest rank a layer may get (0 lets layers drop out).
        r_max: the largest rank a layer may get; None: each layer's spectrum length. Never more than the spectrum
            length, nor min(m, n) when `sizes` is given.
        tau: the energy fraction for rule="energy", in (0, 1].
        sizes: module name -> (m, n), the weight's shape; required for budget_by="params".
        importance: module name -> I_l ≥ 0; required for rule="importance" (and only used there).
        budget_by: "rank" or "params".
        caps: module name -> a further upper bound of that layer's rank alone (e.g. min(m, n)/2 for LoRA-GA, which
            takes 2r singular directions); layers not named have none.

    Returns:
        module name -> rank, in the order of `spectra`.

    Raises:
        TypeError: budget, r_min or r_max is not an int.
        ValueError: empty `spectra`; a spectrum that is not 1-D, empty, non-finite or negative; unknown rule or
            budget_by; r_min < 0; r_min > r_max (or > a layer's spectrum length); tau outside (0, 1]; sizes missing
            for budget_by="params" or not covering exactly the layers; importance missing, negative or not covering
            exactly the layers for rule="importance", or given for another rule; a budget below
            Σ r_min·cost_l or above Σ r_max_l·cost_l.
    """
    if not isinstance(spectra, Mapping) or len(spectra) == 0:
        raise ValueError("spectra is empty: pass one 1-D spectrum per adapted layer (module name -> singular values).")
    if rule not in RULES:
        raise ValueError(f"Unknown rule {rule!r}: use one of {', '.join(RULES)}.")
    if budget_by not in BUDGET_BY:
        raise ValueError(f"Unknown budget_by {budget_by!r}: use 'rank' (Σ r_l = budget) or 'params' "
                         "(Σ r_l·(m_l+n_l) ≤ budget).")
    if not _is_int(budget):
        raise TypeError(f"budget must be an int (a total rank or a parameter count), got {budget!r}.")
    if not _is_int(r_min):
        raise TypeError(f"r_min must be an int, got {r_min!r}.")
    if r_max is not None and not _is_int(r_max):
        raise TypeError(f"r_max must be an int or None, got {r_max!r}.")
    if r_min < 0:
        raise ValueError(f"r_min = {r_min} < 0: use r_min ≥ 0 (0 lets layers drop out).")
    if r_max is not None and r_min > r_max:
        raise ValueError(f"r_min = {r_min} > r_max = {r_max}: lower r_min or raise r_max.")
    if not (isinstance(tau, (int, float)) and not isinstance(tau, bool) and 0 < tau <= 1):
        raise ValueError(f"tau = {tau!r} must be in (0, 1]: the fraction of Σσ² the energy rule keeps.")
    if budget < 0:
        raise ValueError(f"budget = {budget} < 0: pass a non-negative total.")

    names = list(spectra)
    specs = [_as_spectrum(n, spectra[n]) for n in names]
    if budget_by == "params" and sizes is None:
        raise ValueError("budget_by='params' needs sizes: pass sizes={name: (m, n)} for every layer.")
    shapes = _sizes(sizes, names) if sizes is not None else None
    if rule == "importance":
        if importance is None:
            raise ValueError("rule='importance' needs importance={name: I_l} for every layer (GoRA: mean|W ⊙ G|).")
        imp = _importance(importance, names)
    elif importance is not None:
        raise ValueError(f"importance is only used by rule='importance', not rule={rule!r}: drop it or change rule.")

    cost = [shapes[n][0] + shapes[n][1] if budget_by == "params" else 1 for n in names]
    lo, hi = [], []
    for n, s in zip(names, specs):
        top = s.numel() if r_max is None else min(r_max, s.numel())
        if shapes is not None:
            top = min(top, min(shapes[n]))
        if caps is not None and n in caps:
            top = min(top, int(caps[n]))
        if r_min > top:
            raise ValueError(f"r_min = {r_min} > r_max = {top} for layer {n!r} (its spectrum has {s.numel()} values"
                             f"{'' if shapes is None else f', weight {shapes[n]}'}): lower r_min.")
        lo.append(r_min)
        hi.append(top)
    unit = "rank" if budget_by == "rank" else "parameters"
    least = sum(lo[i] * cost[i] for i in range(len(names)))
    most = sum(hi[i] * cost[i] for i in range(len(names)))
    if budget < least:
        raise ValueError(f"budget = {budget} {unit} is below the {least} that r_min = {r_min} needs over "
                         f"{len(names)} layers: raise the budget or lower r_min.")
    if budget > most:
        raise ValueError(f"budget = {budget} {unit} is above the {most} the layers can take at their maximum rank: "
                         "lower the budget or raise r_max.")

    if rule == "budget":
        values = []
        for s in specs:
            sq = s ** 2
            total = float(sq.sum())
            values.append(sq / total if total > 0 else torch.zeros_like(sq))
        r = _greedy_top_k(values, lo, hi, cost, budget, exact=budget_by == "rank")
    else:
        if rule == "energy":
            d = [float(energy_rank(s, tau)) for s in specs]
        elif rule == "effective":
            d = [effective_rank(s) for s in specs]
        else:
            d = [imp[n] / (cost[i] if budget_by == "params" else 1) for i, n in enumerate(names)]
        x = _water_fill(d, lo, hi, cost, budget)
        if budget_by == "rank":
            r = _round_to_rank_budget(x, lo, hi, budget)
        else:
            r = _round_to_param_budget(x, lo, hi, cost, budget)
    return dict(zip(names, r))


def eva_ranks(
    explained: Mapping[str, torch.Tensor],
    r: int,
    rho: float = 2.0,
    equal_inputs: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """EVA's rank redistribution, as PEFT computes it (`peft.tuners.lora.eva`, `_get_rank_distribution`).

    Each layer offers its first round(ρ·r) explained-variance ratios (Python's `round`, as PEFT: half to even); the
    r × (number of layers) largest of all offered ratios are taken, and a layer's rank is how many of its own were
    taken. Layers may get 0 (PEFT then removes their adapter) and at most round(ρ·r).

    PEFT computes the SVD once per group of layers that see identical inputs (e.g. q/k/v_proj) and gives the group's
    first layer (in module order) the statistic for all; after the top-k it swaps ranks so that this first layer
    holds the largest rank of its group. `equal_inputs` reproduces that: non-first layer -> the group's first layer.
    The values are concatenated as PEFT does (layers not in `equal_inputs` in the order of `explained`, then the
    `equal_inputs` layers in their order) and sorted stably, so exact ties go to the earlier value; PEFT's
    `argsort` is not stable, so within a group of three or more equal-input layers which of the later layers gets the
    one extra component at the cut is unspecified in PEFT and by key order here (totals and the first layer agree).

    Not reproduced: PEFT lowers ρ above 1000 to max(parameter dimension) // r, which needs the model; and PEFT's
    per-layer `rank_pattern` budgets (here every layer's base rank is r).

    Args:
        explained: module name -> 1-D explained-variance ratios (PEFT's `IncrementalPCA.explained_variance_ratio_`:
            S²/Σ_features (n·var), S the singular values of the mean-centred layer inputs). Sorted descending here.
            Layers in `equal_inputs` may be left out (they take their group's first layer's ratios); if present
            they must equal them.
        r: the base LoRA rank (PEFT's `LoraConfig.r`); the budget is r × number of layers.
        rho: EVA's ρ ≥ 1 (PEFT's `EvaConfig.rho`): a layer takes at most round(ρ·r).
        equal_inputs: layer -> the first layer of its group of layers with identical inputs (PEFT's
            `equal_inputs_map`); None when no two layers share inputs.

    Returns:
        module name -> rank (0 … round(ρ·r)), in the order of `explained` and then the `equal_inputs` layers not in
        it; the ranks sum to min(r × number of layers, number of offered ratios).

    Raises:
        TypeError: r is not an int.
        ValueError: r < 1; ρ < 1 or not finite; empty `explained`; a ratio tensor that is not 1-D, empty,
            non-finite or negative; an `equal_inputs` entry whose first layer is not in `explained`, is itself
            mapped, or whose own ratios differ from its first layer's.
    """
    if not _is_int(r):
        raise TypeError(f"r must be an int (LoraConfig.r), got {r!r}.")
    if r < 1:
        raise ValueError(f"r = {r} < 1: EVA needs a positive base rank.")
    if not (isinstance(rho, (int, float)) and not isinstance(rho, bool) and math.isfinite(rho) and rho >= 1.0):
        raise ValueError(f"rho = {rho!r}: EVA's rho must be a finite number ≥ 1 (1 = no redistribution; PEFT's "
                         "default is 2).")
    if not isinstance(explained, Mapping) or len(explained) == 0:
        raise ValueError("explained is empty: pass one 1-D explained-variance-ratio tensor per adapted layer.")
    equal_inputs = dict(equal_inputs or {})
    ratios = {n: _as_spectrum(n, v, "explained-variance ratios") for n, v in explained.items()}
    for k, first in equal_inputs.items():
        if first not in ratios or first in equal_inputs:
            raise ValueError(f"equal_inputs[{k!r}] = {first!r}: map each layer to the first layer of its group, "
                             "which must be in `explained` and not itself in equal_inputs.")
        if k in ratios and not torch.equal(ratios[k], ratios[first]):
            raise ValueError(f"Layer {k!r} shares its inputs with {first!r} (equal_inputs) but its explained-variance "
                             "ratios differ: pass identical ratios, or leave it out of `explained`.")

    cap = round(r * rho)
    order = [n for n in ratios if n not in equal_inputs] + list(equal_inputs)
    budget = r * len(order)
    keys, values = [], []
    for i, n in enumerate(order):
        v = ratios[equal_inputs.get(n, n)][:cap]
        keys.extend([i] * v.numel())
        values.append(v)
    allv = torch.cat(values)
    idx = torch.argsort(allv, descending=True, stable=True)[:budget]
    counts = [0] * len(order)
    for j in idx.tolist():
        counts[keys[j]] += 1
    got = dict(zip(order, counts))
    # PEFT's swap, so that a group's first layer holds its largest rank. With the stable sort and the first layers
    # laid out before the others, exact ties already favour the first layer, so this never changes anything here;
    # it is kept so the procedure reads as PEFT's
    for k, first in equal_inputs.items():
        if got[first] < got[k]:
            got[first], got[k] = got[k], got[first]
    return {n: got[n] for n in list(ratios) + [k for k in equal_inputs if k not in ratios]}


class RankPatterns(NamedTuple):
    """PEFT's per-layer overrides for a rank allocation.

    Attributes:
        rank_pattern: `re.escape(full module name)` -> r_l, for every layer with r_l ≥ 1; keys ordered longest first
            so that PEFT's first-match lookup (`get_pattern_key`, a suffix match) never lets a name that is a suffix
            of another layer's name claim that layer.
        alpha_pattern: the same keys -> α_l.
        dropped: the layers with r_l = 0, in the order of `ranks`: PEFT cannot build a rank-0 adapter, so the
            caller removes them from `target_modules` (they keep their base weight, as PEFT's EVA does).
    """

    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    dropped: list[str]


def rank_patterns(ranks: Mapping[str, int], r: int, alpha: float, use_rslora: bool = False) -> RankPatterns:
    """PEFT `rank_pattern`/`alpha_pattern` that keep each layer's LoRA scaling as at the base rank.

    Plain LoRA scales by s = α/r, so α_l = α·r_l/r keeps s_l = α_l/r_l = α/r; rsLoRA scales by α/√r, so
    α_l = α·√(r_l/r) keeps α_l/√r_l = α/√r.

    Args:
        ranks: full module name (as in the base model's `named_modules()`) -> r_l ≥ 0.
        r: the config's base rank (`LoraConfig.r`).
        alpha: the config's `lora_alpha`.
        use_rslora: whether the config sets `use_rslora=True`.

    Returns:
        RankPatterns(rank_pattern, alpha_pattern, dropped); see `RankPatterns`.

    Raises:
        TypeError: r or a rank is not an int.
        ValueError: r < 1, alpha not a finite positive number, a negative rank, or no layer with a rank ≥ 1.
    """
    if not _is_int(r):
        raise TypeError(f"r must be an int (LoraConfig.r), got {r!r}.")
    if r < 1:
        raise ValueError(f"r = {r} < 1: pass the config's base rank.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha = {alpha!r}: pass the config's lora_alpha, a finite positive number.")
    kept, dropped = [], []
    for name, rank in ranks.items():
        if not _is_int(rank):
            raise TypeError(f"ranks[{name!r}] = {rank!r} is not an int.")
        if rank < 0:
            raise ValueError(f"ranks[{name!r}] = {rank} < 0: ranks are ≥ 0.")
        (kept if rank > 0 else dropped).append(name)
    if not kept:
        raise ValueError("Every layer has rank 0: there is no adapter to build; raise the budget or r_min.")
    kept.sort(key=len, reverse=True)  # stable: equal lengths keep the order of `ranks`
    rank_pattern, alpha_pattern = {}, {}
    for name in kept:
        key = re.escape(name)
        rl = ranks[name]
        rank_pattern[key] = rl
        alpha_pattern[key] = float(alpha * math.sqrt(rl / r)) if use_rslora else float(alpha * rl / r)
    return RankPatterns(rank_pattern, alpha_pattern, dropped)


def _energies(ranks: Mapping[str, int], spectra: Mapping[str, torch.Tensor]) -> dict[str, float | None]:
    missing = [n for n in ranks if n not in spectra]
    if missing:
        raise ValueError(f"spectra has no entry for {missing[:5]}: pass the spectra the ranks were allocated from.")
    return {n: energy_captured(spectra[n], rank) for n, rank in ranks.items()}


def rank_table(ranks: Mapping[str, int], spectra: Mapping[str, torch.Tensor] | None = None,
               r: int | None = None) -> str:
    """A markdown table of the allocation for logs: layer, rank, rank/r (with `r`), energy captured (with `spectra`).

    Energy captured is Σ_{i<r_l} σ_i²/Σσ_i² of the layer's spectrum ("n/a" for an all-zero spectrum). The last row
    holds the total rank (and the mean rank/r).

    Args:
        ranks: module name -> rank.
        spectra: module name -> 1-D singular values, optional.
        r: the base rank, optional.

    Returns:
        The table, lines joined by newlines (no trailing newline).

    Raises:
        ValueError: `spectra` lacks a layer of `ranks`.
    """
    energy = _energies(ranks, spectra) if spectra is not None else None
    head = ["layer", "rank"] + (["rank/r"] if r else []) + (["energy"] if energy is not None else [])
    rows = []
    for n, rank in ranks.items():
        row = [n, str(rank)]
        if r:
            row.append(f"{rank / r:.2f}")
        if energy is not None:
            row.append("n/a" if energy[n] is None else f"{energy[n]:.3f}")
        rows.append(row)
    total = sum(ranks.values())
    foot = ["total", str(total)] + ([f"{total / (r * max(len(ranks), 1)):.2f}"] if r else []) + (
        [""] if energy is not None else [])
    rows.append(foot)
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) \
            + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i else (":" + "-" * (w + 1)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), sep] + [line(x) for x in rows])


def write_ranks(ranks: Mapping[str, int], directory: str, spectra: Mapping[str, torch.Tensor] | None = None,
                extra: Mapping | None = None) -> list[str]:
    """Save the allocation beside the adapter: `ranks.json` and a per-layer bar plot `ranks.png`.

    Each file is written under a temporary name in `directory` and renamed into place (`fsio.write_atomic`), so a
    reader never sees half a file and a failed write leaves no temporary behind.

    ranks.json holds {"ranks": name -> rank, "total_rank": Σ r_l, "energy_captured": name -> Σ_{i<r_l}σ_i²/Σσ_i²
    (only with `spectra`; null for an all-zero spectrum), "extra": `extra` (e.g. rule, budget, r; non-JSON values are
    written with str)}.

    Args:
        ranks: module name -> rank, in layer order (the plot's x axis).
        directory: the folder (created if missing), usually the adapter's.
        spectra: module name -> 1-D singular values, optional.
        extra: metadata to store, optional.

    Returns:
        [path of ranks.json, path of ranks.png].

    Raises:
        ValueError: `ranks` is empty, or `spectra` lacks one of its layers.
    """
    if not ranks:
        raise ValueError("ranks is empty: nothing to write.")
    os.makedirs(directory, exist_ok=True)
    data = {"ranks": {n: int(v) for n, v in ranks.items()}, "total_rank": int(sum(ranks.values()))}
    if spectra is not None:
        data["energy_captured"] = _energies(ranks, spectra)
    data["extra"] = dict(extra or {})

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(ranks)
    fig = Figure(figsize=(min(max(6.0, 0.18 * len(names) + 2.0), 40.0), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(len(names)), [ranks[n] for n in names], color="C0")
    step = max(1, math.ceil(len(names) / 80))  # at most ~80 labels
    ax.set_xticks(list(range(0, len(names), step)))
    ax.set_xticklabels(names[::step], rotation=90, fontsize=6)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel("rank")
    ax.set_title(f"per-layer LoRA rank (total {data['total_rank']}, {len(names)} layers)")
    fig.tight_layout()

    def write_png(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=110)

    return [write_json(os.path.join(directory, "ranks.json"), data, indent=2, fsync=True),
            write_atomic(os.path.join(directory, "ranks.png"), write_png)]
