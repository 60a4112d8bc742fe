"""The benchmark scripts' pure parts: method specs, the convergence metric, tables. (The benchmarks themselves
are never run by the tests; see benchmarks/.)"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import common  # noqa: E402
import convergence  # noqa: E402


def test_method_specs_parse_flags_and_typed_options():
    assert convergence.parse_spec("lora_fa") == ("lora_fa", False, {})
    assert convergence.parse_spec("lora_fa+prec:stable_gamma=16,scale=unit") == (
        "lora_fa", True, {"stable_gamma": 16, "scale": "unit"})
    assert convergence.parse_spec("lora_ga:sketch=24")[2] == {"sketch": 24}
    assert isinstance(convergence.parse_spec("lora_fa:reg=1e-4")[2]["reg"], float)
    with pytest.raises(ValueError, match="only flag is \\+prec"):
        convergence.parse_spec("lora_fa+fast")


def test_steps_to_reach_interpolates_between_evaluations():
    curve = [[0, 2.0], [10, 1.5], [20, 1.0], [30, 0.9]]
    assert convergence.steps_to_reach(curve, 1.0) == 20
    assert convergence.steps_to_reach(curve, 1.25) == pytest.approx(15.0)
    assert convergence.steps_to_reach(curve, 2.5) == 0  # already below at the first evaluation after init
    assert convergence.steps_to_reach(curve, 0.5) is None


def test_summary_ranks_by_the_reference_final_loss(tmp_path):
    def run(method, lr, curve, seed=0):
        return {"method": method, "lr": lr, "seed": seed, "curve": curve, "final_loss": curve[-1][1],
                "init_s": 0.1, "init_peak_mb": 1.0}

    results = [run("lora", 1e-3, [[0, 2.0], [10, 1.6], [20, 1.2]]), run("lora", 1e-4, [[0, 2.0], [10, 1.9], [20, 1.8]]),
               run("fast", 1e-3, [[0, 1.8], [10, 1.2], [20, 1.0]]), run("fast", 1e-4, [[0, 1.8], [10, 1.5], [20, 1.4]])]
    md = convergence.summarise(results, ["lora", "fast"], str(tmp_path), "t")
    summary = md.split("Learning-rate grid")[0]
    rows = {r.split("|")[1].strip(): r for r in summary.splitlines() if r.startswith(("| lora", "| fast"))}
    assert "2.00×" in rows["fast"] and "1.00×" in rows["lora"]  # 10 steps against default LoRA's 20
    assert (tmp_path / "summary.csv").exists() and (tmp_path / "convergence.png").exists()


def test_peak_memory_sees_a_transient_allocation():
    import torch

    with common.PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
        del x
    assert mem.mb > 48
