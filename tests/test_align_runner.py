"""The runner's align/ group (SPEC §5): bad settings fail before any long work; distillation, self-alignment and
cyclic phases run end to end and log the phase and both loss terms of every step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_runner import _in_process, assets, composed, local  # noqa: F401 (the module-scoped fixture)
from tiny_assets import save_tiny_causal_lm

from lorafa.runconfig import parse_run_config


@pytest.fixture(scope="module")
def teacher(assets):  # noqa: F811
    return save_tiny_causal_lm(str(assets["root"] / "tiny-teacher"), seed=7)


@pytest.mark.parametrize("overrides,match", [
    (["+align=distill"], "needs a teacher"),
    (["+align=distill", "++align.teacher=t", "++align.lambda_=-1"], "align.lambda_ must be >= 0"),
    (["+align=distill", "++align.teacher=t", "++align.temperature=0"], "temperature"),
    (["+align=distill", "++align.teacher=t", "++align.kind=jsd", "++align.beta=1"], "beta"),
    (["+align=distill", "++align.teacher=t", "++align.kind=mse"], "kind"),
    (["+align=self", "+init=gradient", "++init.direction=LoRA-GA"], "offsets them"),
    (["+align=self", "++align.teacher=t"], "drop align.teacher"),
    (["+align=distill", "++align.teacher=t", "++align.refresh=ema"], "cyclic"),
    (["++align.teacher=t"], "align.mode is none"),
    (["+align=cyclic", "++align.align_steps=0"], "align_steps"),
    (["+align=distill", "++align.teacher=t", "++align.layer_map=[[1,1]]"], "target=hidden"),
    (["+align=distill", "++align.teacher=t", "++align.projection=pca"], "projection"),
    (["++align.lamda=1"], "align.lamda"),
    (["+align=distill", "++align.teacher=t", "++align.projection=learned", "++resume=true"], "resume"),
    # issue 25
    (["+align=self", "+init=svd", "++init.direction=kasa"], "kasa truncates them"),
    (["+align=cyclic", "+init=svd", "++init.direction=kasa"], "kasa truncates them"),
    (["+align=cyclic", "++align.teacher=t", "++align.refresh=ema", "+init=svd", "++init.direction=goat"],
     "goat student has none"),
    (["+align=distill", "++align.teacher=t", "++align.target=hidden", "++align.kind=mse",
      "++align.projection=truncate"], "projection=truncate"),
    (["+align=distill", "++align.teacher=t", "++align.target=pooled", "++align.kind=cosine",
      "++align.projection=truncate"], "projection=truncate"),
    (["+align=distill", "++align.teacher=t", "++align.temperature='0.5'"], "temperature .*without quotes"),
    (["+align=distill", "++align.teacher=t", "++align.kind=jsd", "++align.beta='0.5'"], "align.beta"),
    (["+align=cyclic", "++align.teacher=t", "++align.refresh=ema", "++align.ema_mu='0.9'"], "align.ema_mu"),
])
def test_bad_align_settings_fail_when_the_config_is_parsed(overrides, match):
    with pytest.raises(ValueError, match=match):
        parse_run_config(composed(overrides))


def test_errors_before_long_work(assets, teacher, tmp_path):  # noqa: F811
    base = ["+init=gradient", *local(assets, tmp_path / "runs", steps=4)]
    with pytest.raises(ValueError, match="first realignment step"):
        _in_process(base + ["+align=cyclic", "++align.task_steps=10", "++wandb.name=a"])
    other = tmp_path / "other-tok"
    save_tiny_causal_lm(str(other), seed=1)
    vocab = json.loads((other / "tokenizer.json").read_text())
    vocab["model"]["vocab"]["é"] = len(vocab["model"]["vocab"])
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match="another tokenizer"):
        _in_process(base + ["+align=distill", f"++align.teacher={other}", "++wandb.name=b"])
    assert not (tmp_path / "runs" / "b" / "metrics.jsonl").exists()  # stopped before training


def _rows(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _train_batch(overrides):
    """The run's whole training set as one collated batch (with real_batch_size = the training set, step 1's batch
    in any order), and the parsed config."""
    from lorafa.data import CausalLMCollator
    from lorafa.data.datasets import load_task, split_validation
    from lorafa.models import load_causal_lm

    cfg = parse_run_config(composed(overrides))
    task = load_task(cfg.dataset_name, path=cfg.dataset.path, test_path=cfg.dataset.test_path, seed=cfg.seed)
    train, _ = split_validation(task.train, cfg.dataset.validation_size, cfg.seed)
    tokenizer = load_causal_lm(cfg.model.name)[1]
    return CausalLMCollator(tokenizer, max_length=cfg.model.max_length)(train), len(train)


def _jsd(s_logits, t_logits, labels, tau, beta=0.5):
    """τ² · the mean over the scored positions of β·KL(p_T‖M) + (1−β)·KL(p_S‖M), M = (1−β)p_S + βp_T, written out."""
    p_s, p_t = torch.softmax(s_logits.double() / tau, -1), torch.softmax(t_logits.double() / tau, -1)
    m = (1 - beta) * p_s + beta * p_t
    per = beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)
    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != -100
    return tau ** 2 * per[scored].mean().item()


def test_distillation_run_logs_both_terms_every_step(assets, teacher, tmp_path):  # noqa: F811
    """Plain LoRA (B = 0): at step 1 the student is the base model, and the whole training set is the step's one
    batch, so the logged terms are the base's task loss and its jsd to the teacher on that batch, computed here."""
    from transformers import AutoModelForCausalLM

    overrides = ["+init=default", *local(assets, tmp_path / "runs", steps=4), "++wandb.name=kd", "+align=distill",
                 f"++align.teacher={teacher}", "++align.kind=jsd", "++align.lambda_=0.5", "++align.temperature=2.0",
                 "++eval.enabled=false", "++model.real_batch_size=40", "++model.per_device_batch_size=40"]
    batch, n_train = _train_batch(overrides)
    assert n_train == 40
    res = _in_process(overrides)
    steps = [r for r in _rows(res["run_dir"]) if "task_loss" in r and "loss" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["phase"] == "align" and r["align_weight"] == 0.5 for r in steps)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(assets["model"]).eval()
        t_model = AutoModelForCausalLM.from_pretrained(teacher).eval()
        out = base(**batch)
        t_logits = t_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert steps[0]["task_loss"] == pytest.approx(out.loss.item(), rel=1e-4)
    assert steps[0]["align_loss"] == pytest.approx(_jsd(out.logits, t_logits, batch["labels"], 2.0), rel=1e-4)
    assert steps[-1]["align_loss"] != pytest.approx(steps[0]["align_loss"], rel=1e-4)  # the student moved
    assert res["align"]["mode"] == "distill" and res["align"]["kind"] == "jsd"
    assert (Path(res["run_dir"]) / "loss_curve.png").exists()
    csv_header = (Path(res["run_dir"]) / "metrics.csv").read_text().splitlines()[0]
    assert "align_loss" in csv_header and "phase" in csv_header


def test_cyclic_self_alignment_alternates_phases(assets, tmp_path):  # noqa: F811
    res = _in_process(["+init=gradient", "++init.direction=LoRA-One", *local(assets, tmp_path / "runs", steps=6),
                       "++wandb.name=cyc", "+align=cyclic", "++align.task_steps=2", "++align.align_steps=1",
                       "++align.warmup_steps=1", "++align.lambda_=2.0", "++eval.enabled=false"])
    steps = [r for r in _rows(res["run_dir"]) if "task_loss" in r and "loss" not in r]
    assert [r["phase"] for r in steps] == ["warmup", "task", "task", "align", "task", "task"]
    assert [("align_loss" in r) for r in steps] == [False, False, False, True, False, False]
    assert res["align"]["teacher"].startswith("base model")
    from lorafa.run_io import align_spans

    assert align_spans(steps) == [(4, 4)]


def _spy_build_term(monkeypatch):
    """Record every alignment term the runner builds, with its projection's weight when built."""
    import lorafa.align.build as build

    built, real = [], build.build_term

    def spy(*args, **kwargs):
        term = real(*args, **kwargs)
        built.append((term, term.student_map.weight.detach().clone() if term.parameters() else None))
        return term

    monkeypatch.setattr(build, "build_term", spy)
    return built


def _wide_teacher(folder, assets):  # noqa: F811
    """A causal LM of hidden width 48 (the student's is 32) with the student's tokenizer."""
    import shutil

    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(assets["model"])
    cfg.hidden_size, cfg.intermediate_size = 48, 64
    torch.manual_seed(11)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    for f in Path(assets["model"]).glob("*token*"):
        shutil.copy(f, Path(folder) / f.name)
    return str(folder)


def test_a_learned_projection_is_saved_beside_the_adapter_and_reloads(assets, teacher, tmp_path,  # noqa: F811
                                                                       monkeypatch):
    from lorafa.align import load_mapping

    built = _spy_build_term(monkeypatch)
    res = _in_process(["+init=gradient", *local(assets, tmp_path / "runs", steps=3), "++wandb.name=proj",
                       "+align=distill", f"++align.teacher={teacher}", "++align.target=pooled", "++align.kind=cosine",
                       "++align.projection=learned", "++eval.enabled=false"])
    path = res["align"]["projection"]
    assert Path(path).parent == Path(res["adapter_dir"])
    proj = load_mapping(res["adapter_dir"])
    assert len(built) == 1
    term, start = built[0]
    torch.testing.assert_close(start, torch.eye(32))  # equal widths: the identity at the start
    torch.testing.assert_close(proj.weight, term.student_map.weight.detach(), rtol=0, atol=0)  # the trained map
    assert (proj.weight - start).abs().max() > 1e-6  # which the optimiser moved


def test_align_init_with_a_learned_projection_trains_the_map_it_initialised_with(assets, tmp_path,  # noqa: F811
                                                                                 monkeypatch):
    """Widths 32 → 48: the map is a random orthonormal draw. The init's dual objective and the training must use
    the same one (and save it), so the runner builds the alignment term once."""
    import lorafa.align.term as align_term
    from lorafa.align import load_mapping

    built = _spy_build_term(monkeypatch)
    used, real = [], align_term.aligned_loss
    monkeypatch.setattr(align_term, "aligned_loss", lambda align, *a, **k: used.append(align) or real(align, *a, **k))
    wide = _wide_teacher(tmp_path / "wide", assets)
    res = _in_process(["+init=gradient", "++init.direction=LoRA-One", *local(assets, tmp_path / "runs", steps=2),
                       "++wandb.name=ai", "++eval.enabled=false", "+align=distill", f"++align.teacher={wide}",
                       "++align.target=pooled", "++align.kind=mse", "++align.projection=learned",
                       "++init.align_init=true", "++init.cache=false"])
    assert len(built) == 1 and used and all(u is built[0][0] for u in used)
    term, start = built[0]
    assert start.shape == (48, 32)
    proj = load_mapping(res["adapter_dir"])
    torch.testing.assert_close(proj.weight, term.student_map.weight.detach(), rtol=0, atol=0)
    # trained from the map the init used: still near it (2 steps), far from any other random draw
    assert (proj.weight - start).abs().max() < 0.1 * start.abs().max()


def test_align_init_from_the_runner_changes_the_init_and_the_statistics_cache_key(assets, teacher, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    common = ["+init=gradient", "++init.direction=LoRA-One", *local(assets, tmp_path / "runs", steps=1),
              "++eval.enabled=false", "+align=distill", f"++align.teacher={teacher}"]
    plain = _in_process(common + ["++wandb.name=plain"])
    aligned = _in_process(common + ["++wandb.name=ainit", "++init.align_init=true", "++init.align_lambda=2.0"])
    a = load_file(str(Path(plain["initial_adapter_dir"]) / "adapter_model.safetensors"))
    b = load_file(str(Path(aligned["initial_adapter_dir"]) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(not torch.allclose(a[k], b[k]) for k in a)  # not the cached task-only stats
    with pytest.raises(ValueError, match="align_init"):
        parse_run_config(composed(["++init.align_init=true"]))
    with pytest.raises(ValueError, match="align_init"):
        parse_run_config(composed(["+align=self", "++init.align_init=true"]))


def test_extract_from_the_runner(assets, teacher, tmp_path):  # noqa: F811
    """init.direction=extract with init.tuned and the identity metric: the initial adapter's s·B·A is the rank-r part
    of W_tuned − W in every layer (plain SVD, computed here); a fine-tune of another architecture fails before the
    statistics pass."""
    import json as _json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    common = ["+init=gradient", *local(assets, tmp_path / "runs", steps=1), "++eval.enabled=false"]
    res = _in_process(common + ["++wandb.name=ex", "++init.direction=extract", f"++init.tuned={teacher}",
                                "++init.metric=identity"])
    assert res["method"] == "extract" and res["steps"] == 1
    folder = Path(res["initial_adapter_dir"])
    config = _json.loads((folder / "adapter_config.json").read_text())
    r, alpha = config["r"], config["lora_alpha"]
    s = alpha / r ** 0.5 if config["use_rslora"] else alpha / r
    assert not config["rank_pattern"] and not config["alpha_pattern"]
    factors = load_file(str(folder / "adapter_model.safetensors"))
    base = dict(AutoModelForCausalLM.from_pretrained(assets["model"]).named_parameters())
    tuned = dict(AutoModelForCausalLM.from_pretrained(teacher).named_parameters())
    layers = sorted(k[: -len(".lora_A.weight")] for k in factors if k.endswith(".lora_A.weight"))
    assert len(layers) == 2 * 7  # every linear layer of both blocks
    for layer in layers:
        name = layer[len("base_model.model."):] + ".weight"
        U, S, Vh = torch.linalg.svd((tuned[name] - base[name]).detach().double(), full_matrices=False)
        want = (U[:, :r] * S[:r]) @ Vh[:r]
        got = s * factors[f"{layer}.lora_B.weight"].double() @ factors[f"{layer}.lora_A.weight"].double()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="init.tuned"):
        parse_run_config(composed(["++init.direction=extract"]))
    with pytest.raises(ValueError, match="does not use it"):
        parse_run_config(composed(["++init.tuned=x"]))
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=104, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    import shutil

    for f in (Path(teacher)).glob("tokenizer*"):
        shutil.copy(f, other / f.name)
    with pytest.raises(ValueError, match="same architecture"):
        _in_process(common + ["++wandb.name=ex2", "++init.direction=extract", f"++init.tuned={other}"])
