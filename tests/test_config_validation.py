"""InitConfig refuses, with a message naming the option and what it takes, values of the wrong type or range,
including the rank-allocation settings when rank is None and Python's bools where integers belong (issue 25, 12)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lorafa import InitConfig


@pytest.mark.parametrize("kw, phrase", [
    # the allocation's settings, with rank=None (they used to be checked only with rank="auto")
    (dict(rank_rule="bogus"), r"rank_rule must be one of \('energy', 'effective', 'budget', 'importance'\), "
                              r"got 'bogus'"),
    (dict(budget_by="flops"), r"budget_by must be one of \('rank', 'params'\)"),
    (dict(r_min=3, r_max=2), "r_max must be >= r_min, got r_min=3 > r_max=2"),
    (dict(method="lora_fa", rank="auto", r_min=3, r_max=2), "r_max must be >= r_min, got r_min=3 > r_max=2"),
    (dict(r_min=-1), "r_min must be an integer >= 0, got -1"),
    (dict(r_min=1.5), r"r_min must be an integer, got 1.5 \(float\)"),
    (dict(r_max=0), "r_max must be an integer >= 1, got 0"),
    (dict(rank_budget=0), "rank_budget must be an integer >= 1, got 0"),
    (dict(tau="0.5"), r"tau \(the energy rule's threshold\) must be a number in \(0, 1\], got '0.5'"),
    (dict(tau=0.0), r"tau .* must be a number in \(0, 1\], got 0.0"),
    (dict(tau=float("nan")), r"tau .* must be a number in \(0, 1\], got nan"),
    (dict(tau=True), r"tau .* must be a number in \(0, 1\], got True"),
    # bool is an int to Python, not to a batch size
    (dict(bsz=True), r"bsz must be an integer, got True \(bool\)"),
    (dict(iters=False), r"iters must be an integer, got False \(bool\)"),
    (dict(max_length=2.0), r"max_length must be an integer, got 2.0 \(float\)"),
    (dict(bsz=0), "bsz must be an integer >= 1, got 0"),
    (dict(seed="x"), r"seed must be an integer, got 'x' \(str\)"),
    (dict(seed=True), r"seed must be an integer, got True \(bool\)"),
    (dict(seed=1.0), r"seed must be an integer, got 1.0 \(float\)"),
    (dict(seed=-1), r"seed must be an integer in \[0, "),
    (dict(method="lora_one", sketch=True), r"sketch must be an integer, got True \(bool\)"),
    (dict(align_init=1), "align_init must be True or False, got 1"),
    (dict(align_lambda=True), "align_lambda must be a finite number >= 0, got True"),
    # accumulate_on: a torch device
    (dict(accumulate_on="tpu9"), r"accumulate_on is the device .*\"cpu\", \"cuda\".*got 'tpu9', which is not a "
                                 "torch device"),
    (dict(accumulate_on="CPU"), "got 'CPU', which is not a torch device"),
    (dict(accumulate_on=""), "got '', which is not a torch device"),
    (dict(accumulate_on="meta"), "'meta' holds no data"),
    (dict(accumulate_on=1), r"accumulate_on is the device .* got 1 \(int\)"),
])
def test_init_config_refuses_bad_values_with_the_option_named(kw, phrase):
    with pytest.raises(ValueError, match=phrase):
        InitConfig(**kw)


def test_init_config_accepts_and_normalises_good_values():
    cfg = InitConfig(method="lora_fa", seed=np.int64(3), bsz=np.int32(2), accumulate_on=torch.device("cpu"),
                     r_min=2, r_max=2, tau=1, rank_budget=8, rank_rule="budget", budget_by="params")
    assert type(cfg.seed) is int and cfg.seed == 3 and type(cfg.bsz) is int and cfg.bsz == 2
    assert cfg.accumulate_on == "cpu"
    json.dumps(cfg.to_dict())  # recorded as JSON in the initial adapter
    for device in (None, "cpu", "cpu:0", "cuda", "cuda:1", "mps", "xpu"):  # syntax only: the device is not probed
        assert InitConfig(accumulate_on=device).accumulate_on == device
    assert InitConfig(r_min=0).r_max is None
    assert InitConfig(seed=0, align_lambda=0).seed == 0
