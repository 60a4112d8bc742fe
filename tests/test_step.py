"""SPEC §2.5: LoRA-FA's target (gradient | natural), the step length (stable | kfac | line_search) and the partial
offset, on tiny models: against fp64 references, finite differences of the true loss, and saved adapters that load
on the original base."""

from __future__ import annotations

import math
import types

import pytest
import torch
from conftest import batch_logits as logits
from conftest import lora_cfg, make_batches, tiny_llama
from peft import LoraConfig, PeftModel
from torch import nn

import lorafa
from lorafa import InitConfig, collect_stats, init_factors
from lorafa.methods.line_search import GUARD_Z, _paired_bound
from lorafa.methods.lora_one import kfac_curvature, kfac_step
from lorafa.saving import init_record

TARGETS = ["q_proj", "v_proj", "o_proj"]


def cfg(r=2, alpha=4, **kw):
    return lora_cfg(TARGETS, r=r, alpha=alpha, **kw)


@torch.no_grad()
def mean_loss(model, batches):
    model.eval()
    return sum(float(model(**b).loss) for b in batches) / len(batches)


def example_losses(model, batches):
    """Each example's loss, alone in its forward pass (what the step's guard compares)."""
    model.eval()
    with torch.no_grad():
        return torch.tensor([float(model(**{k: v[i: i + 1] for k, v in b.items()}).loss)
                             for b in batches for i in range(len(b["input_ids"]))], dtype=torch.float64)


@pytest.fixture(scope="module")
def ascent_stats():
    """Statistics whose gradients point uphill: every positive init step raises the loss."""
    other = make_batches(n_batches=3, bsz=4, seq=12, seed=7)
    stats = collect_stats(tiny_llama(), other, TARGETS, kinds=("kfac",), progress=False)
    for st in stats.values():
        st.grad = -st.grad
    return stats


@pytest.fixture(scope="module")
def sbatches():
    return make_batches(n_batches=3, bsz=4, seq=12)


@pytest.fixture(scope="module")
def kfac_stats(sbatches):
    return collect_stats(tiny_llama(), sbatches, TARGETS, kinds=("kfac",), progress=False)


# ------------------------------------------------------------------------------------------ natural target
def _root(M, power):
    e, V = torch.linalg.eigh(M)
    return (V * e.clamp_min(1e-300) ** power) @ V.T


@pytest.mark.parametrize("reg", [1e-3, 1e-1])
def test_natural_target_matches_fp64_reference(kfac_stats, reg):
    """M = C_λ^{-1/2} [−C_λ^{-1/2} Ḡ Σ_λ^{-1/2}]_r Σ_λ^{-1/2} (relative damping), then B·A = M/σ₁(M)/γ."""
    st = kfac_stats["model.layers.0.self_attn.q_proj"]
    W = tiny_llama().model.layers[0].self_attn.q_proj.weight.detach()
    r, s, gamma = 3, 2.0, 128.0
    C, Sig, Gb = st.out_cov.double(), st.in_cov.double(), st.cross.double()
    C = C + reg * torch.trace(C) / C.shape[0] * torch.eye(C.shape[0], dtype=C.dtype)
    Sig = Sig + reg * torch.trace(Sig) / Sig.shape[0] * torch.eye(Sig.shape[0], dtype=Sig.dtype)
    N = -_root(C, -0.5) @ Gb @ _root(Sig, -0.5)
    U, S, Vh = torch.linalg.svd(N)
    M = _root(C, -0.5) @ (U[:, :r] * S[:r]) @ Vh[:r] @ _root(Sig, -0.5)
    ref = M / torch.linalg.matrix_norm(M, ord=2) / gamma
    res = init_factors("lora_fa", W, st, rank=r, scaling=s, target="natural", reg=reg)
    got = (res.B.double() @ res.A.double())
    torch.testing.assert_close(got, ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-4)
    # a different subspace from the gradient target's: the target is not cosmetic
    grad = init_factors("lora_fa", W, st, rank=r, scaling=s, reg=reg)
    assert (grad.B @ grad.A - res.B @ res.A).abs().max() > 1e-3 * float(ref.abs().max())
    assert res.info["target"] == "natural" and res.info["reg"] == reg


def test_natural_target_is_a_descent_direction(kfac_stats):
    for name, st in kfac_stats.items():
        W = torch.zeros(st.out_cov.shape[0], st.in_cov.shape[0])
        res = init_factors("lora_fa", W, st, rank=2, scaling=1.0, target="natural", reg=1e-2)
        assert float(torch.sum(st.grad * (res.B @ res.A))) < 0, name


# ------------------------------------------------------------------------------------------ kfac curvature
class TinyHeadLM(nn.Module):
    """Embedding → `head` (a linear map to the vocabulary) → the shifted, mean-token cross-entropy of HF causal LMs.

    The loss is linear-softmax in `head`, so its Hessian there is exactly the Gauss-Newton matrix; with labels drawn
    from the model's own distribution, the empirical Fisher the statistics pass builds is an unbiased estimate of it.
    """

    def __init__(self, vocab=12, dim=6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(vocab, dim, generator=g))
            self.head.weight.copy_(0.05 * torch.randn(vocab, dim, generator=g))

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(self.emb(input_ids))
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                           ignore_index=-100)
        return types.SimpleNamespace(loss=loss, logits=logits)


def _self_labelled_batches(model, n_batches, bsz, seq, seed=0):
    """Token batches whose labels are sampled from the model's own predictions; the first 2 positions and a
    random tail of padding are excluded, so batches have different loss-token counts T_b."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, model.emb.num_embeddings, (bsz, seq), generator=g)
        with torch.no_grad():
            probs = torch.softmax(model.head(model.emb(ids)), -1)
        nxt = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=g).view(bsz, seq)
        labels = torch.full_like(ids, -100)
        labels[:, 1:] = nxt[:, :-1]  # position t predicts labels[t + 1]
        lengths = torch.randint(seq // 2, seq + 1, (bsz,), generator=g)
        mask = (torch.arange(seq)[None] < lengths[:, None]).long()
        labels[mask == 0] = -100
        labels[:, :2] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def test_kfac_curvature_matches_finite_differences_of_the_loss():
    """κ(M) = (Σ_b T_b N_b / iters)·tr(MᵀCMΣ) against the second difference of the true mean loss along M."""
    model = TinyHeadLM().double()
    batches = _self_labelled_batches(model, n_batches=6, bsz=32, seq=24)
    stats = collect_stats(model, batches, ["head"], kinds=("kfac",), progress=False)["head"]
    assert stats.fisher_weight == sum(int((b["labels"][:, 1:] != -100).sum()) * int(b["attention_mask"].sum())
                                      for b in batches)
    W0 = model.head.weight.detach().clone()
    g = torch.Generator().manual_seed(3)
    for trial in range(3):
        B, A = torch.randn(W0.shape[0], 2, generator=g).double(), torch.randn(2, W0.shape[1], generator=g).double()
        M = B @ A

        def loss_at(eta):
            with torch.no_grad():
                model.head.weight.copy_(W0 + eta * M)
                return sum(float(model(**b).loss) for b in batches) / len(batches)

        h = 1e-3 / float(M.abs().max())
        fd = (loss_at(h) - 2 * loss_at(0.0) + loss_at(-h)) / h ** 2
        model.head.weight.data.copy_(W0)
        kappa = kfac_curvature(stats, A, B)
        assert fd > 0
        assert 0.8 < kappa / fd < 1.25, (trial, kappa, fd)
        # without the T_b factor the curvature would be off by the loss-token count (hundreds here)
        assert stats.fisher_weight / stats.n_tokens > 50


def test_kfac_step_minimises_the_quadratic_model_and_lowers_the_loss():
    model = TinyHeadLM(seed=1).double()
    batches = _self_labelled_batches(model, n_batches=4, bsz=32, seq=24, seed=1)
    stats = collect_stats(model, batches, ["head"], kinds=("kfac",), progress=False)["head"]
    W0 = model.head.weight.detach().clone()
    res = init_factors("lora_one", W0, stats, rank=2, scaling=2.0, scale="kfac")
    eta, kappa, slope = res.info["eta"], res.info["kappa"], res.info["slope"]
    assert math.isclose(eta, -slope / kappa, rel_tol=1e-9)
    step = 2.0 * (res.B.double() @ res.A.double())  # s·B·A
    unit = step / eta
    assert math.isclose(float(torch.linalg.matrix_norm(unit, ord=2)), 1.0, rel_tol=1e-4)

    def loss_at(x):
        with torch.no_grad():
            model.head.weight.copy_(W0 + x * unit)
            return sum(float(model(**b).loss) for b in batches) / len(batches)

    # the quadratic model is accurate here, so the K-FAC step is close to the best step along the line
    assert loss_at(eta) < loss_at(0.0)
    assert loss_at(eta) <= min(loss_at(0.5 * eta), loss_at(2.0 * eta))


def test_kfac_scale_needs_loss_token_counts(kfac_stats):
    st = kfac_stats["model.layers.0.self_attn.q_proj"]
    import dataclasses
    blind = dataclasses.replace(st, fisher_weight=0)
    with pytest.raises(ValueError, match="loss tokens"):
        init_factors("lora_fa", torch.zeros(32, 32), blind, rank=2, scaling=1.0, scale="kfac")


def test_lora_one_kfac_needs_kfac_statistics():
    assert InitConfig(method="lora_one").needs == "grad"
    assert InitConfig(method="lora_one", scale="kfac").needs == "kfac"
    assert InitConfig(method="lora_one", scale="line_search", line_search_from="kfac").needs == "kfac"


# ------------------------------------------------------------------------------------------ partial offset
@pytest.mark.parametrize("method", ["lora_one", "lora_fa"])
def test_partial_offset_starts_where_the_step_goes_with_trainable_factors(method, sbatches):
    none = lorafa.initialize(tiny_llama(), cfg(), InitConfig(method=method), batches=sbatches, progress=False)
    part = lorafa.initialize(tiny_llama(), cfg(), InitConfig(method=method, offset="partial"), batches=sbatches,
                             progress=False)
    torch.testing.assert_close(logits(part, sbatches), logits(none, sbatches), atol=2e-5, rtol=1e-4)
    for (n, p1), (_, p2) in zip(part.named_parameters(), none.named_parameters()):
        if "lora_" in n:  # the factors are 16^{-1/2}·m^{1/4} instead of 128^{-1/2}: ≈ 6.7× larger for m = 32
            ratio = float(torch.linalg.matrix_norm(p1.detach(), ord=2) / torch.linalg.matrix_norm(p2.detach(), ord=2))
            m = 32 if "q_proj" in n or "o_proj" in n else 16
            assert math.isclose(ratio, m ** 0.25 / 16 ** 0.5 * 128 ** 0.5, rel_tol=1e-3), n
    infos = init_record(part).infos
    assert all(0 < i["offset_scale"] < 1 for i in infos.values())


def _train_save_and_reload(pm, sbatches, tmp_path):
    """A few SGD steps, then `save_adapter` and stock PEFT's load on a fresh (original) base: the loaded model must
    compute what the trained one does. Returns the trained logits."""
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    pm.train()
    for b in sbatches:
        pm(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = logits(pm, sbatches)
    lorafa.save_adapter(pm, tmp_path / "adapter", initial_adapter=tmp_path / "init")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, sbatches), trained, atol=2e-5, rtol=1e-4)
    return trained


@pytest.mark.parametrize("method,rslora", [("lora_fa", False), ("lora_one", True), ("lora_fa", True)])
def test_partial_offset_round_trips_on_the_original_base(method, rslora, sbatches, tmp_path):
    pristine = logits(tiny_llama(), sbatches)
    pm = lorafa.initialize(tiny_llama(), cfg(use_rslora=rslora), InitConfig(method=method, offset="partial"),
                           batches=sbatches, progress=False, initial_adapter_dir=tmp_path / "init")
    trained = _train_save_and_reload(pm, sbatches, tmp_path)
    assert (trained - pristine).abs().max() > 1e-3


def test_partial_offset_only_for_one_step_methods():
    with pytest.raises(ValueError, match="partial"):
        InitConfig(method="pissa", offset="partial")


# ------------------------------------------------------------------------------------------ line search
@pytest.mark.parametrize("method,offset,frm", [("lora_fa", "none", "stable"), ("lora_fa", "partial", "stable"),
                                               ("lora_one", "partial", "kfac")])
def test_line_search_never_worse_than_stable_on_its_batches(method, offset, frm, sbatches):
    init = InitConfig(method=method, scale="line_search", offset=offset, line_search_from=frm, iters=3)
    pm = lorafa.initialize(tiny_llama(), cfg(), init, batches=sbatches, progress=False)
    ls = init_record(pm).summary["line_search"]
    tried = dict((g, v) for g, v in ls["tried"])
    assert 1.0 in tried and 0.0 in tried and ls["chosen"] in tried
    assert ls["loss_chosen"] == min(v for g, v in tried.items() if g > 0 or offset == "partial")
    assert ls["loss_chosen"] <= tried[1.0]
    if offset == "partial":
        assert ls["loss_chosen"] <= ls["loss_before"]
    # the hooks the search used agree with the model the init then built
    assert math.isclose(mean_loss(pm, sbatches), ls["loss_chosen"], rel_tol=1e-4)
    reference = InitConfig(method=method, offset=offset, iters=3,
                           **({"scale": "kfac"} if frm == "kfac" else {}))
    ref = lorafa.initialize(tiny_llama(), cfg(), reference, batches=sbatches, progress=False)
    assert math.isclose(mean_loss(ref, sbatches), tried[1.0], rel_tol=1e-4)
    assert all(i["global_factor"] == ls["chosen"] for i in init_record(pm).infos.values())


def test_line_search_needs_batches(kfac_stats):
    with pytest.raises(ValueError, match="line_search.*batches"):
        lorafa.initialize(tiny_llama(), cfg(), InitConfig(method="lora_fa", scale="line_search"), stats=kfac_stats)


def test_line_search_keeps_the_base_when_every_step_hurts(ascent_stats, sbatches):
    """Statistics from other data than the search's batches: with the offset, g = 0 (the base) is a candidate."""
    other = make_batches(n_batches=3, bsz=4, seq=12, seed=7)
    init = InitConfig(method="lora_fa", scale="line_search", offset="partial", iters=3)
    pm = lorafa.initialize(tiny_llama(), cfg(), init, batches=other, stats=ascent_stats, progress=False)
    ls = init_record(pm).summary["line_search"]
    assert ls["chosen"] == 0.0
    torch.testing.assert_close(logits(pm, sbatches), logits(tiny_llama(), sbatches), atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("method,k,match", [("lora_ga", 3, r"sketch=3.*2r.*sketch >= 4"),
                                            ("lora_one", 1, r"sketch=1.*sketch >= 2")])
def test_sketch_smaller_than_the_directions_used_is_an_error(method, k, match, sbatches):
    with pytest.raises(ValueError, match=match):
        lorafa.compute_init(tiny_llama(), cfg(r=2), InitConfig(method=method, sketch=k), batches=sbatches)


@pytest.mark.parametrize("kw,match", [
    ({"method": "lora_fa", "target": "newton"}, "target must be one of"),
    ({"method": "lora_one", "target": "natural"}, "does not have"),
    ({"method": "lora_ga", "scale": "kfac"}, "kfac and line_search are for lora_one and lora_fa"),
    ({"method": "lora_fa", "step_factor": 0.0}, "step_factor must be a positive"),
    ({"method": "lora_fa", "line_search_from": "pissa"}, "line_search_from"),
    ({"method": "lora_fa", "factor_gamma": -1.0}, "factor_gamma"),
    ({"method": "eva", "eva_rho": 0.5}, r"eva's rho \(InitConfig's eva_rho\) must be >= 1"),
])
def test_bad_step_options(kw, match):
    with pytest.raises(ValueError, match=match):
        InitConfig(**kw)


# ------------------------------------------------------------------------------------------ K-FAC preconditioner
def test_kfac_preconditioner_solves_the_kronecker_fisher_blocks():
    """∇A' and ∇B' solve F_A vec(∇A') = vec(∇A) and F_B vec(∇B') = vec(∇B) for the damped K-FAC blocks
    F_A = κs²·(BᵀCB + λ_C I) ⊗ Σ_λ and F_B = κs²·C_λ ⊗ (AΣAᵀ + λ_Σ I), λ_C = λ·tr(C)/m, λ_Σ = λ·tr(Σ)/n
    (row-major vec, built with torch.kron)."""
    from lorafa.optim import create_kfac_optimizer

    base = TinyHeadLM(seed=2)
    batches = _self_labelled_batches(base, n_batches=3, bsz=8, seq=16, seed=2)
    stats = collect_stats(base, batches, ["head"], kinds=("kfac",), progress=False)
    pm = lorafa.initialize(base, LoraConfig(r=2, lora_alpha=4, target_modules=["head"]),
                           InitConfig(method="lora_one", offset="partial"), stats=stats, progress=False)
    layer = pm.base_model.model.head
    reg = 1e-2
    opt = create_kfac_optimizer(pm, {"head": stats["head"]}, lr=1.0, reg=reg)
    pm.train()
    loss = sum(pm(**b).loss for b in batches) / len(batches)
    loss.backward()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    gA, gB = A.grad.detach().double().clone(), B.grad.detach().double().clone()
    opt.kfac_preconditioner.precondition()
    st = stats["head"]
    kappa = st.fisher_weight / st.n_batches * layer.scaling["default"] ** 2

    C0, S0 = st.out_cov.double(), st.in_cov.double()
    lam_c, lam_s = reg * torch.trace(C0) / C0.shape[0], reg * torch.trace(S0) / S0.shape[0]
    eye = lambda d: torch.eye(d, dtype=torch.float64)  # noqa: E731
    Ad, Bd = A.detach().double(), B.detach().double()
    FA = kappa * torch.kron(Bd.T @ C0 @ Bd + lam_c * eye(2), S0 + lam_s * eye(S0.shape[0]))
    FB = kappa * torch.kron(C0 + lam_c * eye(C0.shape[0]), Ad @ S0 @ Ad.T + lam_s * eye(2))
    torch.testing.assert_close(A.grad.double().flatten(), torch.linalg.solve(FA, gA.flatten()), rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(B.grad.double().flatten(), torch.linalg.solve(FB, gB.flatten()), rtol=1e-3, atol=1e-6)


def test_kfac_sgd_descends_at_learning_rate_one_half():
    """SGD with the preconditioner takes each factor's damped Gauss-Newton step; both factors move at once, so their
    steps add up and lr 0.5 is the one full step: the loss falls at every one of a few steps."""
    from lorafa.optim import create_kfac_optimizer

    base = TinyHeadLM(seed=4)
    batches = _self_labelled_batches(base, n_batches=3, bsz=16, seq=16, seed=4)
    shifted = [{**b, "labels": torch.where(b["labels"] >= 0, (b["labels"] + 1) % 12, b["labels"])} for b in batches]
    stats = collect_stats(base, shifted, ["head"], kinds=("kfac",), progress=False)
    pm = lorafa.initialize(base, LoraConfig(r=2, lora_alpha=4, target_modules=["head"]),
                           InitConfig(method="lora_one", offset="partial"), stats=stats, progress=False)
    opt = create_kfac_optimizer(pm, {"head": stats["head"]}, lr=0.5, reg=1e-2)
    pm.train()
    losses = []
    for _ in range(4):
        loss = sum(pm(**b).loss for b in shifted) / len(shifted)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.01, losses


def test_line_search_goes_down_when_the_starting_step_already_hurts(sbatches):
    """Far past the minimum the loss along the step is not unimodal (SmolLM2: 15.0 at g = 1, 12.7 at g = 2, 1.4 at
    g = 0): where g = 1 raises the loss, the search only shrinks the step."""
    huge = dict(method="lora_fa", line_search_from="kfac", step_factor=300.0, iters=3, offset="partial")
    ref = lorafa.initialize(tiny_llama(), cfg(), InitConfig(scale="kfac", **huge), batches=sbatches, progress=False)
    assert mean_loss(ref, sbatches) > mean_loss(tiny_llama(), sbatches)  # the ×300 kfac steps hurt
    pm = lorafa.initialize(tiny_llama(), cfg(), InitConfig(scale="line_search", **huge), batches=sbatches,
                           progress=False)
    ls = init_record(pm).summary["line_search"]
    assert max(g for g, _ in ls["tried"]) == 1.0 and ls["chosen"] < 1.0
    assert ls["loss_chosen"] <= ls["loss_before"]


def test_line_search_on_other_batches(sbatches):
    """search_batches: the step is chosen on other examples than those it was computed from."""
    other = make_batches(n_batches=2, bsz=4, seq=12, seed=11)
    pm = lorafa.initialize(tiny_llama(), cfg(), InitConfig(method="lora_fa", scale="line_search", offset="partial",
                                                           iters=3), batches=sbatches, search_batches=other,
                           progress=False)
    ls = init_record(pm).summary["line_search"]
    assert ls["on"] == "search_batches"
    assert math.isclose(mean_loss(pm, other), ls["loss_chosen"], rel_tol=1e-4)
    assert ls["loss_chosen"] <= min(ls["loss_before"], ls["loss_at_1"])


# ------------------------------------------------------------------------------------------ the step's guard
@pytest.mark.parametrize("method", ["lora_fa", "lora_one"])
def test_guard_shortens_a_step_that_raises_the_held_out_loss(method, ascent_stats, sbatches, tmp_path):
    base = mean_loss(tiny_llama(), sbatches)
    init = InitConfig(method=method, iters=3, stable_gamma=0.01)  # a long step: clearly uphill
    ref = lorafa.initialize(tiny_llama(), cfg(), init, stats=ascent_stats, progress=False)
    assert mean_loss(ref, sbatches) > base + 1e-3  # unguarded, the step raises the loss
    pm = lorafa.initialize(tiny_llama(), cfg(), init, stats=ascent_stats, guard_batches=sbatches, progress=False,
                           initial_adapter_dir=tmp_path / "init")
    g = init_record(pm).summary["guard"]
    assert g["remedy"] == "offset" and g["chosen"] < 1.0 and not g["raises"]
    assert g["loss_step"] > g["loss_before"] >= g["loss_chosen"]
    base_each = example_losses(tiny_llama(), sbatches)
    assert g["examples"] == len(base_each) == 12 and g["z"] == GUARD_Z
    assert math.isclose(g["loss_before"], float(base_each.mean()), rel_tol=1e-6)  # the mean over examples
    each = example_losses(pm, sbatches)
    assert math.isclose(float(each.mean()), g["loss_chosen"], rel_tol=1e-4)  # the model is what the guard saw
    assert float(each.mean()) <= float(base_each.mean()) + 1e-5
    for (n, p1), (_, p2) in zip(pm.named_parameters(), ref.named_parameters()):
        if "lora_" in n:  # the factors keep their scale: only the function's step is shortened
            torch.testing.assert_close(p1, p2)
    assert init_record(pm).subtracted
    # trained a little, saved, loaded by stock PEFT on the original (un-offset) base: the same function
    _train_save_and_reload(pm, sbatches, tmp_path)


def test_guard_keeps_a_step_that_lowers_the_held_out_loss(sbatches):
    init = InitConfig(method="lora_fa", iters=3)
    ref = lorafa.initialize(tiny_llama(), cfg(), init, batches=sbatches, progress=False)
    other = make_batches(n_batches=2, bsz=4, seq=12, seed=11)
    pm = lorafa.initialize(tiny_llama(), cfg(), init, batches=sbatches, guard_batches=sbatches[:2], progress=False)
    g = init_record(pm).summary["guard"]
    assert g["loss_step"] < g["loss_before"]  # on examples the step was computed from, it helps
    assert g["remedy"] is None and g["chosen"] == 1.0 and [t[0] for t in g["tried"]] == [0.0, 1.0]
    assert g["tried"][1][2] <= 0.0  # the change's upper bound: a decrease beyond the examples' noise
    assert g["seconds"] > 0
    torch.testing.assert_close(logits(pm, other), logits(ref, other))
    assert not init_record(pm).subtracted


def test_paired_bound_is_the_mean_change_and_its_upper_confidence_bound():
    before = torch.tensor([1.0, 2.0, 3.0, 4.0, float("nan")], dtype=torch.float64)
    after = torch.tensor([0.9, 2.1, 2.5, 3.9, 5.0], dtype=torch.float64)
    d = (after - before)[:4]  # the example with no finite loss before is left out
    mean, upper, n = _paired_bound(after, before)
    assert n == 4 and math.isclose(mean, float(d.mean()), rel_tol=1e-12)
    assert math.isclose(upper, float(d.mean() + GUARD_Z * d.std() / 2), rel_tol=1e-12)  # sd with n − 1
    assert mean < 0 < upper  # a decrease on average, but not beyond these four examples' spread
    after[0] = float("inf")  # a non-finite loss after the step: never kept
    assert _paired_bound(after, before)[:2] == (math.inf, math.inf)
    one = torch.tensor([1.0], dtype=torch.float64)
    assert _paired_bound(one - 0.5, one)[1] == math.inf  # one example has no spread to judge by


def test_guard_zeroes_a_decrease_within_the_examples_noise(sbatches):
    """A step whose mean change on the guard's examples is below zero, but whose per-example changes scatter around
    it far more than that: the former rule (mean loss not raised) kept it; the guard now takes it out (offset)."""
    init = InitConfig(method="lora_fa", iters=3)
    guard = make_batches(n_batches=2, bsz=4, seq=12, seed=11)
    ref = lorafa.initialize(tiny_llama(), cfg(), init, batches=sbatches, progress=False)
    d = example_losses(ref, guard) - example_losses(tiny_llama(), guard)
    # a sign per example (a loss_fn of this test's own): alternating by size, so the changes cancel to near zero
    sign = torch.ones_like(d)
    sign[d.abs().argsort()[1::2]] = -1.0
    if float((sign * d).mean()) > 0:
        sign = -sign
    keys = [tuple(b["input_ids"][i].tolist()) for b in guard for i in range(len(b["input_ids"]))]
    weight = dict(zip(keys, sign.tolist()))

    def loss_fn(model, b):  # the statistics batches (4 examples each) keep the model's loss
        one = len(b["input_ids"]) == 1
        return (weight[tuple(b["input_ids"][0].tolist())] if one else 1.0) * model(**b).loss

    mean, upper, _ = _paired_bound(sign * d, torch.zeros_like(d))
    assert mean < 0 < upper  # the premise: lower on average, within the noise
    pm = lorafa.initialize(tiny_llama(), cfg(), init, batches=sbatches, guard_batches=guard, loss_fn=loss_fn,
                           progress=False)
    g = init_record(pm).summary["guard"]
    assert g["loss_step"] < g["loss_before"]  # the mean alone would have kept the step
    assert math.isclose(g["loss_step"] - g["loss_before"], mean, rel_tol=1e-4, abs_tol=1e-7)
    assert g["remedy"] == "offset" and g["chosen"] == 0.0 and g["examples"] == 8
    assert all(upper > 0 for gg, _, upper in g["tried"] if gg > 0)  # no shorter step was clearly lower either
    torch.testing.assert_close(logits(pm, guard), logits(tiny_llama(), guard))  # the model starts as the base


def test_guard_shortens_an_overshooting_step_to_the_longest_clear_decrease(sbatches):
    """A descent step that overshoots: g = 1 and 1/2 are not clearly lower, 1/4 is; the model starts at W + step/4
    (the factors keep their scale, the base takes the other 3/4)."""
    init = InitConfig(method="lora_fa", iters=3, stable_gamma=1.0)
    pm = lorafa.initialize(tiny_llama(), cfg(), init, batches=sbatches, guard_batches=sbatches, progress=False)
    g = init_record(pm).summary["guard"]
    bound = {x: upper for x, _, upper in g["tried"]}
    assert g["remedy"] == "offset" and 0.0 < g["chosen"] < 1.0 and bound[g["chosen"]] <= 0.0
    assert all(bound[x] > 0 for x in bound if x > g["chosen"])  # every longer step tried was not clearly lower
    assert math.isclose(float(example_losses(pm, sbatches).mean()), g["loss_chosen"], rel_tol=1e-4)
    assert g["loss_chosen"] < g["loss_before"]
    info = next(iter(init_record(pm).infos.values()))
    assert math.isclose(info["offset_scale"], 1.0 - g["chosen"]) and info["guard_factor"] == g["chosen"]


def test_guard_refuses_a_batch_it_cannot_split_into_examples(sbatches):
    bad = [dict(sbatches[0], extra=torch.zeros(3, 2))]  # a tensor whose first dimension is not the batch's 4
    with pytest.raises(ValueError, match=r"per-example losses: every tensor .* first dimensions \[3, 4\]"):
        lorafa.initialize(tiny_llama(), cfg(), InitConfig(method="lora_fa", iters=3), batches=sbatches,
                          guard_batches=bad, progress=False)


def test_guard_only_for_step_methods(sbatches):
    with pytest.raises(ValueError, match=r"guard_batches= checks the init step of lora_fa and lora_one; pissa"):
        lorafa.initialize(tiny_llama(), cfg(), InitConfig(method="pissa"), guard_batches=sbatches, progress=False)
