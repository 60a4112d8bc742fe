"""SPEC §6 through the bridge: InitConfig(rank="auto") allocates per-layer ranks from the method's own spectra,
writes them into PEFT's rank_pattern/alpha_pattern, and the adapters load on the original base with stock PEFT;
eva redistributes as EVA does."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import batch_logits as logits
from conftest import lora_cfg, make_batches, tiny_llama
from peft import PeftModel
from peft.tuners.lora import LoraLayer

import lorafa
from lorafa import InitConfig, collect_stats
from lorafa.saving import init_record
from lorafa.ranks import eva_ranks

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # 8 layers in the tiny Llama


def cfg(r=2, alpha=4, **kw):
    return lora_cfg(TARGETS, r=r, alpha=alpha, **kw)


def layers(model):
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.fixture(scope="module")
def batches():
    return make_batches(n_batches=3, bsz=4, seq=12)


def _train(pm, batches):
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    pm.train()
    for b in batches:
        pm(**b).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("method,rule,rslora", [("lora_fa", "energy", False), ("lora_fa", "effective", True),
                                                ("lora_ga", "budget", False), ("lora_ga", "importance", True),
                                                ("lora_one", "energy", True)])
def test_auto_ranks_meet_the_budget_and_round_trip(method, rule, rslora, batches, tmp_path):
    config = cfg(use_rslora=rslora)
    init = InitConfig(method=method, rank="auto", rank_rule=rule, r_max=6 if method != "lora_ga" else 3)
    pm = lorafa.initialize(tiny_llama(), config, init, batches=batches, progress=False,
                           initial_adapter_dir=tmp_path / "init")
    alloc = init_record(pm).summary["ranks"]
    ranks = alloc["ranks"]
    assert sum(ranks.values()) == 2 * 8 == alloc["budget"]
    built = layers(pm)
    assert {n: m.r["default"] for n, m in built.items()} == ranks
    assert len(set(ranks.values())) > 1, ranks  # the spectra differ, so the ranks do
    base_s = 4 / math.sqrt(2) if rslora else 4 / 2
    for n, m in built.items():  # α_l keeps each layer's s at the config's
        assert math.isclose(m.scaling["default"], base_s, rel_tol=1e-6), n
        assert m.lora_A["default"].weight.shape[0] == ranks[n]
    _train(pm, batches)
    trained = logits(pm, batches)
    lorafa.save_adapter(pm, tmp_path / "adapter", initial_adapter=tmp_path / "init")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, batches), trained, atol=2e-5, rtol=1e-4)
    mult = 2 if method == "lora_ga" else 1  # offset methods are saved as rank-2r adapters on the original base
    assert {n: m.r["default"] for n, m in layers(loaded).items()} == {n: mult * r for n, r in ranks.items()}


def test_auto_ranks_drop_layers_only_with_r_min_zero(batches, tmp_path):
    init = InitConfig(method="lora_one", rank="auto", rank_rule="budget", rank_budget=3, r_min=0)
    pm = lorafa.initialize(tiny_llama(), cfg(), init, batches=batches, progress=False,
                           initial_adapter_dir=tmp_path / "init")
    ranks = init_record(pm).summary["ranks"]["ranks"]
    kept = {n: r for n, r in ranks.items() if r > 0}
    assert sum(ranks.values()) == 3 and len(kept) < 8
    assert set(layers(pm)) == set(kept)
    _train(pm, batches)
    trained = logits(pm, batches)
    lorafa.save_adapter(pm, tmp_path / "adapter", initial_adapter=tmp_path / "init")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, batches), trained, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="budget"):
        lorafa.initialize(tiny_llama(), cfg(), InitConfig(method="lora_one", rank="auto", rank_budget=3),
                          batches=batches, progress=False)


def test_eva_redistributes_ranks_like_peft(batches):
    """lorafa's eva: budget r × layers, at most round(ρ·r) per layer, by a global ranking of explained variance."""
    pm = lorafa.initialize(tiny_llama(), cfg(), InitConfig(method="eva"), batches=batches, progress=False)
    alloc = init_record(pm).summary["ranks"]
    ranks = alloc["ranks"]
    assert sum(ranks.values()) == 16 and max(ranks.values()) <= 4
    stats = collect_stats(tiny_llama(), batches, TARGETS, kinds=("act",), progress=False)
    explained = {}
    for n, st in stats.items():
        ev = torch.linalg.eigvalsh(st.in_cov.double()).flip(0).clamp_min(0)
        explained[n] = (ev / ev.sum()).float()
    owners, equal = {}, {}
    for n, st in stats.items():
        equal.update({n: owners[id(st.in_cov)]} if id(st.in_cov) in owners else {})
        owners.setdefault(id(st.in_cov), n)
    assert ranks == eva_ranks(explained, r=2, rho=2.0, equal_inputs=equal)
    plain = lorafa.initialize(tiny_llama(), cfg(), InitConfig(method="eva", eva_rho=1.0), batches=batches, progress=False)
    assert all(m.r["default"] == 2 for m in layers(plain).values())  # rho = 1: PCA init at the config's rank


@pytest.mark.parametrize("kw,match", [
    ({"method": "lora", "rank": "auto"}, "has none"),
    ({"method": "pissa", "rank": "auto"}, "has none"),
    ({"method": "lora_fa", "rank": 4}, "rank must be None"),
    ({"method": "lora_fa", "rank": "auto", "rank_rule": "entropy"}, "rank_rule must be one of"),
    ({"method": "lora_fa", "rank": "auto", "r_min": 5, "r_max": 3}, "r_max must be"),
    ({"method": "eva", "rank": "auto", "rank_rule": "importance"}, "needs the gradient"),
    ({"method": "lora_fa", "rank": "auto", "budget_by": "flops"}, "budget_by must be one of"),
])
def test_bad_rank_options(kw, match):
    with pytest.raises(ValueError, match=match):
        InitConfig(**kw)


def test_too_small_budget_fails_before_the_statistics_pass(batches):
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        return model(**batch).loss

    with pytest.raises(ValueError, match="budget"):
        lorafa.initialize(tiny_llama(), cfg(), InitConfig(method="lora_fa", rank="auto", rank_budget=4, r_min=1),
                          batches=batches, loss_fn=loss_fn, progress=False)
    assert not calls


def test_a_users_rank_pattern_sets_the_budget_and_the_allocation_is_what_is_built(batches, tmp_path):
    """Issue 25 item 7: with the user's keys first, PEFT took the user's rank for every layer it matched, while the
    record (ranks.json) reported the allocation. The allocation wins now, each layer keeps the scale the user's
    alpha_pattern gave it, and the saved adapter reloads on the original base."""
    config = cfg(r=2, alpha=4, rank_pattern={"v_proj": 4}, alpha_pattern={"v_proj": 16})  # v_proj: s = 4, others 2
    init = InitConfig(method="lora_fa", rank="auto", rank_rule="effective", r_max=6)
    pm = lorafa.initialize(tiny_llama(), config, init, batches=batches, progress=False,
                           initial_adapter_dir=tmp_path / "init")
    ranks = init_record(pm).summary["ranks"]["ranks"]
    assert sum(ranks.values()) == 6 * 2 + 2 * 4  # the budget: the user's ranks, v_proj's included
    built = layers(pm)
    assert {n: m.r["default"] for n, m in built.items()} == ranks
    assert {ranks[n] for n in ranks if n.endswith("v_proj")} != {4}  # not the user's rank any more
    for n, m in built.items():
        want = 16 / 4 if n.endswith("v_proj") else 4 / 2
        assert math.isclose(m.scaling["default"], want, rel_tol=1e-6), (n, m.scaling["default"])
    lorafa.save_adapter(pm, tmp_path / "adapter", initial_adapter=tmp_path / "init")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, batches), logits(pm, batches), atol=2e-5, rtol=1e-4)


def test_each_layer_is_capped_by_its_own_shape_not_the_smallest_layers():
    """Issue 25 item 12: r_max was cut to the smallest target's min(m, n) for every layer: k_proj (16 × 32) capped
    q_proj (32 × 32) at 16, so a budget that q_proj alone could take was refused as too large."""
    config = lora_cfg(["q_proj", "k_proj"], r=8, alpha=16)
    init = InitConfig(method="lora_fa", rank="auto", rank_rule="budget", r_max=30, rank_budget=4 * 22)
    pm = lorafa.initialize(tiny_llama(), config, init, batches=make_batches(2), progress=False)
    ranks = init_record(pm).summary["ranks"]["ranks"]
    assert sum(ranks.values()) == 88
    assert max(r for n, r in ranks.items() if n.endswith("q_proj")) > 16
    assert all(r <= 16 for n, r in ranks.items() if n.endswith("k_proj"))
