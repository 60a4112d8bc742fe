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
    (["+align=distill", "++align.teacher=t", "++align.lambda_=-1"], "align_lambda must be a finite number >= 0"),
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


def test_distillation_run_logs_both_terms_every_step(assets, teacher, tmp_path):  # noqa: F811
    res = _in_process(["+init=gradient", *local(assets, tmp_path / "runs", steps=4), "++wandb.name=kd",
                       "+align=distill", f"++align.teacher={teacher}", "++align.kind=jsd", "++align.lambda_=0.5",
                       "++align.temperature=2.0", "++eval.enabled=false"])
    steps = [r for r in _rows(res["run_dir"]) if "task_loss" in r and "loss" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["phase"] == "align" and r["align_weight"] == 0.5 and r["align_loss"] > 0 for r in steps)
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


def test_a_learned_projection_is_saved_beside_the_adapter_and_reloads(assets, teacher, tmp_path):  # noqa: F811
    from lorafa.align import load_mapping

    res = _in_process(["+init=gradient", *local(assets, tmp_path / "runs", steps=3), "++wandb.name=proj",
                       "+align=distill", f"++align.teacher={teacher}", "++align.target=pooled", "++align.kind=cosine",
                       "++align.projection=learned", "++eval.enabled=false"])
    path = res["align"]["projection"]
    assert Path(path).parent == Path(res["adapter_dir"])
    proj = load_mapping(res["adapter_dir"])
    assert proj.weight.shape == (32, 32)
    assert not torch.equal(proj.weight, torch.eye(32))  # it trained (identity at the start)


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
    """init.direction=extract with init.tuned: the adapter starts at the fine-tune's rank-r part (so the validation
    loss at step 0 differs from plain LoRA's); a fine-tune of another architecture fails before the statistics pass."""
    common = ["+init=gradient", *local(assets, tmp_path / "runs", steps=1), "++eval.enabled=false"]
    res = _in_process(common + ["++wandb.name=ex", "++init.direction=extract", f"++init.tuned={teacher}",
                                "++init.metric=input"])
    assert res["method"] == "extract" and res["steps"] == 1
    plain = _in_process(["+init=default", *common[1:], "++wandb.name=plain"])
    assert res["validation_loss"]["at_init"] != pytest.approx(plain["validation_loss"]["at_init"], rel=1e-6)
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
