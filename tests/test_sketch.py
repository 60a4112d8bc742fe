"""The streaming gradient sketch: its two sketches equal the exact gradient's, its reconstruction recovers the
gradient's subspaces, and the init, cache and error paths accept it."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from conftest import make_batches, tiny_gpt2, tiny_llama
from lorafa import InitConfig
from lorafa.peft_bridge import compute_init
from lorafa.stats import collect_stats, load_stats, save_stats
from lorafa.stats.sketch import GradSketch, gaussian_matrix, principal_cosines, sketch_sizes, subspace_agreement

QKV = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def _exact_and_sketch(model, batches, targets, k, l=None, kinds=("grad",)):
    exact = collect_stats(model, batches, targets, kinds=kinds, progress=False)
    sk = collect_stats(model, batches, targets, kinds=kinds, sketch=(k, l) if l else k, progress=False)
    return exact, sk


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_sketches_equal_the_exact_gradients_sketches(make):
    model, batches = make(), make_batches()
    targets = QKV if make is tiny_llama else ["c_attn", "c_proj", "c_fc"]
    exact, sk = _exact_and_sketch(model, batches, targets, k=5, l=9)
    for name, st in exact.items():
        g, s = st.grad.double(), sk[name].grad_sketch
        m, n = g.shape
        omega = gaussian_matrix(n, 5, s.seed).double()
        psi = gaussian_matrix(m, 9, s.seed).double()
        assert s.y.shape == (m, 5) and s.z.shape == (9, n)
        torch.testing.assert_close(s.y.double(), g @ omega, rtol=1e-4, atol=1e-6 * float(g.abs().max()) * n)
        torch.testing.assert_close(s.z.double(), psi.T @ g, rtol=1e-4, atol=1e-6 * float(g.abs().max()) * m)
        assert sk[name].grad is None and sk[name].n_batches == st.n_batches


def test_reconstruction_is_exact_when_the_sketch_covers_the_rank():
    model = tiny_llama()
    batches = make_batches(n_batches=1, bsz=1, seq=6)  # gradient rank <= 3 answer tokens
    exact, sk = _exact_and_sketch(model, batches, ["q_proj", "o_proj"], k=8)
    for name, st in exact.items():
        approx = sk[name].grad_sketch.reconstruct()
        torch.testing.assert_close(approx, st.grad, rtol=1e-3, atol=1e-5 * float(st.grad.abs().max()))


def test_no_weight_gradient_is_formed_and_flags_are_restored():
    model = tiny_llama()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    seen = []
    hooks = [p.register_hook(lambda g, n=n: seen.append(n)) for n, p in model.named_parameters() if p.requires_grad]
    collect_stats(model, make_batches(), QKV, sketch=4, progress=False)
    for h in hooks:
        h.remove()
    assert seen == []  # backward never computed a parameter's gradient
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())


def test_top_subspaces_and_the_agreement_measure():
    model = tiny_llama()
    exact, sk = _exact_and_sketch(model, make_batches(n_batches=2, bsz=2, seq=8), ["q_proj"], k=16, l=33)
    name = next(iter(exact))
    agree = subspace_agreement(exact[name].grad, sk[name].grad_sketch.reconstruct(), r=2)
    assert agree["min_cos_left"] > 0.99 and agree["min_cos_right"] > 0.99 and agree["rel_err_rank_r"] < 0.05
    e = torch.eye(6)
    assert torch.allclose(principal_cosines(e[:, :2], e[:, [1, 0]]), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(principal_cosines(e[:, :2], e[:, 2:4]), torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("method", ["lora_ga", "lora_one", "lora_fa"])
def test_init_from_a_covering_sketch_matches_the_exact_init(method):
    model = tiny_llama()
    batches = make_batches(n_batches=1, bsz=2, seq=8)  # gradient rank <= 8 answer tokens < k: exact reconstruction
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    exact = compute_init(model, cfg, InitConfig(method=method, iters=1, bsz=2), batches=batches, progress=False)
    approx = compute_init(model, cfg, InitConfig(method=method, iters=1, bsz=2, sketch=12), batches=batches,
                          progress=False)
    for name, res in exact.items():  # compare projectors (singular vectors have arbitrary signs)
        a, b = res.A.double(), approx[name].A.double()
        torch.testing.assert_close(a.T @ a, b.T @ b, rtol=1e-3, atol=1e-4 * float((a.T @ a).abs().max()))
        torch.testing.assert_close(res.B @ res.B.T, approx[name].B @ approx[name].B.T, rtol=1e-3,
                                   atol=1e-4 * float((res.B @ res.B.T).abs().max()))


def test_kfac_with_sketch_keeps_the_covariances_exact():
    model = tiny_llama()
    exact, sk = _exact_and_sketch(model, make_batches(), ["q_proj", "k_proj", "down_proj"], k=4, kinds=("kfac",))
    for name, st in exact.items():
        torch.testing.assert_close(sk[name].in_cov, st.in_cov)
        torch.testing.assert_close(sk[name].out_cov, st.out_cov)
        assert sk[name].kinds() == {"grad", "act", "kfac"}


def test_sketch_cache_round_trip(tmp_path):
    model = tiny_llama()
    sk = collect_stats(model, make_batches(), ["q_proj"], sketch=(3, 7), sketch_seed=5, progress=False)
    save_stats(sk, tmp_path / "s.safetensors", config={"k": 3})
    back = load_stats(tmp_path / "s.safetensors", expected_config={"k": 3})
    for name, st in sk.items():
        assert back[name].grad_sketch.seed == 5
        torch.testing.assert_close(back[name].grad_sketch.reconstruct(), st.grad_sketch.reconstruct())


def test_bad_sketch_settings_are_clear_errors():
    with pytest.raises(ValueError, match="1 <= k <= l"):
        sketch_sizes(8, 4)
    with pytest.raises(ValueError, match="does not use"):
        InitConfig(method="pissa", sketch=8)
    with pytest.raises(ValueError, match="set sketch=k"):
        InitConfig(method="lora_ga", sketch_l=8)
    with pytest.raises(ValueError, match="add 'grad'"):
        collect_stats(tiny_llama(), make_batches(), ["q_proj"], kinds=("act",), sketch=4, progress=False)
    zero = GradSketch(torch.zeros(4, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="zero"):
        zero.reconstruct()
    assert InitConfig(method="lora_ga", sketch=8).sketch_sizes == (8, 17)


def test_offloaded_accumulators_give_the_same_init():
    model, batches = tiny_llama(), make_batches()
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    a = compute_init(model, cfg, InitConfig(method="lora_one", iters=3, bsz=4), batches=batches, progress=False)
    b = compute_init(model, cfg, InitConfig(method="lora_one", iters=3, bsz=4, accumulate_on="cpu"), batches=batches,
                     progress=False)
    for name in a:
        torch.testing.assert_close(a[name].B @ a[name].A, b[name].B @ b[name].A)
