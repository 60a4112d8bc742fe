"""The memory plan (`lorafa.plan_init`) and grouped statistics passes (`InitConfig(stats_memory=...)`): the plan's
bytes counted from shapes, its groups under a budget, and a grouped init equal to the one-pass init."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from conftest import lora_cfg, make_batches, tiny_llama
from lorafa import InitConfig, collect_stats, initialize
from lorafa.peft_bridge import _compute_init, compute_init
from lorafa.stats.types import held_bytes
from lorafa.plan import parse_memory, plan_init

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]



@pytest.mark.parametrize("method,kind", [("lora_fa", "kfac"), ("lora_ga", "grad"), ("eva", "act")])
def test_plan_bytes_equal_what_the_pass_holds(method, kind):
    model, batches = tiny_llama(), make_batches(2)
    plan = plan_init(model, lora_cfg(ALL), InitConfig(method=method), timings=False)
    stats = collect_stats(model, batches, ALL, kinds=(kind,), progress=False)
    assert plan.stats_bytes == held_bytes(stats)
    assert plan.groups == [list(stats)]  # one pass without a budget, every target in depth order
    assert len(plan.groups[0]) == 14  # 7 targets × 2 blocks


def _meta_forward_works() -> bool:
    """transformers before 5 cannot run Llama's rotary embedding on the meta device (torch.autocast refuses the
    "meta" device type): plan_init then counts Σ per layer, an upper bound, and says so."""
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def test_plan_on_the_meta_device_matches_the_real_model():
    cfg = tiny_llama().config
    real = plan_init(tiny_llama(), lora_cfg(ALL), InitConfig(), timings=False)
    meta = plan_init(cfg, lora_cfg(ALL), InitConfig(), timings=False)
    if not _meta_forward_works():
        assert meta.sharing.startswith("unknown") and meta.stats_bytes > real.stats_bytes  # the upper bound
        return
    assert meta.stats_bytes == real.stats_bytes
    assert meta.sharing == "forward on the meta device"
    # q, k, v read one input, gate and up another: 2 distinct Σ of 32² per block besides o's and down's
    shared = [lp.name for lp in meta.layers if lp.shares_input_with is not None]
    assert sorted(n.split(".")[-1] for n in shared) == sorted(["k_proj", "v_proj", "up_proj"] * 2)


def test_a_config_s_dtype_is_the_weights_dtype():
    """A config saying bf16 (as the published checkpoints' do) plans bf16 weights: 2 bytes a parameter."""
    cfg = tiny_llama().config
    fp32 = plan_init(cfg, lora_cfg(ALL), InitConfig(), timings=False)
    cfg.dtype = torch.bfloat16
    bf16 = plan_init(cfg, lora_cfg(ALL), InitConfig(), timings=False)
    n_params = sum(p.numel() for p in tiny_llama().parameters())
    assert (fp32.weights_bytes, bf16.weights_bytes) == (4 * n_params, 2 * n_params)
    assert bf16.stats_bytes == fp32.stats_bytes  # the statistics are fp32 whatever the weights


def test_plan_of_an_8b_shape_counts_the_issue_s_numbers():
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256)
    plan = plan_init(cfg, lora_cfg(ALL), InitConfig(method="lora_fa"), memory="8GiB", timings=False)
    if not _meta_forward_works():
        pytest.skip("transformers < 5: no forward on the meta device, so no input sharing found (upper bound)")
    per_block = (4 * (4096 * 4096 * 2 + 1024 * 4096 * 2 + 14336 * 4096 * 3)  # G of every layer
                 + 4 * (3 * 4096 ** 2 + 14336 ** 2)  # Σ: q/k/v's, o's, gate/up's, down's
                 + 4 * (2 * 4096 ** 2 + 2 * 1024 ** 2 + 2 * 14336 ** 2 + 4096 ** 2))  # C of every layer
    assert plan.stats_bytes == 32 * per_block  # about 120 GB, as the issue counts
    assert max(plan.group_bytes) <= 8 * 2 ** 30
    assert sum(plan.group_bytes) == plan.stats_bytes
    names = [n for g in plan.groups for n in g]
    assert names == [lp.name for lp in plan.layers]  # every layer once, in depth order
    for g in plan.groups:  # an input-sharing set never straddles two groups
        for lp in plan.layers:
            if lp.name in g and lp.shares_input_with is not None:
                assert lp.shares_input_with in g


def test_budget_below_one_layer_names_the_numbers():
    with pytest.raises(ValueError, match=r"smaller than the statistics of .*q_proj.*raise stats_memory to at least"):
        plan_init(tiny_llama(), lora_cfg(ALL), InitConfig(method="lora_fa"), memory=1000, timings=False)


@pytest.mark.parametrize("value,expected", [("8GiB", 8 * 2 ** 30), ("512 MB", 512 * 10 ** 6), (4096, 4096),
                                            ("1.5e3", 1500), ("auto", "auto"), (None, None)])
def test_parse_memory(value, expected):
    assert parse_memory(value) == expected


@pytest.mark.parametrize("bad", ["8 GB/s", "eight", "0", -5, "1e-4KiB", True, [8]])
def test_unknown_size_string_is_refused(bad):
    with pytest.raises(ValueError, match="stats_memory"):
        InitConfig(stats_memory=bad)


def test_stats_memory_on_a_method_without_statistics_is_refused():
    with pytest.raises(ValueError, match="does not run"):
        InitConfig(method="pissa", stats_memory="1GiB")


def _factors(res):
    return {n: (r.A, r.B) for n, r in res.items()}


def _budget_for_blocks(model, init, blocks: int = 1) -> int:
    """A budget that holds about one block's statistics: several groups on the tiny model."""
    plan = plan_init(model, lora_cfg(ALL), init, timings=False)
    return plan.stats_bytes // (2 * blocks) + 1


@pytest.mark.parametrize("options", [dict(method="lora_fa"), dict(method="lora_one"), dict(method="lora_ga"),
                                     dict(method="corda"), dict(method="eva"),
                                     dict(method="lora_fa", rank="auto"),
                                     dict(method="lora_one", rank="auto", rank_rule="importance"),
                                     dict(method="lora_fa", scale="line_search"),
                                     dict(method="lora_ga", sketch=8)])
def test_grouped_init_equals_one_pass(options):
    batches = make_batches(3)
    one = InitConfig(iters=3, **options)
    res1, cfg1, summary1, _ = _compute_init(tiny_llama(), lora_cfg(ALL), one, None, batches, None, False)
    model = tiny_llama()
    budget = _budget_for_blocks(model, one)
    grouped = InitConfig(iters=3, stats_memory=budget, **options)
    assert len(plan_init(model, lora_cfg(ALL), grouped, timings=False).groups) >= 2
    res2, cfg2, summary2, _ = _compute_init(model, lora_cfg(ALL), grouped, None, batches, None, False)
    assert summary2["stats_groups"] and len(summary2["stats_groups"]) >= 2
    assert cfg1.rank_pattern == cfg2.rank_pattern
    assert set(res1) == set(res2)
    for n, (a1, b1) in _factors(res1).items():
        a2, b2 = res2[n].A, res2[n].B
        for x, y in ((a1, a2), (b1, b2)):
            assert torch.linalg.norm(x - y) <= 1e-5 * max(torch.linalg.norm(x), 1e-12), n


def test_grouped_initialize_gives_the_same_model(tmp_path):
    batches = make_batches(3)
    ref = initialize(tiny_llama(), lora_cfg(ALL), InitConfig(iters=3), batches=batches, progress=False)
    model = tiny_llama()
    budget = _budget_for_blocks(model, InitConfig(iters=3))
    got = initialize(model, lora_cfg(ALL), InitConfig(iters=3, stats_memory=budget), batches=batches,
                     progress=False)
    from conftest import batch_logits

    torch.testing.assert_close(batch_logits(got, batches), batch_logits(ref, batches), rtol=1e-5, atol=1e-5)


def test_grouped_passes_refuse_an_iterator():
    model = tiny_llama()
    budget = _budget_for_blocks(model, InitConfig(iters=3))
    with pytest.raises(ValueError, match="iterator"):
        compute_init(model, lora_cfg(ALL), InitConfig(iters=3, stats_memory=budget), batches=iter(make_batches(3)), progress=False)


def test_stats_memory_with_given_statistics_that_exceed_it():
    model, batches = tiny_llama(), make_batches(2)
    stats = collect_stats(model, batches, ALL, kinds=("kfac",), progress=False)
    with pytest.raises(ValueError, match=r"statistics given .* hold .* at once"):
        compute_init(model, lora_cfg(ALL), InitConfig(iters=2, stats_memory=1000), stats=stats, progress=False)
    # a budget they fit is fine
    compute_init(model, lora_cfg(ALL), InitConfig(iters=2, stats_memory="1GiB"), stats=stats, progress=False)


def test_summary_prints_groups_and_factorisations():
    model = tiny_llama()
    plan = plan_init(model, lora_cfg(ALL), InitConfig(method="lora_fa"),
                     memory=_budget_for_blocks(model, InitConfig(method="lora_fa")))
    text = str(plan)
    assert f"{len(plan.groups)} passes" in text and len(plan.groups) >= 2 and "predicted peak" in text and "cholesky" in text
    assert all(f["seconds"] >= 0 for f in plan.factorisations)


def test_all_linear_keyword_is_expanded_as_peft_does():
    from peft import LoraConfig

    plan = plan_init(tiny_llama(), LoraConfig(r=2, target_modules="all-linear"), InitConfig(), timings=False)
    assert sorted({lp.name.split(".")[-1] for lp in plan.layers}) == sorted(ALL)


def test_the_plan_predicts_which_whiteners_fall_back_to_eigh():
    """With the statistics' token count, the plan says for each covariance whether its whitener takes Cholesky or
    eigh (singular, with the fp32 round-off above the damping), and the whiteners do exactly that, on every layer,
    for token counts below and above the widths (16, 32, 48) and dampings from 1e-9 to 1e-4."""
    from lorafa.methods.lora_fa import Whitener
    from lorafa.plan import whitener_takes_eigh

    model, lc = tiny_llama(), lora_cfg(ALL)
    outcomes = set()
    for n_batches, bsz in ((1, 1), (1, 2), (6, 4)):
        batches = make_batches(n_batches, bsz=bsz, seq=12)
        tokens = int(sum(b["attention_mask"].sum() for b in batches))
        stats = collect_stats(model, batches, ALL, kinds=("kfac",), progress=False)
        for reg in (1e-9, 1e-7, 1e-6, 1e-4):
            for s in stats.values():
                for cov in (s.in_cov, s.out_cov):
                    eigh = not Whitener(cov, reg, True).cholesky
                    assert eigh == whitener_takes_eigh(cov.shape[0], tokens, reg, True), (tokens, cov.shape, reg)
                    outcomes.add(eigh)
            plan = plan_init(model, lc, InitConfig(method="lora_fa", reg=reg), tokens=tokens)
            ops = {f["op"].split()[0] for f in plan.factorisations} - {"svd"}
            widths = {lp.in_features for lp in plan.layers} | {lp.out_features for lp in plan.layers}
            assert ops == {"eigh" if whitener_takes_eigh(d, tokens, reg, True) else "cholesky" for d in widths}
            assert all(f["worst_seconds"] >= f["seconds"] for f in plan.factorisations)
    assert outcomes == {True, False}  # both paths were taken (and predicted)


def test_without_tokens_the_plan_prints_the_worst_case():
    model, lc = tiny_llama(), lora_cfg(ALL)
    unknown = plan_init(model, lc, InitConfig(method="lora_fa"))
    assert "up to" in unknown.summary() and "tokens=" in unknown.summary()
    with pytest.raises(ValueError, match="tokens must be an integer"):
        plan_init(model, lc, InitConfig(method="lora_fa"), tokens=0)
