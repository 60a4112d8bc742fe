"""rank="auto" on a model (SPEC §6): each target layer's spectrum from its method, the allocation under the budget,
and the LoraConfig (rank_pattern, alpha_pattern, exclude_modules) that makes PEFT build exactly those ranks.

The allocation rules themselves are pure functions of the spectra, in `lorafa.ranks`; this module ties them to a
model, its LoraConfig and the InitConfig.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re

import torch

from . import ranks as R
from .methods.registry import METHODS, make_options
from .targets import layer_rank_and_scaling, out_in_features

logger = logging.getLogger(__name__)


def check_budget(init_config, targets) -> None:
    """A rank budget that cannot give every layer r_min: an error before the statistics pass."""
    if init_config.rank != "auto" or init_config.rank_budget is None:
        return
    sizes = [sum(out_in_features(m)) for m in targets.values()]
    need = init_config.r_min * (len(sizes) if init_config.budget_by == "rank" else sum(sizes))
    if init_config.rank_budget < need:
        raise ValueError(f"rank_budget={init_config.rank_budget} ({init_config.budget_by}s) cannot give each of the "
                         f"{len(sizes)} target layers r_min={init_config.r_min}: it needs at least {need}. Raise the "
                         "budget, or set r_min=0 to let layers drop out.")


def allocates(init_config) -> bool:
    """Whether the init chooses per-layer ranks from every layer's spectrum (rank="auto", or EVA's redistribution)."""
    if init_config.rank == "auto":
        return True
    return init_config.method == "eva" and make_options("eva", **init_config.method_options()).rho > 1


def rank_evidence(targets, init_config, stats, opts, weights, tuned=None) -> dict:
    """What `allocate` reads from the statistics, for `targets` (all of them, or one group of a grouped pass: the
    evidence of the groups merges with `merge_evidence`): each layer's spectrum, GoRA's importance mean|W ⊙ G| for
    rank_rule="importance", and for EVA the layers that read an earlier layer's input (one Σ tensor)."""
    method = METHODS[init_config.method]
    method_opts = make_options(init_config.method, **opts)
    ev = {"spectra": {}, "importance": {}, "equal": {}}
    owners = {}  # layers reading one input (one Σ tensor): PEFT's EVA keys the group by its first layer
    for name in targets:
        st = stats[name].densified() if stats is not None else None
        extra = {"tuned": tuned[name]()} if method.tuned else {}
        ev["spectra"][name] = method.spectrum(weights[name](), st, method_opts, **extra).detach().float().cpu()
        if init_config.rank == "auto" and init_config.rank_rule == "importance":
            w = weights[name]()
            ev["importance"][name] = float((w * st.grad.to(w.device)).abs().mean())
        if init_config.method == "eva":
            key = id(stats[name].in_cov)
            if key in owners:
                ev["equal"][name] = owners[key]
            else:
                owners[key] = name
    return ev


def merge_evidence(parts: list[dict]) -> dict:
    return {k: {n: v for p in parts for n, v in p[k].items()} for k in ("spectra", "importance", "equal")}


def allocate(targets, lora_config, init_config, stats, opts, weights, tuned=None, evidence=None):
    """Per-layer ranks from the method's spectra (SPEC §6), or EVA's redistribution; (LoraConfig, targets, info).
    `evidence`: `rank_evidence`'s result gathered beforehand (a grouped pass); None: read from `stats` now."""
    if not allocates(init_config):
        return lora_config, targets, None
    eva = init_config.rank != "auto"
    layer_r = {n: layer_rank_and_scaling(lora_config, n)[0] for n in targets}
    sizes = {n: out_in_features(m) for n, m in targets.items()}
    if evidence is None:
        evidence = rank_evidence(targets, init_config, stats, opts, weights, tuned)
    spectra = evidence["spectra"]
    if eva:
        rho = make_options("eva", **opts).rho
        explained = {n: s / s.sum().clamp_min(1e-30) for n, s in spectra.items()}
        allocation = R.eva_ranks(explained, r=lora_config.r, rho=rho, equal_inputs=evidence["equal"])
        rule, budget = f"eva (rho={rho:g})", lora_config.r * len(targets)
    else:
        pairs = 2 if init_config.method == "lora_ga" else 1
        r_max = init_config.r_max if init_config.r_max is not None else 2 * max(layer_r.values())
        caps = {n: min(sz) // pairs for n, sz in sizes.items()}  # each layer by its own shape, not the smallest's
        if init_config.budget_by == "params":
            budget = init_config.rank_budget or sum(layer_r[n] * sum(sizes[n]) for n in targets)
        else:
            budget = init_config.rank_budget or sum(layer_r.values())
        importance = evidence["importance"] if init_config.rank_rule == "importance" else None
        allocation = R.allocate_ranks(spectra, budget, rule=init_config.rank_rule, r_min=init_config.r_min,
                                      r_max=r_max, tau=init_config.tau, sizes=sizes, budget_by=init_config.budget_by,
                                      importance=importance, caps=caps)
        rule = init_config.rank_rule
    kept = {n: r for n, r in allocation.items() if r > 0}
    rank_pattern, _, dropped = R.rank_patterns(allocation, lora_config.r, lora_config.lora_alpha,
                                               lora_config.use_rslora)
    # Each kept layer keeps the scale s_l its LoraConfig gives it (a user's alpha_pattern included) at its new rank.
    # The allocation's keys come first: PEFT takes the first pattern that matches, so a user's rank_pattern (which
    # set the budget) cannot shadow the allocated rank.
    scale = {re.escape(n): layer_rank_and_scaling(lora_config, n)[1] for n in kept}
    alpha_pattern = {k: scale[k] * (math.sqrt(r) if lora_config.use_rslora else r) for k, r in rank_pattern.items()}
    new_config = dataclasses.replace(
        lora_config, rank_pattern={**rank_pattern, **lora_config.rank_pattern},
        alpha_pattern={**alpha_pattern, **lora_config.alpha_pattern},
        exclude_modules=_merge_exclude(lora_config.exclude_modules, dropped))
    for n, r in kept.items():  # what ranks.json reports is what PEFT will build
        built_r, built_s = layer_rank_and_scaling(new_config, n)
        if built_r != r or not math.isclose(built_s, scale[re.escape(n)], rel_tol=1e-9):
            raise RuntimeError(f"the rank pattern resolves {n!r} to r={built_r}, s={built_s}, not the allocated "
                               f"r={r}, s={scale[re.escape(n)]}: please report this with your LoraConfig.")
    info = {"rule": rule, "budget": budget, "budget_by": "rank" if eva else init_config.budget_by,
            "ranks": allocation, "energy": {n: _energy(spectra[n], r) for n, r in allocation.items()}}
    logger.info("lorafa: ranks by %s (budget %s):\n%s", rule, budget, R.rank_table(allocation, spectra, lora_config.r))
    return new_config, {n: targets[n] for n in kept}, info


def _merge_exclude(existing, dropped):
    """LoraConfig.exclude_modules plus the layers whose allocated rank is 0 (PEFT reads a list as module names or
    name suffixes, a string as one regex)."""
    if not dropped:
        return existing
    if existing is None or not isinstance(existing, str):
        return list(existing or []) + list(dropped)
    return f"(?:{existing})|" + "|".join(re.escape(n) for n in dropped)


def _energy(spectrum: torch.Tensor, r: int) -> float:
    sq = spectrum.double() ** 2
    return float(sq[:r].sum() / sq.sum()) if float(sq.sum()) > 0 else 0.0
