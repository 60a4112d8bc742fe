"""Behaviour that differs across the supported dependency versions (CI runs this suite on the newest releases and
again on the lowest declared ones, ci/lowest_constraints.py), and the lowest-versions leg itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lorafa.runconfig import parse_run_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "src" / "lorafa" / "conf"


def _run_config(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return parse_run_config(OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True))


def _learning_rates(args, total_steps: int) -> list[float]:
    """The rate at each step, from the scheduler the Trainer builds out of these TrainingArguments."""
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    sched = get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=args.get_warmup_steps(total_steps),
                          num_training_steps=total_steps)
    rates = []
    for _ in range(total_steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


@pytest.mark.parametrize("warmup, expected_steps", [(0.1, 10), (0.03, 3), (5, 5), (0, 0)])
def test_warmup_is_a_ratio_below_one_and_a_step_count_above(tmp_path, warmup, expected_steps):
    """transformers 4.x reads `warmup_steps` as an int count and 5.x a fraction as a ratio; `model.warmup` must mean
    the same thing on both: the rate climbs from 0 to the peak over the first ceil(warmup × steps) steps."""
    from lorafa.train import _training_args

    cfg = _run_config(["++model.optimizer=adamw", "++model.lr_scheduler_type=linear", f"++model.warmup={warmup}", "++model.max_steps=100",
                       "++model.learning_rate=0.01", "++model.per_device_batch_size=2", "++model.real_batch_size=2"])
    args = _training_args(cfg, str(tmp_path), n_train=200, world=1)
    assert args.get_warmup_steps(100) == expected_steps
    rates = _learning_rates(args, 100)
    peak = max(rates)
    assert peak == pytest.approx(0.01)
    if expected_steps:
        assert rates[0] < peak / 2, f"no warm-up: the first step already runs at {rates[0]}"
        assert rates[expected_steps] == pytest.approx(peak) and rates[expected_steps - 1] < peak
    else:
        assert rates[0] == pytest.approx(peak)


def test_lowest_constraints_pin_every_declared_dependency():
    """The CI leg pins each direct dependency (and the dev extra's) to the lower bound pyproject declares."""
    tomllib = pytest.importorskip("tomllib")
    out = subprocess.run([sys.executable, str(ROOT / "ci" / "lowest_constraints.py")], check=True,
                         capture_output=True, text=True).stdout
    pins = dict(line.split("==") for line in out.split())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for req in project["dependencies"] + project["optional-dependencies"]["dev"]:
        name, _, lower = req.partition(">=")
        assert pins[name.strip().lower()] == lower.split(",")[0].strip(), req
    assert "lowest_constraints.py" in (ROOT / ".ci" / "run").read_text(), "CI must run the lowest-versions leg"
