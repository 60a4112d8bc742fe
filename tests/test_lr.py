"""`lorafa.suggest_lr` (SPEC §11, issue 23): the curvature routines against closed forms, the Gauss-Newton fallback,
determinism, the model left as it was, bad input, every rule after three inits, and the two entry points (the
runner's `model.learning_rate=auto`, `initialize_trainer(..., learning_rate="auto")`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import peft
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import lorafa
from lorafa import lr as lrmod
from lorafa.lr import LrSuggestion, suggest_lr

from conftest import lora_cfg, make_batches, tiny_gpt2, tiny_llama


# -- closed forms ------------------------------------------------------------------------------------------------
class Quadratic(nn.Module):
    """loss = w·(½θᵀAθ − bᵀθ) for a batch {"w": w}: the mean over batches of weights w has Hessian mean(w)·A."""

    def __init__(self, eigenvalues, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = len(eigenvalues)
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        self.register_buffer("A", q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T)
        self.register_buffer("b", torch.randn(n, generator=g, dtype=torch.float64))
        self.theta = nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))

    def forward(self, w):
        t = self.theta
        return SimpleNamespace(loss=w * (0.5 * t @ self.A @ t - self.b @ t))


QUAD_BATCHES = [{"w": torch.tensor(1.0, dtype=torch.float64)}, {"w": torch.tensor(3.0, dtype=torch.float64)}]


def test_adam_step_equals_the_closed_form_on_a_quadratic():
    model = Quadratic([5.0, 2.0, 1.0, 0.5, 0.1])
    H = 2.0 * model.A  # the mean of w = 1 and w = 3
    g = (H @ model.theta - 2.0 * model.b).detach()
    for optimizer, d in (("adamw", g / (g.abs() + 1e-8)), ("sgd", g)):
        s = suggest_lr(model, QUAD_BATCHES, optimizer, rule="adam_step")
        eta = float(g @ d / (d @ H @ d))
        assert s.evidence["eta_star"] == pytest.approx(eta, rel=1e-10)
        assert s.lr == pytest.approx(lrmod.ADAM_STEP_C * eta, rel=1e-12)
        assert s.evidence["curvature"] == "hessian" and "fallback" not in s.evidence
        assert s.evidence["dHd"] == pytest.approx(float(d @ H @ d), rel=1e-10)
        assert s.evidence["g_dot_d"] == pytest.approx(float(g @ d), rel=1e-10)
    eps = 0.3  # the optimiser's eps is the one in the direction
    d = g / (g.abs() + eps)
    assert suggest_lr(model, QUAD_BATCHES, rule="adam_step", eps=eps, c=1.0).lr == pytest.approx(
        float(g @ d / (d @ H @ d)), rel=1e-10)


def test_polyak_is_the_loss_over_the_first_order_decrease():
    """Polyak's step for the optimiser's first update d: (L − floor)/gᵀd, with L and g the means over the batches."""
    model = Quadratic([5.0, 2.0, 1.0, 0.5, 0.1])
    H = 2.0 * model.A
    t = model.theta.detach()
    g = H @ t - 2.0 * model.b
    loss = float(2.0 * (0.5 * t @ model.A @ t - model.b @ t))
    floor = loss - 4.0  # a floor under the loss (this quadratic's loss can be negative)
    for optimizer, d in (("adamw", g / (g.abs() + 1e-8)), ("sgd", g)):
        s = suggest_lr(model, QUAD_BATCHES, optimizer, rule="polyak", floor=floor)
        assert s.evidence["eta_polyak"] == pytest.approx(4.0 / float(g @ d), rel=1e-10)
        assert s.lr == pytest.approx(lrmod.POLYAK_C * 4.0 / float(g @ d), rel=1e-12)
        assert s.evidence["loss"] == pytest.approx(loss, rel=1e-12) and s.evidence["floor"] == floor
    with pytest.raises(ValueError, match=r"is not above floor=.*Polyak's step has nothing left to descend"):
        suggest_lr(model, QUAD_BATCHES, rule="polyak", floor=loss + 1.0)


ARCHS = {  # (tiny model, LoRA targets, a norm's weight to train besides the adapters); GPT-2's layers are Conv1D
    "llama": (tiny_llama, {"target_modules": ["q_proj", "v_proj"]}, lambda m: m.model.norm.weight),
    "gpt2": (tiny_gpt2, {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True},
             lambda m: m.transformer.ln_f.weight),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_anchored_is_default_lora_s_first_order_decrease_over_the_model_s(arch):
    """anchored's reference is exactly the gᵀd of a default PEFT LoRA on the same layers (A drawn by
    `_reference_a`, B = 0, rsLoRA scaling alpha/√r) at the same point, non-LoRA trainable parameters included."""
    build, targets, norm = ARCHS[arch]

    def model_with(a_of=None, alpha=16):
        m = get_peft_model(build(), LoraConfig(r=4, lora_alpha=alpha, use_rslora=True, **targets))
        norm(m.base_model.model).requires_grad_(True)  # a trainable parameter outside the adapters
        with torch.no_grad():
            for name, layer, adapter in lrmod._reference_layers(m):
                w = layer.lora_A[adapter].weight
                w.copy_(a_of[f"{name}/{adapter}"] if a_of else 5 * w)  # B stays 0: the point is the base model
        return m

    model = model_with()
    s = suggest_lr(model, make_batches(), rule="anchored", seed=5)
    same_a = model_with(lrmod._reference_a(lrmod._reference_layers(model), 5))
    default = suggest_lr(same_a, make_batches(), rule="polyak", c=1.0)
    assert s.evidence["ref_g_dot_d"] == pytest.approx(default.evidence["g_dot_d"], rel=1e-6)
    assert s.evidence["other_g_dot_d"] > 0 and s.evidence["alpha"] == lrmod.ANCHOR_ALPHA
    assert s.lr == pytest.approx(lrmod.ANCHORED_C * s.evidence["ref_g_dot_d"] / s.evidence["g_dot_d"], rel=1e-12)
    assert s.evidence["ratio"] < 1  # A five times PEFT's: five times the decrease per unit rate on the adapters
    # the reference's scaling is alpha/√r: a quarter of the alpha, a quarter of the adapters' part
    quarter = suggest_lr(model, make_batches(), rule="anchored", seed=5, alpha=4.0).evidence
    lora_part = s.evidence["ref_g_dot_d"] - s.evidence["other_g_dot_d"]
    assert quarter["ref_g_dot_d"] - quarter["other_g_dot_d"] == pytest.approx(lora_part / 4, rel=1e-4)  # eps
    # the reference itself (the same A, the reference's alpha): the rate is c
    plain = suggest_lr(same_a, make_batches(), rule="anchored", seed=5)
    assert plain.lr == pytest.approx(lrmod.ANCHORED_C, rel=1e-6)
    with pytest.raises(ValueError, match="no active PEFT LoRA layer"):
        suggest_lr(Quadratic([1.0, 2.0]), QUAD_BATCHES, rule="anchored")
    emb = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(ValueError, match=r"1 LoRA layer\(s\) are not linear .*Use rule='polyak'"):
        suggest_lr(emb, make_batches(), rule="anchored")
    with pytest.raises(ValueError, match="alpha .* must be positive"):
        suggest_lr(model, make_batches(), rule="anchored", alpha=0.0)


def test_anchored_for_schedule_free_adamw_takes_its_default_rate():
    """Schedule-free AdamW's first step is Adam's, so anchored's ratio is the same; its c is the optimiser's own
    default rate (SCHEDULE_FREE_C, schedulefree's AdamWScheduleFree default) unless given; the rules whose constants
    are fitted for AdamW refuse it."""
    schedulefree = pytest.importorskip("schedulefree")
    import inspect

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=16, use_rslora=True,
                                                    target_modules=["q_proj", "v_proj"]))
    adam = suggest_lr(model, make_batches(), "adamw", rule="anchored", seed=3)
    sf = suggest_lr(model, make_batches(), "schedulefree", rule="anchored", seed=3)
    assert sf.evidence["ratio"] == adam.evidence["ratio"] and sf.evidence["optimizer"] == "schedulefree"
    assert sf.evidence["c"] == lrmod.SCHEDULE_FREE_C and adam.evidence["c"] == lrmod.ANCHORED_C
    assert sf.lr == pytest.approx(lrmod.SCHEDULE_FREE_C * sf.evidence["ratio"], rel=1e-12)
    assert lrmod.SCHEDULE_FREE_C == inspect.signature(schedulefree.AdamWScheduleFree).parameters["lr"].default
    # transformers' optim name is the same optimiser; an explicit c wins
    alias = suggest_lr(model, make_batches(), "schedule_free_adamw", rule="anchored", seed=3, c=1e-3)
    assert alias.evidence["optimizer"] == "schedulefree" and alias.lr == pytest.approx(1e-3 * sf.evidence["ratio"])
    for rule in ("polyak", "adam_step", "range_test"):
        with pytest.raises(ValueError, match="for schedule-free AdamW use rule='anchored'"):
            suggest_lr(model, make_batches(), "schedulefree", rule=rule)


@pytest.mark.parametrize("rule", ["polyak", "adam_step"])
def test_reference_carries_a_known_rate_over_by_the_ratio(rule):
    """rate = the reference's rate × (this model's number / the reference's): the constant cancels."""
    a, b = Quadratic([5.0, 2.0, 1.0, 0.5, 0.1], seed=1), Quadratic([50.0, 9.0, 3.0, 0.2, 0.1], seed=2)
    floor = {"floor": -100.0} if rule == "polyak" else {}  # these quadratics' losses can be negative
    ref = suggest_lr(b, QUAD_BATCHES, rule=rule, **floor)
    mine = suggest_lr(a, QUAD_BATCHES, rule=rule, **floor)
    s = suggest_lr(a, QUAD_BATCHES, rule=rule, reference=(ref, 3e-4), **floor)
    assert s.lr == pytest.approx(3e-4 * mine.lr / ref.lr, rel=1e-12)
    assert s.evidence["reference"]["ratio"] == pytest.approx(mine.lr / ref.lr, rel=1e-12)
    assert suggest_lr(b, QUAD_BATCHES, rule=rule, reference=(ref, 3e-4), **floor).lr == pytest.approx(3e-4)
    with pytest.raises(ValueError, match=r"other settings \({'c'"):
        suggest_lr(a, QUAD_BATCHES, rule=rule, reference=(ref, 3e-4), c=2.0, **floor)
    with pytest.raises(ValueError, match="other settings .*'rule'"):
        suggest_lr(a, QUAD_BATCHES, rule="polyak" if rule != "polyak" else "adam_step", reference=(ref, 3e-4),
                   **({} if rule == "polyak" else {"floor": -100.0}))
    with pytest.raises(TypeError, match="reference must be a pair"):
        suggest_lr(a, QUAD_BATCHES, rule=rule, reference=ref, **floor)
    with pytest.raises(ValueError, match="reference's rate must be a positive number"):
        suggest_lr(a, QUAD_BATCHES, rule=rule, reference=(ref, 0.0), **floor)


def test_lambda_max_is_the_top_eigenvalue_of_a_quadratic():
    eigenvalues = [7.0, 3.0, 2.5, 1.0, -4.0, 0.2]  # the top algebraic eigenvalue, not the largest magnitude
    s = suggest_lr(Quadratic(eigenvalues), QUAD_BATCHES, rule="lambda_max")
    assert s.evidence["lambda_max"] == pytest.approx(2.0 * 7.0, rel=1e-4)  # mean w = 2
    assert s.lr == pytest.approx(lrmod.LAMBDA_MAX_C / 14.0, rel=1e-4) and s.evidence["converged"]
    with pytest.raises(ValueError, match="top eigenvalue of the hessian is .* <= 0"):
        suggest_lr(Quadratic([-1.0, -2.0, -0.5]), QUAD_BATCHES, rule="lambda_max")


class SquaredLogit(nn.Module):
    """Two classes with logits (c·θ², 0), label 0: H = ℓ''·(2cθ)² + ℓ'·2c < 0 for small θ (ℓ' < 0), while the
    Gauss-Newton part ℓ''·(2cθ)² is positive."""

    def __init__(self, theta=0.1, c=1.0):
        super().__init__()
        self.theta, self.c = nn.Parameter(torch.tensor([theta], dtype=torch.float64)), c

    def forward(self, labels):
        z = torch.stack([self.c * self.theta[0] ** 2, torch.zeros((), dtype=torch.float64)])[None]
        return SimpleNamespace(logits=z, loss=nn.functional.cross_entropy(z, labels))


def test_negative_curvature_falls_back_to_gauss_newton():
    model, batches = SquaredLogit(), [{"labels": torch.tensor([0])}]
    theta, c, eps = 0.1, 1.0, 1e-8
    u = c * theta ** 2
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    l1, l2 = -sigmoid(-u), sigmoid(u) * sigmoid(-u)  # ℓ'(u), ℓ''(u) of ℓ(u) = log(1 + e^{-u})
    g = l1 * 2 * c * theta
    d = g / (abs(g) + eps)
    dhd, dgd = d * d * (l2 * (2 * c * theta) ** 2 + l1 * 2 * c), d * d * l2 * (2 * c * theta) ** 2
    assert dhd < 0 < dgd
    s = suggest_lr(model, batches, rule="adam_step")
    assert s.evidence["dHd"] == pytest.approx(dhd, rel=1e-8) and s.evidence["dGd"] == pytest.approx(dgd, rel=1e-8)
    assert s.evidence["curvature"] == "gauss_newton" and "dᵀHd" in s.evidence["fallback"]
    assert s.lr == pytest.approx(lrmod.ADAM_STEP_C * g * d / s.evidence["dGd"], rel=1e-8)
    with pytest.raises(ValueError, match="no minimum. Use curvature='gauss_newton'"):
        suggest_lr(model, batches, rule="adam_step", curvature="hessian")
    forced = suggest_lr(model, batches, rule="adam_step", curvature="gauss_newton")
    assert forced.lr == s.lr and "dHd" not in forced.evidence and "fallback" not in forced.evidence
    gn = suggest_lr(model, batches, rule="lambda_max", curvature="gauss_newton")
    assert gn.evidence["lambda_max"] == pytest.approx(l2 * (2 * c * theta) ** 2, rel=1e-6)


def test_curvature_products_on_a_tiny_llama_match_finite_differences():
    """dᵀHd and dᵀGd over HF's causal-LM loss: dᵀHd against the second difference of the loss, dᵀGd against
    Σ_tokens [Σ p·u² − (Σ p·u)²] / N with u = J·d from a central difference of the logits (a float64 model)."""
    model = get_peft_model(tiny_llama(dtype=torch.float64), lora_cfg(["q_proj", "v_proj"], init_lora_weights=False))
    batch = make_batches(1)[0]
    params = [p for p in model.parameters() if p.requires_grad]
    d = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=p.dtype) for i, p in enumerate(params)]
    with lrmod._probing(model, eager=True):
        probe = lrmod._Probe(model, [batch], None)
        dhd, dgd = probe.quadratic(d, "hessian"), probe.quadratic(d, "gauss_newton")

    def at(t):
        with torch.no_grad():
            for p, x in zip(params, d):
                p.add_(x, alpha=t)
            out = model(**batch)
            for p, x in zip(params, d):
                p.sub_(x, alpha=t)
        z = out.logits.double()  # HF's loss is computed in float32: recomputed here in float64
        loss = nn.functional.cross_entropy(z[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
        return loss.item(), z

    h = 1e-3  # HF computes the rotary embedding in float32: smaller steps drown in its round-off
    (lp, zp), (l0, z0), (lm, zm) = at(h), at(0.0), at(-h)
    assert dhd == pytest.approx((lp - 2 * l0 + lm) / h ** 2, rel=1e-3)
    u, p = ((zp - zm) / (2 * h))[:, :-1], torch.softmax(z0[:, :-1], -1)
    valid = batch["labels"][:, 1:] != -100
    per_token = (p * u ** 2).sum(-1) - (p * u).sum(-1) ** 2
    assert dgd == pytest.approx(float(per_token[valid].sum() / valid.sum()), rel=1e-4) and dgd > 0


# -- determinism, the model as it was, bad input -----------------------------------------------------------------
def _lora_llama(seed=0):
    return get_peft_model(tiny_llama(seed), lora_cfg(["q_proj", "v_proj"]))


FAST = {"polyak": {}, "anchored": {}, "adam_step": {}, "lambda_max": {"steps": 8},
        "range_test": {"lr_min": 1e-4, "lr_max": 1e3, "factor": 4.0}}  # tiny random models take huge rates


@pytest.mark.parametrize("rule", list(lrmod.RULES))
def test_same_inputs_and_seed_give_the_same_rate_and_evidence(rule):
    a = suggest_lr(_lora_llama(), make_batches(), rule=rule, seed=3, **FAST[rule])
    b = suggest_lr(_lora_llama(), make_batches(), rule=rule, seed=3, **FAST[rule])
    strip = lambda e: {k: v for k, v in e.items() if k != "seconds"}  # noqa: E731
    assert a.lr == b.lr and strip(a.evidence) == strip(b.evidence)
    assert a.evidence["rule"] == rule and a.evidence["seconds"] >= 0 and a.evidence["n_batches"] == 2
    json.dumps(a.evidence)  # results.json holds it


def test_the_model_is_left_exactly_as_it_was():
    model = _lora_llama()
    model.train()
    model.base_model.model.model.layers[0].eval()  # mixed training flags survive too
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    lora[0].grad = torch.full_like(lora[0], 0.5)
    grad = lora[0].grad
    flags = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    config = model.get_base_model().config
    assert config._attn_implementation == "sdpa"
    for rule in lrmod.RULES:
        assert suggest_lr(model, make_batches(), rule=rule, **FAST[rule]).lr > 0
        assert config._attn_implementation == "sdpa"
        assert {n: m.training for n, m in model.named_modules()} == flags
        assert {n: p.requires_grad for n, p in model.named_parameters()} == requires
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert lora[0].grad is grad and torch.equal(grad, torch.full_like(grad, 0.5))
        assert all(p.grad is None for p in lora[1:]) and all(p.grad is None for p in model.parameters()
                                                              if not p.requires_grad)


def test_bad_input_is_refused():
    frozen = tiny_llama()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        suggest_lr(frozen, make_batches())
    assert all(not p.requires_grad for p in frozen.parameters())
    with pytest.raises(ValueError, match="at least one batch"):
        suggest_lr(_lora_llama(), [])
    nan_batch = make_batches(1)[0]
    nan_batch["labels"][:] = -100  # no label token: the mean loss is 0/0
    with pytest.raises(ValueError, match="loss on batch 0 is nan, not a finite number"):
        suggest_lr(_lora_llama(), [nan_batch])
    model = _lora_llama()
    b = [p for n, p in model.named_parameters() if "lora_B" in n][0]  # zero under PEFT's default init
    # a finite loss whose gradient is not: 0·√|B| has an infinite slope at B = 0
    with pytest.raises(ValueError, match="gradient is not finite"):
        suggest_lr(model, make_batches(), loss_fn=lambda m, x: m(**x).loss + 0 * b.abs().sqrt().sum())
    with pytest.raises(ValueError, match="rule must be one of"):
        suggest_lr(model, make_batches(), rule="newton")
    with pytest.raises(TypeError, match=r"anchored has no option\(s\) \['steps'\]"):
        suggest_lr(model, make_batches(), steps=3)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        suggest_lr(model, make_batches(), "lion")
    with pytest.raises(TypeError, match="must be a dict"):
        suggest_lr(model, [torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="not bracketed: raise lr_max"):
        suggest_lr(model, make_batches(), rule="range_test", lr_min=1e-6, lr_max=1e-5)


# -- every rule after three inits --------------------------------------------------------------------------------
def _peft_lora_ga():
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="lora_ga",
                        lora_ga_config=peft.LoraGAConfig(direction="ArB2r", scale="stable", stable_gamma=16))
    model, batches = tiny_llama(), make_batches(2, seed=7)
    peft.preprocess_loraga(model, config, lambda: [model(**b).loss.backward() for b in batches])
    return get_peft_model(model, config)


INITS = {
    "lora": _lora_llama,
    "lora_fa": lambda: lorafa.initialize(tiny_llama(), lora_cfg(["q_proj", "v_proj"]),
                                         lorafa.InitConfig(method="lora_fa", bsz=4, iters=2),
                                         batches=make_batches(2, seed=7), progress=False),
    "peft_lora_ga": _peft_lora_ga,
}


@pytest.mark.parametrize("init", list(INITS))
def test_every_rule_gives_a_finite_positive_rate_after_each_init(init):
    model = INITS[init]()
    for rule in lrmod.RULES:
        s = suggest_lr(model, make_batches(), rule=rule, **FAST[rule])
        assert isinstance(s, LrSuggestion) and math.isfinite(s.lr) and s.lr > 0, (rule, s.evidence)
        assert s.evidence["lr"] == s.lr and s.evidence["n_params"] == sum(
            p.numel() for p in model.parameters() if p.requires_grad)
        assert lrmod.RULES[rule](model, make_batches(), **FAST[rule]).lr == s.lr  # each rule on its own


# -- the entry points ---------------------------------------------------------------------------------------------
def _tiny_run(tmp_path, *overrides) -> dict:
    """The runner in-process on a tiny causal LM and meta_math-shaped arithmetic rows, learning_rate=auto, LoRA on
    q_proj and v_proj, no accuracy evaluation; `overrides` added."""
    from test_runner import _in_process
    from tiny_assets import arithmetic_rows, save_tiny_causal_lm, write_jsonl

    model = save_tiny_causal_lm(str(tmp_path / "tiny-lm"))
    write_jsonl(str(tmp_path / "gsm" / "test.jsonl"), arithmetic_rows(4, seed=1))
    write_jsonl(str(tmp_path / "metamath.jsonl"), [
        {"query": r["question"], "response": r["answer"].replace("####", "The answer is:"), "type": "GSM_Rephrased"}
        for r in arithmetic_rows(32, seed=2)])
    return _in_process([
        "++dataset_name=meta_math", f"++model.name={model}", f"++dataset.path={tmp_path / 'metamath.jsonl'}",
        f"++dataset.test_path={tmp_path / 'gsm'}", f"++output_root={tmp_path / 'runs'}", "++eval.enabled=false",
        "++init.bsz=2", "++init.iters=2", "++model.learning_rate=auto", "++peft.target_modules=[q_proj,v_proj]",
        *overrides])


def test_runner_learning_rate_auto_records_and_uses_each_arms_rate(tmp_path):
    results = _tiny_run(tmp_path, "++model.max_steps=2", "++dataset.validation_size=4", "++wandb.name=auto",
                        "++model.lr_scheduler_type=constant", "++model.warmup=0", "++baseline=lora",
                        "++model.lr_c=2e-4")
    run_dir = Path(results["run_dir"])
    saved = json.loads((run_dir / "results.json").read_text())
    for arm, folder in ((saved, run_dir), (saved["baseline"], run_dir / "baseline")):
        lr = arm["learning_rate"]
        assert lr == arm["lr_suggestion"]["lr"] > 0 and arm["lr_suggestion"]["rule"] == lrmod.DEFAULT_RULE
        assert arm["lr_suggestion"]["n_batches"] == 2 and arm["lr_suggestion"]["c"] == 2e-4  # model.lr_c
        assert lr == pytest.approx(2e-4 * arm["lr_suggestion"]["ratio"], rel=1e-12)
        rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        used = [r["learning_rate"] for r in rows if "learning_rate" in r]
        assert used and all(x == pytest.approx(lr, rel=1e-6) for x in used)  # the Trainer trained at that rate
    assert saved["learning_rate"] != saved["baseline"]["learning_rate"]  # each arm its own (lora_fa vs lora)
    from lorafa.cli import report_lines

    shown = [line for line in report_lines(saved) if line.strip().startswith("learning rate")]
    assert len(shown) == 2 and f"{saved['learning_rate']:.3g} (auto: {lrmod.DEFAULT_RULE}" in shown[0]


def test_runner_schedule_free_adamw_at_the_auto_rate_saves_its_averaged_weights(tmp_path, monkeypatch):
    """++model.optimizer=schedulefree: schedule-free AdamW at anchored's rate with its own default as c, its warm-up
    from model.warmup, a constant Trainer schedule; the adapter saved is the averaged (eval-mode) weights."""
    schedulefree = pytest.importorskip("schedulefree")

    from lorafa import train as trainmod

    made, modes_at_save = [], []
    real_init, real_save = schedulefree.AdamWScheduleFree.__init__, trainmod.save_adapter

    def init(self, *a, **k):
        real_init(self, *a, **k)
        made.append(self)

    def save(*a, **k):
        modes_at_save.append([g["train_mode"] for opt in made for g in opt.param_groups])
        return real_save(*a, **k)

    monkeypatch.setattr(schedulefree.AdamWScheduleFree, "__init__", init)
    monkeypatch.setattr(trainmod, "save_adapter", save)
    results = _tiny_run(tmp_path, "++model.max_steps=4", "++model.optimizer=schedulefree",
                        "++model.lr_scheduler_type=constant", "++model.warmup=0.3", "++dataset.validation_size=0")
    saved = json.loads((Path(results["run_dir"]) / "results.json").read_text())
    ev = saved["lr_suggestion"]
    assert ev["optimizer"] == "schedulefree" and ev["c"] == lrmod.SCHEDULE_FREE_C
    assert saved["learning_rate"] == pytest.approx(lrmod.SCHEDULE_FREE_C * ev["ratio"], rel=1e-12)
    assert len(made) == 1 and made[0].param_groups[0]["warmup_steps"] == 2  # ceil(0.3 × 4), as the Trainer counts
    assert made[0].param_groups[0]["lr"] == pytest.approx(saved["learning_rate"], rel=1e-12)  # constant schedule
    assert made[0].state and modes_at_save == [[False]]  # it trained, and saved the averaged weights


def test_runner_refuses_schedule_free_adamw_under_deepspeed():
    """DeepSpeed steps its own fp32 copy of the weights, which the averaged (eval-mode) weights would never reach:
    the runner refuses the pair before loading anything and says what to launch instead; FSDP and DDP pass."""
    from accelerate.utils import DistributedType
    from test_runner import composed

    from lorafa.runconfig import parse_run_config
    from lorafa.train import _check_backend

    sf = parse_run_config(composed([]))  # the runner's default optimiser
    with pytest.raises(ValueError, match="under DeepSpeed.*fsdp_version: 2.*model.optimizer=adamw"):
        _check_backend(sf, DistributedType.DEEPSPEED)
    for backend in (DistributedType.FSDP, DistributedType.MULTI_CPU, DistributedType.NO):
        _check_backend(sf, backend)
    _check_backend(parse_run_config(composed(["++model.optimizer=adamw"])), DistributedType.DEEPSPEED)


def test_runner_learning_rate_values_are_checked():
    from test_runner import composed

    from lorafa.runconfig import parse_run_config, scheduler_type

    default = parse_run_config(composed([])).model  # schedule-free AdamW at the auto rate, no decaying schedule
    assert (default.learning_rate, default.optimizer, scheduler_type(default)) == ("auto", "schedulefree", "constant")
    assert scheduler_type(parse_run_config(composed(["++model.optimizer=adamw"])).model) == "cosine"
    assert parse_run_config(composed(["++model.learning_rate=auto"])).model.learning_rate == "auto"
    assert parse_run_config(composed(["++model.learning_rate=2e-4"])).model.learning_rate == 2e-4
    assert parse_run_config(composed(["++model.learning_rate=auto", "++model.lr_c=2e-4"])).model.lr_c == 2e-4
    for override, match in (("++model.learning_rate=fast", "positive number or 'auto', got 'fast'"),
                            ("++model.learning_rate=0", "positive number or 'auto', got 0"),
                            ("++model.lr_rule=newton", "lr_rule must be one of"),
                            ("++model.lr_c=-1", "lr_c must be a positive number"),
                            ("++model.lr_c=fast", "must be a number"),
                            ("++model.lr_c=2e-4 ++model.learning_rate=1e-3", "model.learning_rate=0.001 is a number")):
        with pytest.raises(ValueError, match=match):
            parse_run_config(composed(override.split()))
    with pytest.raises(ValueError, match="learning_rate=auto models the first step of plain AdamW, schedule-free AdamW or SGD"):
        parse_run_config(composed(["++model.learning_rate=auto", "++model.optimizer=lora_pro"]))
    with pytest.raises(ValueError, match="lr_rule=range_test has none"):
        parse_run_config(composed(["++model.learning_rate=auto", "++model.lr_c=2", "++model.lr_rule=range_test"]))


def test_initialize_trainer_sets_the_rate_before_the_optimizer(tmp_path):
    from test_integrations import lm_rows, make_trainer, tiny_lm
    from tiny_assets import char_tokenizer

    tok = char_tokenizer()
    trainer = make_trainer(tiny_lm(tok), tok, lm_rows(tok, 12), tmp_path)
    assert trainer.args.learning_rate == 1e-2
    pm = lorafa.initialize_trainer(trainer, lora_cfg(["q_proj", "v_proj"]), {"method": "lora_fa", "bsz": 2,
                                                                                "iters": 2},
                                   progress=False, learning_rate="auto")
    s = lorafa.lr_suggestion(pm)
    assert s is not None and trainer.args.learning_rate == s.lr != 1e-2
    assert s.evidence["eps"] == trainer.args.adam_epsilon and s.evidence["optimizer"] == "adamw"
    trainer.create_optimizer()
    assert all(g["lr"] == s.lr for g in trainer.optimizer.param_groups)
    trainer.train()
    assert trainer.state.global_step == 2

    other = make_trainer(tiny_lm(tok), tok, lm_rows(tok, 12), tmp_path / "b", optim="adafactor")
    with pytest.raises(ValueError, match="schedule-free AdamW or SGD; the trainer's optim is 'adafactor'"):
        lorafa.initialize_trainer(other, lora_cfg(["q_proj"]), {"method": "lora", "bsz": 2, "iters": 2},
                                  learning_rate="auto")
    with pytest.raises(ValueError, match="positive number or 'auto'"):
        lorafa.initialize_trainer(other, lora_cfg(["q_proj"]), {"method": "lora"}, learning_rate="fast")


def test_initialize_trainer_auto_rate_for_schedule_free_adamw(tmp_path):
    """TrainingArguments(optim="schedule_free_adamw") with learning_rate="auto": anchored with schedule-free AdamW's
    own default rate as c, set before transformers builds the optimiser."""
    pytest.importorskip("schedulefree")
    from test_integrations import lm_rows, make_trainer, tiny_lm
    from tiny_assets import char_tokenizer

    tok = char_tokenizer()
    trainer = make_trainer(tiny_lm(tok), tok, lm_rows(tok, 12), tmp_path, optim="schedule_free_adamw",
                           lr_scheduler_type="constant")
    pm = lorafa.initialize_trainer(trainer, lora_cfg(["q_proj", "v_proj"]), {"method": "lora_fa", "bsz": 2,
                                                                                "iters": 2},
                                   progress=False, learning_rate="auto")
    s = lorafa.lr_suggestion(pm)
    assert s.evidence["optimizer"] == "schedulefree" and s.evidence["c"] == lrmod.SCHEDULE_FREE_C
    assert trainer.args.learning_rate == s.lr == pytest.approx(lrmod.SCHEDULE_FREE_C * s.evidence["ratio"])
    trainer.create_optimizer()
    assert type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
                ).__name__ == "AdamWScheduleFree"
    assert all(g["lr"] == s.lr for g in trainer.optimizer.param_groups)


def test_the_fitted_constants_are_the_benchmark_s():
    """POLYAK_C, ANCHORED_C and ADAM_STEP_C are the constants benchmarks/rate.py fitted on default LoRA (classification preset), rounded to 3
    significant digits: a refit that is not carried over (or a hand edit) fails here."""
    import json
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "rate_cls", "fit.json")
    with open(path) as f:
        fit = json.load(f)
    assert fit["fitted_on"] == "lora"
    assert lrmod.ADAM_STEP_C == float(f"{fit['rules']['adam_step']['k']:.3g}")
    assert lrmod.POLYAK_C == float(f"{fit['rules']['polyak']['k']:.3g}")
    assert lrmod.ANCHORED_C == float(f"{fit['rules']['anchored']['k']:.3g}")


def test_one_default_rule_everywhere():
    import inspect

    from lorafa.runconfig import RunConfig

    assert inspect.signature(suggest_lr).parameters["rule"].default == lrmod.DEFAULT_RULE
    assert RunConfig().model.lr_rule == lrmod.DEFAULT_RULE  # the runner's schema repeats it (a literal default)
