"""The runner with the LoRA variants of SPEC §9: `+init=svd ++init.direction=kasa|goat` trains with the method's
loss term in every step's metrics, and refuses what cannot work before any long work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_runner import _in_process, assets, composed, local  # noqa: F401 (the module-scoped fixture)

from lorafa.runconfig import parse_run_config


def _steps(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "task_loss" in r and "loss" not in r]


@pytest.mark.parametrize("overrides,match", [
    (["+init=svd", "++init.direction=kasa", "++init.beta=-1"], "beta"),
    (["+init=svd", "++init.direction=kasa", "++init.offset=subtract"], "offset"),
    (["+init=svd", "++init.direction=pissa", "++init.beta=0.1"], "does not have"),
    (["+init=gradient", "++init.direction=kasa"], "not a gradient method"),
])
def test_bad_variant_settings_fail_when_the_config_is_parsed(overrides, match):
    with pytest.raises(ValueError, match=match):
        parse_run_config(composed(overrides))


def test_kasa_run_adds_its_regulariser_every_step(assets, tmp_path):  # noqa: F811
    res = _in_process(["+init=svd", "++init.direction=kasa", "++init.beta=0.01", *local(assets, tmp_path / "r", steps=3),
                       "++wandb.name=kasa", "++eval.enabled=false", "++peft.target_modules=[q_proj,v_proj]"])
    steps = _steps(res["run_dir"])
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["kasa_weight"] == 1.0 and r["kasa_loss"] > 0 for r in steps)
    meta = json.loads((Path(res["adapter_dir"]) / "lorafa_init.json").read_text())
    assert "truncat" in meta["base_truncated"]


def test_goat_run_adds_the_load_balancing_loss_every_step(assets, tmp_path):  # noqa: F811
    res = _in_process(["+init=svd", "++init.direction=goat", "++init.num_experts=2", "++init.aux_loss_weight=0.01",
                       *local(assets, tmp_path / "r", steps=3), "++wandb.name=goat", "++eval.enabled=false",
                       "++peft.target_modules=[q_proj,v_proj]", "++peft.lora_r=4"])
    steps = _steps(res["run_dir"])
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["goat_aux_weight"] == 0.01 and r["goat_aux_loss"] > 0 for r in steps)
    assert (Path(res["adapter_dir"]) / "goat.json").exists()


def test_goat_refuses_a_merged_checkpoint():
    with pytest.raises(ValueError, match="cannot be merged"):
        parse_run_config(composed(["+init=svd", "++init.direction=goat", "++model.saving=true"]))
