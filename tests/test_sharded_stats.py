"""Statistics sharded across processes (`InitConfig(stats_sharding=True)`, `collect_stats(shard=True)`), with 2 gloo
processes on CPU: each process holds only the layers it owns (about half the bytes), the init equals the
single-process one-pass init (also grouped, with rank="auto", and with uneven batches), and an FSDP2 model is refused."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from conftest import lora_cfg, make_batches, tiny_llama
from spawn_ranks import free_port, require_gloo, run_ranks

import lorafa
from lorafa import InitConfig
from lorafa.peft_bridge import _compute_init
from lorafa.stats.types import held_bytes
from lorafa.plan import plan_init, stats_owners
from lorafa.stats import shard_batches
from lorafa.stats.collect import normalize_kinds
from lorafa.targets import resolve_targets

WORLD = 2
N_BATCHES = 5  # odd: rank 0 has 3 batches, rank 1 has 2 and runs one blank pass
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TIMEOUT_S = 240  # the whole spawned run; a hang (mismatched collectives) fails the tests instead of blocking CI


def _budget() -> int:
    """About one block's statistics: two groups on the tiny model."""
    return plan_init(tiny_llama(), lora_cfg(ALL), InitConfig(method="lora_fa"), timings=False).stats_bytes // 2 + 1


CASES = {  # name -> InitConfig options (iters=N_BATCHES, stats_sharding=True added)
    "lora_fa": dict(method="lora_fa"),
    "lora_one": dict(method="lora_one"),
    "lora_ga": dict(method="lora_ga"),
    "corda": dict(method="corda"),
    "eva": dict(method="eva"),  # its rank redistribution gathers every process's spectra
    "lora_fa_auto": dict(method="lora_fa", rank="auto"),
    "lora_ga_sketch": dict(method="lora_ga", sketch=8),
    "lora_fa_grouped": dict(method="lora_fa", stats_memory="budget"),
    "eva_grouped": dict(method="eva", stats_memory="budget"),
}


def _options(name: str) -> dict:
    return {k: (_budget() if v == "budget" else v) for k, v in CASES[name].items()}



def _plain(stats) -> dict:
    return {n: {"tensors": {k: t.clone() for k, t in st.tensors().items()}, "n_tokens": st.n_tokens,
                "n_batches": st.n_batches, "shared": [m for m, o in stats.items() if o.in_cov is not None
                                                      and o.in_cov is st.in_cov]}
            for n, st in stats.items()}


def _factors(results) -> dict:
    return {n: (r.A.clone(), r.B.clone(), r.info["rank"]) for n, r in results.items()}


def _outcome(fn):
    try:
        fn()
        return ("ok", "")
    except Exception as e:  # noqa: BLE001 - checked on the parent side
        return (type(e).__name__, str(e))


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=90))
    res = {}
    try:
        mine = shard_batches(make_batches(N_BATCHES), rank, WORLD)

        def nan_on_rank1_second_batch(model, batch, calls=[]):  # noqa: B006 - counts this rank's calls
            calls.append(1)
            loss = model(**batch).loss
            return loss * float("nan") if rank == 1 and len(calls) == 2 else loss

        # failures on one process reach both, before any backward hook sends (a hang would time the test out)
        res["nan"] = _outcome(lambda: lorafa.collect_stats(tiny_llama(), mine, ALL, kinds=("kfac",), shard=True,
                                                           loss_fn=nan_on_rank1_second_batch, progress=False))
        bad = mine + [torch.zeros(2, 3, dtype=torch.long)] if rank == 0 else mine
        res["bad_batch"] = _outcome(lambda: lorafa.collect_stats(tiny_llama(), bad, ALL, shard=True, progress=False))
        stats = lorafa.collect_stats(tiny_llama(), mine, ALL, kinds=("kfac",), shard=True, progress=False)
        res["kfac"], res["kfac_bytes"] = _plain(stats), held_bytes(stats)
        del stats
        sketch = lorafa.collect_stats(tiny_llama(), mine, ALL, sketch=(3, 5), shard=True, progress=False)
        res["sketch"] = _plain(sketch)
        # one batch in all: rank 1 has none, borrows rank 0's for its blank pass
        few = lorafa.collect_stats(tiny_llama(), shard_batches(make_batches(1), rank, WORLD), ALL, kinds=("kfac",),
                                   shard=True, progress=False)
        res["few"] = _plain(few)
        for name in CASES:
            results, cfg, summary, _ = _compute_init(tiny_llama(), lora_cfg(ALL),
                                                     InitConfig(iters=N_BATCHES, stats_sharding=True,
                                                                **_options(name)), None, mine, None, False)
            res[name] = {"factors": _factors(results), "rank_pattern": cfg.rank_pattern, "summary": summary}
        # uneven: 4 batches, rank 0 holds 3 and rank 1 one (each may use up to 3 of iters=6)
        uneven = make_batches(4)[:3] if rank == 0 else make_batches(4)[3:]
        results = _compute_init(tiny_llama(), lora_cfg(ALL), InitConfig(iters=6, stats_sharding=True), None, uneven,
                                None, False)[0]
        res["uneven"] = _factors(results)
        pm = lorafa.initialize(tiny_llama(), lora_cfg(ALL), InitConfig(iters=N_BATCHES, stats_sharding=True),
                               batches=mine, progress=False)
        res["initialize"] = {k: v.detach().clone() for k, v in pm.state_dict().items()}

        from test_fsdp import _sharded_llama

        fsdp_model, _ = _sharded_llama()
        res["fsdp_init"] = _outcome(lambda: lorafa.compute_init(
            fsdp_model, lora_cfg(ALL), InitConfig(iters=N_BATCHES, stats_sharding=True), batches=mine,
            progress=False))
        res["fsdp_collect"] = _outcome(lambda: lorafa.collect_stats(fsdp_model, mine, ALL, shard=True,
                                                                    progress=False))
    finally:
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    require_gloo()
    out = tmp_path_factory.mktemp("sharded")
    run_ranks(_worker, WORLD, free_port(), str(out), timeout=TIMEOUT_S)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _check_owned(ranks, key, single, owners):
    """Each rank holds exactly its owned layers, each equal to the single-process statistics."""
    for r, res in enumerate(ranks):
        assert set(res[key]) == {n for n, o in owners.items() if o == r}, (key, r)
        for name, got in res[key].items():
            ref = single[name]
            assert got["n_tokens"] == ref.n_tokens and got["n_batches"] == ref.n_batches
            assert set(got["tensors"]) == set(ref.tensors())
            for kind, t in ref.tensors().items():
                torch.testing.assert_close(got["tensors"][kind], t, rtol=1e-5, atol=1e-7)


def test_each_process_holds_only_its_layers(sharded_run):
    single = lorafa.collect_stats(tiny_llama(), make_batches(N_BATCHES), ALL, kinds=("kfac",), progress=False)
    model = tiny_llama()
    owners = stats_owners(model, resolve_targets(model, ALL), normalize_kinds("kfac"), WORLD)
    assert set(owners.values()) == {0, 1}
    _check_owned(sharded_run, "kfac", single, owners)
    total = held_bytes(single)
    for res in sharded_run:  # about half each: the plan balances the units by bytes
        assert res["kfac_bytes"] <= 0.6 * total, (res["kfac_bytes"], total)
    assert sum(res["kfac_bytes"] for res in sharded_run) == total
    q, k, v = (f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    holder = sharded_run[owners[q]]["kfac"]
    assert k in holder and v in holder and sorted(holder[q]["shared"]) == sorted([q, k, v])  # one Σ, one owner


def test_sharded_sketch_and_a_process_without_batches(sharded_run):
    model = tiny_llama()
    targets = resolve_targets(model, ALL)
    sketch = lorafa.collect_stats(tiny_llama(), make_batches(N_BATCHES), ALL, sketch=(3, 5), progress=False)
    _check_owned(sharded_run, "sketch", sketch, stats_owners(model, targets, normalize_kinds("grad"), WORLD, (3, 5)))
    few = lorafa.collect_stats(tiny_llama(), make_batches(1), ALL, kinds=("kfac",), progress=False)
    _check_owned(sharded_run, "few", few, stats_owners(model, targets, normalize_kinds("kfac"), WORLD))


def _assert_same_factors(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), what
    for n, (a, b, r) in want.items():
        ga, gb, gr = got[n]
        assert gr == r, (what, n)
        for x, y in ((ga, a), (gb, b)):
            assert torch.linalg.norm(x - y) <= 1e-5 * max(float(torch.linalg.norm(y)), 1e-12), (what, n)


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_init_equals_one_pass(sharded_run, name):
    results, cfg, _, _ = _compute_init(tiny_llama(), lora_cfg(ALL), InitConfig(iters=N_BATCHES, **_options(name)),
                                       None, make_batches(N_BATCHES), None, False)
    want = _factors(results)
    for r, res in enumerate(sharded_run):
        _assert_same_factors(res[name]["factors"], want, f"{name} on rank {r}")
        assert res[name]["rank_pattern"] == cfg.rank_pattern
        assert res[name]["summary"]["stats_sharding"] == WORLD
    if "auto" in name or name.startswith("eva"):  # the ranks were allocated, not all equal to r
        assert len({f[2] for f in want.values()}) > 1


def test_uneven_batches_give_the_one_pass_init(sharded_run):
    results = _compute_init(tiny_llama(), lora_cfg(ALL), InitConfig(iters=4), None, make_batches(4), None, False)[0]
    for r, res in enumerate(sharded_run):
        _assert_same_factors(res["uneven"], _factors(results), f"uneven on rank {r}")


def test_sharded_initialize_builds_the_same_model(sharded_run):
    ref = lorafa.initialize(tiny_llama(), lora_cfg(ALL), InitConfig(iters=N_BATCHES), batches=make_batches(N_BATCHES),
                            progress=False).state_dict()
    for res in sharded_run:
        assert set(res["initialize"]) == set(ref)
        for k, t in ref.items():
            got = res["initialize"][k]
            assert torch.linalg.norm(got - t) <= 1e-5 * max(float(torch.linalg.norm(t)), 1e-12), k


def test_fsdp2_model_is_refused(sharded_run):
    for res in sharded_run:
        for key in ("fsdp_init", "fsdp_collect"):
            kind, msg = res[key]
            assert kind == "ValueError" and "FSDP2" in msg and "stats_sharding" in msg, (key, msg)


def test_a_failure_on_one_process_raises_on_both(sharded_run):
    assert sharded_run[1]["nan"][0] == "ValueError" and "Non-finite loss" in sharded_run[1]["nan"][1]
    kind, msg = sharded_run[0]["nan"]
    assert kind == "RankFailedError" and "rank 1: ValueError: Non-finite loss" in msg
    assert sharded_run[0]["bad_batch"][0] == "TypeError"
    kind, msg = sharded_run[1]["bad_batch"]
    assert kind == "RankFailedError" and "rank 0: TypeError" in msg and "statistics batch 3" in msg


def test_bad_stats_sharding_values():
    with pytest.raises(ValueError, match="True or False"):
        InitConfig(stats_sharding="yes")
    with pytest.raises(ValueError, match="does not run"):
        InitConfig(method="pissa", stats_sharding=True)


def test_single_process_sharding_changes_nothing():
    batches = make_batches(2)
    one = _compute_init(tiny_llama(), lora_cfg(ALL), InitConfig(iters=2), None, batches, None, False)[0]
    sharded = _compute_init(tiny_llama(), lora_cfg(ALL), InitConfig(iters=2, stats_sharding=True), None, batches,
                            None, False)[0]
    for n, r in one.items():
        assert torch.equal(r.A, sharded[n].A) and torch.equal(r.B, sharded[n].B)
