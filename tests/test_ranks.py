"""Data-aware rank (SPEC §6): lorafa.ranks.

The allocations below are computed by hand; the arithmetic is in the comments. `eva_ranks` is checked against PEFT's
own EVA (`get_eva_state_dict`) on the same layer inputs.
"""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import eva as peft_eva
from peft.tuners.lora.config import EvaConfig
from peft.utils.other import get_pattern_key
from torch import nn

from lorafa.ranks import (
    allocate_ranks,
    effective_rank,
    energy_rank,
    eva_ranks,
    rank_patterns,
    rank_table,
    write_ranks,
)


def pad(values, n=8):
    return torch.tensor(list(values) + [0.0] * (n - len(values)), dtype=torch.float64)


# energy spectra (τ = 0.9):
#   a: σ² = 9, 1          total 10, 0.9·10 = 9,    cumsum 9        -> k_a = 1
#   b: σ² = 4, 4, 4, 4    total 16, 0.9·16 = 14.4, cumsum 4,8,12,16 -> k_b = 4
#   c: σ² = 1, 1, 1       total 3,  0.9·3 = 2.7,   cumsum 1,2,3     -> k_c = 3
ENERGY = {"a": pad([3, 1]), "b": pad([2, 2, 2, 2]), "c": pad([1, 1, 1])}


def test_energy_and_effective_scores():
    assert [energy_rank(s, 0.9) for s in ENERGY.values()] == [1, 4, 3]
    assert energy_rank(ENERGY["b"], 1.0) == 4  # τ = 1: the last non-zero value, not the padded length
    assert energy_rank(torch.zeros(3), 0.9) == 0
    # p = (1/2, 1/2): exp(ln 2) = 2;  p = (1/4,)*4: 4;  p = (1,): 1
    assert effective_rank(pad([1, 1])) == pytest.approx(2.0)
    assert effective_rank(pad([1, 1, 1, 1])) == pytest.approx(4.0)
    assert effective_rank(pad([1])) == pytest.approx(1.0)


def test_energy_rule_proportional():
    # Σk = 8, budget 12: shares 12·(1,4,3)/8 = 1.5, 6, 4.5 -> floors 1, 6, 4 (11); one unit left, fractions
    # .5, 0, .5 tie -> the earlier key (a) gets it
    assert allocate_ranks(ENERGY, 12, rule="energy") == {"a": 2, "b": 6, "c": 4}


def test_energy_rule_clip_and_redistribute():
    # r_max = 5: clip(c·1) + clip(4c) + clip(3c) = 12. At c = 2: 2 + min(8, 5) + min(6, 5) = 12 -> (2, 5, 5)
    assert allocate_ranks(ENERGY, 12, rule="energy", r_max=5) == {"a": 2, "b": 5, "c": 5}
    # r_min = 2, budget 8: a's share 8/8 = 1 < 2 -> a = 2; the 6 left split 4:3 -> 24/7 = 3.43, 18/7 = 2.57;
    # floors 3, 2, one unit left -> the larger fraction (.57, c) -> (2, 3, 3)
    assert allocate_ranks(ENERGY, 8, rule="energy", r_min=2) == {"a": 2, "b": 3, "c": 3}
    # the spectra are sorted here: an unsorted spectrum gives the same ranks
    shuffled = {**ENERGY, "b": torch.tensor([0, 2, 0, 2, 2, 0, 0, 2.0])}
    assert allocate_ranks(shuffled, 12, rule="energy") == {"a": 2, "b": 6, "c": 4}


def test_largest_remainder_meets_budget_where_rounding_does_not():
    spectra = {n: torch.ones(8) for n in "xyz"}
    # equal shares 10/3 = 3.33 each: round() gives 3+3+3 = 9 ≠ 10; Hamilton gives the leftover unit to the first key
    assert sum(round(10 / 3) for _ in range(3)) == 9
    assert allocate_ranks(spectra, 10, rule="effective") == {"x": 4, "y": 3, "z": 3}
    # shares 2.5 each for 4 layers: round-half-even gives 2·4 = 8 ≠ 10; Hamilton: 3, 3, 2, 2
    spectra4 = {n: torch.ones(8) for n in "wxyz"}
    assert allocate_ranks(spectra4, 10, rule="effective") == {"w": 3, "x": 3, "y": 2, "z": 2}


def test_effective_rule():
    spectra = {"a": pad([1, 1]), "b": pad([1, 1, 1, 1]), "c": pad([1])}  # effective ranks 2, 4, 1 (Σ 7)
    assert allocate_ranks(spectra, 14, rule="effective") == {"a": 4, "b": 8, "c": 2}  # 14/7 = 2 × (2, 4, 1)
    # budget 10: 10/7·(2,4,1) = 2.857, 5.714, 1.429 -> floors 2,5,1 (8); fractions .857, .714, .429 -> a, b
    assert allocate_ranks(spectra, 10, rule="effective") == {"a": 3, "b": 6, "c": 1}


# budget rule: normalised σ² within each layer
#   a: σ = 2,1,1     σ² = 4,1,1 / 6   -> .667, .167, .167
#   b: σ = 1,1,1,1                    -> .25 × 4
#   c: σ = 1                          -> 1.0
BUDGET = {"a": torch.tensor([2.0, 1, 1]), "b": torch.ones(4), "c": torch.ones(1)}


def test_budget_rule_global_top_k():
    # r_min = 1 takes a .667, b .25, c 1.0; the pool is a: .167 .167, b: .25 .25 .25
    assert allocate_ranks(BUDGET, 5, rule="budget") == {"a": 1, "b": 3, "c": 1}  # + b .25, b .25
    assert allocate_ranks(BUDGET, 7, rule="budget") == {"a": 2, "b": 4, "c": 1}  # + b .25, then a .167
    assert allocate_ranks(BUDGET, 8, rule="budget") == {"a": 3, "b": 4, "c": 1}  # everything
    # without a cap, budget 6 = the 3 forced + b .25 ×3; r_max = 3 stops b at 3: + b .25 ×2, then a .167
    assert allocate_ranks(BUDGET, 6, rule="budget") == {"a": 1, "b": 4, "c": 1}
    assert allocate_ranks(BUDGET, 6, rule="budget", r_max=3) == {"a": 2, "b": 3, "c": 1}


def test_layer_drops_out_only_with_r_min_zero():
    # r_min = 0, budget 2: the two largest values overall are c 1.0 and a .667 -> b gets nothing
    assert allocate_ranks(BUDGET, 2, rule="budget", r_min=0) == {"a": 1, "b": 0, "c": 1}
    # r_min = 1 keeps every layer
    assert allocate_ranks(BUDGET, 3, rule="budget") == {"a": 1, "b": 1, "c": 1}
    # a zero importance gets r_min: 0 with r_min = 0, 1 by default
    spectra = {n: torch.ones(8) for n in "abc"}
    imp = {"a": 0.0, "b": 1.0, "c": 1.0}
    assert allocate_ranks(spectra, 6, rule="importance", importance=imp, r_min=0) == {"a": 0, "b": 3, "c": 3}
    got = allocate_ranks(spectra, 6, rule="importance", importance=imp)
    assert got["a"] == 1 and min(got.values()) >= 1 and sum(got.values()) == 6
    for rule in ("energy", "effective", "budget"):
        assert min(allocate_ranks(BUDGET, 3, rule=rule).values()) >= 1


def test_importance_rule_rank_budget():
    spectra = {n: torch.ones(16) for n in "abc"}
    imp = {"a": 1.0, "b": 2.0, "c": torch.tensor(5.0)}
    # ΣI = 8: 16·(1,2,5)/8 = 2, 4, 10
    assert allocate_ranks(spectra, 16, rule="importance", importance=imp) == {"a": 2, "b": 4, "c": 10}
    # 10·(1,2,5)/8 = 1.25, 2.5, 6.25 -> floors 1,2,6 (9); the largest fraction (.5, b) gets the last unit
    assert allocate_ranks(spectra, 10, rule="importance", importance=imp) == {"a": 1, "b": 3, "c": 6}


def test_params_budget_gora():
    # costs m+n: a (4,4) -> 8, b (8,8) -> 16, c (6,4) -> 10; caps min(m, n): 4, 8, 4; equal importance.
    spectra = {"a": torch.ones(4), "b": torch.ones(8), "c": torch.ones(4)}
    sizes = {"a": (4, 4), "b": (8, 8), "c": (6, 4)}
    imp = {"a": 1.0, "b": 1.0, "c": 1.0}
    # 100 parameters split equally: 33.3 each -> ranks 4.17 (a capped at 4 = 32 params), the other 68 split
    # equally: b 34/16 = 2.125, c 34/10 = 3.4. Floors 4, 2, 3 = 32 + 32 + 30 = 94; 6 left, and neither b (16) nor
    # c (10) fits: the result is maximal.
    got = allocate_ranks(spectra, 100, rule="importance", importance=imp, sizes=sizes, budget_by="params")
    assert got == {"a": 4, "b": 2, "c": 3}
    # the final fill: a has importance 0 (stays at r_min = 1 in the real shares; cost 2 + 2 = 4), b gets the rest.
    spectra2 = {"a": torch.ones(2), "b": torch.ones(10)}
    sizes2 = {"a": (2, 2), "b": (10, 10)}
    # 50 params: a = 1 (4), b = 46/20 = 2.3 -> 2 (40); 6 left: b (20) does not fit, a (4) does -> a = 2; 2 left
    got2 = allocate_ranks(spectra2, 50, rule="importance", importance={"a": 0.0, "b": 1.0}, sizes=sizes2,
                          budget_by="params")
    assert got2 == {"a": 2, "b": 2}
    # the energy rule with a parameter budget: ranks ∝ k_l = (1, 4, 3), caps 4, 8, 4, costs 8, 16, 10.
    # f(c) = 8·min(c, 4) + 16·min(4c, 8) + 10·min(3c, 4); b and c are full from c = 2 on (128 + 40 params), so
    # 8c + 168 = 190 -> c = a = 2.75 -> 2 (16 params); 184 used, 6 left: a (8) does not fit
    got3 = allocate_ranks({"a": pad([3, 1], 4), "b": pad([2, 2, 2, 2], 8), "c": pad([1, 1, 1], 4)}, 190,
                          rule="energy", sizes=sizes, budget_by="params")
    assert got3 == {"a": 2, "b": 8, "c": 4}


def _check_params_maximal(got, spectra, sizes, budget, r_min, r_max):
    cost = {n: sum(sizes[n]) for n in spectra}
    used = sum(got[n] * cost[n] for n in spectra)
    assert used <= budget
    for n in spectra:
        top = min(len(spectra[n]), min(sizes[n]), r_max or 10**9)
        assert r_min <= got[n] <= top
        assert got[n] == top or used + cost[n] > budget, (n, got, budget)


def test_random_allocations_respect_budget_and_bounds():
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        n_layers = rng.randint(1, 6)
        spectra, sizes, imp = {}, {}, {}
        for i in range(n_layers):
            m, n = rng.randint(2, 12), rng.randint(2, 12)
            sizes[f"l{i}"] = (m, n)
            spectra[f"l{i}"] = torch.rand(min(m, n), generator=gen) ** 3
            imp[f"l{i}"] = rng.random()
        rule = ("energy", "effective", "budget", "importance")[trial % 4]
        r_min = rng.randint(0, 2)
        r_max = rng.choice([None, 3, 6])
        kwargs = dict(rule=rule, r_min=r_min, r_max=r_max, sizes=sizes, tau=rng.choice([0.5, 0.9, 1.0]),
                      importance=imp if rule == "importance" else None)
        tops = [min(len(spectra[n]), min(sizes[n]), r_max or 10**9) for n in spectra]
        if any(r_min > t for t in tops):
            continue
        lo, hi = r_min * n_layers, sum(tops)
        budget = rng.randint(lo, hi)
        got = allocate_ranks(spectra, budget, **kwargs)
        assert list(got) == list(spectra) and sum(got.values()) == budget
        assert all(r_min <= got[n] <= t for n, t in zip(spectra, tops))
        assert got == allocate_ranks(spectra, budget, **kwargs)  # deterministic
        costs = [sum(sizes[n]) for n in spectra]
        plo, phi = r_min * sum(costs), sum(t * c for t, c in zip(tops, costs))
        pbudget = rng.randint(plo, phi)
        got = allocate_ranks(spectra, pbudget, budget_by="params", **kwargs)
        _check_params_maximal(got, spectra, sizes, pbudget, r_min, r_max)


def test_budget_caps_at_min_dim_when_sizes_given():
    spectra = {"a": torch.ones(8), "b": torch.ones(8)}
    # sizes cap a at min(3, 8) = 3 even though its spectrum has 8 values: budget 10 -> a 3, b 7
    got = allocate_ranks(spectra, 10, rule="effective", sizes={"a": (3, 8), "b": (8, 8)})
    assert got == {"a": 3, "b": 7}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(spectra={}), "spectra is empty"),
        (dict(budget=2), "below the 3 that r_min = 1 needs"),
        (dict(budget=9), "above the 8"),
        (dict(r_min=3, r_max=2), "r_min = 3 > r_max = 2"),
        (dict(r_min=2, budget=6), "r_min = 2 > r_max = 1 for layer 'c'"),
        (dict(r_min=-1), "r_min = -1 < 0"),
        (dict(rule="svd"), "use one of energy, effective, budget, importance"),
        (dict(budget_by="flops"), "Unknown budget_by"),
        (dict(budget_by="params"), "needs sizes"),
        (dict(sizes={"a": (3, 3), "b": (4, 4)}), r"missing for \['c'\]"),
        (dict(sizes={"a": (3, 3), "b": (4, 4), "c": (0, 1)}), "positive integers"),
        (dict(rule="importance"), "needs importance"),
        (dict(rule="importance", importance={"a": 1.0, "b": 1.0}), r"missing for \['c'\]"),
        (dict(rule="importance", importance={"a": 1, "b": 1, "c": 1, "d": 1}), r"unknown layers \['d'\]"),
        (dict(rule="importance", importance={"a": 1, "b": -1, "c": 1}), "finite and ≥ 0"),
        (dict(rule="energy", importance={"a": 1, "b": 1, "c": 1}), "only used by rule='importance'"),
        (dict(spectra={"a": torch.tensor([1.0, float("nan")])}, budget=1), "NaN or inf"),
        (dict(spectra={"a": torch.tensor([1.0, float("inf")])}, budget=1), "NaN or inf"),
        (dict(spectra={"a": torch.tensor([1.0, -0.5])}, budget=1), "negative"),
        (dict(spectra={"a": torch.ones(2, 2)}, budget=1), "1-D"),
        (dict(spectra={"a": torch.ones(0)}, budget=1), "is empty"),
        (dict(tau=0.0), r"tau = 0.0 must be in \(0, 1\]"),
        (dict(tau=1.5), r"tau = 1.5 must be in \(0, 1\]"),
        (dict(budget=-1, r_min=0), "budget = -1 < 0"),
    ],
)
def test_bad_inputs(kwargs, match):
    args = dict(spectra=BUDGET, budget=5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        allocate_ranks(**args)


def test_budget_must_be_int():
    with pytest.raises(TypeError, match="budget must be an int"):
        allocate_ranks(BUDGET, 5.0)
    with pytest.raises(TypeError, match="budget must be an int"):
        allocate_ranks(BUDGET, None)


def test_params_budget_errors():
    sizes = {"a": (3, 3), "b": (4, 4), "c": (1, 5)}  # costs 6, 8, 6; caps 3, 4, 1
    with pytest.raises(ValueError, match="below the 20 that r_min = 1 needs"):
        allocate_ranks(BUDGET, 19, sizes=sizes, budget_by="params")
    with pytest.raises(ValueError, match="above the 56"):  # 3·6 + 4·8 + 1·6
        allocate_ranks(BUDGET, 57, sizes=sizes, budget_by="params")


# ---------------------------------------------------------------------------------------------------------- EVA


def test_eva_ranks_by_hand():
    # r = 2, ρ = 2: each layer offers its first round(4) = 4 ratios; the budget is 2 × 3 = 6
    explained = {
        "x": torch.tensor([0.2, 0.19, 0.18, 0.17, 0.16, 0.1]),  # flat: would take 5 without the cap
        "y": torch.tensor([0.9, 0.05, 0.03]),
        "z": torch.tensor([0.15, 0.01]),
    }
    # sorted: y .9, x .2, .19, .18, .17 (x capped at 4: .16 not offered), z .15 -> x 4, y 1, z 1
    assert eva_ranks(explained, r=2, rho=2.0) == {"x": 4, "y": 1, "z": 1}
    # ρ = 1: cap 2, offered x .2 .19 | y .9 .05 | z .15 .01: all 6 fit the budget -> 2, 2, 2 (no redistribution)
    assert eva_ranks(explained, r=2, rho=1.0) == {"x": 2, "y": 2, "z": 2}
    # r = 1, budget 3, cap round(1.5) = 2: y .9, x .2, .19 -> z drops out
    assert eva_ranks(explained, r=1, rho=1.5) == {"x": 2, "y": 1, "z": 0}
    # Python's round, as PEFT: round(2.5) = 2 (half to even). Offered x .5 .4 | y .1 | z .05, budget 3 -> x 2, y 1;
    # a cap of 3 would give x 3, y 0
    assert eva_ranks({"x": torch.tensor([0.5, 0.4, 0.3]), "y": torch.tensor([0.1]), "z": torch.tensor([0.05])},
                     r=1, rho=2.5) == {"x": 2, "y": 1, "z": 0}
    # equal inputs: w shares y's input; PEFT offers y's ratios for w too and then puts the larger rank on y
    got = eva_ranks(explained, r=1, rho=2.0, equal_inputs={"w": "y"})
    # budget 4, cap 2: y .9, w .9, x .2, .19 -> x 2, y 1, z 0, w 1
    assert got == {"x": 2, "y": 1, "z": 0, "w": 1}
    for bad, match in [(dict(rho=0.5), "rho must be a finite number ≥ 1"), (dict(r=0), "r = 0 < 1"),
                       (dict(explained={}), "explained is empty"),
                       (dict(equal_inputs={"w": "q"}), "first layer of its group"),
                       (dict(equal_inputs={"x": "y"}), "ratios differ")]:
        args = dict(explained=explained, r=2)
        args.update(bad)
        with pytest.raises(ValueError, match=match):
            eva_ranks(**args)


class _SharedInputs(nn.Module):
    """l0 -> (a, b) on the same input -> c: PEFT's EVA sees a and b as one group (equal inputs)."""

    def __init__(self, d: int):
        super().__init__()
        self.l0, self.a, self.b, self.c = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        h = self.l0(x)
        return self.c(self.a(h) + 0.5 * self.b(h))


def _centered_ratios(x: torch.Tensor) -> torch.Tensor:
    """PEFT's IncrementalPCA.explained_variance_ratio_ computed exactly: S²/Σ_features(n·var), S the singular values
    of the inputs minus their mean over all rows (tokens), var the biased per-feature variance — i.e. the share of
    the total (centred) variance along each principal direction."""
    xc = x.double() - x.double().mean(0)
    s = torch.linalg.svdvals(xc)
    return s ** 2 / (xc ** 2).sum()


def _peft_eva(model, x, r, rho, monkeypatch):
    svd_hooks = []

    class RecordingSVDHook(peft_eva.SVDHook):
        def __init__(self, **kw):
            super().__init__(**kw)
            svd_hooks.append(self)

    monkeypatch.setattr(peft_eva, "SVDHook", RecordingSVDHook)
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    cfg = LoraConfig(r=r, init_lora_weights="eva", eva_config=EvaConfig(rho=rho, tau=0.99), target_modules=targets)
    state = peft_eva.get_eva_state_dict(model, [x], peft_config=cfg, forward_fn=lambda m, inp: m(inp),
                                        prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None,
                                        show_progress_bar=False)
    inputs = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda mod, args, out, n=n: inputs.__setitem__(n, args[0].detach())) for n in targets]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return {n: state[n].shape[0] for n in targets}, inputs, {h.name: h for h in svd_hooks}


def _spread(model, d):
    """Give the layers very different input spectra (one isotropic, the others concentrated), so the global top-k
    redistributes ranks and the ρ cap binds."""
    with torch.no_grad():
        q = torch.linalg.qr(torch.randn(d, d))[0]
        decay = torch.tensor([10.0 * 0.3 ** i for i in range(d)])
        for lin in model.modules():
            if isinstance(lin, nn.Linear):
                lin.weight.copy_((decay[:, None] * q) @ torch.linalg.qr(torch.randn(d, d))[0])


def _assert_clear_cut(explained, r, rho, copies=None):
    """The value at the top-k cut is at least 1% away from every other offered value (exact copies from layers that
    share inputs aside), so float32 (PEFT) against float64 (here) cannot reorder them."""
    cap = round(r * rho)
    offered = torch.cat([v[:cap].repeat((copies or {}).get(n, 1)) for n, v in explained.items()])
    n_layers = sum((copies or {}).get(n, 1) for n in explained)
    at_cut = offered.sort(descending=True).values[r * n_layers - 1]
    others = offered[offered != at_cut]
    assert ((others - at_cut).abs() > 0.01 * at_cut).all()


def test_eva_ranks_match_peft(monkeypatch):
    # The comparison is exact because PEFT's statistic is reproducible here: one batch (PEFT's loop cycles the
    # dataloader, so every partial_fit sees that batch again, which keeps the top principal directions and the
    # ratios unchanged), and every layer's inputs have rank ≤ 8 = 2·n_components, PEFT's svd_lowrank oversampling
    # q, so its randomized SVD is exact. With several different batches PEFT's incremental PCA truncates to
    # n_components after each batch and its ratios drift slightly from the exact centred PCA of all inputs.
    torch.manual_seed(0)
    d, r, rho = 8, 2, 2.0
    model = nn.Sequential(*(nn.Linear(d, d) for _ in range(4)))
    _spread(model, d)
    x = torch.randn(64, d)
    peft_ranks, inputs, hooks = _peft_eva(model, x, r, rho, monkeypatch)
    explained = {n: _centered_ratios(inputs[n]) for n in peft_ranks}
    for n, h in hooks.items():  # the statistic PEFT ranked by is the exact centred ratio
        k = h.svd.explained_variance_ratio_.numel()
        assert k == round(r * rho)
        torch.testing.assert_close(h.svd.explained_variance_ratio_.double(), explained[n][:k], rtol=1e-4, atol=1e-6)
    _assert_clear_cut(explained, r, rho)
    ours = eva_ranks(explained, r=r, rho=rho)
    assert ours == peft_ranks
    # the case is not trivial: ranks moved, one layer is at the cap round(ρ·r) = 4
    assert sorted(ours.values()) != [r] * 4 and max(ours.values()) == 4 and sum(ours.values()) == r * 4


def test_eva_ranks_match_peft_with_equal_inputs(monkeypatch):
    torch.manual_seed(1)
    d, r, rho = 8, 2, 2.0
    model = _SharedInputs(d)
    _spread(model, d)
    with torch.no_grad():
        # l0's output (a's and b's input): a flat spectrum, but not a rotation of x (that would tie with l0's)
        model.l0.weight.copy_(torch.linspace(1.6, 0.4, d)[:, None] * torch.linalg.qr(torch.randn(d, d))[0])
    x = torch.randn(64, d)
    peft_ranks, inputs, hooks = _peft_eva(model, x, r, rho, monkeypatch)
    assert set(hooks) == {"l0", "a", "c"}  # PEFT computed b's SVD through a
    explained = {n: _centered_ratios(inputs[n]) for n in ("l0", "a", "c")}
    for n, h in hooks.items():
        k = h.svd.explained_variance_ratio_.numel()
        torch.testing.assert_close(h.svd.explained_variance_ratio_.double(), explained[n][:k], rtol=1e-4, atol=1e-6)
    _assert_clear_cut(explained, r, rho, copies={"a": 2})
    ours = eva_ranks(explained, r=r, rho=rho, equal_inputs={"b": "a"})
    assert ours == peft_ranks
    assert ours["a"] >= ours["b"] and sum(ours.values()) == r * 4


# ----------------------------------------------------------------------------------------------- PEFT patterns


NAMES = {"q": 2, "enc.q": 8, "model.layers.1.attn.q": 4, "model.layers.11.attn.q": 1, "model.layers.1.attn.k": 0}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rank_patterns_resolve_in_peft(use_rslora):
    r, alpha = 4, 16.0
    rank_pattern, alpha_pattern, dropped = rank_patterns(NAMES, r=r, alpha=alpha, use_rslora=use_rslora)
    assert dropped == ["model.layers.1.attn.k"]
    assert 0 not in rank_pattern.values()
    for name, rank in NAMES.items():
        for full in (name, "base_model.model." + name):  # as named in the base model and inside a PeftModel
            key = get_pattern_key(rank_pattern.keys(), full)
            if rank == 0:
                assert key not in rank_pattern
                continue
            assert rank_pattern[key] == rank, (full, key)
            want = alpha * math.sqrt(rank / r) if use_rslora else alpha * rank / r
            assert alpha_pattern[get_pattern_key(alpha_pattern.keys(), full)] == pytest.approx(want)
            # the scaling is kept: α_l/r_l = α/r, or α_l/√r_l = α/√r
            s = want / math.sqrt(rank) if use_rslora else want / rank
            assert s == pytest.approx(alpha / math.sqrt(r) if use_rslora else alpha / r)


def test_rank_patterns_build_a_peft_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(8, 8)
            self.enc = nn.Module()
            self.enc.q = nn.Linear(8, 8)
            self.enc.k = nn.Linear(8, 8)

    ranks = {"q": 2, "enc.q": 6, "enc.k": 0}
    pats = rank_patterns(ranks, r=4, alpha=8, use_rslora=False)
    kept = [n for n in ranks if n not in pats.dropped]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=kept, rank_pattern=pats.rank_pattern,
                     alpha_pattern=pats.alpha_pattern)
    model = get_peft_model(Net(), cfg)
    base = model.base_model.model
    assert base.q.lora_A["default"].weight.shape == (2, 8)
    assert base.enc.q.lora_A["default"].weight.shape == (6, 8)
    assert not hasattr(base.enc.k, "lora_A")
    assert base.q.scaling["default"] == pytest.approx(2.0) and base.enc.q.scaling["default"] == pytest.approx(2.0)


def test_rank_patterns_errors():
    with pytest.raises(ValueError, match="Every layer has rank 0"):
        rank_patterns({"a": 0}, r=4, alpha=8)
    with pytest.raises(ValueError, match="< 0"):
        rank_patterns({"a": -1}, r=4, alpha=8)
    with pytest.raises(ValueError, match="lora_alpha"):
        rank_patterns({"a": 1}, r=4, alpha=0)
    with pytest.raises(ValueError, match="r = 0 < 1"):
        rank_patterns({"a": 1}, r=0, alpha=8)


# ------------------------------------------------------------------------------------------------- logs & files


def test_rank_table():
    table = rank_table({"a": 1, "b": 3}, spectra={"a": torch.tensor([3.0, 1.0]), "b": torch.zeros(4)}, r=2)
    lines = table.splitlines()
    assert lines[0].split("|")[1:-1] == [" layer ", " rank ", " rank/r ", " energy "]
    assert "0.900" in lines[2]  # a: 9 / (9 + 1)
    assert "n/a" in lines[3]  # b: all-zero spectrum
    assert lines[-1].split("|")[1].strip() == "total" and " 4 " in lines[-1] and "1.00" in lines[-1]
    assert "energy" not in rank_table({"a": 1})


def test_write_ranks_atomic(tmp_path):
    out = tmp_path / "adapter"
    ranks = {"x.q": 2, "x.k": 5, "x.v": 0}
    spectra = {"x.q": torch.tensor([2.0, 1, 1]), "x.k": torch.ones(8), "x.v": torch.ones(3)}
    paths = write_ranks(ranks, str(out), spectra=spectra, extra={"rule": "energy", "budget": 7})
    assert paths == [str(out / "ranks.json"), str(out / "ranks.png")]
    assert sorted(os.listdir(out)) == ["ranks.json", "ranks.png"]  # no temporary left behind
    data = json.loads((out / "ranks.json").read_text())
    assert data["ranks"] == ranks and list(data["ranks"]) == list(ranks) and data["total_rank"] == 7
    assert data["energy_captured"]["x.q"] == pytest.approx(5 / 6)  # (4 + 1) / 6
    assert data["energy_captured"]["x.v"] == 0.0
    assert data["extra"] == {"rule": "energy", "budget": 7}
    assert (out / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # overwriting keeps the folder clean too
    write_ranks({"x.q": 1}, str(out))
    assert sorted(os.listdir(out)) == ["ranks.json", "ranks.png"]
    assert "energy_captured" not in json.loads((out / "ranks.json").read_text())
    with pytest.raises(ValueError, match="spectra has no entry"):
        write_ranks(ranks, str(out), spectra={"x.q": torch.ones(2)})
    assert sorted(os.listdir(out)) == ["ranks.json", "ranks.png"]
