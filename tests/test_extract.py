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


def test_initialize_refuses_a_tuned_model_equal_to_the_base_and_names_unchanged_layers(caplog):
    """The library path (not only lorafa-extract): a fine-tune equal to the base on every target gives an all-zero
    adapter (B = A = 0) that cannot train, so initialize refuses it before the model is changed; one equal on some
    targets only is accepted, with those layers named in a warning."""
    targets = ["q_proj", "v_proj"]
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"The fine-tune equals the base on every target layer \(4 of them\).*"
                                         r"Check that tuned= names the fine-tuned model, not the base"):
        initialize(model, lora_cfg(targets), InitConfig(method="extract", metric="identity"), tuned=tiny_llama(),
                   progress=False)
    assert not hasattr(model, "peft_config")  # refused before get_peft_model wrapped it
    with pytest.raises(ValueError, match="equals the base on every target layer"):  # a state dict too
        initialize(tiny_llama(), lora_cfg(targets), InitConfig(method="extract", metric="identity"),
                   tuned=tiny_llama().state_dict(), progress=False)
    tuned = _tuned_copy(tiny_llama(), ["q_proj"])  # v_proj left as it was
    with caplog.at_level("WARNING"):
        peft_model = initialize(tiny_llama(), lora_cfg(targets), InitConfig(method="extract", metric="identity"),
                                tuned=tuned, progress=False)
    assert ("equals the base on 2 of 4 target layers (model.layers.0.self_attn.v_proj, "
            "model.layers.1.self_attn.v_proj): their adapters are zero") in caplog.text
    assert "leave them out of target_modules" in caplog.text
    b = {n: m.lora_B["default"].weight for n, m in peft_model.named_modules() if hasattr(m, "lora_B")}
    assert all((w == 0).all() == n.endswith("v_proj") for n, w in b.items())


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


# --- lorafa-extract: options, memory, and inputs it must refuse (issue 25, item 11) ---

@pytest.fixture(scope="module")
def extract_dirs(tmp_path_factory):
    """A tiny base, a fine-tune of it (every linear layer moved), and a GSM8K-format data folder, saved once."""
    import shutil

    from tiny_assets import arithmetic_rows, save_tiny_causal_lm, write_jsonl
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("extract_cli")
    base_dir = save_tiny_causal_lm(str(root / "base"))
    tuned = AutoModelForCausalLM.from_pretrained(base_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    tuned.save_pretrained(root / "tuned")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (root / "base" / f).exists():
            shutil.copy(root / "base" / f, root / "tuned" / f)
    write_jsonl(str(root / "gsm" / "train.jsonl"), arithmetic_rows(16, seed=0))
    write_jsonl(str(root / "gsm" / "test.jsonl"), arithmetic_rows(4, seed=1))
    return {"base": base_dir, "tuned": str(root / "tuned"), "data": str(root / "gsm")}


def _extract_args(dirs, out, *extra, tuned=None, data=True):
    args = ["--base", dirs["base"], "--tuned", tuned or dirs["tuned"], "--rank", "2", "--out", str(out),
            "--iters", "2", "--bsz", "2", "--max-length", "128"]
    if data:
        args += ["--dataset", "gsm8k", "--data", dirs["data"], "--heldout", "4"]
    return args + list(extra)


@pytest.mark.parametrize("extra, phrase", [
    (["--alpha", "0"], "--alpha"),
    (["--alpha", "-2"], "--alpha"),
    (["--alpha", "nan"], "--alpha"),
    (["--heldout", "-1"], "--heldout"),
    (["--device", "tpu9"], "not a torch device"),
    (["--device", "meta"], "--device meta holds no data"),
    (["--dtype", "fp8"], "argument --dtype: invalid choice"),
])
def test_lorafa_extract_refuses_bad_options_before_loading_anything(extract_dirs, tmp_path, capsys, extra, phrase):
    """--alpha 0 used to become the rank, --heldout -1 "all but the last example"; there was no --device/--dtype."""
    from lorafa.extract_cli import main

    with pytest.raises(SystemExit) as err:
        main(_extract_args(extract_dirs, tmp_path / "out", *extra))
    assert err.value.code == 2 and phrase in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a device this machine lacks")
def test_lorafa_extract_refuses_a_device_this_machine_lacks(extract_dirs, tmp_path, capsys):
    from lorafa.extract_cli import main

    with pytest.raises(SystemExit):
        main(_extract_args(extract_dirs, tmp_path / "out", "--device", "cuda"))
    assert "not usable on this machine" in capsys.readouterr().err


def test_lorafa_extract_alpha_sets_the_scale(extract_dirs, tmp_path):
    """An explicit --alpha reaches the LoraConfig (and the extracted s·B·A is the same: the factors absorb s)."""
    import json

    from lorafa.extract_cli import main

    main(_extract_args(extract_dirs, tmp_path / "a1", "--alpha", "1", data=False))
    main(_extract_args(extract_dirs, tmp_path / "a2", data=False))
    assert json.loads((tmp_path / "a1" / "adapter_config.json").read_text())["lora_alpha"] == 1
    assert json.loads((tmp_path / "a2" / "adapter_config.json").read_text())["lora_alpha"] == 2


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lorafa_extract_refuses_a_tuned_model_equal_to_the_base(extract_dirs, tmp_path, dtype):
    """Base and fine-tune the same: W_tuned − W = 0 everywhere, and the adapter would be B = A = 0 (cannot train).
    In bf16 the fine-tune's weights are compared in bf16 too (an fp32 checkpoint against a bf16 base differs by the
    rounding alone)."""
    from lorafa.extract_cli import main

    with pytest.raises(ValueError, match="nothing to extract"):
        main(_extract_args(extract_dirs, tmp_path / "out", "--dtype", dtype, tuned=extract_dirs["base"]))
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_lorafa_extract_warns_about_unchanged_target_layers(extract_dirs, tmp_path, caplog):
    """A fine-tune that changed some targets only: the others' adapters are zero; said, not silent."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafa.extract_cli import main

    tuned = AutoModelForCausalLM.from_pretrained(extract_dirs["base"])
    with torch.no_grad():
        tuned.model.layers[0].self_attn.q_proj.weight.add_(0.1)
    tuned.save_pretrained(tmp_path / "tuned")
    AutoTokenizer.from_pretrained(extract_dirs["base"]).save_pretrained(tmp_path / "tuned")
    with caplog.at_level("WARNING", logger="lorafa.extract"):
        main(_extract_args(extract_dirs, tmp_path / "out", "--targets", "q_proj", data=False,
                           tuned=str(tmp_path / "tuned")))
    assert "equals the base on 1 of 2 target layers (model.layers.1.self_attn.q_proj)" in caplog.text


def test_lorafa_extract_keeps_at_most_two_models_and_no_fine_tune_during_the_init(extract_dirs, tmp_path,
                                                                                  monkeypatch):
    """The init reads the fine-tune's target weights from its checkpoint: no full fine-tuned model is alive while
    the statistics pass runs, and never more than two full models (the base and, for the KL, the fine-tune)."""
    import gc
    import weakref

    import lorafa
    import lorafa.models
    from lorafa.extract_cli import main

    alive, peak, at_init = [], [0], []

    def count():
        gc.collect()
        return [r() for r in alive if r() is not None]

    real_load, real_init = lorafa.models.load_causal_lm, lorafa.initialize

    def load(*a, **kw):
        model, tok = real_load(*a, **kw)
        alive.append(weakref.ref(model))
        peak[0] = max(peak[0], len(count()))
        return model, tok

    def init(model, *a, **kw):
        at_init.append(len(count()))
        out = real_init(model, *a, **kw)
        peak[0] = max(peak[0], len(count()))
        return out

    monkeypatch.setattr(lorafa.models, "load_causal_lm", load)
    monkeypatch.setattr(lorafa, "initialize", init)
    report = main(_extract_args(extract_dirs, tmp_path / "out"))
    assert set(report) >= {"base_model", "extract_input", "extract_identity"}
    assert at_init == [1, 2]  # the base alone at the statistics pass; a fresh base and the fine-tune for plain SVD
    assert peak[0] == 2


def test_lorafa_extract_in_bf16(extract_dirs, tmp_path, monkeypatch):
    """--dtype bf16: both models run in bf16; the adapter is the (fp32) truncated SVD of the difference of the bf16
    weights, the extraction that a bf16 base plus the adapter is closest to the bf16 fine-tune with."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import lorafa.models
    from lorafa.extract_cli import main

    dtypes = []
    real_load = lorafa.models.load_causal_lm

    def load(*a, **kw):
        model, tok = real_load(*a, **kw)
        dtypes.append(next(model.parameters()).dtype)
        return model, tok

    monkeypatch.setattr(lorafa.models, "load_causal_lm", load)
    report = main(_extract_args(extract_dirs, tmp_path / "out", "--dtype", "bf16", "--targets", "v_proj",
                                "--rank", "3", data=False))
    assert report["dtype"] == "bf16" and report["device"] == "cpu" and dtypes == [torch.bfloat16]
    base = AutoModelForCausalLM.from_pretrained(extract_dirs["base"])
    tuned = AutoModelForCausalLM.from_pretrained(extract_dirs["tuned"])
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(extract_dirs["base"]),
                                       str(tmp_path / "out"))
    layer = loaded.base_model.model.model.layers[0].self_attn.v_proj
    got = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).double() * layer.scaling["default"]
    w, wt = (m.model.layers[0].self_attn.v_proj.weight.detach() for m in (base, tuned))
    U, S, Vh = torch.linalg.svd((wt.bfloat16().double() - w.bfloat16().double()))
    assert layer.lora_A["default"].weight.dtype == torch.float32
    torch.testing.assert_close(got, (U[:, :3] * S[:3]) @ Vh[:3], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lorafa_extract_on_cuda_in_bf16(extract_dirs, tmp_path):
    """--device cuda --dtype bf16: the data-aware extraction runs on the GPU and gets closer to the fine-tune than
    the base is; plain SVD extraction there gives the CPU's adapter (the factorisation is fp32 on both)."""
    from safetensors.torch import load_file

    from lorafa.extract_cli import main

    cuda = main(_extract_args(extract_dirs, tmp_path / "data", "--device", "cuda", "--dtype", "bf16"))
    assert cuda["device"] == "cuda" and cuda["extract_input"]["kl"] < cuda["base_model"]["kl"]
    main(_extract_args(extract_dirs, tmp_path / "cuda", "--device", "cuda", "--dtype", "bf16", data=False))
    main(_extract_args(extract_dirs, tmp_path / "cpu", "--dtype", "bf16", data=False))
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("cuda", "cpu"))
    for key in (k for k in a if "lora_A" in k):
        delta = [f[key.replace("lora_A", "lora_B")].float() @ f[key].float() for f in (a, b)]
        assert (delta[0] - delta[1]).norm() <= 1e-3 * delta[1].norm(), key
