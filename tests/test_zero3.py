"""DeepSpeed ZeRO-3 (2 gloo processes on DeepSpeed's CPU accelerator): on a model partitioned by
`deepspeed.zero.Init`, the statistics pass (each module's weights gathered only while it runs) and the inits equal one
process on the union of the batches, and every weight is partitioned again afterwards. Skipped without deepspeed
(`pip install deepspeed`; CI installs it for this file)."""

from __future__ import annotations

import json
import math
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from conftest import make_batches, tiny_llama
from safetensors.torch import load_file, save_file
from spawn_ranks import free_port, require_gloo, run_ranks
from test_fsdp import N_BATCHES, TARGETS, WORLD, _guard_batches, _lora_config, assert_ranks_equal

import lorafa
from lorafa.saving import init_record
from lorafa.stats import shard_batches

DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
METHODS = ("lora_fa", "lora_ga", "pissa")  # statistics only; an offset written into the partitions; W read and offset
GROUP_BUDGET = 40_000  # bytes: the tiny model's lora_fa statistics (170 kB) in 6 grouped sweeps


def _zero3_llama(full: dict):
    """tiny_llama partitioned by zero.Init, holding the weights `full` (zero.Init draws its own at construction)."""
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=DS_CONFIG):
        model = tiny_llama(seed=0)
    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
        if dist.get_rank() == 0:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(full[n])
    return model


def _gathered_state(module) -> dict[str, torch.Tensor]:
    import deepspeed

    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(params):
        return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def _all_partitioned(model) -> bool:
    return all(p.numel() == 0 for p in model.parameters() if hasattr(p, "ds_id"))


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=120))
    try:
        full = {n: p.detach().clone() for n, p in tiny_llama(seed=0).named_parameters()}
        mine = shard_batches(make_batches(N_BATCHES), rank, WORLD)  # 3 batches and 2: rank 1 runs a blank pass
        model = _zero3_llama(full)
        assert _all_partitioned(model) and model.model.layers[0].mlp.down_proj.weight.ds_numel == 32 * 48
        plan = lorafa.plan_init(model, _lora_config(), lorafa.InitConfig(method="lora_fa"), timings=False)
        with open(os.path.join(out_dir, f"plan{rank}.txt"), "w") as f:
            f.write(f"{plan.weights_bytes} {plan.stats_bytes}")
        stats = lorafa.collect_stats(model, mine, TARGETS, kinds=("kfac",), progress=False)
        assert _all_partitioned(model)  # nothing left gathered after the pass
        lorafa.save_stats(stats, os.path.join(out_dir, f"stats{rank}.safetensors"))
        for method in METHODS:
            pm = lorafa.initialize(_zero3_llama(full), _lora_config(), lorafa.InitConfig(method=method,
                                                                                         iters=N_BATCHES),
                                   batches=mine, progress=False)
            assert _all_partitioned(pm)
            save_file(_gathered_state(pm), os.path.join(out_dir, f"{method}{rank}.safetensors"))
        pm = lorafa.initialize(_zero3_llama(full), _lora_config(),
                               lorafa.InitConfig(method="lora_fa", iters=N_BATCHES, scale="line_search"),
                               batches=mine, progress=False)
        save_file(_gathered_state(pm), os.path.join(out_dir, f"search{rank}.safetensors"))
        # the step's guard: 8 examples here, 4 there (rank 1 runs blank passes); its offset reaches the partitions
        pm = lorafa.initialize(_zero3_llama(full), _lora_config(), lorafa.InitConfig(method="lora_fa", iters=N_BATCHES),
                               batches=mine, guard_batches=shard_batches(_guard_batches(), rank, WORLD),
                               progress=False)
        assert _all_partitioned(pm)
        with open(os.path.join(out_dir, f"guard{rank}.json"), "w") as f:
            json.dump(init_record(pm).summary["guard"], f)
        save_file(_gathered_state(pm), os.path.join(out_dir, f"guard{rank}.safetensors"))
        pm = lorafa.initialize(_zero3_llama(full), _lora_config(),
                               lorafa.InitConfig(method="lora_fa", iters=N_BATCHES, stats_memory=GROUP_BUDGET),
                               batches=mine, progress=False)
        save_file(_gathered_state(pm), os.path.join(out_dir, f"grouped{rank}.safetensors"))
        try:
            lorafa.initialize(_zero3_llama(full), _lora_config(),
                              lorafa.InitConfig(method="lora_fa", iters=N_BATCHES, stats_sharding=True),
                              batches=mine, progress=False)
            outcome = "returned"
        except ValueError as e:
            outcome = str(e)
        with open(os.path.join(out_dir, f"sharding{rank}.txt"), "w") as f:
            f.write(outcome)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    pytest.importorskip("deepspeed")
    require_gloo()
    out = tmp_path_factory.mktemp("zero3")
    run_ranks(_worker, WORLD, free_port(), str(out), timeout=400)
    return out


def test_zero3_stats_equal_one_process(zero3_run):
    single = lorafa.collect_stats(tiny_llama(seed=0), make_batches(N_BATCHES), TARGETS, kinds=("kfac",),
                                  progress=False)
    for r in range(WORLD):
        got = lorafa.load_stats(zero3_run / f"stats{r}.safetensors")
        assert list(got) == list(single)
        for name, st in single.items():
            assert got[name].n_batches == N_BATCHES and got[name].n_tokens == st.n_tokens
            for key in ("grad", "in_cov", "out_cov"):
                torch.testing.assert_close(getattr(got[name], key), getattr(st, key), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_zero3_init_equals_one_process(zero3_run, method):
    """Factors and (offset) base weights of the 2-process ZeRO-3 init equal a one-process init on all the batches."""
    single = lorafa.initialize(tiny_llama(seed=0), _lora_config(), lorafa.InitConfig(method=method, iters=N_BATCHES),
                               batches=make_batches(N_BATCHES), progress=False)
    assert_ranks_equal(zero3_run, method, {k: v.detach() for k, v in single.state_dict().items()})
    if method != "lora_fa":  # the offset reached the partitions: the base weight moved
        base = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
        moved = (load_file(zero3_run / f"{method}0.safetensors")[base]
                 - tiny_llama(seed=0).model.layers[0].self_attn.q_proj.weight.detach())
        assert float(moved.norm()) > 1e-4


def test_zero3_line_search_equals_one_process(zero3_run):
    single = lorafa.initialize(tiny_llama(seed=0), _lora_config(),
                               lorafa.InitConfig(method="lora_fa", iters=N_BATCHES, scale="line_search"),
                               batches=make_batches(N_BATCHES), progress=False)
    assert_ranks_equal(zero3_run, "search", {k: v.detach() for k, v in single.state_dict().items()})


def test_zero3_guard_decides_on_both_ranks_examples(zero3_run):
    single = lorafa.initialize(tiny_llama(seed=0), _lora_config(), lorafa.InitConfig(method="lora_fa", iters=N_BATCHES),
                               batches=make_batches(N_BATCHES), guard_batches=_guard_batches(), progress=False)
    want = init_record(single).summary["guard"]
    for r in range(WORLD):
        got = json.loads((zero3_run / f"guard{r}.json").read_text())
        assert (got["examples"], got["chosen"], got["remedy"]) == (want["examples"], want["chosen"], want["remedy"])
        for (g1, l1, u1), (g2, l2, u2) in zip(got["tried"], want["tried"], strict=True):
            assert g1 == g2 and math.isclose(l1, l2, rel_tol=1e-5) and math.isclose(u1, u2, rel_tol=1e-3, abs_tol=1e-6)
    assert_ranks_equal(zero3_run, "guard", {k: v.detach() for k, v in single.state_dict().items()})


def test_zero3_grouped_sweeps_equal_one_pass(zero3_run):
    """`stats_memory` on a ZeRO-3 model: the grouped sweeps (upper groups' lower blocks without autograd) give the
    one-process, one-pass init."""
    from lorafa.plan import plan_init

    assert len(plan_init(tiny_llama(seed=0), _lora_config(), lorafa.InitConfig(method="lora_fa"),
                         memory=GROUP_BUDGET).groups) >= 2
    single = lorafa.initialize(tiny_llama(seed=0), _lora_config(), lorafa.InitConfig(method="lora_fa",
                                                                                     iters=N_BATCHES),
                               batches=make_batches(N_BATCHES), progress=False)
    assert_ranks_equal(zero3_run, "grouped", {k: v.detach() for k, v in single.state_dict().items()})


def test_zero3_plan_counts_the_whole_model(zero3_run):
    """plan_init on the partitioned model counts the whole weights (ds_numel, not the empty local tensors) and the
    statistics from the layers' shapes (its meta forward cannot run on partitions: Σ counted per layer, at most)."""
    from lorafa.plan import plan_init

    one = plan_init(tiny_llama(seed=0), _lora_config(), lorafa.InitConfig(method="lora_fa"), timings=False)
    for r in range(WORLD):
        weights, stats = map(int, (zero3_run / f"plan{r}.txt").read_text().split())
        assert weights == one.weights_bytes and stats >= one.stats_bytes


def test_zero3_refuses_sharded_statistics(zero3_run):
    for r in range(WORLD):
        assert "stats_sharding" in (zero3_run / f"sharding{r}.txt").read_text()


def test_a_zero3_engine_is_refused_with_the_way_out():
    """Once deepspeed.initialize has run, its hooks own the weights and its optimiser the parameters: refused. The
    engine's marks (`ds_id` on a partitioned parameter, `ds_grads_remaining` on a hooked module) are set by hand here,
    as building an engine needs DeepSpeed installed."""
    model = tiny_llama(seed=0)
    model.model.layers[0].self_attn.q_proj.weight.ds_id = 0
    model.model.layers[0].ds_grads_remaining = 0
    with pytest.raises(ValueError, match="ZeRO-3 engine.*before trainer.train"):
        lorafa.collect_stats(model, make_batches(1), TARGETS, progress=False)
