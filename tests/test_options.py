"""The init options declared once (lorafa.options): InitConfig, the runner's init section, the methods' option
dataclasses and the methods table follow the declaration; renamed names are refused naming the new ones;
`init.method` and the seed's `init.direction`; `init.dtype` accepts only what happens (fp32)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lorafa import InitConfig
from lorafa.options import (METHOD_OPTIONS, OPTIONS, RENAMED, check_fields, check_methods, method_defaults,
                            renamed_options)
from lorafa.runconfig import InitSection, RUNNER_INIT_KEYS, parse_run_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "src" / "lorafa" / "conf"


def composed(overrides=()) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)


def test_the_declaration_matches_the_dataclasses_and_a_drift_is_caught():
    check_fields(InitConfig, runner=False, extra=("method", "weight"))
    check_fields(InitSection, runner=True, extra=RUNNER_INIT_KEYS)
    check_methods()
    drifted = dataclasses.make_dataclass("Drifted", [(f.name, f.type, f) for f in dataclasses.fields(InitSection)
                                                     if f.name != "eva_rho"] + [("rho", "float | None", None)])
    with pytest.raises(TypeError, match=r"eva_rho: declared in lorafa.options, not a field; rho: a field not "):
        check_fields(drifted, runner=True, extra=RUNNER_INIT_KEYS)
    runner_bsz = next(o for o in OPTIONS if o.name == "bsz")
    assert (runner_bsz.default, runner_bsz.runner_default) == (InitConfig().bsz, InitSection().bsz) == (2, 4)


def test_one_meaning_per_name():
    """An option name that two methods take means the same thing for both (the same field of their dataclasses)."""
    fields = {}
    for o in METHOD_OPTIONS:
        fields.setdefault(o.name, set()).add(o.method_field)
    assert all(len(f) == 1 for f in fields.values())
    assert set(RENAMED) == {"rho", "beta", "gamma"}
    assert method_defaults(next(o for o in METHOD_OPTIONS if o.name == "stable_gamma")) == {
        "lora_ga": 16.0, "lora_one": 128.0, "lora_fa": 128.0}


@pytest.mark.parametrize("kw, new", [({"method": "eva", "rho": 2.0}, "eva_rho"),
                                     ({"method": "goat", "rho": 5.0}, "goat_rho"),
                                     ({"method": "kasa", "beta": 0.1}, "kasa_beta"),
                                     ({"method": "kasa", "gamma": 0.1}, "kasa_gamma")])
def test_old_names_are_refused_naming_the_new(kw, new):
    with pytest.raises(TypeError, match=new):
        InitConfig(**kw)
    key = next(k for k in kw if k != "method")
    with pytest.raises(ValueError, match=rf"init.{key} is now .*init.{new}"):
        parse_run_config(composed(["+init=svd" if kw["method"] != "eva" else "+init=gradient",
                                   f"++init.method={kw['method']}", f"++init.{key}={kw[key]}"]))
    with pytest.raises(ValueError, match=r"corda's reg is corda_reg"):
        InitConfig(method="corda", reg=0.1)
    assert InitConfig(method="corda", corda_reg=0.1).method_options() == {"reg": 0.1}


def test_a_record_written_with_the_old_names_loads():
    """lorafa_init.json files written before the renames hold rho/beta/gamma (None unless set) and corda's reg."""
    old = {k: v for k, v in InitConfig(method="eva").to_dict().items() if k not in ("eva_rho", "goat_rho", "kasa_beta",
                                                                                  "kasa_gamma", "corda_reg")}
    assert InitConfig(**renamed_options({**old, "rho": 3.0, "beta": None, "gamma": None})).eva_rho == 3.0
    corda = renamed_options({**old, "method": "corda", "rho": None, "reg": 0.05})
    assert InitConfig(**corda).method_options() == {"reg": 0.05} and corda["corda_reg"] == 0.05


def test_init_method_and_the_seeds_direction():
    default = parse_run_config(composed())
    assert default.init.method == "LoRA-FA" and default.init_config().method == "lora_fa"
    by_method = parse_run_config(composed(["+init=gradient", "++init.method=LoRA-One"]))
    by_direction = parse_run_config(composed(["+init=gradient", "++init.direction=LoRA-One"]))
    assert by_method.init_config() == by_direction.init_config()
    assert by_direction.init.direction == "LoRA-One"  # recorded as written (run_config.json)
    both = parse_run_config(composed(["+init=gradient", "++init.method=lora_one", "++init.direction=LoRA-One"]))
    assert both.init_config().method == "lora_one"
    with pytest.raises(ValueError, match=r"init.method='LoRA-GA' and init.direction='LoRA-One' .* set one"):
        parse_run_config(composed(["+init=gradient", "++init.method=LoRA-GA", "++init.direction=LoRA-One"]))
    assert parse_run_config(composed(["+init=svd"])).init_config().method == "pissa"
    assert parse_run_config(composed(["+init=default"])).init_config().method == "lora"
    with pytest.raises(ValueError, match=r"init.method='LoRA-FA' is not a default method"):
        parse_run_config(composed(["+init=default", "++init.method=LoRA-FA"]))
    ga = parse_run_config(composed(["+init=gradient", "++init.method=A2rBr"])).init_config()
    assert (ga.method, ga.direction) == ("lora_ga", "A2rBr")
    with pytest.raises(ValueError, match=r"\(did you mean init.method"):
        parse_run_config(composed(["++model.method=LoRA-FA"]))


def test_init_dtype_takes_only_fp32():
    assert parse_run_config(composed(["++init.dtype=fp32"])).init.dtype == "fp32"
    with pytest.raises(ValueError, match=r"init.dtype='bf16': the statistics are always accumulated in fp32"):
        parse_run_config(composed(["++init.dtype=bf16"]))


def test_the_methods_table_lists_each_methods_options():
    rows = {}
    for line in (ROOT / "docs" / "methods.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if line.startswith("| `") and len(cells) == 4:
            for name in re.findall(r"`(\w+)`", cells[0]):
                rows[name] = cells[3]
    for o in METHOD_OPTIONS:
        for method in o.methods:
            row = rows[method]
            base = re.match(r"as (\w+)", row)
            assert f"`{o.name}`" in row or base and f"`{o.name}`" in rows[base.group(1)], \
                f"docs/methods.md: {method}'s row does not list {o.name}"
