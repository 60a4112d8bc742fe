"""The runner with the LoRA variants of SPEC §9: `+init=svd ++init.direction=kasa|goat` trains with the method's
loss term in every step's metrics, and refuses what cannot work before any long work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_runner import _in_process, assets, composed, local  # noqa: F401 (the module-scoped fixture)

from lorafa.runconfig import parse_run_config


def _steps(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "task_loss" in r and "loss" not in r]


@pytest.mark.parametrize("overrides,match", [
    (["+init=svd", "++init.direction=kasa", "++init.kasa_beta=-1"], "kasa_beta"),
    (["+init=svd", "++init.direction=kasa", "++init.offset=subtract"], "offset"),
    (["+init=svd", "++init.direction=pissa", "++init.kasa_beta=0.1"], "does not have"),
    (["+init=svd", "++init.method=kasa", "++init.beta=0.1"], r"init.beta is now init.kasa_beta"),
    (["+init=svd", "++init.method=goat", "++init.rho=5"], r"init.rho is now init.eva_rho .* or init.goat_rho"),
    (["+init=gradient", "++init.direction=kasa"], "not a gradient method"),
])
def test_bad_variant_settings_fail_when_the_config_is_parsed(overrides, match):
    with pytest.raises(ValueError, match=match):
        parse_run_config(composed(overrides))


def _logged_losses(run_dir):
    """The Trainer's training-loss rows (logging_steps=1: one per step), with the terms' means beside the loss."""
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r and "task_loss" in r]


def _per_step(calls, n_steps):
    """The mean of the recorded per-micro-batch values of each step (calls: (0-based step, value))."""
    by_step = {}
    for step, value in calls:
        by_step.setdefault(step, []).append(value)
    assert sorted(by_step) == list(range(n_steps)) and all(len(v) == 2 for v in by_step.values())  # 2 micro-batches
    return [sum(by_step[k]) / len(by_step[k]) for k in range(n_steps)]


TWO_MICRO_BATCHES = ["++model.real_batch_size=8", "++model.per_device_batch_size=4"]


def test_kasa_run_adds_its_regulariser_every_step(assets, tmp_path, monkeypatch):  # noqa: F811
    """The logged KaSA loss of each step is β·Σσ² + γ·(‖BᵀB − I‖_F + ‖AAᵀ − I‖_F) summed over the layers, computed
    here from the factors the model held at that step (the first step's are the saved initial adapter's), and the
    step's training loss is the task loss plus it."""
    from peft.tuners.lora import LoraLayer

    from lorafa import kasa

    beta, gamma, factors = 0.01, 0.02, []
    term_call = kasa.KasaTerm.__call__

    def recording(self, model, batch, outputs, step):
        factors.append((step, {n: (m.lora_A["default"].weight.detach().clone(),
                                   m.lora_B["default"].weight.detach().clone(),
                                   m.lora_diag["default"].detach().clone())
                               for n, m in model.named_modules() if isinstance(m, LoraLayer)}))
        return term_call(self, model, batch, outputs, step)

    monkeypatch.setattr(kasa.KasaTerm, "__call__", recording)
    res = _in_process(["+init=svd", "++init.direction=kasa", f"++init.kasa_beta={beta}", f"++init.kasa_gamma={gamma}",
                       *local(assets, tmp_path / "r", steps=3), *TWO_MICRO_BATCHES, "++wandb.name=kasa",
                       "++eval.enabled=false", "++peft.target_modules=[q_proj,v_proj]", "++peft.lora_r=2"])

    def by_hand(layers):
        total = 0.0
        for A, B, sigma in layers.values():
            eye = torch.eye(A.shape[0], dtype=torch.float64)
            A, B, sigma = A.double(), B.double(), sigma.double()
            total += (beta * (sigma ** 2).sum() + gamma * (torch.linalg.norm(B.T @ B - eye)
                                                          + torch.linalg.norm(A @ A.T - eye))).item()
        return total

    assert len(factors[0][1]) == 4  # q_proj and v_proj of 2 layers
    want = _per_step([(step, by_hand(layers)) for step, layers in factors], 3)
    steps = _steps(res["run_dir"])
    assert [r["step"] for r in steps] == [1, 2, 3] and all(r["kasa_weight"] == 1.0 for r in steps)
    for r, w in zip(steps, want):
        assert r["kasa_loss"] == pytest.approx(w, rel=1e-5)
    assert want[0] != pytest.approx(want[-1], rel=1e-6)  # the factors trained, and the regulariser saw it
    # the first step's factors are the initial adapter the run saved
    saved = load_file(str(Path(res["initial_adapter_dir"]) / "adapter_model.safetensors"))
    for name, (A, B, sigma) in factors[0][1].items():
        key = name.replace(".default", "").split("base_model.model.", 1)[-1]
        stored = {k.split(key + ".", 1)[1]: v for k, v in saved.items() if key + "." in k}
        torch.testing.assert_close(stored["lora_A.weight"], A, rtol=0, atol=0)
        torch.testing.assert_close(stored["lora_B.weight"], B, rtol=0, atol=0)
        torch.testing.assert_close(stored["lora_diag"], sigma, rtol=0, atol=0)
    # the loss trained on: the task loss plus the regulariser (the Trainer rounds its logged loss to 4 digits)
    logged = _logged_losses(res["run_dir"])
    assert len(logged) == 3
    assert all(r["loss"] == pytest.approx(r["task_loss"] + r["kasa_loss"], abs=1e-4) for r in logged)
    meta = json.loads((Path(res["adapter_dir"]) / "lorafa_init.json").read_text())
    assert "truncat" in meta["base_truncated"]


def test_goat_run_adds_the_load_balancing_loss_every_step(assets, tmp_path, monkeypatch):  # noqa: F811
    """The logged GOAT loss of each step is E·Σ_i f_i·P_i summed over the layers (f_i: the share of (token, slot)
    pairs the top-k routing sends to expert i, P_i: the mean router probability), computed here from each layer's
    input and router weights; and the step's loss is the task loss plus aux_loss_weight times it."""
    from lorafa import goat

    E, k, aux_weight = 4, 2, 0.01
    inputs, values = {}, []
    forward, term_call = goat.GoatLinearVariant.forward, goat.GoatAuxTerm.__call__

    def keep_input(module, active_adapter, x, result, **kwargs):
        inputs[module] = x.detach().float().clone()
        return forward(module, active_adapter, x, result, **kwargs)

    def recording(self, model, batch, outputs, step):
        total = 0.0
        for module in goat.goat_layers(model).values():
            x = inputs[module].reshape(-1, module.in_features)
            probs = (x @ module.lora_router["default"].weight.detach().float().T).softmax(-1)
            chosen = probs.topk(k, dim=-1).indices
            f = torch.stack([(chosen == i).sum() for i in range(E)]).float() / x.shape[0]
            total += (E * (f * probs.mean(0)).sum()).item()
        values.append((step, total))
        return term_call(self, model, batch, outputs, step)

    monkeypatch.setattr(goat.GoatLinearVariant, "forward", staticmethod(keep_input))
    monkeypatch.setattr(goat.GoatAuxTerm, "__call__", recording)
    res = _in_process(["+init=svd", "++init.direction=goat", f"++init.num_experts={E}", f"++init.top_k={k}",
                       f"++init.aux_loss_weight={aux_weight}", *local(assets, tmp_path / "r", steps=3),
                       *TWO_MICRO_BATCHES, "++wandb.name=goat", "++eval.enabled=false",
                       "++peft.target_modules=[q_proj,v_proj]", "++peft.lora_r=4"])
    want = _per_step(values, 3)
    steps = _steps(res["run_dir"])
    assert [r["step"] for r in steps] == [1, 2, 3] and all(r["goat_aux_weight"] == aux_weight for r in steps)
    for r, w in zip(steps, want):
        assert r["goat_aux_loss"] == pytest.approx(w, rel=1e-5)
    assert want[0] != pytest.approx(want[-1], rel=1e-6)  # other batches, trained routers: the value moves
    logged = _logged_losses(res["run_dir"])
    assert len(logged) == 3
    assert all(r["loss"] == pytest.approx(r["task_loss"] + aux_weight * r["goat_aux_loss"], abs=1e-4) for r in logged)
    assert (Path(res["adapter_dir"]) / "goat.json").exists()


def test_goat_refuses_a_merged_checkpoint():
    with pytest.raises(ValueError, match="cannot be merged"):
        parse_run_config(composed(["+init=svd", "++init.direction=goat", "++model.saving=true"]))
