"""A real 2-process statistics pass (gloo, CPU) equals a single-process pass, and both ranks init identically."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from conftest import make_batches, tiny_llama
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from spawn_ranks import free_port, require_gloo, run_ranks

import lorafa
from lorafa.stats import shard_batches

WORLD = 2
N_BATCHES = 5  # odd: rank 0 gets 3 batches, rank 1 gets 2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_config() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)


def _model_state(peft_model) -> dict[str, torch.Tensor]:
    """Every tensor of the PEFT model (adapters and possibly offset base weights), as independent copies."""
    return {k: v.detach().clone().contiguous() for k, v in peft_model.state_dict().items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        batches = make_batches(N_BATCHES)
        mine = shard_batches(batches, rank, WORLD)
        assert len(mine) == (3 if rank == 0 else 2)
        auto = shard_batches(batches)  # rank and world size from torch.distributed
        assert [b["input_ids"].data_ptr() for b in auto] == [b["input_ids"].data_ptr() for b in mine]
        model = tiny_llama(seed=0)
        stats = lorafa.collect_stats(model, mine, TARGETS, kinds=("kfac",), progress=False)
        lorafa.save_stats(stats, os.path.join(out_dir, f"stats{rank}.safetensors"), config={"world": WORLD})
        peft_model = lorafa.initialize(model, _lora_config(), lorafa.InitConfig(method="lora_fa"), stats=stats,
                                       progress=False)
        save_file(_model_state(peft_model), os.path.join(out_dir, f"model{rank}.safetensors"))

        sketch = lorafa.collect_stats(tiny_llama(seed=0), mine, TARGETS, sketch=(3, 5), progress=False)
        lorafa.save_stats(sketch, os.path.join(out_dir, f"sketch{rank}.safetensors"))

        # fewer batches than processes: rank 1 sees none, yet must join the same all-reduces
        few = shard_batches(make_batches(1), rank, WORLD)
        assert len(few) == (1 if rank == 0 else 0)
        stats = lorafa.collect_stats(tiny_llama(seed=0), few, TARGETS, kinds=("kfac",), progress=False)
        lorafa.save_stats(stats, os.path.join(out_dir, f"few{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    require_gloo()
    out = tmp_path_factory.mktemp("ddp")
    run_ranks(_worker, WORLD, free_port(), str(out))
    return out


def test_two_rank_stats_equal_single_process(two_rank_run):
    ranks = [lorafa.load_stats(two_rank_run / f"stats{r}.safetensors") for r in range(WORLD)]
    single = lorafa.collect_stats(tiny_llama(seed=0), make_batches(N_BATCHES), TARGETS, kinds=("kfac",), progress=False)
    n_tokens = sum(int(b["attention_mask"].sum()) for b in make_batches(N_BATCHES))
    assert list(ranks[0]) == list(ranks[1]) == list(single)
    for name, ref in single.items():
        a, b = ranks[0][name], ranks[1][name]
        assert a.n_batches == b.n_batches == ref.n_batches == N_BATCHES
        assert a.n_tokens == b.n_tokens == ref.n_tokens == n_tokens
        assert set(a.tensors()) == set(b.tensors()) == set(ref.tensors()) == {"grad", "in_cov", "out_cov"}
        for kind, t in ref.tensors().items():
            assert torch.equal(a.tensors()[kind], b.tensors()[kind]), (name, kind)  # identical on every rank
            torch.testing.assert_close(a.tensors()[kind], t, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a.cross, ref.cross, rtol=1e-5, atol=1e-7)
    # sharing of the input covariance survives the all-reduce and the cache
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    assert ranks[0][k].in_cov is ranks[0][q].in_cov


def test_two_rank_adapters_identical(two_rank_run):
    m0 = load_file(str(two_rank_run / "model0.safetensors"))
    m1 = load_file(str(two_rank_run / "model1.safetensors"))
    assert m0.keys() == m1.keys()
    lora_keys = [k for k in m0 if "lora_A" in k or "lora_B" in k]
    assert len(lora_keys) == 2 * 2 * len(TARGETS)
    for k in m0:
        assert torch.equal(m0[k], m1[k]), k
    assert any(m0[k].abs().max() > 0 for k in lora_keys if "lora_B" in k)  # a data-aware init, not B = 0

    # and they agree with the single-process init (the product B·A, which is sign-invariant)
    single_model = tiny_llama(seed=0)
    stats = lorafa.collect_stats(single_model, make_batches(N_BATCHES), TARGETS, kinds=("kfac",), progress=False)
    single = _model_state(lorafa.initialize(single_model, _lora_config(), lorafa.InitConfig(method="lora_fa"),
                                            stats=stats, progress=False))
    assert single.keys() == m0.keys()
    for k in lora_keys:
        if ".lora_A." in k:
            kb = k.replace(".lora_A.", ".lora_B.")
            torch.testing.assert_close(m0[kb] @ m0[k], single[kb] @ single[k], rtol=1e-3, atol=1e-5)
    for k in m0:
        if "lora_" not in k:
            torch.testing.assert_close(m0[k], single[k], rtol=1e-4, atol=1e-6)


def test_rank_without_batches_joins_the_reduction(two_rank_run):
    ranks = [lorafa.load_stats(two_rank_run / f"few{r}.safetensors") for r in range(WORLD)]
    single = lorafa.collect_stats(tiny_llama(seed=0), make_batches(1), TARGETS, kinds=("kfac",), progress=False)
    for name, ref in single.items():
        for st in ranks:
            assert st[name].n_batches == 1 and st[name].n_tokens == ref.n_tokens
            for kind, t in ref.tensors().items():
                torch.testing.assert_close(st[name].tensors()[kind], t, rtol=1e-5, atol=1e-7)
    for st in ranks:  # the rank that saw nothing still knows q/k/v share one covariance
        assert st["model.layers.1.self_attn.v_proj"].in_cov is st["model.layers.1.self_attn.q_proj"].in_cov


def test_two_rank_gradient_sketch_equals_single_process(two_rank_run):
    ranks = [lorafa.load_stats(two_rank_run / f"sketch{r}.safetensors") for r in range(WORLD)]
    single = lorafa.collect_stats(tiny_llama(seed=0), make_batches(N_BATCHES), TARGETS, sketch=(3, 5), progress=False)
    for name, ref in single.items():
        for st in ranks:
            assert st[name].n_batches == N_BATCHES
            torch.testing.assert_close(st[name].grad_sketch.y, ref.grad_sketch.y, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(st[name].grad_sketch.z, ref.grad_sketch.z, rtol=1e-5, atol=1e-7)


# -- failure modes: a failure on one rank reaches every rank; the cache hit is decided together ----------------------
import json  # noqa: E402
import types  # noqa: E402
from datetime import timedelta  # noqa: E402

TIMEOUT_S = 150  # the whole spawned run; a hang (the regression) fails the tests instead of blocking CI


def _outcome(fn) -> list:
    try:
        fn()
        return ["ok", ""]
    except Exception as e:  # noqa: BLE001 - recorded for the test to check on the parent side
        return [type(e).__name__, str(e)]


def _examples(n: int) -> list[dict]:
    rows = [{k: b[k][i] for k in b} for b in make_batches(n // 4 + 1) for i in range(4)]
    return rows[:n]


def _stack(rows: list[dict]) -> dict:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _cached_init(rank: int, out_dir: str, model=None) -> tuple[object, int]:
    """`train._stats_for_init` with a per-rank output root (nodes that share no filesystem); returns (stats, passes)."""
    from lorafa import train
    from lorafa.runconfig import InitSection, RunConfig

    cfg = RunConfig(output_root=os.path.join(out_dir, f"root{rank}"), init=InitSection(direction="LoRA-One", bsz=2, iters=3))
    passes = []
    real = train.collect_stats
    train.collect_stats = lambda *a, **k: passes.append(1) or real(*a, **k)
    try:
        state = types.SimpleNamespace(is_main_process=rank == 0, is_local_main_process=rank == 0)
        stats = train._stats_for_init(cfg, model or tiny_llama(seed=0), LoraConfig(target_modules=["q_proj", "v_proj"]),
                                      cfg.init_config(), types.SimpleNamespace(train=_examples(8)), _stack, state)
    finally:
        train.collect_stats = real
    return stats, len(passes)


def _failure_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                           timeout=timedelta(seconds=60))
    results = {}
    try:
        mine = shard_batches(make_batches(N_BATCHES), rank, WORLD)  # rank 0: 3 batches, rank 1: 2

        def nan_on_rank1_second_batch(model, batch, calls=[]):  # noqa: B006 - counts this rank's calls
            calls.append(1)
            loss = model(**batch).loss
            return loss * float("nan") if rank == 1 and len(calls) == 2 else loss

        results["nan"] = _outcome(lambda: lorafa.collect_stats(tiny_llama(), mine, TARGETS, kinds="kfac",
                                                               loss_fn=nan_on_rank1_second_batch, progress=False))
        # rank 0's fourth batch is not a dict; rank 1 ran out of batches two steps before
        bad = mine + [torch.zeros(2, 3, dtype=torch.long)] if rank == 0 else mine
        results["bad_batch"] = _outcome(lambda: lorafa.collect_stats(tiny_llama(), bad, TARGETS, progress=False))
        # the process group still works after an agreed failure
        results["after"] = _outcome(lambda: lorafa.collect_stats(tiny_llama(), mine, TARGETS, progress=False))

        # cache: miss everywhere, then only rank 0 has the file (per-rank output roots), then both have it
        _, first = _cached_init(rank, out_dir)
        _, only_rank0 = _cached_init(rank, out_dir)
        if rank == 0:
            src = os.path.join(out_dir, "root0", ".stats_cache")
            os.makedirs(os.path.join(out_dir, "root1"), exist_ok=True)
            import shutil

            shutil.copytree(src, os.path.join(out_dir, "root1", ".stats_cache"), dirs_exist_ok=True)
        dist.barrier()
        stats, both = _cached_init(rank, out_dir)
        lorafa.save_stats(stats, os.path.join(out_dir, f"cached{rank}.safetensors"))
        results["passes"] = [first, only_rank0, both]

        different = tiny_llama(seed=0)
        if rank == 1:
            with torch.no_grad():
                different.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
        results["weights_differ"] = _outcome(lambda: _cached_init(rank, out_dir, model=different))
    finally:
        with open(os.path.join(out_dir, f"results{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def failure_run(tmp_path_factory):
    require_gloo()
    out = tmp_path_factory.mktemp("ddp_failures")
    codes = run_ranks(_failure_worker, WORLD, free_port(), str(out), timeout=TIMEOUT_S, check=False)
    results = {}
    for r in range(WORLD):
        path = out / f"results{r}.json"
        assert path.exists(), f"rank {r} crashed (exit code {codes[r]})"
        results[r] = json.loads(path.read_text())
    return out, results


def test_nan_loss_on_one_rank_raises_on_both(failure_run):
    _, res = failure_run
    assert res[1]["nan"][0] == "ValueError" and "Non-finite loss" in res[1]["nan"][1]  # the rank's own error
    kind, msg = res[0]["nan"]
    assert kind == "RankFailedError"
    assert "statistics batch 1" in msg and "rank 1: ValueError: Non-finite loss" in msg


def test_bad_batch_on_one_rank_raises_on_both_even_after_the_other_ran_out(failure_run):
    _, res = failure_run
    assert res[0]["bad_batch"][0] == "TypeError" and "mapping" in res[0]["bad_batch"][1]
    kind, msg = res[1]["bad_batch"]
    assert kind == "RankFailedError" and "rank 0: TypeError" in msg and "statistics batch 3" in msg
    assert res[0]["after"] == res[1]["after"] == ["ok", ""]


def test_cache_hit_is_decided_by_all_ranks(failure_run):
    out, res = failure_run
    # a miss, then a local hit on rank 0 only (both recompute), then a hit on both (no pass anywhere)
    assert res[0]["passes"] == res[1]["passes"] == [1, 1, 0]
    a, b = (lorafa.load_stats(out / f"cached{r}.safetensors") for r in range(WORLD))
    for name in a:
        assert torch.equal(a[name].grad, b[name].grad)


def test_ranks_with_different_weights_fail_together(failure_run):
    _, res = failure_run
    for r in range(WORLD):
        kind, msg = res[r]["weights_differ"]
        assert kind == "ValueError" and "weights" in msg and "rank 0=" in msg and "rank 1=" in msg
