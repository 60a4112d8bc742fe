"""LoRA-Pro (SPEC §9): the adjusted gradients against an fp64 brute-force least-squares, least-norm solution, the
errors, the optimisers on a tiny PEFT model, and the runner's model.optimizer=lora_pro."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lorafa.lora_pro import lora_pro_gradients
from lorafa.optim import create_lora_pro_optimizer

F64 = torch.float64
S = 1.7  # the LoRA scaling


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: threads only add contention on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def problem(m=7, n=9, r=3, seed=0, zero_b=False):
    g = torch.Generator().manual_seed(seed)
    A, B, G = (torch.randn(*shape, generator=g, dtype=F64) for shape in ((r, n), (m, r), (m, n)))
    if zero_b:
        B.zero_()
    return A, B, G, S * B.T @ G, S * G @ A.T


def brute_force(A, B, G, s=S):
    """The least-norm minimiser of ‖s(B·X + Y·A) − G‖ over (X, Y), from the explicit (mn) × (rn + mr) matrix."""
    (r, n), m = A.shape, B.shape[0]
    M = s * torch.cat([kron(B, torch.eye(n, dtype=F64)), kron(torch.eye(m, dtype=F64), A.T)], 1)  # row-major vec
    sol = torch.linalg.pinv(M) @ G.reshape(-1)
    return sol[: r * n].reshape(r, n), sol[r * n:].reshape(m, r)


def kron(a, b):
    return (a[:, None, :, None] * b[None, :, None, :]).reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])


def image(A, B, tA, tB, s=S):
    return s * (B @ tA + tB @ A)


@pytest.mark.parametrize("shape", [(7, 9, 3), (12, 5, 4), (6, 6, 1)])
def test_image_is_the_orthogonal_projection_and_the_pair_has_least_norm(shape):
    A, B, G, gA, gB = problem(*shape)
    tA, tB = lora_pro_gradients(A, B, gA, gB, S, damping=0.0)
    rA, rB = brute_force(A, B, G)
    assert torch.allclose(tA, rA, atol=1e-10) and torch.allclose(tB, rB, atol=1e-10)  # measured: ≤ 3e-14
    resid = G - image(A, B, tA, tB)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):  # the residual is orthogonal to the tangent space {B·X + Y·A}
        X, Y = torch.randn(shape[2], shape[1], generator=gen, dtype=F64), torch.randn(shape[0], shape[2], generator=gen,
                                                                                   dtype=F64)
        assert abs(float((resid * (B @ X)).sum())) < 1e-10 and abs(float((resid * (Y @ A)).sum())) < 1e-10
    Z = torch.randn(shape[2], shape[2], generator=gen, dtype=F64)  # the null space: (Z·A, −B·Z) has image 0
    other = (tA + 1e-3 * Z @ A, tB - 1e-3 * B @ Z)
    assert torch.allclose(image(A, B, *other), image(A, B, tA, tB), atol=1e-12)
    assert other[0].norm() ** 2 + other[1].norm() ** 2 > tA.norm() ** 2 + tB.norm() ** 2


def test_fp32_and_bf16_inputs_with_default_damping():
    A, B, G, gA, gB = problem(14, 18, 5, seed=1)
    rA, rB = brute_force(A, B, G)
    tA, tB = lora_pro_gradients(A.float(), B.float(), gA.float(), gB.float(), S)
    assert tA.dtype == tB.dtype == torch.float32
    assert (tA.double() - rA).norm() / rA.norm() < 1e-4 and (tB.double() - rB).norm() / rB.norm() < 1e-4  # ~2e-6
    hA, hB = lora_pro_gradients(A.bfloat16(), B.bfloat16(), gA.bfloat16(), gB.bfloat16(), S)
    assert hA.dtype == hB.dtype == torch.bfloat16 and torch.isfinite(hA).all() and torch.isfinite(hB).all()


def test_zero_b_projects_onto_y_a():
    A, B, G, gA, gB = problem(zero_b=True)
    assert not gA.any()
    tA, tB = lora_pro_gradients(A, B, gA, gB, S, damping=0.0)
    assert not tA.any()
    torch.testing.assert_close(tB, gB @ torch.linalg.inv(A @ A.T) / S**2, atol=1e-12, rtol=0)
    rA, rB = brute_force(A, B, G)
    assert rA.abs().max() < 1e-12 and torch.allclose(tB, rB, atol=1e-10)
    tA, tB = lora_pro_gradients(A, B, gA, gB, S)  # the default damping works too
    assert not tA.any() and torch.allclose(tB, rB, atol=1e-4)


def test_errors():
    A, B, G, gA, gB = problem()
    dup_b = B.clone()
    dup_b[:, 1] = dup_b[:, 0]
    with pytest.raises(ValueError, match="B .* linearly dependent columns.*raise damping"):
        lora_pro_gradients(A, dup_b, S * dup_b.T @ G, gB, S, damping=0.0)
    assert torch.isfinite(lora_pro_gradients(A, dup_b, S * dup_b.T @ G, gB, S)[0]).all()  # damped: regularised
    dup_a = A.clone()
    dup_a[2] = dup_a[0]
    with pytest.raises(ValueError, match="A .* linearly dependent rows"):
        lora_pro_gradients(dup_a, B, gA, S * G @ dup_a.T, S, damping=0.0)
    with pytest.raises(ValueError, match="linearly dependent rows"):  # no damping rescues A = 0
        lora_pro_gradients(torch.zeros_like(A), B, gA, gB, S)
    with pytest.raises(ValueError, match="do not match"):
        lora_pro_gradients(A, B, gA[:, :-1], gB, S)
    with pytest.raises(ValueError, match="r × n"):
        lora_pro_gradients(A, B[:, :-1], gA, gB[:, :-1], S)
    bad = gB.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        lora_pro_gradients(A, B, gA, bad, S)
    with pytest.raises(ValueError, match="grad_A is not s·Bᵀg"):
        lora_pro_gradients(A, torch.zeros_like(B), gA, gB, S)
    with pytest.raises(ValueError, match="scaling"):
        lora_pro_gradients(A, B, gA, gB, 0.0)
    with pytest.raises(ValueError, match="damping"):
        lora_pro_gradients(A, B, gA, gB, S, damping=-1.0)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.head = torch.nn.Linear(8, 12), torch.nn.Linear(12, 10), torch.nn.Linear(10, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def tiny_peft(dtype=torch.float32, nonzero_b=True, **kw):
    torch.manual_seed(0)
    pm = get_peft_model(Tiny().to(dtype), LoraConfig(r=2, lora_alpha=4, target_modules=["l1", "l2"],
                                                     modules_to_save=["head"], **kw))
    if nonzero_b:  # lorafa's inits write nonzero B
        with torch.no_grad():
            for name in ("l1", "l2"):
                getattr(pm.base_model.model, name).lora_B["default"].weight.normal_(0, 0.3)
    return pm


def data(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=g).to(dtype), torch.randint(0, 3, (32,), generator=g)


def loss_of(pm, x, y):
    return torch.nn.functional.cross_entropy(pm(x), y)


def factors(pm):
    layers = [getattr(pm.base_model.model, n) for n in ("l1", "l2")]
    return [(layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"])
            for layer in layers]


def snapshot(pm):
    return {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("moments,nonzero_b", [("factor", True), ("factor", False), ("full", True), ("full", False)])
def test_optimiser_trains_factors_and_the_plain_head(moments, nonzero_b):
    pm = tiny_peft(nonzero_b=nonzero_b)
    opt = create_lora_pro_optimizer(pm, lr=1e-2, moments=moments, weight_decay=0.0)
    assert [g["lora_pro"] for g in opt.param_groups] == [True, False]
    plain = {id(q) for q in opt.param_groups[1]["params"]}
    assert all("modules_to_save" in n for n, p in pm.named_parameters() if id(p) in plain)
    before, (x, y) = snapshot(pm), data()
    losses = []
    for _ in range(3):  # from B = 0 the first step moves only B (g̃_A = 0)
        opt.zero_grad()
        loss = loss_of(pm, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = snapshot(pm)
    assert all(not torch.equal(before[n], after[n]) for n in before)  # every A, B and the head moved
    assert losses[-1] < losses[0]
    if moments == "full":  # m × n moments live in the state of B; the plain head keeps its own
        for A, B, _ in factors(pm):
            assert opt.state[B]["exp_avg"].shape == (B.shape[0], A.shape[1]) and A not in opt.state
        fresh = tiny_peft(nonzero_b=nonzero_b)
        again = create_lora_pro_optimizer(fresh, lr=1e-2, moments="full", weight_decay=0.0)
        again.load_state_dict(opt.state_dict())  # a checkpoint's optimiser state round-trips
        assert torch.equal(again.state[factors(fresh)[0][1]]["exp_avg"], opt.state[factors(pm)[0][1]]["exp_avg"])


@pytest.mark.parametrize("nonzero_b", [True, False])
def test_sgd_step_is_minus_lr_times_the_projection(nonzero_b):
    """One SGD step at rate η moves each W_eff = W + s·B·A by −η·(projection of its full gradient g) + O(η²), and
    the loss by −η·(Σ⟨g, projection⟩ + ‖the head's gradient‖²) + O(η²)."""
    eta = 1e-5
    pm = tiny_peft(F64, nonzero_b=nonzero_b)
    opt = create_lora_pro_optimizer(pm, torch.optim.SGD, lr=eta, damping=0.0)
    x, y = data(F64)
    base = [getattr(pm.base_model.model, n).base_layer.weight for n in ("l1", "l2")]
    head = list(opt.param_groups[1]["params"])  # the classifier head: a plain SGD step
    for w in base:
        w.requires_grad_(True)
    full = torch.autograd.grad(loss_of(pm, x, y), base + head)  # g: the gradient of each W_eff, then the head's
    for w in base:
        w.requires_grad_(False)
    predicted = sum(float((g * g).sum()) for g in full[2:])
    start = [(A.detach().clone(), B.detach().clone(), s) for A, B, s in factors(pm)]
    loss = loss_of(pm, x, y)
    loss.backward()
    opt.step()
    for (A0, B0, s), (A1, B1, _), g in zip(start, factors(pm), full):
        rA, rB = brute_force(A0, B0, g, s)
        proj = image(A0, B0, rA, rB, s)  # the fp64 least-squares projection of g onto {B·X + Y·A}
        moved = s * (B1.detach() @ A1.detach() - B0 @ A0) / -eta
        assert (moved - proj).norm() / proj.norm() < 1e-3
        predicted += float((g * proj).sum())
    with torch.no_grad():
        decrease = (float(loss) - float(loss_of(pm, x, y))) / eta
    assert decrease == pytest.approx(predicted, rel=1e-3)


def test_factor_mode_hands_the_adjusted_gradients_to_the_optimiser():
    pm = tiny_peft()
    opt = create_lora_pro_optimizer(pm, torch.optim.SGD, lr=0.1)
    x, y = data()
    loss_of(pm, x, y).backward()
    expected = [(A - 0.1 * tA, B - 0.1 * tB) for (A, B, s) in factors(pm)
                for tA, tB in [lora_pro_gradients(A, B, A.grad, B.grad, s)]]
    opt.step()
    for (A, B, _), (eA, eB) in zip(factors(pm), expected):
        torch.testing.assert_close(A.detach(), eA)
        torch.testing.assert_close(B.detach(), eB)


def test_full_moments_first_step_is_the_projected_adam_step():
    """Step 1 of the paper's AdamW: Adam's direction u = g̃ / (|g̃| + ε) of the equivalent gradient g̃, treated as a
    full gradient and projected back onto the factors."""
    pm = tiny_peft()
    opt = create_lora_pro_optimizer(pm, lr=0.01, moments="full", weight_decay=0.0)
    x, y = data()
    loss_of(pm, x, y).backward()
    expected = []
    for A, B, s in factors(pm):
        tA, tB = lora_pro_gradients(A, B, A.grad, B.grad, s)
        equivalent = s * (B.detach() @ tA + tB @ A.detach())
        u = equivalent / (equivalent.abs() + 1e-8)
        uA, uB = lora_pro_gradients(A, B, s * B.detach().T @ u, s * u @ A.detach().T, s)
        expected.append((A.detach() - 0.01 * uA, B.detach() - 0.01 * uB))
    opt.step()
    for (A, B, _), (eA, eB) in zip(factors(pm), expected):
        torch.testing.assert_close(A.detach(), eA)
        torch.testing.assert_close(B.detach(), eB)


def test_optimiser_refusals():
    pm = tiny_peft()
    with pytest.raises(ValueError, match="torch.optim.AdamW"):
        create_lora_pro_optimizer(pm, torch.optim.SGD, lr=1e-2, moments="full")
    with pytest.raises(ValueError, match="moments"):
        create_lora_pro_optimizer(pm, lr=1e-2, moments="half")
    with pytest.raises(ValueError, match="lora_B.default.bias .* not an A/B factor"):
        create_lora_pro_optimizer(tiny_peft(lora_bias=True), lr=1e-2)
    with pytest.raises(ValueError, match="variant"):
        create_lora_pro_optimizer(tiny_peft(use_dora=True), lr=1e-2)
    x, y = data()
    for moments in ("factor", "full"):  # a non-LoRA parameter handed over as LoRA
        opt = create_lora_pro_optimizer(pm, lr=1e-2, moments=moments)
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "lora_pro": True})
        loss_of(pm, x, y).backward()
        with pytest.raises(ValueError, match="not LoRA factors"):
            opt.step()
        pm.zero_grad()
    opt = create_lora_pro_optimizer(pm, lr=1e-2)
    extra = torch.nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [extra]})  # a plain group (e.g. the runner's learned projection) trains plainly
    extra.grad = torch.ones(3)
    loss_of(pm, x, y).backward()
    opt.step()
    assert extra.detach().lt(1).all()
    opt.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="No LoRA factor has a gradient"):
        opt.step()


def composed(overrides):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lorafa.runconfig import parse_run_config

    conf = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "src" / "lorafa" / "conf")
    with initialize_config_dir(config_dir=conf, version_base=None):
        return parse_run_config(OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True))


def test_runner_option():
    from lorafa.train import _optimizer

    pm = tiny_peft()
    opt = _optimizer(composed(["++model.optimizer=lora_pro", "++model.learning_rate=0.01",
                               "++model.weight_decay=0.1"]), pm)
    assert isinstance(opt, torch.optim.AdamW) and hasattr(opt, "lora_pro")
    assert [(g["lr"], g["weight_decay"], g["lora_pro"]) for g in opt.param_groups] == [(0.01, 0.1, True),
                                                                                        (0.01, 0.1, False)]
    full = _optimizer(composed(["++model.optimizer=lora_pro", "++model.learning_rate=0.01",
                                "++model.lora_pro_moments=full"]), pm)
    assert type(full).__name__ == "LoraProAdamW"
    for extra in (["++model.prec_reg=0.01"], ["++peft.use_loraplus=true"]):
        with pytest.raises(ValueError, match="cannot be combined"):
            _optimizer(composed(["++model.optimizer=lora_pro", "++model.learning_rate=0.01", *extra]), pm)
    with pytest.raises(ValueError, match="model.optimizer=lora_pro"):
        _optimizer(composed(["++model.lora_pro_moments=full"]), pm)


def test_benchmark_flag():
    import os
    import sys
    from types import SimpleNamespace

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import convergence

    assert convergence.parse_spec("lora_fa+lora_pro") == ("lora_fa", "lora_pro", {})
    p = convergence.PRESETS["causal"]
    convergence.check_spec("lora_fa+lora_pro", p)
    convergence.check_spec("lora+lora_pro", p)
    with pytest.raises(ValueError, match="full fine-tuning has none"):
        convergence.check_spec("full+lora_pro", p)
    opt = convergence.optimizer(tiny_peft(), 1e-3, "lora_pro", SimpleNamespace())
    assert isinstance(opt, torch.optim.AdamW) and hasattr(opt, "lora_pro") and opt.param_groups[0]["lora_pro"]
