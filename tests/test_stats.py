"""The statistics pass (SPEC §1) against independent autograd computations, plus its errors, cache and sampling."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import VOCAB, make_batches, tiny_gpt2, tiny_llama
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorafa
from lorafa.stats import sample_indices, shard_batches, stat_batches

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
LLAMA_BUILDERS = {"llama": (tiny_llama, LLAMA_TARGETS), "gpt2": (tiny_gpt2, GPT2_TARGETS)}


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal up to fp32 round-off, relative to the size of the expected tensor."""
    assert actual is not None
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    assert scale > 0, "degenerate reference"
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=1e-6 * scale)


def _target_names(model: nn.Module, leaves: list[str]) -> list[str]:
    return [n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in leaves]


def reference_stats(model: nn.Module, batches: list[dict], names: list[str], loss_fn=None) -> dict[str, dict]:
    """Independent SPEC §1 statistics: autograd.grad of each batch's loss w.r.t. the weights and the layer outputs."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    mods = {n: model.get_submodule(n) for n in names}
    captured: dict[str, list] = {}
    handles = [
        mod.register_forward_hook(lambda m, args, out, n=n: captured.setdefault(n, []).append((args[0], out)))
        for n, mod in mods.items()
    ]
    acc = {n: {"grad": 0.0, "xx": 0.0, "jj": 0.0, "jx": 0.0, "tokens": 0} for n in names}
    try:
        for batch in batches:
            captured.clear()
            loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
            weights = [mods[n].weight for n in names]
            outs = [captured[n][0][1] for n in names]
            assert all(len(captured[n]) == 1 for n in names)
            grads = torch.autograd.grad(loss, weights + outs)
            mask = batch["attention_mask"].bool()
            for i, n in enumerate(names):
                g = grads[i].t() if isinstance(mods[n], Conv1D) else grads[i]
                x = captured[n][0][0].detach()[mask].double()
                j = grads[len(names) + i][mask].double()
                a = acc[n]
                a["grad"] = a["grad"] + g.double()
                a["xx"] = a["xx"] + x.T @ x
                a["jj"] = a["jj"] + j.T @ j
                a["jx"] = a["jx"] + j.T @ x
                a["tokens"] += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, a in acc.items():
        N = a["tokens"]
        out[n] = {"grad": a["grad"] / len(batches), "in_cov": a["xx"] / N, "out_cov": a["jj"] / N,
                  "cross": a["jx"] / N, "n_tokens": N}
    return out


# ---------------------------------------------------------------------------------------------------------------
# grad and kfac against autograd
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_grad_matches_autograd(arch):
    build, leaves = LLAMA_BUILDERS[arch]
    batches = make_batches(3)
    model = build()
    stats = lorafa.collect_stats(model, batches, leaves, kinds=("grad",), progress=False)
    ref = reference_stats(build(), batches, _target_names(model, leaves))
    assert set(stats) == set(ref)
    for name, st in stats.items():
        mod = model.get_submodule(name)
        m, n = (mod.weight.shape[1], mod.weight.shape[0]) if isinstance(mod, Conv1D) else tuple(mod.weight.shape)
        assert st.grad.shape == (m, n)  # out x in, also for Conv1D
        close(st.grad, ref[name]["grad"])
        assert st.n_batches == 3
        assert st.in_cov is None and st.out_cov is None
        assert st.kinds() == {"grad"}
    if arch == "gpt2":  # Conv1D: our orientation is the transpose of its weight
        attn = model.transformer.h[0].attn.c_attn
        assert attn.weight.shape == (32, 96)
        assert stats["transformer.h.0.attn.c_attn"].grad.shape == (96, 32)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kfac_matches_independent_computation(arch):
    build, leaves = LLAMA_BUILDERS[arch]
    batches = make_batches(3)
    assert any((b["attention_mask"] == 0).any() for b in batches), "fixture should have padding"
    model = build()
    stats = lorafa.collect_stats(model, batches, leaves, kinds=("kfac",), progress=False)
    names = _target_names(model, leaves)
    ref = reference_stats(build(), batches, names)
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    for name in names:
        st, r = stats[name], ref[name]
        assert st.n_tokens == r["n_tokens"] == n_tokens
        assert st.n_batches == 3
        close(st.grad, r["grad"])
        close(st.in_cov, r["in_cov"])
        close(st.out_cov, r["out_cov"])
        close(st.cross, r["cross"])
        assert st.kinds() == {"grad", "act", "kfac"}
        # covariances are symmetric PSD
        torch.testing.assert_close(st.in_cov, st.in_cov.T)
        torch.testing.assert_close(st.out_cov, st.out_cov.T)


def test_kfac_shares_input_covariance_between_modules_reading_one_input(llama, batches):
    stats = lorafa.collect_stats(llama, batches, LLAMA_TARGETS, kinds="kfac", progress=False)
    for i in range(2):
        p = f"model.layers.{i}."
        q, k, v, o = (stats[p + f"self_attn.{x}_proj"] for x in "qkvo")
        gate, up, down = (stats[p + f"mlp.{x}_proj"] for x in ("gate", "up", "down"))
        assert k.in_cov is q.in_cov and v.in_cov is q.in_cov
        assert up.in_cov is gate.in_cov
        assert o.in_cov is not q.in_cov and down.in_cov is not gate.in_cov and gate.in_cov is not q.in_cov
        assert k.out_cov is not q.out_cov
    # layers of different blocks never share
    assert stats["model.layers.0.self_attn.q_proj"].in_cov is not stats["model.layers.1.self_attn.q_proj"].in_cov


def test_n_tokens_counts_mask_positions_without_attention_mask(llama):
    batches = [{k: v for k, v in b.items() if k != "attention_mask"} for b in make_batches(2)]
    stats = lorafa.collect_stats(llama, batches, ["q_proj"], kinds=("act",), progress=False)
    assert all(st.n_tokens == 2 * 4 * 12 for st in stats.values())


# ---------------------------------------------------------------------------------------------------------------
# act kind
# ---------------------------------------------------------------------------------------------------------------

def test_act_is_forward_only(batches):
    model = tiny_llama()
    grad_enabled = []
    h = model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda m, a, o: grad_enabled.append((torch.is_grad_enabled(), o.requires_grad)))
    try:
        stats = lorafa.collect_stats(model, batches, LLAMA_TARGETS, kinds="act", progress=False)
    finally:
        h.remove()
    assert grad_enabled == [(False, False)] * len(batches)
    assert all(p.grad is None for p in model.parameters())
    ref = reference_stats(tiny_llama(), batches, _target_names(model, LLAMA_TARGETS))
    for name, st in stats.items():
        assert st.grad is None and st.out_cov is None and st.cross is None
        assert st.kinds() == {"act"}
        close(st.in_cov, ref[name]["in_cov"])
        assert st.n_tokens == ref[name]["n_tokens"]
        assert st.n_batches == len(batches)


def test_act_with_loss_fn_and_no_labels(batches):
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    calls = []

    def fwd(model, batch):
        calls.append(1)
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    a = lorafa.collect_stats(tiny_llama(), no_labels, ["v_proj"], kinds="act", progress=False)
    b = lorafa.collect_stats(tiny_llama(), no_labels, ["v_proj"], kinds="act", loss_fn=fwd, progress=False)
    assert len(calls) == len(batches)
    for n in a:
        torch.testing.assert_close(a[n].in_cov, b[n].in_cov, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# the model is left as it was
# ---------------------------------------------------------------------------------------------------------------

def _hook_counts(model):
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for n, m in model.named_modules()}


@pytest.mark.parametrize("kinds", ["grad", "kfac", "act"])
def test_model_state_restored(kinds, batches):
    model = tiny_llama()
    model.train()
    q = model.model.layers[0].self_attn.q_proj.weight
    model.model.embed_tokens.weight.requires_grad_(False)
    q.requires_grad_(False)  # a frozen target still gets statistics and stays frozen
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    old_grad = torch.full_like(q, 0.25)
    q.grad = old_grad
    up = model.model.layers[1].mlp.up_proj.weight
    up_old = torch.randn_like(up)
    up.grad = up_old
    up_old_value = up_old.clone()
    seen = []
    user_hook = model.model.layers[0].mlp.register_forward_hook(lambda *a: seen.append(1))
    hooks_before = _hook_counts(model)
    post_before = {n: len(p._post_accumulate_grad_hooks or {}) for n, p in model.named_parameters()}

    stats = lorafa.collect_stats(model, batches, LLAMA_TARGETS, kinds=kinds, progress=False)

    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert q.grad is old_grad and torch.equal(old_grad, torch.full_like(q, 0.25))
    assert up.grad is up_old and torch.equal(up_old, up_old_value)
    assert all(p.grad is None for n, p in model.named_parameters() if "q_proj" not in n and "up_proj" not in n)
    assert _hook_counts(model) == hooks_before
    assert {n: len(p._post_accumulate_grad_hooks or {}) for n, p in model.named_parameters()} == post_before
    assert len(seen) == len(batches)
    user_hook.remove()
    assert all(not m._forward_hooks for m in model.modules())

    # the collected statistics do not depend on the pre-existing grads / training mode
    ref = lorafa.collect_stats(tiny_llama(), batches, LLAMA_TARGETS, kinds=kinds, progress=False)
    for n in ref:
        for k, t in ref[n].tensors().items():
            torch.testing.assert_close(stats[n].tensors()[k], t, rtol=0, atol=0)

    # a later ordinary backward fills .grad as usual (no hooks left that steal it)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    model(**batches[0]).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    fresh = tiny_llama()
    fresh_q = fresh.model.layers[0].self_attn.q_proj.weight
    (expected,) = torch.autograd.grad(fresh(**batches[0]).loss, fresh_q)
    torch.testing.assert_close(q.grad, expected)


def test_model_state_restored_after_error(batches):
    model = tiny_llama()
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks_before = _hook_counts(model)

    def nan_loss(m, b):
        return m(**b).loss * float("nan")

    with pytest.raises(ValueError, match="Non-finite loss"):
        lorafa.collect_stats(model, batches, LLAMA_TARGETS, kinds="kfac", loss_fn=nan_loss, progress=False)
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert _hook_counts(model) == hooks_before
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_train_mode_default_off_makes_pass_deterministic(batches):
    """GPT-2 has dropout: a model in train mode must give the eval-mode statistics (train_mode=False default)."""
    model = tiny_gpt2().train()
    a = lorafa.collect_stats(model, batches, GPT2_TARGETS, kinds="kfac", progress=False)
    assert model.training
    b = lorafa.collect_stats(tiny_gpt2(), batches, GPT2_TARGETS, kinds="kfac", progress=False)
    for n in a:
        for k, t in a[n].tensors().items():
            torch.testing.assert_close(t, b[n].tensors()[k], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------------------------

def test_custom_loss_fn(batches):
    def loss_fn(model, batch):  # no labels used: a different objective
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return (logits[..., :5].pow(2) * batch["attention_mask"][..., None]).mean()

    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    model = tiny_llama()
    stats = lorafa.collect_stats(model, no_labels, ["o_proj", "down_proj"], kinds="kfac", loss_fn=loss_fn, progress=False)
    names = _target_names(model, ["o_proj", "down_proj"])
    ref = reference_stats(tiny_llama(), batches, names, loss_fn=loss_fn)
    for n in names:
        close(stats[n].grad, ref[n]["grad"])
        close(stats[n].out_cov, ref[n]["out_cov"])
        close(stats[n].cross, ref[n]["cross"])
    default = lorafa.collect_stats(tiny_llama(), batches, ["o_proj"], progress=False)
    assert not torch.allclose(default[names[0]].grad, stats[names[0]].grad)


def test_max_batches(batches):
    limited = lorafa.collect_stats(tiny_llama(), batches, ["q_proj", "down_proj"], kinds="kfac", max_batches=2,
                                   progress=False)
    first_two = lorafa.collect_stats(tiny_llama(), batches[:2], ["q_proj", "down_proj"], kinds="kfac", progress=False)
    for n, st in limited.items():
        assert st.n_batches == 2
        assert st.n_tokens == sum(int(b["attention_mask"].sum()) for b in batches[:2])
        for k, t in st.tensors().items():
            torch.testing.assert_close(t, first_two[n].tensors()[k], rtol=0, atol=0)


def test_max_batches_with_generator(batches):
    consumed = []

    def gen():
        for b in batches:
            consumed.append(1)
            yield b

    stats = lorafa.collect_stats(tiny_llama(), gen(), ["q_proj"], max_batches=1, progress=False)
    assert all(st.n_batches == 1 for st in stats.values())
    assert len(consumed) <= 2


def test_accumulate_on_cpu_same_result(batches):
    a = lorafa.collect_stats(tiny_llama(), batches, LLAMA_TARGETS, kinds="kfac", progress=False)
    b = lorafa.collect_stats(tiny_llama(), batches, LLAMA_TARGETS, kinds="kfac", accumulate_on="cpu", progress=False)
    for n in a:
        assert a[n].n_tokens == b[n].n_tokens and a[n].n_batches == b[n].n_batches
        for k, t in b[n].tensors().items():
            assert t.device.type == "cpu" and t.dtype == torch.float32
            torch.testing.assert_close(t, a[n].tensors()[k], rtol=1e-6, atol=0)


def test_target_modules_as_lora_config_and_regex(batches):
    by_list = lorafa.collect_stats(tiny_llama(), batches, ["q_proj", "v_proj"], progress=False)
    by_config = lorafa.collect_stats(tiny_llama(), batches, LoraConfig(target_modules=["q_proj", "v_proj"]),
                                     progress=False)
    by_regex = lorafa.collect_stats(tiny_llama(), batches, r".*\.(q|v)_proj", progress=False)
    assert list(by_list) == list(by_config) == list(by_regex) == [
        f"model.layers.{i}.self_attn.{x}_proj" for i in range(2) for x in "qv"]
    for n in by_list:
        torch.testing.assert_close(by_list[n].grad, by_regex[n].grad, rtol=0, atol=0)


def test_bf16_model_gives_fp32_stats(batches):
    stats = lorafa.collect_stats(tiny_llama(dtype=torch.bfloat16), batches, ["q_proj", "k_proj"], kinds="kfac",
                                 progress=False)
    ref = lorafa.collect_stats(tiny_llama(), batches, ["q_proj", "k_proj"], kinds="kfac", progress=False)
    for n, st in stats.items():
        assert all(t.dtype == torch.float32 for t in st.tensors().values())
        rel = (st.in_cov - ref[n].in_cov).norm() / ref[n].in_cov.norm()
        assert rel < 0.05


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------

class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.used = nn.Linear(6, 5)
        self.unused = nn.Linear(6, 5)

    def forward(self, x):
        return self.used(x)


def _toy_loss(model, batch):
    return model(batch["x"]).pow(2).mean()


def test_error_empty_batches(llama):
    with pytest.raises(ValueError, match="no batches"):
        lorafa.collect_stats(llama, [], ["q_proj"], progress=False)


def test_error_no_labels_and_no_loss_fn(llama, batches):
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    with pytest.raises(ValueError, match="returned no loss.*loss_fn"):
        lorafa.collect_stats(llama, no_labels, ["q_proj"], progress=False)


def test_error_nan_loss(llama, batches):
    with pytest.raises(ValueError, match="Non-finite loss"):
        lorafa.collect_stats(llama, batches, ["q_proj"], loss_fn=lambda m, b: m(**b).loss * float("nan"),
                             progress=False)


def test_error_non_dict_batch(llama):
    with pytest.raises(TypeError, match="mapping"):
        lorafa.collect_stats(llama, [torch.zeros(2, 3, dtype=torch.long)], ["q_proj"], progress=False)


def test_a_batch_encoding_is_a_batch(llama, batches):
    from transformers import BatchEncoding

    plain = lorafa.collect_stats(llama, batches[:1], ["q_proj"], progress=False)
    wrapped = lorafa.collect_stats(llama, [BatchEncoding(batches[0])], ["q_proj"], progress=False)
    for name in plain:
        torch.testing.assert_close(wrapped[name].grad, plain[name].grad)


def test_error_unknown_target_lists_close_matches(llama, batches):
    with pytest.raises(ValueError, match=r"'q_prj' \(close: \[.*'q_proj'"):
        lorafa.collect_stats(llama, batches, ["q_prj", "v_proj"], progress=False)


@pytest.mark.parametrize(("build", "target", "kind"), [
    (tiny_llama, "embed_tokens", "Embedding"),
    (tiny_gpt2, "wte", "Embedding"),
    (tiny_gpt2, "ln_1", "LayerNorm"),
])
def test_error_unsupported_layer(build, target, kind, batches):
    with pytest.raises(ValueError, match=f"is a {kind}.*nn.Linear"):
        lorafa.collect_stats(build(), batches, [target], progress=False)


@pytest.mark.parametrize("kinds", ["grad", "kfac"])
def test_error_unused_target(kinds):
    batches = [{"x": torch.randn(3, 6)} for _ in range(2)]
    with pytest.raises(ValueError, match="'unused' received no gradient"):
        lorafa.collect_stats(TwoLinear(), batches, ["used", "unused"], kinds=kinds, loss_fn=_toy_loss, progress=False)
    ok = lorafa.collect_stats(TwoLinear(), batches, ["used"], kinds=kinds, loss_fn=_toy_loss, progress=False)
    m = TwoLinear()
    expected = sum(torch.autograd.grad(_toy_loss(m, b), m.used.weight)[0] for b in batches) / 2
    close(ok["used"].grad, expected)
    if kinds == "kfac":
        x = torch.cat([b["x"] for b in batches])
        close(ok["used"].in_cov, x.T @ x / 6)
        assert ok["used"].n_tokens == 6


@pytest.mark.parametrize("kinds", [("fisher",), "gradient", ()])
def test_error_unknown_kind(llama, batches, kinds):
    with pytest.raises(ValueError, match="Unknown statistics kinds"):
        lorafa.collect_stats(llama, batches, ["q_proj"], kinds=kinds, progress=False)


def test_error_peft_model(batches):
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="PeftModel"):
        lorafa.collect_stats(peft_model, batches, ["q_proj"], progress=False)


def test_error_empty_target_list(llama, batches):
    with pytest.raises(ValueError, match="target_modules"):
        lorafa.collect_stats(llama, batches, [], progress=False)


# ---------------------------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------------------------

CONFIG = {"method": "lora_fa", "bsz": 4, "iters": 3, "model": "tiny-llama", "targets": LLAMA_TARGETS}


@pytest.fixture(scope="module")
def kfac_stats():
    return lorafa.collect_stats(tiny_llama(), make_batches(3), LLAMA_TARGETS, kinds="kfac", progress=False)


def test_cache_round_trip(kfac_stats, tmp_path):
    path = tmp_path / "sub" / "stats.safetensors"
    lorafa.save_stats(kfac_stats, path, config=CONFIG)
    assert os.listdir(path.parent) == ["stats.safetensors"]
    loaded = lorafa.load_stats(path)
    assert list(loaded) == list(kfac_stats)
    for n, st in kfac_stats.items():
        ld = loaded[n]
        assert ld.n_tokens == st.n_tokens and ld.n_batches == st.n_batches
        assert set(ld.tensors()) == set(st.tensors()) == {"grad", "in_cov", "out_cov"}
        for k, t in st.tensors().items():
            assert ld.tensors()[k].dtype == torch.float32
            assert torch.equal(ld.tensors()[k], t)
        assert torch.equal(ld.cross, st.cross)
    for i in range(2):
        p = f"model.layers.{i}."
        assert loaded[p + "self_attn.k_proj"].in_cov is loaded[p + "self_attn.q_proj"].in_cov
        assert loaded[p + "self_attn.v_proj"].in_cov is loaded[p + "self_attn.q_proj"].in_cov
        assert loaded[p + "mlp.up_proj"].in_cov is loaded[p + "mlp.gate_proj"].in_cov
        assert loaded[p + "mlp.down_proj"].in_cov is not loaded[p + "mlp.gate_proj"].in_cov
    assert lorafa.read_stats_config(path) == CONFIG
    assert lorafa.load_stats(path, expected_config=dict(CONFIG)) is not None


def test_cache_is_safetensors_with_shared_cov_stored_once(kfac_stats, tmp_path):
    path = tmp_path / "stats.safetensors"
    lorafa.save_stats(kfac_stats, str(path), config=CONFIG)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert meta["format"] == "lorafa.stats.v1"
    assert "model.layers.0.self_attn.q_proj::in_cov" in keys
    assert "model.layers.0.self_attn.k_proj::in_cov" not in keys
    assert "model.layers.0.mlp.up_proj::in_cov" not in keys
    assert "model.layers.0.mlp.down_proj::in_cov" in keys
    assert sum(k.endswith("::in_cov") for k in keys) == 2 * 4  # q, o, gate, down per layer
    assert len([k for k in keys if k.endswith("::grad")]) == 14


def test_cache_config_mismatch(kfac_stats, tmp_path):
    path = tmp_path / "stats.safetensors"
    lorafa.save_stats(kfac_stats, path, config=CONFIG)
    with pytest.raises(ValueError, match="different config"):
        lorafa.load_stats(path, expected_config={**CONFIG, "iters": 4})
    with pytest.raises(ValueError, match="different config"):
        lorafa.load_stats(path, expected_config={})


def test_cache_without_config(tmp_path):
    stats = lorafa.collect_stats(tiny_llama(), make_batches(1), ["q_proj"], kinds="act", progress=False)
    path = tmp_path / "s.safetensors"
    lorafa.save_stats(stats, path)
    assert lorafa.read_stats_config(path) == {}
    loaded = lorafa.load_stats(path)
    for n, st in stats.items():
        assert loaded[n].grad is None and loaded[n].out_cov is None
        assert torch.equal(loaded[n].in_cov, st.in_cov)


def test_cache_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="collect_stats"):
        lorafa.load_stats(tmp_path / "nope.safetensors")


def test_cache_rejects_foreign_safetensors(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a lorafa statistics file"):
        lorafa.load_stats(path)
    with pytest.raises(ValueError, match="not a lorafa statistics file"):
        lorafa.read_stats_config(path)


def test_cache_damaged_file_is_named(kfac_stats, tmp_path):
    """A truncated cache (an interrupted copy) is refused with its path and what to do, by both readers."""
    full = tmp_path / "full.safetensors"
    lorafa.save_stats(kfac_stats, full, config=CONFIG)
    for size in (5, 200, len(full.read_bytes()) // 2):
        path = tmp_path / f"cut{size}.safetensors"
        path.write_bytes(full.read_bytes()[:size])
        for read in (lorafa.load_stats, lorafa.read_stats_config):
            with pytest.raises(ValueError, match=f"cut{size}.safetensors cannot be read .* Delete it and recompute"):
                read(path)


def test_cache_save_refuses_before_writing(kfac_stats, tmp_path):
    """Bad arguments are refused before a byte (or a temporary file) is written; the key of a value JSON cannot
    store is named, however deep."""
    path = tmp_path / "stats.safetensors"
    with pytest.raises(TypeError, match=r"config\['a'\]\['b'\]\[1\] is not JSON serializable"):
        lorafa.save_stats(kfac_stats, path, config={"a": {"b": [1, torch.zeros(1)]}})
    with pytest.raises(TypeError, match="is a str, not a LayerStats"):
        lorafa.save_stats({"layer": "x"}, path)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        lorafa.save_stats(kfac_stats, tmp_path)
    assert os.listdir(tmp_path) == []


def test_cache_failed_save_leaves_nothing(kfac_stats, tmp_path, monkeypatch):
    import lorafa.stats.cache as cache

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(cache, "save_file", broken)
    path = tmp_path / "stats.safetensors"
    with pytest.raises(OSError, match="disk full"):
        lorafa.save_stats(kfac_stats, path, config=CONFIG)
    assert os.listdir(tmp_path) == []

    # an existing cache survives a failed overwrite untouched
    monkeypatch.undo()
    lorafa.save_stats(kfac_stats, path, config=CONFIG)
    before = path.read_bytes()
    monkeypatch.setattr(cache, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        lorafa.save_stats(kfac_stats, path, config={"other": 1})
    assert os.listdir(tmp_path) == ["stats.safetensors"]
    assert path.read_bytes() == before


# ---------------------------------------------------------------------------------------------------------------
# sampling and sharding
# ---------------------------------------------------------------------------------------------------------------

def test_sample_indices_seeded():
    a = sample_indices(100, 4, 3, seed=0)
    assert a == sample_indices(100, 4, 3, seed=0)
    assert a == sample_indices(100, 4, 3)  # random by default
    assert a != sample_indices(100, 4, 3, seed=1)
    assert len(a) == 3 and all(len(b) == 4 for b in a)
    flat = [i for b in a for i in b]
    assert len(set(flat)) == 12 and all(0 <= i < 100 for i in flat)
    assert flat != list(range(12))


@pytest.mark.parametrize("sample", ["random", "first"])
def test_sample_indices_skip_gives_other_examples(sample):
    """The line search's split (skip = the statistics pass's batches): the same order continued, so disjoint from the
    statistics sample, which itself does not change."""
    stats = sample_indices(50, 4, 3, sample=sample, seed=2)
    search = sample_indices(50, 4, 2, sample=sample, seed=2, skip=3)
    assert sample_indices(50, 4, 5, sample=sample, seed=2) == stats + search
    assert not {i for b in stats for i in b} & {i for b in search for i in b}


def test_sample_indices_first():
    assert sample_indices(100, 4, 3, sample="first") == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert sample_indices(6, 2, 3, sample="first", seed=5) == [[0, 1], [2, 3], [4, 5]]
    assert sorted(i for b in sample_indices(6, 2, 3, seed=3) for i in b) == list(range(6))


def test_sample_indices_errors():
    with pytest.raises(ValueError, match="needs 12 examples \\(bsz=4 × 3 batches\\), the dataset has 11"):
        sample_indices(11, 4, 3)
    with pytest.raises(ValueError, match="line search's split needs 20 examples"):
        sample_indices(19, 4, 2, skip=3)
    with pytest.raises(ValueError, match="sample must be"):
        sample_indices(100, 4, 3, sample="last")
    with pytest.raises(ValueError, match="bsz must be an integer >= 1, got 0"):
        sample_indices(100, 0, 3)


def test_shard_batches_round_robin():
    batches = [f"b{i}" for i in range(5)]
    assert shard_batches(batches, 0, 2) == ["b0", "b2", "b4"]
    assert shard_batches(batches, 1, 2) == ["b1", "b3"]
    assert shard_batches(batches, 2, 3) == ["b2"]
    assert shard_batches(batches, 0, 1) == batches
    assert shard_batches(batches) == batches  # not distributed: everything
    shards = [shard_batches(batches, r, 4) for r in range(4)]
    assert sorted(b for s in shards for b in s) == sorted(batches)
    dict_batches = make_batches(3)
    assert shard_batches(dict_batches, 1, 2)[0] is dict_batches[1]  # whole batches, not split


def test_stat_batches():
    dataset = [{"v": i} for i in range(20)]
    out = stat_batches(dataset, lambda items: [x["v"] for x in items], bsz=3, iters=2, sample="first")
    assert out == [[0, 1, 2], [3, 4, 5]]
    out = stat_batches(dataset, lambda items: [x["v"] for x in items], bsz=3, iters=2, seed=7)
    assert out == sample_indices(20, 3, 2, seed=7)


def test_vocab_fixture_sanity():
    assert all(int(b["input_ids"].max()) < VOCAB for b in make_batches())


def test_kfac_refuses_gradient_checkpointing_in_train_mode():
    model = tiny_llama()
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        lorafa.collect_stats(model, make_batches(1), ["q_proj"], kinds=("kfac",), train_mode=True, progress=False)
    # eval mode (the default) does not checkpoint, so the statistics equal those of the plain model
    got = lorafa.collect_stats(model, make_batches(1), ["q_proj"], kinds=("kfac",), progress=False)
    ref = lorafa.collect_stats(tiny_llama(), make_batches(1), ["q_proj"], kinds=("kfac",), progress=False)
    for name in ref:
        for kind, t in ref[name].tensors().items():
            torch.testing.assert_close(got[name].tensors()[kind], t)
        assert got[name].n_tokens == ref[name].n_tokens
