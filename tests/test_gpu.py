"""The CUDA paths (issue 25): the statistics pass and the inits on a bf16 model, 2 NCCL processes, and 4-bit bases
with bitsandbytes' CUDA kernels.

Every test is marked `gpu`: tests/conftest.py skips them when CUDA is unavailable. `LORAFA_TEST_DEVICE` chooses the
device (default "cuda"); `LORAFA_TEST_DEVICE=cpu` runs the same logic on the CPU (bf16 works there) and the
2-process test with gloo instead of NCCL, so that the tests themselves are checked on a machine without a GPU:

    LORAFA_TEST_DEVICE=cpu python -m pytest tests/test_gpu.py -q    # here
    bash benchmarks/gpu_check.sh                                     # on a CUDA machine

Tolerances are in units of bf16's unit round-off u = 2^-8 (8 significant bits): every bf16 rounding of a value moves
it by at most u relative. The references are fp32 computations on the CPU with the *same* weights (the bf16 model's
values, which fp32 holds exactly), so a difference comes from the bf16 arithmetic alone, not from rounding the weights.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
from conftest import make_batches, tiny_llama
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

import lorafa
from lorafa.stats import shard_batches

from spawn_ranks import free_port, run_ranks

DEVICE = os.environ.get("LORAFA_TEST_DEVICE", "cuda")
ON_CUDA = torch.device(DEVICE).type == "cuda"
U = 2.0**-8  # bf16's unit round-off
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

pytestmark = pytest.mark.gpu


def dev() -> torch.device:
    """The test device with an explicit index ("cuda" -> the current CUDA device), resolved only when used."""
    d = torch.device(DEVICE)
    return torch.device("cuda", torch.cuda.current_device()) if d.type == "cuda" and d.index is None else d


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖_F / ‖b‖_F, in fp64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert a.shape == b.shape
    return float((a - b).norm() / b.norm())


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|: the largest error relative to the scale of the reference."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def logits(model, batches, train_mode: bool = False) -> torch.Tensor:
    """fp32 CPU logits on every batch (inputs moved to the model's device). `train_mode` keeps the modules in train
    mode, which for these models (no dropout anywhere) is the same function: see `_logits_4bit`."""
    model.train(train_mode)
    d = next(model.parameters()).device
    return torch.cat([model(input_ids=b["input_ids"].to(d), attention_mask=b["attention_mask"].to(d)).logits.float().cpu()
                      for b in batches])


def lora_layers(model) -> dict[str, LoraLayer]:
    """Module name in the base model -> PEFT LoRA layer."""
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def factors(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor, float]:
    return layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach(), layer.scaling["default"]


def bf16_pair(seed: int = 0):
    """(the tiny Llama in bf16 on the test device, an fp32 CPU copy holding exactly the same weight values)."""
    return tiny_llama(seed, dtype=torch.bfloat16).to(dev()), tiny_llama(seed, dtype=torch.bfloat16).float()


def stats_to_cpu(stats, path) -> dict:
    """A CPU copy of statistics, through the safetensors cache (its round trip is tested in test_stats.py)."""
    lorafa.save_stats(stats, path)
    return lorafa.load_stats(path)


# ---------------------------------------------------------------------------------------------------------------
# 1. the statistics pass of a bf16 model
# ---------------------------------------------------------------------------------------------------------------

# SPEC §1: statistics are accumulated in fp32 whatever the model's dtype, so the bf16 pass differs from the fp32 pass
# (same weight values) only by the rounding of the bf16 forward and backward: each activation and each gradient is
# rounded to bf16 (≤ u relative) in every one of the few dozen operations of this 2-block model, errors of roughly
# independent sign, summed over ~100 tokens. Measured on the CPU: ≤ 2.2u (Frobenius, every layer and kind; 0.0086);
# CUDA's bf16 GEMMs accumulate in fp32 and round once, as the CPU's do, and its fused attention keeps the softmax in
# fp32. 8u leaves ~4× of margin.
BF16_STATS_TOL = 8 * U


def test_bf16_statistics_pass_matches_fp32(tmp_path):
    batches = make_batches(3)
    model, ref_model = bf16_pair()
    stats = lorafa.collect_stats(model, batches, TARGETS, kinds=("kfac",), progress=False)
    ref = lorafa.collect_stats(ref_model, batches, TARGETS, kinds=("kfac",), progress=False)
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert set(stats) == set(ref) and len(stats) == 2 * len(TARGETS)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # the pass left the model as it was
    assert all(p.grad is None for p in model.parameters())
    worst = {}
    for name, st in stats.items():
        assert st.n_tokens == ref[name].n_tokens == n_tokens and st.n_batches == 3
        tensors = st.tensors()
        assert set(tensors) == {"grad", "in_cov", "out_cov"}
        for kind, t in [*tensors.items(), ("cross", st.cross)]:
            assert t.dtype == torch.float32, (name, kind, t.dtype)
            assert t.device.type == dev().type, (name, kind, t.device)  # accumulated beside the weights
            assert torch.isfinite(t).all(), (name, kind)
            r = ref[name].tensors()[kind] if kind != "cross" else ref[name].cross
            assert r.abs().max() > 0
            worst[kind] = max(worst.get(kind, 0.0), rel(t, r))
    assert all(err < BF16_STATS_TOL for err in worst.values()), {k: v / U for k, v in worst.items()}
    # accumulators on the CPU (accumulate_on="cpu"): the same sums. The per-batch contributions are the same
    # computations; a non-deterministic CUDA kernel (fused attention's backward) may flip a bf16 rounding here and
    # there, well below one unit round-off of the whole statistic.
    offloaded = lorafa.collect_stats(tiny_llama(dtype=torch.bfloat16).to(dev()), batches, TARGETS, kinds=("kfac",),
                                     accumulate_on="cpu", progress=False)
    for name, st in offloaded.items():
        for kind, t in st.tensors().items():
            assert t.device.type == "cpu" and t.dtype == torch.float32
            assert rel(t, stats[name].tensors()[kind]) < U, (name, kind)


# ---------------------------------------------------------------------------------------------------------------
# 2. data-aware inits of a bf16 model
# ---------------------------------------------------------------------------------------------------------------

# Logits of a bf16 model against the fp32 model with the same weights: measured 1.2u (max error relative to the
# largest logit) on the CPU. For an offset method the base stores bf16(W − s·B·A), whose rounding is relative to the
# residual: when the residual is larger than W (LoRA-GA's stable scale makes s·B·A larger than W, SPEC §10), the
# error grows with ‖W − s·B·A‖ / ‖W‖ =: ρ, so the tolerance is 8u·max(1, ρ) (measured: LoRA-GA 2.9u at ρ ≈ 3).
LOGIT_TOL = 8 * U
# The same statistics on the device and on the CPU: both compute in fp32/fp64 (SPEC §0), so the factors agree to
# round-off (~1e-7) amplified by the inverse spectral gaps of these small random matrices: measured on the CPU, a
# random 1e-6 relative perturbation of every statistic (or of W, for pissa) moves B·Bᵀ, Aᵀ·A and B·A by ≤ 1e-5. 1e-4
# leaves that margin again and still catches a factor computed in bf16 (errors ≥ u ≈ 4e-3).
SAME_STATS_TOL = 1e-4
OFFSET = {"lora_fa": False, "lora_ga": True, "pissa": True}
KINDS = {"lora_fa": ("kfac",), "lora_ga": ("grad",), "pissa": None}


def _cfg() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)


def _sign_free(A: torch.Tensor, B: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the init fixes whatever the signs of the singular vectors (SPEC §2.1): B·Bᵀ and Aᵀ·A, and B·A for the
    methods whose product is sign-invariant (LoRA-GA's pairs A and B come from different singular pairs)."""
    A, B = A.double().cpu(), B.double().cpu()
    return {"BBt": B @ B.T, "AtA": A.T @ A, "BA": B @ A}


@pytest.mark.parametrize("method", ["lora_fa", "lora_ga", "pissa"])
def test_bf16_init(method, tmp_path):
    batches = make_batches(3)
    model, ref_model = bf16_pair()
    W0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    base_bf16 = logits(model, batches)
    base_fp32 = logits(ref_model, batches)

    pm = lorafa.initialize(model, _cfg(), lorafa.InitConfig(method=method, iters=3), batches=batches, progress=False)
    out = logits(pm, batches)
    assert torch.isfinite(out).all()
    layers = lora_layers(pm)
    assert len(layers) == 2 * len(TARGETS)
    rho = 1.0
    merged = tiny_llama(dtype=torch.bfloat16).float()  # fp32 CPU model holding W + s·B·A (no-offset check)
    for name, layer in layers.items():
        A, B, s = factors(layer)
        base = layer.get_base_layer().weight.detach()
        # PEFT's default (autocast_adapter_dtype=True) upcasts the adapters of a bf16 base to fp32
        assert A.dtype == B.dtype == torch.float32 and A.device.type == B.device.type == dev().type, name
        assert base.dtype == torch.bfloat16 and base.device.type == dev().type
        assert torch.isfinite(A).all() and torch.isfinite(B).all() and A.norm() > 0 and B.norm() > 0
        if OFFSET[method]:
            # SPEC §0: the offset is computed in fp32 from the factors the layer holds, then cast once
            expected = (W0[name].float() - s * (B.float() @ A.float())).to(torch.bfloat16)
            assert torch.equal(base, expected), f"{name}: base weight is not bf16(W − s·B·A)"
            rho = max(rho, float((W0[name].float() - s * (B.float() @ A.float())).norm() / W0[name].float().norm()))
        else:
            assert torch.equal(base, W0[name]), f"{name}: a no-offset method changed the base weight"
            with torch.no_grad():
                merged.get_submodule(name).weight.add_(s * (B.float() @ A.float()).cpu())
    tol = LOGIT_TOL * rho
    if OFFSET[method]:
        # W − s·B·A + s·B·A = W: the function at init is the base model's, up to bf16 rounding
        assert rel_max(out, base_bf16) < tol, (rel_max(out, base_bf16) / U, rho)
    else:
        # a real update at init: the model computes W + s·B·A (independently merged in fp32 on the CPU) ...
        assert rel_max(out, logits(merged, batches)) < tol, rel_max(out, logits(merged, batches)) / U
        # ... which moves the output well beyond the tolerance (measured 51u), so the check above discriminates
        assert rel_max(out, base_bf16) > 2 * tol, rel_max(out, base_bf16) / U

    # End to end against the fp32 CPU init from the same batches: the statistics differ by ≤ 8u (test 1), which moves
    # LoRA-FA's update by a few % of itself (measured 2 %), i.e. well under u of the logits; both offset models equal
    # their base. So the two models' outputs agree to the bf16 forward's rounding.
    ref_pm = lorafa.initialize(ref_model, _cfg(), lorafa.InitConfig(method=method, iters=3), batches=batches,
                               progress=False)
    ref_out = logits(ref_pm, batches)
    if OFFSET[method]:
        assert rel_max(ref_out, base_fp32) < 1e-5
    else:
        assert rel_max(ref_out, base_fp32) > 2 * tol
    assert rel_max(out, ref_out) < tol, rel_max(out, ref_out) / U

    # The factors themselves: the device's bf16 model and the CPU's fp32 model, given the same statistics (from the
    # device's bf16 pass), must compute the same factors to fp32 round-off.
    stats = None
    if KINDS[method]:
        stats = lorafa.collect_stats(tiny_llama(dtype=torch.bfloat16).to(dev()), batches, TARGETS,
                                     kinds=KINDS[method], progress=False)
        cpu_stats = stats_to_cpu(stats, tmp_path / "stats.safetensors")
    else:
        cpu_stats = None
    on_dev = lora_layers(lorafa.initialize(tiny_llama(dtype=torch.bfloat16).to(dev()), _cfg(),
                                           lorafa.InitConfig(method=method), stats=stats, progress=False))
    on_cpu = lora_layers(lorafa.initialize(tiny_llama(dtype=torch.bfloat16).float(), _cfg(),
                                           lorafa.InitConfig(method=method), stats=cpu_stats, progress=False))
    assert set(on_dev) == set(on_cpu) == set(layers)
    for name in on_dev:
        a, b = _sign_free(*factors(on_dev[name])[:2]), _sign_free(*factors(on_cpu[name])[:2])
        for key in ("BBt", "AtA") + (("BA",) if method != "lora_ga" else ()):
            assert rel(a[key], b[key]) < SAME_STATS_TOL, (name, key, rel(a[key], b[key]))
        if OFFSET[method]:  # fp32 CPU: W − s·B·A exactly; the device: its bf16 rounding
            dev_base = on_dev[name].get_base_layer().weight.detach().float().cpu()
            cpu_base = on_cpu[name].get_base_layer().weight.detach()
            torch.testing.assert_close(dev_base, cpu_base, rtol=U, atol=SAME_STATS_TOL * cpu_base.abs().max().item())


@pytest.mark.parametrize("method", ["lora_ga", "pissa"])
def test_bf16_adapters_offset_from_the_cast_factors(method):
    """autocast_adapter_dtype=False keeps bf16 adapters: the offset must use the bf16 A and B the layer holds."""
    batches = make_batches(2)
    model = tiny_llama(dtype=torch.bfloat16).to(dev())
    W0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    base_out = logits(model, batches)
    fp32 = lorafa.compute_init(model, _cfg(), lorafa.InitConfig(method=method, iters=2), batches=batches,
                               progress=False)  # the factors before the cast (nothing is modified)
    pm = lorafa.initialize(model, _cfg(), lorafa.InitConfig(method=method, iters=2), batches=batches, progress=False,
                           autocast_adapter_dtype=False)
    rho, mismatch_vs_fp32 = 1.0, 0
    for name, layer in lora_layers(pm).items():
        A, B, s = factors(layer)
        assert A.dtype == B.dtype == torch.bfloat16 and A.device.type == dev().type
        residual = W0[name].float() - s * (B.float() @ A.float())
        assert torch.equal(layer.get_base_layer().weight.detach(), residual.to(torch.bfloat16)), name
        rho = max(rho, float(residual.norm() / W0[name].float().norm()))
        res = fp32[name]
        uncast = (W0[name].float() - s * (res.B.float() @ res.A.float()).to(W0[name].device)).to(torch.bfloat16)
        mismatch_vs_fp32 += int((uncast != residual.to(torch.bfloat16)).sum())
    assert mismatch_vs_fp32 > 0  # the two rules differ here, so the equality above discriminates
    out = logits(pm, batches)
    assert rel_max(out, base_out) < LOGIT_TOL * rho, (rel_max(out, base_out) / U, rho)


# ---------------------------------------------------------------------------------------------------------------
# 3. two processes: NCCL on two GPUs (gloo on the CPU with LORAFA_TEST_DEVICE=cpu)
# ---------------------------------------------------------------------------------------------------------------

WORLD = 2
N_BATCHES = 5  # odd: rank 0 gets 3 batches, rank 1 gets 2
BACKEND = "nccl" if ON_CUDA else "gloo"


def eager_llama(dtype=torch.float32) -> torch.nn.Module:
    """tiny_llama with eager attention: deterministic kernels (CUDA's fused attention backward may not be), so each
    batch's contribution is the same in every process and only the order of the fp32 sums differs."""
    model = tiny_llama(dtype=dtype)
    model.set_attn_implementation("eager")
    return model


def _rank_device(rank: int) -> torch.device:
    return torch.device("cuda", rank) if ON_CUDA else torch.device("cpu")


def _cpu_state(peft_model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in peft_model.state_dict().items()}


def _two_rank_worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: the statistics (fp32 and bf16), a lora_fa init from batches and a lora_ga init from statistics, on
    this rank's shard of the batches; everything written to `out_dir` for the parent to compare."""
    torch.set_num_threads(1)
    device = _rank_device(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives and all_gather_object use the current device
    dist.init_process_group(BACKEND, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        assert dist.get_backend() == BACKEND
        mine = shard_batches(make_batches(N_BATCHES), rank, WORLD)
        assert len(mine) == (3 if rank == 0 else 2)
        stats = lorafa.collect_stats(eager_llama().to(device), mine, TARGETS, kinds=("kfac",), progress=False)
        lorafa.save_stats(stats, os.path.join(out_dir, f"stats{rank}.safetensors"))
        bf16 = lorafa.collect_stats(eager_llama(torch.bfloat16).to(device), mine, TARGETS, kinds=("kfac",),
                                    progress=False)
        lorafa.save_stats(bf16, os.path.join(out_dir, f"bf16_{rank}.safetensors"))
        fa = lorafa.initialize(eager_llama().to(device), _cfg(), lorafa.InitConfig(method="lora_fa"), batches=mine,
                               progress=False)
        save_file(_cpu_state(fa), os.path.join(out_dir, f"lora_fa{rank}.safetensors"))
        ga = lorafa.initialize(eager_llama().to(device), _cfg(), lorafa.InitConfig(method="lora_ga"), stats=stats,
                               progress=False)
        save_file(_cpu_state(ga), os.path.join(out_dir, f"lora_ga{rank}.safetensors"))
        with open(os.path.join(out_dir, f"done{rank}.json"), "w") as f:
            json.dump({"device": str(stats[next(iter(stats))].grad.device)}, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    if ON_CUDA and torch.cuda.device_count() < WORLD:
        pytest.skip(f"the NCCL test needs {WORLD} GPUs; this machine has {torch.cuda.device_count()}")
    if not dist.is_available() or not (dist.is_nccl_available() if ON_CUDA else dist.is_gloo_available()):
        pytest.skip(f"torch.distributed with {BACKEND} is not available")
    out = tmp_path_factory.mktemp("two_ranks")
    run_ranks(_two_rank_worker, WORLD, free_port(), str(out))
    for r in range(WORLD):
        done = json.loads((out / f"done{r}.json").read_text())
        assert done["device"] == str(_rank_device(r)), done  # each rank's statistics lived on its own device
    return out


def _single(dtype=torch.float32, kinds=("kfac",)):
    """One process on the test device over all N_BATCHES batches."""
    return lorafa.collect_stats(eager_llama(dtype).to(dev()), make_batches(N_BATCHES), TARGETS, kinds=kinds,
                                progress=False)


def test_two_ranks_statistics_equal_one_process(two_rank_run, tmp_path):
    n_tokens = sum(int(b["attention_mask"].sum()) for b in make_batches(N_BATCHES))
    # fp32: the same per-batch sums in another order, so fp32 round-off (1e-5 of each tensor's largest entry);
    # bf16: the same, since every batch's bf16 computation is the same in both runs (eager attention, same kernels)
    for prefix, dtype, tol in (("stats", torch.float32, 1e-5), ("bf16_", torch.bfloat16, 1e-4)):
        ranks = [lorafa.load_stats(two_rank_run / f"{prefix}{r}.safetensors") for r in range(WORLD)]
        single = stats_to_cpu(_single(dtype), tmp_path / f"{prefix}single.safetensors")
        assert list(ranks[0]) == list(ranks[1]) == list(single)
        for name, ref in single.items():
            a, b = ranks[0][name], ranks[1][name]
            assert a.n_batches == b.n_batches == ref.n_batches == N_BATCHES
            assert a.n_tokens == b.n_tokens == ref.n_tokens == n_tokens
            for kind, t in ref.tensors().items():
                assert torch.equal(a.tensors()[kind], b.tensors()[kind]), (name, kind)  # one all-reduce result
                assert rel_max(a.tensors()[kind], t) < tol, (prefix, name, kind, rel_max(a.tensors()[kind], t))
            assert rel_max(a.cross, ref.cross) < tol
        q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
        assert ranks[0][k].in_cov is ranks[0][q].in_cov  # the shared input covariance survives the reduction


@pytest.mark.parametrize("method", ["lora_fa", "lora_ga"])
def test_two_ranks_init_identical_and_equal_to_one_process(two_rank_run, method, tmp_path):
    m0, m1 = (load_file(str(two_rank_run / f"{method}{r}.safetensors")) for r in range(WORLD))
    assert m0.keys() == m1.keys()
    for k in m0:  # SPEC §1: identical statistics and a shared seed give identical adapters on every rank
        assert torch.equal(m0[k], m1[k]), k
    stats = _single()
    model = eager_llama().to(dev())
    if method == "lora_fa":  # the statistics pass inside initialize, as on the ranks
        pm = lorafa.initialize(model, _cfg(), lorafa.InitConfig(method=method), batches=make_batches(N_BATCHES),
                               progress=False)
    else:
        pm = lorafa.initialize(model, _cfg(), lorafa.InitConfig(method=method), stats=stats, progress=False)
    single = _cpu_state(pm)
    assert single.keys() == m0.keys()
    a_keys = [k for k in m0 if ".lora_A." in k]
    assert len(a_keys) == 2 * len(TARGETS)
    for ka in a_keys:
        kb = ka.replace(".lora_A.", ".lora_B.")
        assert m0[kb].abs().max() > 0  # data-aware, not B = 0
        two, one = _sign_free(m0[ka], m0[kb]), _sign_free(single[ka], single[kb])
        for key in ("BBt", "AtA") + (("BA",) if method != "lora_ga" else ()):
            assert rel(two[key], one[key]) < 1e-3, (ka, key, rel(two[key], one[key]))  # as test_distributed.py
    for k in m0:
        if "lora_" not in k:  # base weights: lora_ga's offset W − s·B·A, the rest untouched
            torch.testing.assert_close(m0[k], single[k], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# 4. 4-bit bases with bitsandbytes' kernels on the device (SPEC §10)
# ---------------------------------------------------------------------------------------------------------------

NF4_REL_ERR = 0.12  # nf4's relative weight error on Gaussian-like weights (measured ~0.09, tests/test_quant.py)


@pytest.fixture(scope="module")
def fp_folder(tmp_path_factory):
    """A small Llama (hidden 128: several 64-value nf4 blocks per row) saved in fp32, as tests/test_quant_init.py."""
    from tiny_assets import save_llama128

    return save_llama128(str(tmp_path_factory.mktemp("llama128")))


def _fp(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _nf4(folder):
    """The QLoRA recipe of the README: nf4 weights, bf16 compute, quantized by transformers onto the device."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=q,
                                                device_map={"": str(dev())})


def _logits_4bit(model, batches) -> torch.Tensor:
    # In train mode: on a CPU with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight for its inference kernel at
    # the first eval-mode forward without gradients, and that kernel has no backward, so a later training step would
    # lose the gradients below each 4-bit layer. Train mode is the same function here (no dropout) and never repacks.
    return logits(model, batches, train_mode=True)


def _one_step(pm, batch, lr=0.5) -> float:
    params = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert params and all("lora_" in n for n in params)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.SGD(params.values(), lr=lr)
    pm.train()
    loss = pm(**{k: v.to(dev()) for k, v in batch.items()}).loss
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())
    assert all(p.grad.abs().max() > 0 for n, p in params.items() if "lora_A" in n), "a layer got no gradient"
    opt.step()
    opt.zero_grad()
    assert all(not torch.equal(p.detach(), before[n]) for n, p in params.items() if "lora_A" in n)
    return loss.detach().item()


@pytest.fixture
def bnb():
    bnb = pytest.importorskip("bitsandbytes")
    return bnb


def test_4bit_lora_fa_init_train_and_reload(bnb, fp_folder, tmp_path):
    batches = make_batches(n_batches=2)
    ref = logits(_fp(fp_folder), batches)
    plain_err = rel(_logits_4bit(_nf4(fp_folder), batches), ref)
    q = _nf4(fp_folder)
    quantized = {n: m for n, m in q.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == 2 * len(TARGETS)
    packed = {n: m.weight.detach().clone() for n, m in quantized.items()}
    for m in quantized.values():
        assert m.weight.device.type == dev().type  # the statistics pass runs bitsandbytes' kernels on the device
    pm = lorafa.initialize(q, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0),
                           lorafa.InitConfig(method="lora_fa", iters=2), batches=batches, progress=False)
    layers = lora_layers(pm)
    assert set(layers) == set(quantized)
    for name, layer in layers.items():
        A, B, _ = factors(layer)
        assert torch.equal(layer.get_base_layer().weight.detach(), packed[name])  # no offset: the base untouched
        assert A.dtype == B.dtype == torch.float32 and torch.isfinite(A).all() and torch.isfinite(B).all()
        assert B.abs().max() > 0  # a data-aware update, not B = 0
    init_out = _logits_4bit(pm, batches)
    assert rel(init_out, ref) > 1.3 * plain_err  # the update moves the model beyond the quantization error

    loss = _one_step(pm, batches[0])
    assert torch.isfinite(torch.tensor(loss)) and 0 < loss < 20
    trained = _logits_4bit(pm, batches)
    assert torch.isfinite(trained).all() and rel(trained, init_out) > 1e-3
    lorafa.save_adapter(pm, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "lorafa_init.json").read_text())
    assert meta["converted_to_original_base"] is False
    loaded = PeftModel.from_pretrained(_fp(fp_folder), tmp_path / "adapter")
    for name, layer in lora_layers(loaded).items():  # the trained factors, as they are
        A, B, _ = factors(layer)
        tA, tB, _ = factors(layers[name])
        assert torch.equal(A, tA.cpu()) and torch.equal(B, tB.cpu()), name
    # on the full-precision base the trained adapter differs from the 4-bit model by the base's quantization error
    # only (W against Q(W)): measured 0.84 × plain nf4's error on the CPU
    assert rel(logits(loaded, batches), trained) < 1.3 * plain_err + 8 * U


def test_4bit_pissa_init_train_and_reload(bnb, fp_folder, tmp_path):
    F = bnb.functional
    from lorafa.quant import dequantized_weight

    batches = make_batches(n_batches=2)
    fp = _fp(fp_folder)
    ref = logits(fp, batches)
    plain_err = rel(_logits_4bit(_nf4(fp_folder), batches), ref)
    pm = lorafa.initialize(_nf4(fp_folder), LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0),
                           lorafa.InitConfig(method="pissa"), base_weights=fp_folder, progress=False)
    fp_layers = dict(fp.named_modules())
    layers = lora_layers(pm)
    assert len(layers) == 2 * len(TARGETS)
    for name, layer in layers.items():
        base = layer.get_base_layer()
        assert isinstance(base, bnb.nn.Linear4bit) and base.weight.device.type == dev().type
        A, B, s = factors(layer)
        assert A.dtype == B.dtype == torch.float32
        w = fp_layers[name].weight.detach().to(dev())
        residual = w - s * (B @ A)
        stored = dequantized_weight(layer).float()
        # Q(W − s·B·A) from the full-precision W: nf4's error from the residual, and the very quantization that
        # bitsandbytes gives the residual in the layer's stored dtype (bf16 here, as transformers quantized W);
        # Q(Q(W) − s·B·A) would be about nf4's error away from it, and so would a residual quantized from fp32
        # instead of the stored dtype be ~2 % away (measured)
        assert rel(stored, residual) < NF4_REL_ERR, (name, rel(stored, residual))
        state = base.weight.quant_state
        assert state.dtype == torch.bfloat16
        fresh = F.dequantize_4bit(*F.quantize_4bit(residual.to(state.dtype), blocksize=state.blocksize,
                                                   quant_type="nf4")).float()
        assert rel(stored, fresh) < 1e-3, (name, rel(stored, fresh))
    init_out = _logits_4bit(pm, batches)
    init_err = rel(init_out, ref)
    # QPiSSA: the residual lacks W's top singular directions and quantizes better than W (measured 0.79 × on the CPU)
    assert init_err < plain_err, (init_err, plain_err)
    lorafa.save_adapter(pm, tmp_path / "at_init")  # ΔW = s·B·A − s·B₀·A₀ = 0: the original base's function
    at_init = PeftModel.from_pretrained(_fp(fp_folder), tmp_path / "at_init")
    torch.testing.assert_close(logits(at_init, batches), ref, rtol=1e-4, atol=1e-4)

    loss = _one_step(pm, batches[0])
    assert torch.isfinite(torch.tensor(loss)) and 0 < loss < 20
    trained = _logits_4bit(pm, batches)
    assert rel(trained, init_out) > 2 * init_err  # the step moved the model well beyond the quantization error
    lorafa.save_adapter(pm, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "lorafa_init.json").read_text())
    assert meta["converted_to_original_base"] is True
    loaded = PeftModel.from_pretrained(_fp(fp_folder), tmp_path / "adapter")
    assert all(layer.r["default"] == 32 for layer in lora_layers(loaded).values())  # rank 2r: [A; A₀], [B, −B₀]
    # the adapter for the original base reproduces the trained 4-bit model up to the residual's quantization error
    # (measured 0.55 × init_err on the CPU), as tests/test_quant_init.py checks with fp32 compute
    assert rel(logits(loaded, batches), trained) < 1.3 * init_err
