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


@pytest.mark.parametrize("kw, phrase", [
    # every method option is checked against its declared type in make_options (one place for all methods)
    (dict(method="lora_ga", stable_gamma="16"), r"lora_ga's stable_gamma must be a finite number, got '16' \(str\): "
                                                "write it without quotes"),
    (dict(method="lora_fa", stable_gamma=True), r"lora_fa's stable_gamma must be a finite number, got True \(bool\)"),
    (dict(method="lora_one", scale="kfac", step_factor="2"), r"lora_one's step_factor .* got '2' \(str\)"),
    (dict(method="lora_fa", reg="1e-3"), r"lora_fa's reg .* got '1e-3' \(str\): write it without quotes"),
    (dict(method="corda", corda_reg=[0.1]), r"corda's corda_reg must be a finite number, got \[0.1\] \(list\)"),
    (dict(method="eva", eva_rho="2"), r"eva's eva_rho .* got '2' \(str\)"),
    (dict(method="goat", num_experts=True, top_k=1), r"goat's num_experts must be an integer >= 1, got True"),
    (dict(method="goat", num_experts=2.0), r"goat's num_experts must be an integer >= 1, got 2.0 \(float\)"),
    (dict(method="kasa", kasa_beta=True), r"kasa's kasa_beta must be a finite number, got True \(bool\)"),
    # non-finite values the methods' own ranges let through: γ = inf scales the factors to A = B = 0, an infinite
    # damping makes the whitened SVD fail deep in torch
    (dict(method="lora_ga", stable_gamma=float("inf")), r"lora_ga's stable_gamma must be a finite number, got inf"),
    (dict(method="lora_one", stable_gamma=float("inf")), r"lora_one's stable_gamma must be a finite number, got inf"),
    (dict(method="lora_fa", stable_gamma=float("inf")), r"lora_fa's stable_gamma must be a finite number, got inf"),
    (dict(method="lora_fa", offset="partial", factor_gamma=float("inf")), r"lora_fa's factor_gamma .* got inf"),
    (dict(method="lora_fa", reg=float("inf")), r"lora_fa's reg must be a finite number, got inf"),
    (dict(method="extract", reg=float("inf")), r"extract's reg must be a finite number, got inf"),
    (dict(method="eva", eva_rho=float("inf")), r"eva's eva_rho must be a finite number, got inf"),
])
def test_method_options_refuse_wrong_types_and_non_finite_values(kw, phrase):
    with pytest.raises(ValueError, match=phrase):
        InitConfig(**kw)


def test_method_options_keep_their_own_range_messages_and_accept_numbers():
    with pytest.raises(ValueError, match=r"KaSA's gamma \(InitConfig's kasa_gamma\) must be a finite number >= 0"):
        InitConfig(method="kasa", kasa_gamma=float("nan"))
    with pytest.raises(ValueError, match=r"stable_gamma must be > 0, got -1"):
        InitConfig(method="lora_ga", stable_gamma=-1)
    # an int for a float option, numpy scalars: numbers, accepted
    assert InitConfig(method="lora_ga", stable_gamma=16).method_options()["stable_gamma"] == 16
    assert InitConfig(method="lora_fa", reg=np.float64(1e-4)).needs == "kfac"
    assert InitConfig(method="goat", num_experts=np.int64(4), top_k=2).num_experts == 4


def test_an_unknown_field_is_a_type_error_listing_the_fields():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'metod' \(did you mean method\?\): it is not "
                                        r"one of InitConfig's fields, which are method, direction, "):
        InitConfig(metod="pissa")
    with pytest.raises(TypeError, match=r"'bogus': it is not one of InitConfig's fields"):
        InitConfig(method="pissa", bogus=1)
    import dataclasses

    cfg = dataclasses.replace(InitConfig(method="pissa"), seed=3)  # the dataclass's own machinery still works
    assert (cfg.method, cfg.seed) == ("pissa", 3) and InitConfig("pissa").method == "pissa"
