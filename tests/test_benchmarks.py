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


# -- generated tables (benchmarks/tables.py) ---------------------------------------------------------------------
import io  # noqa: E402
import json  # noqa: E402

import tables  # noqa: E402


def test_generated_blocks_in_readme_and_docs_match_the_results_files():
    """A retyped or hand-edited number inside a generated block fails here; `python benchmarks/tables.py` fixes it."""
    out = io.StringIO()
    stale = tables.run(tables.ROOT, check=True, out=out)
    assert not stale, "stale generated blocks (run `python benchmarks/tables.py`):\n" + out.getvalue()
    names = {n for p in tables.doc_files(tables.ROOT) for n, _, _ in tables.find_blocks(open(p).read(), p)}
    assert {"causal_convergence", "cls_convergence", "cls_probe_convergence", "stats_cost", "targets",
            "causal_convergence_brief", "cls_convergence_brief", "stats_cost_brief"} <= names


def test_committed_summaries_match_their_runs_and_md_files():
    """The summary.csv files the tables read are what convergence.py's summary gives for the committed runs, and
    each table renders as the .md the benchmark wrote beside it."""
    root = tables.ROOT
    for d in (tables.CAUSAL, tables.CLS, tables.CLS_PROBE):
        results, methods = convergence.saved_runs(os.path.join(root, d))
        rows = convergence.summary_tables(results, methods)["rows"]
        rendered = tables.render_convergence(root, d)
        assert common.markdown_table(rows, list(rows[0])) == rendered, d
        assert open(os.path.join(root, d, "summary.md")).read().split("\n", 2)[2] == rendered, d
    md = open(os.path.join(root, os.path.dirname(tables.STATS), "stats_cost.md")).read()
    assert md.split("\n", 2)[2] == tables.render_stats(root)


def _synthetic_root(tmp_path, final_fast=1.0):
    """A repository with one convergence result (two methods) and a README holding a stale block."""
    def run(method, lr, curve):
        return {"method": method, "lr": lr, "seed": 0, "curve": curve, "final_loss": curve[-1][1],
                "init_s": 0.25, "init_peak_mb": 3.0}

    results = [run("lora", 1e-3, [[0, 2.0], [10, 1.6], [20, 1.2]]),
               run("fast", 1e-3, [[0, 1.8], [10, 1.2], [20, final_fast]])]
    s = convergence.summary_tables(results, ["lora", "fast"])
    out = tmp_path / tables.CAUSAL
    out.mkdir(parents=True)
    common.write_table(s["rows"], list(s["rows"][0]), str(out / "summary"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "# title\n\nprose 1.23 kept\n\n<!-- generated: causal_convergence_brief (python benchmarks/tables.py) -->\n"
        "\n| init | final loss |\n|---|---|\n| lora | 9.999 |\n\n<!-- /generated -->\n\nafter\n")
    (tmp_path / "docs" / "other.md").write_text("no blocks here\n")
    return tmp_path


def test_tables_render_a_synthetic_results_file_and_rewrite_only_the_block(tmp_path):
    root = str(_synthetic_root(tmp_path))
    md = tables.render_causal_brief(root)
    assert md.splitlines()[0] == "| init | best lr | loss after init | final loss | steps to 1.200 | speed-up |"
    assert "| fast | 0.001 | 1.800 | 1.000 | 10.0 | 2.00× |" in md  # 10 steps against default LoRA's 20
    assert tables.main(["--check", "--root", root]) == 1  # the retyped 9.999 is stale
    assert tables.main(["--root", root]) == 0
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("# title\n\nprose 1.23 kept\n\n") and text.endswith("<!-- /generated -->\n\nafter\n")
    assert md in text and "9.999" not in text
    assert tables.main(["--check", "--root", root]) == 0
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # the atomic write left no temp file
    # a new result makes the block stale again, and --check names it
    _synthetic_root(tmp_path / "again", final_fast=0.9)
    (tmp_path / "again" / "README.md").write_text(text)
    out = io.StringIO()
    assert tables.run(str(tmp_path / "again"), check=True, out=out) == [("README.md", "causal_convergence_brief")]
    assert "causal_convergence_brief" in out.getvalue() and "0.900" in out.getvalue()


def test_malformed_blocks_are_errors(tmp_path):
    begin = "<!-- generated: {} (python benchmarks/tables.py) -->\n"
    with pytest.raises(tables.BlockError, match="unknown generated block 'nope'"):
        tables.regenerate(begin.format("nope") + "\n<!-- /generated -->\n", str(tmp_path), "x.md")
    with pytest.raises(tables.BlockError, match="no closing"):
        tables.find_blocks(begin.format("stats_cost") + "| a |\n", "x.md")
    with pytest.raises(tables.BlockError, match="without an opening"):
        tables.find_blocks("text\n<!-- /generated -->\n", "x.md")


def test_main_job_table_from_a_results_json(tmp_path):
    path = tmp_path / tables.MAIN_JOB
    with pytest.raises(FileNotFoundError, match="not committed yet"):
        tables.render_main_job(str(tmp_path))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({
        "method": "lora_fa", "steps": 80, "init_s": 38.51, "train_s": 293.67, "wall_s": 440.77,
        "before": {"accuracy": 0.01, "correct": 2, "n": 200, "seconds": 58.61},
        "after": {"accuracy": 0.565, "correct": 113, "n": 200, "seconds": 48.99},
        "validation_loss": {"first": 0.8, "last": 0.05},
        "baseline": {"method": "lora", "steps": 80, "init_s": 0.5, "train_s": 280.0, "after": {"accuracy": 0.5}}}))
    md = tables.render_main_job(str(tmp_path))
    lines = md.splitlines()
    assert lines[2] == ("| lora_fa | 80 | 1.0% (2/200) | 56.5% (113/200) | 0.800 → 0.050 | 38.5 s "
                        "| 293.7 s (4 min 54 s) | 440.8 s (7 min 21 s) |")
    assert lines[3] == "| lora (baseline) | 80 | 1.0% (2/200) | 50.0% | — | 0.5 s | 280.0 s (4 min 40 s) | — |"
    assert "main_job" in tables.BLOCKS and tables.BLOCKS["main_job"].sources == (tables.MAIN_JOB,)
    # only the required keys
    path.write_text(json.dumps({"before": {"accuracy": 0.1}, "after": {"accuracy": 0.2}, "init_s": 1, "train_s": 2,
                                "wall_s": 3}))
    row = tables.render_main_job(str(tmp_path)).splitlines()[2]
    assert row == "| main job | — | 10.0% | 20.0% | — | 1.0 s | 2.0 s | 3.0 s |"
