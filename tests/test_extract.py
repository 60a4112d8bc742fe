"""method="extract" (SPEC §5 (b)): the rank-r adapter closest to W_tuned − W in the K-FAC metric."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch_logits, lora_cfg, make_batches, tiny_llama

from lorafa import InitConfig, init_factors, initialize, save_adapter
from lorafa.stats import LayerStats


def _sqrt(mat, inverse=False):
    evals, vecs = torch.linalg.eigh(mat)
    p = -0.5 if inverse else 0.5
    return vecs @ torch.diag(evals ** p) @ vecs.T


def _spd(d, g):
    x = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    return x @ x.T / (3 * d) + 0.1 * torch.eye(d, dtype=torch.float64)


@pytest.mark.parametrize("metric", ["kfac", "input"])
@pytest.mark.parametrize("rank", [1, 3, 6])
def test_extract_equals_an_fp64_reference_on_synthetic_statistics(rank, metric):
    g = torch.Generator().manual_seed(0)
    m, n, s = 9, 7, 0.5
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    T = torch.randn(m, n, generator=g, dtype=torch.float64)
    C, Sig = _spd(m, g), _spd(n, g)
    if metric == "input":  # C = I: only the inputs' covariance
        C = torch.eye(m, dtype=torch.float64)
    M = _sqrt(C) @ T @ _sqrt(Sig)
    U, S, Vh = torch.linalg.svd(M)
    want = _sqrt(C, True) @ (U[:, :rank] * S[:rank]) @ Vh[:rank] @ _sqrt(Sig, True)
    stats = LayerStats(grad=torch.zeros(m, n), in_cov=Sig.float(), out_cov=C.float(), n_tokens=10, n_batches=1)
    res = init_factors("extract", W.float(), stats, rank=rank, scaling=s, tuned=(W + T).float(), reg=0.0,
                       reg_mode="absolute", svd="exact", metric=metric)
    torch.testing.assert_close((s * res.B @ res.A).double(), want, rtol=1e-4, atol=1e-5)
    assert not res.subtract and res.A.shape == (rank, n) and res.B.shape == (m, rank)
    # the metric's optimum: any other rank-r candidate (here plain SVD's) is no closer in that metric
    plain = init_factors("extract", W.float(), None, rank=rank, scaling=s, tuned=(W + T).float(), metric="identity")
    err = lambda d: (_sqrt(C) @ (d - T) @ _sqrt(Sig)).norm()  # noqa: E731
    assert err(want) <= err((s * plain.B @ plain.A).double()) + 1e-9


def test_identity_metric_is_the_truncated_svd_of_the_difference():
    g = torch.Generator().manual_seed(1)
    W, T = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    res = init_factors("extract", W, None, rank=2, scaling=2.0, tuned=W + T, metric="identity", svd="exact")
    U, S, Vh = torch.linalg.svd(T.double())
    torch.testing.assert_close((2.0 * res.B @ res.A).double(), (U[:, :2] * S[:2]) @ Vh[:2], rtol=1e-5, atol=1e-6)
    # balanced factors: B and A carry the same singular values
    torch.testing.assert_close(res.B.norm(dim=0), res.A.norm(dim=1), rtol=1e-5, atol=1e-6)


def _tuned_copy(base, targets, seed=3, scale=0.05):
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in tuned.named_modules():
            if name.split(".")[-1] in targets:
                module.weight.add_(scale * torch.randn(module.weight.shape, generator=g))
    return tuned


def test_full_rank_extraction_reproduces_the_fine_tune_and_loads_on_the_original_base(tmp_path):
    from peft import PeftModel

    targets = ["q_proj", "v_proj"]
    base = tiny_llama()
    tuned = _tuned_copy(base, targets)
    batches = make_batches(2)
    want = batch_logits(tuned, batches)
    full = dict(r=32, alpha=32, rank_pattern={"v_proj": 16}, alpha_pattern={"v_proj": 16})  # v_proj is 16 × 32
    peft_model = initialize(tiny_llama(), lora_cfg(targets, **full),
                            InitConfig(method="extract", metric="identity"), tuned=tuned, progress=False)
    torch.testing.assert_close(batch_logits(peft_model, batches), want, rtol=1e-4, atol=1e-4)
    # data-aware metric at full rank: the same (nothing is truncated)
    kfac = initialize(tiny_llama(), lora_cfg(targets, **full),
                      InitConfig(method="extract", metric="kfac", iters=2, bsz=4),
                      batches=batches, tuned=tuned.state_dict(), progress=False)
    torch.testing.assert_close(batch_logits(kfac, batches), want, rtol=1e-3, atol=1e-3)
    path = save_adapter(peft_model, str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(tiny_llama(), path)
    torch.testing.assert_close(batch_logits(loaded, batches), want, rtol=1e-4, atol=1e-4)


def test_extract_bad_input():
    targets = ["q_proj"]
    with pytest.raises(ValueError, match="needs the fine-tuned model"):
        initialize(tiny_llama(), lora_cfg(targets), InitConfig(method="extract", metric="identity"), progress=False)
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="same architecture"):
        initialize(tiny_llama(), lora_cfg(targets), InitConfig(method="extract", metric="identity"), tuned=wide,
                   progress=False)
    with pytest.raises(ValueError, match="same module names"):
        initialize(tiny_llama(), lora_cfg(targets), InitConfig(method="extract", metric="identity"),
                   tuned={"x.weight": torch.zeros(1)}, progress=False)
    with pytest.raises(ValueError, match="does not use it"):
        initialize(tiny_llama(), lora_cfg(targets), InitConfig(method="lora"), tuned=tiny_llama(), progress=False)
    with pytest.raises(ValueError, match="metric"):
        InitConfig(method="extract", metric="euclid")


def test_lorafa_extract_command_writes_an_adapter_and_reports_kl(tmp_path):
    """lorafa-extract on a tiny base and a fine-tune of it: the adapter loads on the base with stock PEFT, and the
    data-aware extraction is closer to the fine-tune (held-out KL) than plain SVD at the same rank on this set-up."""
    import json

    from peft import PeftModel
    from tiny_assets import arithmetic_rows, save_tiny_causal_lm, write_jsonl
    from transformers import AutoModelForCausalLM

    from lorafa.extract_cli import main

    base_dir = save_tiny_causal_lm(str(tmp_path / "base"))
    tuned = AutoModelForCausalLM.from_pretrained(base_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g) @ torch.diag(torch.linspace(0, 1, p.shape[1])))
    tuned.save_pretrained(tmp_path / "tuned")
    import shutil

    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tmp_path / "base" / f).exists():
            shutil.copy(tmp_path / "base" / f, tmp_path / "tuned" / f)
    write_jsonl(str(tmp_path / "gsm" / "train.jsonl"), arithmetic_rows(32, seed=0))
    write_jsonl(str(tmp_path / "gsm" / "test.jsonl"), arithmetic_rows(8, seed=1))
    report = main(["--base", base_dir, "--tuned", str(tmp_path / "tuned"), "--rank", "2", "--out",
                   str(tmp_path / "adapter"), "--dataset", "gsm8k", "--data", str(tmp_path / "gsm"), "--iters", "4",
                   "--heldout", "8", "--max-length", "256"])
    assert report["metric"] == "input"
    assert report["extract_identity"]["kl"] < report["base_model"]["kl"]
    assert report["extract_input"]["kl"] < report["extract_identity"]["kl"]  # the data-aware metric helps here
    saved = json.loads((tmp_path / "adapter" / "extract_report.json").read_text())
    assert saved["extract_input"] == report["extract_input"]
    kfac = main(["--base", base_dir, "--tuned", str(tmp_path / "tuned"), "--rank", "2", "--out",
                 str(tmp_path / "adapter_kfac"), "--dataset", "gsm8k", "--data", str(tmp_path / "gsm"), "--iters",
                 "4", "--heldout", "8", "--max-length", "256", "--metric", "kfac"])
    assert kfac["extract_kfac"]["kl"] < kfac["base_model"]["kl"]
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(tmp_path / "adapter"))
    assert any("lora_A" in n for n, _ in loaded.named_parameters())


def test_sampled_label_loss_draws_from_the_model_at_the_scored_positions():
    from lorafa.stats import sampled_label_loss

    model, batch = tiny_llama(), make_batches(1)[0]
    a, b = sampled_label_loss(seed=3)(model, batch), sampled_label_loss(seed=3)(model, batch)
    assert torch.isfinite(a) and a.item() == pytest.approx(b.item())  # seeded
    # its expectation is the model's entropy at the scored positions: the mean of many draws comes close
    from lorafa.align import causal_lm_mask

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits[causal_lm_mask(batch["labels"])], -1)
        entropy = -(logp.exp() * logp).sum(-1).mean().item()
        fn = sampled_label_loss(seed=0)
        draws = [fn(model, batch).item() for _ in range(200)]
    assert sum(draws) / len(draws) == pytest.approx(entropy, rel=0.02)
    with pytest.raises(ValueError, match="labels"):
        fn(model, {k: v for k, v in batch.items() if k != "labels"})
