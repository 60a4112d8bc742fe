"""FSDP2-sharded statistics and init (2 gloo processes on CPU): the same statistics and the same adapter as one
process on the union of the batches, with no full weight gradient on any rank (a sharded weight never gets one)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
from conftest import make_batches, tiny_llama
from peft import LoraConfig
from safetensors.torch import load_file, save_file

import lorafa
from lorafa.saving import init_record
from lorafa.stats import shard_batches

from spawn_ranks import free_port, require_gloo, run_ranks

WORLD = 2
N_BATCHES = 5  # odd: rank 0 has 3 batches, rank 1 has 2 and runs one blank pass
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("lora_ga", "pissa", "lora_fa")
SF_LR = 0.01


def _partial_search() -> lorafa.InitConfig:
    return lorafa.InitConfig(method="lora_fa", iters=N_BATCHES, scale="line_search", offset="partial")


def _guard_batches() -> list[dict]:
    return make_batches(3, bsz=4, seed=11)


def _lora_config() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)


def _sharded_llama():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama(seed=0)
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.model.layers:  # each decoder block is one FSDP unit: its weights are row shards
        fully_shard(layer, mesh=mesh)
    return model, mesh


def _full_state(module) -> dict[str, torch.Tensor]:
    """Every tensor, with FSDP2 shards gathered (one tensor at a time)."""
    out = {}
    for k, v in module.state_dict().items():
        v = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[k] = v.detach().clone().contiguous()
    return out


def assert_close_fro(got, want, name):
    """Equal to fp32 round-off, as a matrix: summation orders differ between 1 and 2 processes (and thread counts),
    which moves a factor by up to ~2e-5 relative (measured), most by ~1e-6."""
    err = float((got.float() - want.float()).norm())
    assert err <= 1e-4 * float(want.float().norm()) + 1e-6, (name, err, float(want.norm()))


def assert_ranks_equal(out_dir, stem: str, want: dict) -> None:
    """Every rank's `<stem><rank>.safetensors` holds the tensors of `want`, equal to round-off."""
    for r in range(WORLD):
        got = load_file(out_dir / f"{stem}{r}.safetensors")
        assert set(got) == set(want)
        for k in want:
            assert_close_fro(got[k], want[k], k)


def _save_sharded(pm, rank: int, out_dir: str) -> None:
    """`save_adapter` on the sharded, trained model (every rank calls it; rank 0 writes), then a failure on rank 0
    alone: both ranks must raise, and together (a rank that returned would hang in its next collective)."""
    from lorafa.stats.distributed import RankFailedError

    out = lorafa.save_adapter(pm, os.path.join(out_dir, "adapter"), save_initial=True)
    assert out == os.path.join(out_dir, "adapter")
    assert all(hasattr(p, "full_tensor") for n, p in pm.named_parameters() if "lora_" in n)  # the shards are back
    dist.barrier()
    real = pm.save_pretrained

    def broken(*args, **kwargs):
        raise OSError("disk full (test)")

    pm.save_pretrained = broken if rank == 0 else real
    try:
        lorafa.save_adapter(pm, os.path.join(out_dir, "adapter_failed"))
    except (OSError, RankFailedError) as e:
        outcome = type(e).__name__
    else:
        outcome = "returned"
    finally:
        pm.save_pretrained = real
    with open(os.path.join(out_dir, f"failed_save{rank}.txt"), "w") as f:
        f.write(outcome)
    dist.barrier()  # reached by both ranks: neither is stuck in a collective the other skipped


def _schedule_free_steps(pm, lora, batches, rank: int, out_dir: str) -> None:
    """Schedule-free AdamW (the runner's `model.optimizer=schedulefree`) on the sharded adapters: 2 steps, each rank
    on its own batch, then the averaged (eval-mode) weights, the ones the runner saves."""
    from schedulefree import AdamWScheduleFree

    pm.zero_grad()
    opt = AdamWScheduleFree(lora, lr=SF_LR, warmup_steps=1)
    opt.train()
    for b in batches[:2]:
        pm(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    opt.eval()
    state = {k: v for k, v in _full_state(pm).items() if "lora_" in k}
    save_file(state, os.path.join(out_dir, f"schedule_free{rank}.safetensors"))


def _worker(rank: int, port: int, out_dir: str) -> None:
    from datetime import timedelta

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))  # a hang fails the test instead of stalling CI
    try:
        from torch.distributed.fsdp import fully_shard

        mine = shard_batches(make_batches(N_BATCHES), rank, WORLD)
        model, mesh = _sharded_llama()
        q = model.model.layers[0].self_attn.q_proj.weight
        assert q.to_local().shape[0] == q.shape[0] // WORLD  # really sharded
        stats = lorafa.collect_stats(model, mine, TARGETS, kinds=("kfac",), progress=False)
        assert all(p.grad is None for p in model.parameters())  # no weight gradient was ever made
        lorafa.save_stats(stats, os.path.join(out_dir, f"stats{rank}.safetensors"))
        for method in METHODS:
            model, mesh = _sharded_llama()
            init = lorafa.InitConfig(method=method, iters=N_BATCHES)
            pm = lorafa.initialize(model, _lora_config(), init, batches=mine, progress=False)
            base_q = pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
            assert hasattr(base_q, "full_tensor")  # the offset was written into the shard, which stays a shard
            save_file(_full_state(pm), os.path.join(out_dir, f"{method}{rank}.safetensors"))
            if method == "pissa":  # then shard the adapters too and train one step, each rank on its first batch
                lorafa.shard_adapters(pm, mesh=mesh)
                lora = [p for n, p in pm.named_parameters() if "lora_" in n]
                assert lora and all(hasattr(p, "full_tensor") for p in lora)  # the adapters are shards now
                opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
                pm(**mine[0]).loss.backward()
                opt.step()
                trained = {k: v for k, v in _full_state(pm).items() if "lora_" in k}
                save_file(trained, os.path.join(out_dir, f"trained{rank}.safetensors"))
                _save_sharded(pm, rank, out_dir)
                _schedule_free_steps(pm, lora, mine, rank, out_dir)
        # a line search under FSDP: rank 1 runs blank passes so that both ranks gather the weights together
        model, _ = _sharded_llama()
        pm = lorafa.initialize(model, _lora_config(), lorafa.InitConfig(method="lora_fa", iters=N_BATCHES,
                                                                        scale="line_search"),
                               batches=mine, progress=False)
        save_file(_full_state(pm), os.path.join(out_dir, f"search{rank}.safetensors"))
        # with offset="partial" the base is written after the search's forward passes: the write must reach the shards
        model, _ = _sharded_llama()
        pm = lorafa.initialize(model, _lora_config(), _partial_search(), batches=mine, progress=False)
        save_file(_full_state(pm), os.path.join(out_dir, f"partial{rank}.safetensors"))
        # the step's guard under FSDP: its paired per-example sums are over both ranks' examples (8 and 4 here)
        model, _ = _sharded_llama()
        pm = lorafa.initialize(model, _lora_config(), lorafa.InitConfig(method="lora_fa", iters=N_BATCHES),
                               batches=mine, guard_batches=shard_batches(_guard_batches(), rank, WORLD),
                               progress=False)
        with open(os.path.join(out_dir, f"guard{rank}.json"), "w") as f:
            json.dump(init_record(pm).summary["guard"], f)
        save_file(_full_state(pm), os.path.join(out_dir, f"guard{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    require_gloo()
    pytest.importorskip("torch.distributed.fsdp").fully_shard  # FSDP2
    out = tmp_path_factory.mktemp("fsdp")
    run_ranks(_worker, WORLD, free_port(), str(out))
    return out


def test_fsdp2_stats_equal_one_process(fsdp_run):
    ranks = [lorafa.load_stats(fsdp_run / f"stats{r}.safetensors") for r in range(WORLD)]
    single = lorafa.collect_stats(tiny_llama(seed=0), make_batches(N_BATCHES), TARGETS, kinds=("kfac",),
                                  progress=False)
    assert list(ranks[0]) == list(single) == list(ranks[1])
    for name, st in single.items():
        for r in range(WORLD):
            assert ranks[r][name].n_batches == N_BATCHES and ranks[r][name].n_tokens == st.n_tokens
            for key in ("grad", "in_cov", "out_cov"):
                torch.testing.assert_close(getattr(ranks[r][name], key), getattr(st, key), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_fsdp2_init_equals_one_process(fsdp_run, method):
    """Factors and offset base weights of the 2-process FSDP2 init equal a one-process init on all the batches."""
    single = lorafa.initialize(tiny_llama(seed=0), _lora_config(), lorafa.InitConfig(method=method, iters=N_BATCHES),
                               batches=make_batches(N_BATCHES), progress=False)
    want = {k: v.detach() for k, v in single.state_dict().items()}
    assert_ranks_equal(fsdp_run, method, want)


def test_fsdp2_training_step_equals_one_process(fsdp_run):
    """After `shard_adapters`, one SGD step on 2 ranks (batch 0 on rank 0, batch 1 on rank 1) is one process's step
    on the mean of the two batches' losses: FSDP2 averages the factors' gradients."""
    batches = make_batches(N_BATCHES)
    single = lorafa.initialize(tiny_llama(seed=0), _lora_config(), lorafa.InitConfig(method="pissa", iters=N_BATCHES),
                               batches=batches, progress=False)
    opt = torch.optim.SGD([p for p in single.parameters() if p.requires_grad], lr=0.1)
    ((single(**batches[0]).loss + single(**batches[1]).loss) / 2).backward()
    opt.step()
    want = {k: v.detach() for k, v in single.state_dict().items() if "lora_" in k}
    assert_ranks_equal(fsdp_run, "trained", want)


def test_fsdp2_schedule_free_steps_equal_one_process(fsdp_run):
    """Schedule-free AdamW on the sharded adapters (after the SGD step): 2 steps on 2 ranks, then its averaged
    weights, equal one process's steps on the mean of each pair of batches (rank 0 holds batches 0, 2; rank 1
    holds 1, 3). Its update is elementwise, so each rank updates its own shard of every factor."""
    from schedulefree import AdamWScheduleFree

    batches = make_batches(N_BATCHES)
    single = lorafa.initialize(tiny_llama(seed=0), _lora_config(), lorafa.InitConfig(method="pissa", iters=N_BATCHES),
                               batches=batches, progress=False)
    lora = [p for p in single.parameters() if p.requires_grad]
    sgd = torch.optim.SGD(lora, lr=0.1)
    ((single(**batches[0]).loss + single(**batches[1]).loss) / 2).backward()
    sgd.step()
    sgd.zero_grad()
    before = {k: v.detach().clone() for k, v in single.state_dict().items() if "lora_" in k}
    opt = AdamWScheduleFree(lora, lr=SF_LR, warmup_steps=1)
    opt.train()
    for pair in ((0, 1), (2, 3)):
        ((single(**batches[pair[0]]).loss + single(**batches[pair[1]]).loss) / 2).backward()
        opt.step()
        opt.zero_grad()
    opt.eval()
    want = {k: v.detach() for k, v in single.state_dict().items() if "lora_" in k}
    assert max(float((want[k] - before[k]).abs().max()) for k in want) > 1e-3  # the steps moved the factors
    assert_ranks_equal(fsdp_run, "schedule_free", want)


def test_fsdp2_save_and_reload_equal_the_trained_model(fsdp_run):
    """The adapter saved from the sharded, trained PiSSA model (rank 0 writes, after gathering the factors on every
    rank) loads with stock PEFT on the original base and gives the trained model's outputs."""
    from peft import PeftModel

    from conftest import batch_logits

    batches = make_batches(N_BATCHES)
    trained = lorafa.initialize(tiny_llama(seed=0), _lora_config(), lorafa.InitConfig(method="pissa", iters=N_BATCHES),
                                batches=batches, progress=False)
    shards = load_file(fsdp_run / "trained0.safetensors")
    missing, unexpected = trained.load_state_dict(shards, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    reloaded = PeftModel.from_pretrained(tiny_llama(seed=0), fsdp_run / "adapter")
    want, got = batch_logits(trained, batches), batch_logits(reloaded, batches)
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    untrained = batch_logits(lorafa.initialize(tiny_llama(seed=0), _lora_config(),
                                               lorafa.InitConfig(method="pissa", iters=N_BATCHES), batches=batches,
                                               progress=False), batches)
    assert float((want - untrained).abs().max()) > 1e-3  # the step moved the outputs: the save is the trained model
    initial = lorafa.read_initial_adapter(fsdp_run / "adapter" / "initial_adapter")
    assert initial.subtracted and initial.init_config.method == "pissa"


def test_fsdp2_a_failed_save_raises_on_every_rank(fsdp_run):
    outcomes = [(fsdp_run / f"failed_save{r}.txt").read_text() for r in range(WORLD)]
    assert outcomes == ["OSError", "RankFailedError"]


def test_fsdp2_line_search_equals_one_process(fsdp_run):
    single = lorafa.initialize(tiny_llama(seed=0), _lora_config(),
                               lorafa.InitConfig(method="lora_fa", iters=N_BATCHES, scale="line_search"),
                               batches=make_batches(N_BATCHES), progress=False)
    want = {k: v.detach() for k, v in single.state_dict().items()}
    assert_ranks_equal(fsdp_run, "search", want)  # both ranks, not rank 0 alone


def test_fsdp2_partial_offset_after_a_line_search_reaches_the_shards(fsdp_run):
    single = lorafa.initialize(tiny_llama(seed=0), _lora_config(), _partial_search(), batches=make_batches(N_BATCHES),
                               progress=False)
    want = {k: v.detach() for k, v in single.state_dict().items()}
    base = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert float((want[base] - tiny_llama(seed=0).model.layers[0].self_attn.q_proj.weight).norm()) > 1e-4
    assert_ranks_equal(fsdp_run, "partial", want)


def test_fsdp2_guard_decides_on_both_ranks_examples(fsdp_run):
    single = lorafa.initialize(tiny_llama(seed=0), _lora_config(), lorafa.InitConfig(method="lora_fa", iters=N_BATCHES),
                               batches=make_batches(N_BATCHES), guard_batches=_guard_batches(), progress=False)
    want = init_record(single).summary["guard"]
    assert want["examples"] == 12
    for r in range(WORLD):
        got = json.loads((fsdp_run / f"guard{r}.json").read_text())
        assert got["examples"] == want["examples"] and got["chosen"] == want["chosen"]
        assert got["remedy"] == want["remedy"]
        for (g1, l1, u1), (g2, l2, u2) in zip(got["tried"], want["tried"], strict=True):
            assert g1 == g2 and math.isclose(l1, l2, rel_tol=1e-5) and math.isclose(u1, u2, rel_tol=1e-3, abs_tol=1e-6)
    assert_ranks_equal(fsdp_run, "guard", {k: v.detach() for k, v in single.state_dict().items()})


@pytest.mark.parametrize("orig", [False, True])
def test_fsdp1_is_refused_with_the_way_out(orig):
    """FSDP (v1) needs an accelerator to be built at all, so a stand-in of its class (matched by name, as lorafa
    matches it without importing FSDP) wraps the model here."""

    class FullyShardedDataParallel(torch.nn.Module):
        def __init__(self, module, use_orig_params):
            super().__init__()
            self._fsdp_wrapped_module, self._use_orig_params = module, use_orig_params

    wrapped = torch.nn.Sequential(FullyShardedDataParallel(tiny_llama(seed=0), orig))
    with pytest.raises(ValueError, match="fully_shard") as err:
        lorafa.collect_stats(wrapped, make_batches(1), TARGETS, progress=False)
    assert ("use_orig_params=False" in str(err.value)) == (not orig)
