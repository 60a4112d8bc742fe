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
    assert convergence.parse_spec("lora_fa") == ("lora_fa", "", {})
    assert convergence.parse_spec("lora_fa+prec:stable_gamma=16,scale=unit") == (
        "lora_fa", "prec", {"stable_gamma": 16, "scale": "unit"})
    assert convergence.parse_spec("lora_fa+kfac_sgd")[1] == "kfac_sgd"
    assert convergence.parse_spec("lora_ga:sketch=24")[2] == {"sketch": 24}
    assert isinstance(convergence.parse_spec("lora_fa:reg=1e-4")[2]["reg"], float)
    with pytest.raises(ValueError, match="the flags are \\+prec"):
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

    import time

    # 256 MB, touched, held 50 ms (a sampler thread starved by a loaded machine still sees it), then freed; the
    # margin allows for other memory the process frees meanwhile
    with common.PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(256 * 2**20 // 4)
        time.sleep(0.05)
        del x
    assert mem.mb > 192, f"peak {mem.mb:.1f} MB above the level at entry"


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
    new = [d for d in (tables.CAUSAL_VAL, tables.CAUSAL_GPU, tables.CAUSAL_ABLATION, tables.CAUSAL_DAMPING)  # format 2
           if os.path.exists(os.path.join(root, d, "meta.json"))]
    for d in (tables.CAUSAL, tables.CLS, tables.CLS_PROBE, *new):
        results, methods = convergence.saved_runs(os.path.join(root, d))
        rows = convergence.summary_tables(results, methods, convergence.first_seed(os.path.join(root, d)))["rows"]
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


# -- the validation-split protocol (convergence.py, run format 2) --------------------------------------------------
def test_validation_init_and_training_pools_are_disjoint_and_seeded():
    p = convergence.Preset("m", "t", [], batch=4, steps=60, eval_every=10, n_heldout=8, max_length=16, lrs=[1e-3],
                           full_lrs=[1e-4], init_bsz=4, init_iters=8, n_val=64)
    splits = {s: convergence.data_split(300, p.n_val, p.init_bsz * p.init_iters, s) for s in (0, 1)}
    for s, sp in splits.items():
        val, init, train = set(sp["val"]), set(sp["init"]), set(sp["train"])
        assert (len(val), len(init), len(sp["init"])) == (64, 32, 32)
        assert not val & init and not val & train and not init & train
        assert val | init | train == set(range(300))
        order = [i for batch in convergence.train_order(sp["train"], p, s) for i in batch]
        assert len(order) == 240 and set(order) <= train  # 240 > 204 training examples: the pool is cycled
        batches = torch.tensor(sp["init"]).view(8, 4).tolist()  # what init_batches collates, in order
        assert [i for b in batches for i in b] == sp["init"]
        assert convergence.data_split(300, 64, 32, s) == sp and convergence.train_order(sp["train"], p, s) == \
            convergence.train_order(sp["train"], p, s)  # seeded
    assert splits[0]["val"] == splits[1]["val"]  # the validation problems are the same for every seed
    assert splits[0]["init"] != splits[1]["init"]
    with pytest.raises(ValueError, match="cannot split"):
        convergence.data_split(90, 64, 32, 0)


GRID = [5e-5, 2e-4, 8e-4]


def _bracket(loss_of, grid=GRID, max_extend=3, full_grid=False):
    """Drive `next_rates` to the end with a loss function of the rate; returns (rates run in order, last answer)."""
    losses, ran = {}, []
    for _ in range(20):
        ans = convergence.next_rates(dict(losses), grid, convergence.grid_ratio(grid), max_extend, full_grid)
        if not ans["next"]:
            return ran, ans
        for lr in ans["next"]:
            losses[lr] = loss_of(lr)
        ran.append(ans["next"])
    raise AssertionError("next_rates did not stop")


def test_bracketing_extends_past_an_edge_until_interior_or_capped():
    import math

    assert convergence.grid_ratio(GRID) == pytest.approx(4.0) and convergence.grid_ratio([2e-5]) == 4.0
    # the middle rate and above first; the best (8e-4) is the top: lower rates skipped, one ×4 up, then interior
    ran, ans = _bracket(lambda lr: abs(math.log(lr / 1e-3)))
    assert ran == [[2e-4, 8e-4], [0.0032]] and ans == {"next": [], "best": 8e-4, "edge": None, "done": True}
    # the middle rate beat the top: the lower rate runs; then downward while the lowest keeps winning
    ran, ans = _bracket(lambda lr: abs(math.log(lr / 1e-5)))
    assert ran == [[2e-4, 8e-4], [5e-5], [1.25e-5], [3.125e-6]]
    assert ans["best"] == 1.25e-5 and ans["edge"] is None and ans["done"]
    # still improving at the cap: stops at the edge, flagged
    ran, ans = _bracket(lambda lr: -lr)
    assert ran == [[2e-4, 8e-4], [0.0032], [0.0128], [0.0512]]
    assert ans == {"next": [], "best": 0.0512, "edge": "high", "done": True}
    ran, ans = _bracket(lambda lr: -lr, max_extend=0)
    assert ran == [[2e-4, 8e-4]] and ans["edge"] == "high"
    # every rate diverges: the lower rates, then down to the cap (ties go to the lower rate)
    ran, ans = _bracket(lambda lr: float("inf"), max_extend=2)
    assert ran == [[2e-4, 8e-4], [5e-5], [1.25e-5], [3.125e-6]] and ans["edge"] == "low"
    assert _bracket(lambda lr: float("nan"), max_extend=1)[1]["best"] == 1.25e-5  # NaN ranks last, like inf
    # the middle rate is best: interior at once (the lower rate was needed to know it)
    ran, ans = _bracket(lambda lr: abs(math.log(lr / 2e-4)))
    assert ran == [[2e-4, 8e-4], [5e-5]] and ans["edge"] is None
    # --full-grid runs the whole grid first; a one-rate grid extends both ways
    assert _bracket(lambda lr: abs(math.log(lr / 2e-4)), full_grid=True)[0] == [GRID]
    ran, ans = _bracket(lambda lr: abs(math.log(lr / 2e-5)), grid=[2e-5])
    assert ran == [[2e-5], [5e-6, 8e-5]] and ans["best"] == 2e-5 and ans["edge"] is None
    assert convergence.choose_rate({1e-3: 1.0}) == (1e-3, "both")


def _run(method, lr, test, val=None, seconds=None, seed=0, init_s=5.0):
    """A synthetic format-2 run: `test`/`val` are losses at steps 0, 10, 20; seconds = init_s + 1 s a step."""
    val = val if val is not None else test
    steps = [0, 10, 20]
    return {"format": 2, "method": method, "lr": lr, "seed": seed, "curve": [list(x) for x in zip(steps, test)],
            "val_curve": [list(x) for x in zip(steps, val)], "final_loss": test[-1], "final_val_loss": val[-1],
            "seconds": seconds or [init_s + s for s in steps], "init_s": init_s, "init_peak_mb": 1.0}


def test_seconds_to_target_interpolates_on_the_wall_clock():
    r = _run("x", 1e-3, [2.0, 1.5, 1.0], seconds=[30.0, 40.0, 60.0])
    assert convergence.seconds_to_reach(r, 1.25) == pytest.approx(50.0)  # halfway between 40 s and 60 s
    assert convergence.seconds_to_reach(r, 1.5) == pytest.approx(40.0)
    assert convergence.seconds_to_reach(r, 2.5) == pytest.approx(30.0)  # reached at init: the init's seconds
    assert convergence.seconds_to_reach(r, 0.5) is None


def test_summary_chooses_on_validation_flags_edges_and_reports_seconds(tmp_path):
    results = [
        # lora: 1e-3 best on validation (interior); its test loss is not the lowest there: the choice ignores test
        _run("lora", 1e-4, [2.0, 1.8, 1.7], val=[2.0, 1.8, 1.7]),
        _run("lora", 1e-3, [2.0, 1.6, 1.2], val=[2.0, 1.5, 1.1], init_s=1.0),
        _run("lora", 1e-2, [2.0, 1.4, 1.0], val=[2.0, 1.7, 1.3]),
        _run("lora", 1e-3, [2.0, 1.5, 1.2], val=[2.0, 1.5, 1.2], seed=1, init_s=1.0),
        # fast: the top rate is best (edge); it reaches lora's final test loss (1.2) in fewer steps, but pays 5.5 s
        _run("fast", 1e-4, [1.8, 1.5, 1.4]), _run("fast", 1e-3, [1.8, 1.2, 1.0], init_s=5.5),
        _run("fast", 1e-3, [1.8, 1.3, 1.1], seed=1, init_s=5.5),
    ]
    s = convergence.summary_tables(results, ["lora", "fast"])
    assert s["best_lr"] == {"lora": 1e-3, "fast": 1e-3} and s["edge"] == {"lora": None, "fast": "high"}
    assert not s["legacy"] and s["target"] == pytest.approx(1.2)
    rows = {r["method"]: r for r in s["rows"]}
    assert list(rows["lora"]) == ["method", "chosen lr", "bracketed", "seeds", "final val loss", "test loss at 0",
                                  "test loss at step 10", "final test loss", "steps to 1.200", "seconds to 1.200 (incl. init)",
                                  "step speed-up", "time speed-up", "init s", "init peak MB"]
    assert rows["lora"]["bracketed"] == "yes" and rows["fast"]["bracketed"] == "edge (high)"
    assert rows["lora"]["final test loss"] == "1.200 ± 0.000" and rows["fast"]["seeds"] == 2
    assert rows["lora"]["final val loss"] == "1.150 ± 0.071" and rows["fast"]["test loss at 0"] == "1.800 ± 0.000"
    assert rows["lora"]["test loss at step 10"] == "1.550 ± 0.071"  # half-way: the early progress
    # lora: 20 steps, 1 + 20 = 21 s; fast: 10 and 15 steps, 5.5 + 10 and 5.5 + 15 s (mean 18)
    assert rows["lora"]["steps to 1.200"] == "20.0 ± 0.0" and rows["fast"]["steps to 1.200"] == "12.5 ± 3.5"
    assert rows["lora"]["seconds to 1.200 (incl. init)"] == "21 ± 0"
    assert rows["fast"]["seconds to 1.200 (incl. init)"] == "18 ± 4"
    assert rows["fast"]["step speed-up"] == "1.60×" and rows["fast"]["time speed-up"] == "1.17×"
    assert rows["lora"]["step speed-up"] == "1.00×" and rows["lora"]["time speed-up"] == "1.00×"
    assert [g["chosen"] for g in s["grid"] if g["method"] == "lora"] == [None, "✓", None]
    md = convergence.summarise(results, ["lora", "fast"], str(tmp_path), "t")
    assert "final validation loss" in md and (tmp_path / "convergence.png").exists()
    # the seed the rates are chosen at is the first of --seeds, not necessarily the smallest
    assert convergence.summary_tables(results, ["lora"], first_seed=1)["rows"][0]["seeds"] == 2
    legacy = [{k: v for k, v in r.items() if k not in ("val_curve", "final_val_loss", "seconds")} for r in results]
    assert convergence.is_legacy(legacy) and convergence.summary_tables(legacy, ["lora", "fast"])["legacy"]


def test_method_specs_take_the_new_init_options():
    parse = convergence.parse_spec
    assert parse("lora_fa:target=natural,scale=line_search,offset=partial") == (
        "lora_fa", "", {"target": "natural", "scale": "line_search", "offset": "partial"})
    assert parse("lora_one:rank=auto,rank_rule=importance")[2] == {"rank": "auto", "rank_rule": "importance"}
    assert parse("lora_fa:rank=12")[2] == {"rank": 12} and parse("lora_fa:offset=none")[2] == {"offset": "none"}
    reg = parse("lora_fa:target=natural,reg=1e-2")[2]["reg"]
    assert isinstance(reg, float) and reg == 0.01
    for bad in ("lora_fa:reg", "lora_fa:=1", "lora_fa:reg=1,reg=2", ":reg=1"):
        with pytest.raises(ValueError):
            parse(bad)
    # the run-file names: safe, unique, and stable (an interrupted benchmark finds its runs again)
    specs = convergence.ABLATION + convergence.DAMPING + convergence.METHODS + ["a:b=c", "a:bc", "a_b-c", "a:b-c"]
    slugs = {s: convergence.spec_slug(s) for s in set(specs)}
    assert len(set(slugs.values())) == len(slugs)
    assert all(re.fullmatch(r"[A-Za-z0-9_.+-]+", x) for x in slugs.values())
    assert slugs["lora_fa+prec"] == "lora_fa+prec" and slugs["a:b=c"].startswith("a_b-c_")
    assert convergence.run_id("lora_fa:target=natural,reg=0.01", 0.0032, 1).endswith("_lr0.0032_s1")


def test_the_ablation_design_covers_main_effects_and_the_offset_pairs():
    cells = set()
    for spec in convergence.ABLATION:
        name, prec, opts = convergence.parse_spec(spec)
        if name == "lora_fa" and "rank" not in opts:
            cells.add((opts["target"], opts["scale"], opts["offset"]))
    assert len(cells) == 10 and len(set(convergence.ABLATION)) == len(convergence.ABLATION)
    base = ("gradient", "stable", "none")
    assert base in cells
    for i, levels in enumerate((("natural",), ("kfac", "line_search"), ("partial",))):  # each factor changed alone
        for level in levels:
            assert tuple(level if j == i else base[j] for j in range(3)) in cells
    assert {(t, s, "partial") for t in ("gradient", "natural") for s in ("stable", "kfac", "line_search")} <= cells
    names = [convergence.parse_spec(s)[0] for s in convergence.ABLATION]
    assert {"lora", "pissa", "peft_lora_ga", "lora_ga", "lora_one", "eva"} <= set(names)
    # auto rank at the fixed rank's parameter budget: LoRA-FA's energy rule, GoRA's importance rule, and both rank
    # choices of the natural / line-search / partial variant
    auto = [convergence.parse_spec(s) for s in convergence.ABLATION if "rank=auto" in s]
    assert {(n, o["rank_rule"]) for n, _, o in auto} == {("lora_fa", "energy"), ("lora_one", "importance")}
    assert all(o["budget_by"] == "params" for _, _, o in auto)
    natural = [s for s in convergence.ABLATION if "rank=auto" in s and "target=natural" in s]
    assert [s.replace(",rank=auto,rank_rule=energy,budget_by=params", "") in convergence.ABLATION
            for s in natural] == [True]


def test_ablation_specs_are_valid_init_configs():
    """Every spec of the ablation lists builds its InitConfig (what `main` checks before running anything)."""
    import dataclasses

    from lorafa import InitConfig

    missing = {"target", "rank", "rank_rule"} - {f.name for f in dataclasses.fields(InitConfig)}
    if missing:
        pytest.skip(f"InitConfig has no {sorted(missing)} yet")
    p = convergence.PRESETS["causal"]
    for spec in convergence.ABLATION + convergence.DAMPING + convergence.OPTIMIZERS:
        convergence.check_spec(spec, p)
    convergence.check_spec("lora_one+kfac:scale=kfac", p)
    with pytest.raises((ValueError, TypeError)):
        convergence.check_spec("lora_fa:no_such_option=1", p)
    for spec in ("lora+kfac", "lora_one+kfac_sgd", "eva+kfac"):  # no K-FAC statistics to precondition with
        with pytest.raises(ValueError, match="K-FAC statistics"):
            convergence.check_spec(spec, p)


# -- principal angles (benchmarks/subspaces.py) --------------------------------------------------------------------
import math  # noqa: E402
import re  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402

import subspaces  # noqa: E402


def test_principal_cosines_of_hand_made_subspaces():
    e = torch.eye(5, dtype=torch.float64)
    x = e[:, :2]
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(2, 2, generator=g, dtype=torch.float64) + 2 * torch.eye(2, dtype=torch.float64)
    one, zero = torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    assert torch.allclose(subspaces.principal_cosines(x, x @ mix), one)  # the same span in another basis
    assert torch.allclose(subspaces.principal_cosines(x, e[:, 2:4]), zero)  # orthogonal
    theta = 0.3
    y = torch.stack([e[:, 0], math.cos(theta) * e[:, 1] + math.sin(theta) * e[:, 2]], 1) * 7.0  # one shared, one at θ
    assert torch.allclose(subspaces.principal_cosines(x, y), torch.tensor([1.0, math.cos(theta)], dtype=torch.float64))
    assert subspaces.principal_cosines(x, e[:, :1] + e[:, 3:4]).tolist() == pytest.approx([math.cos(math.pi / 4)])
    assert subspaces.principal_cosines(x.float(), y.float()).dtype == torch.float64
    with pytest.raises(ValueError, match="same number of rows"):
        subspaces.principal_cosines(x, torch.ones(4, 2))


def test_layer_cosines_compare_column_spaces_of_b_and_row_spaces_of_a():
    g = torch.Generator().manual_seed(1)
    ref = {"l1": SimpleNamespace(A=torch.randn(2, 6, generator=g), B=torch.randn(5, 2, generator=g)),
           "l2": SimpleNamespace(A=torch.randn(2, 6, generator=g), B=torch.randn(5, 2, generator=g))}
    same = {"l1": SimpleNamespace(A=3 * ref["l1"].A, B=ref["l1"].B @ torch.tensor([[1.0, 2.0], [0.0, 1.0]])),
            "l2": SimpleNamespace(A=torch.zeros(0, 6), B=torch.zeros(5, 0))}  # rank 0 (rank="auto"): skipped
    cos = subspaces.layer_cosines(same, ref)
    assert list(cos) == ["l1"] and cos["l1"]["A"] == pytest.approx([1, 1]) and cos["l1"]["B"] == pytest.approx([1, 1])
    rows = subspaces.summary_rows({"v": cos})
    assert [r["side"] for r in rows] == ["B (columns)", "A (rows)"] and rows[0]["layers"] == 1
    assert rows[0]["mean cos"] == pytest.approx(1.0) and rows[1]["min cos"] == pytest.approx(1.0)


# -- the new blocks (benchmarks/tables.py) -----------------------------------------------------------------------
def test_protocol_and_subspaces_blocks_render_from_results_or_say_not_run(tmp_path):
    root = str(tmp_path)
    assert tables.render_protocol(root).startswith("_Not run yet: `benchmarks/results/causal_val/`")
    assert tables.render_subspaces(root).startswith("_Not run yet")
    results = [_run("lora", 1e-3, [2.0, 1.6, 1.2]), _run("fast", 1e-3, [1.8, 1.2, 1.0], init_s=11.0)]
    out = tmp_path / tables.CAUSAL_VAL
    out.mkdir(parents=True)
    s = convergence.summary_tables(results, ["lora", "fast"])
    common.write_table(s["rows"], list(s["rows"][0]), str(out / "summary"))
    full = tables.render_protocol(root)
    assert full == common.markdown_table(s["rows"], list(s["rows"][0]))
    brief = tables.render_protocol(root, brief=True).splitlines()
    assert brief[0] == ("| method | chosen lr | bracketed | seeds | test loss at step 10 | final test loss "
                        "| steps to 1.200 | seconds to 1.200 (incl. init) | step speed-up | time speed-up | init s |")
    assert brief[3] == "| fast | 0.001 | edge (one rate) | 1 | 1.200 | 1.000 | 10.0 | 21 | 2.00× | 1.19× | 11.0 |"
    sub = tmp_path / tables.SUBSPACES
    sub.mkdir(parents=True)
    rows = [{"variant": "lora_fa", "side": "B (columns)", "layers": 2, "mean cos": 0.98765, "min cos": 0.5,
             "mean of layer min": 0.75}]
    (sub / "subspaces.json").write_text(json.dumps({"rows": rows}))
    assert tables.render_subspaces(root).splitlines()[2] == "| lora_fa | B (columns) | 2 | 0.988 | 0.500 | 0.750 |"
    for name in ("causal_val", "causal_val_brief", "causal_ablation", "causal_damping", "subspaces"):
        assert name in tables.BLOCKS
    assert tables.BLOCKS["causal_ablation"].render(root).startswith("_Not run yet")


def test_run_jobs_in_process_records_failures_and_keeps_going(tmp_path, monkeypatch):
    """A run that raises leaves no run file, lands in `failed` with its traceback, and the other runs still run."""
    def fake_run_one(job):
        if job["method"] == "broken":
            raise RuntimeError("boom")
        res = {"method": job["method"], "lr": job["lr"], "seed": job["seed"], "final_val_loss": 1.0,
               "final_loss": 1.0, "init_s": 0.0}
        convergence.write_json(job["path"], res)
        return res

    monkeypatch.setattr(convergence, "run_one", fake_run_one)
    jobs = [{"method": m, "lr": 1e-3, "seed": 0, "args": {"device": "cpu", "dtype": "auto"},
             "path": str(tmp_path / f"{m}.json")} for m in ("broken", "ok")]
    failed = {}
    got = convergence.run_jobs(jobs, 1, failed=failed, in_process=True)
    assert [r["method"] for r in got] == ["ok"]
    assert list(failed) == ["broken"] and "RuntimeError: boom" in failed["broken"]
    assert not (tmp_path / "broken.json").exists()
    # cached runs are reused, not run again
    monkeypatch.setattr(convergence, "run_one", lambda job: pytest.fail("a cached run ran again"))
    assert [r["method"] for r in convergence.run_jobs(jobs[1:], 1, in_process=True)] == ["ok"]


def test_step0_cache_is_shared_across_rates_and_refuses_other_options(tmp_path):
    """The held-out losses right after an init are cached per (method, seed): a run of another rate (another grid's
    preset, an auto run) gets them back, a run under another rank or task raises, and without a folder nothing is
    kept."""
    import dataclasses

    cache = str(tmp_path / "step0")
    args = vars(convergence.parser().parse_args(["--out", str(tmp_path), "--step0-cache", cache]))
    preset = dataclasses.asdict(convergence.PRESETS["main_job"])

    def job(method="lora_fa", lrs=(1e-3,), **over):
        return {"method": method, "lr": lrs[0], "args": dict(args, **over), "probe": None,
                "preset": dict(preset, lrs=list(lrs))}

    assert convergence.step0_cached(job(), 0) is None
    convergence.step0_store(job(), 0, test=1.25, val=1.5)
    hit = convergence.step0_cached(job(lrs=(4e-4, 8e-4)), 0)  # another grid's rates: the same init
    assert (hit["test"], hit["val"]) == (1.25, 1.5)
    assert convergence.step0_cached(job(), 1) is None and convergence.step0_cached(job("lora"), 0) is None
    # a rate-free optimiser's run starts from the same init; a K-FAC-preconditioned one keeps its own record
    assert convergence.step0_cached(job("lora_fa+sf"), 0)["val"] == 1.5
    assert convergence.step0_cached(job("lora_fa+prodigy"), 0)["val"] == 1.5
    assert convergence.step0_cached(job("lora_fa+kfac"), 0) is None
    # a task that reads no GSM8K: where the folder lies does not matter, nor whether it exists
    assert convergence.step0_cached(job(gsm8k=str(tmp_path / "nowhere")), 0)["test"] == 1.25
    with pytest.raises(ValueError, match="other options"):
        convergence.step0_cached(job(rank=16), 0)
    # a GSM8K task: the data are keyed by their content, so a copy elsewhere (another machine or checkout) matches and
    # other data do not
    here, there, other = (tmp_path / n for n in ("here", "there", "other"))
    for d, text in ((here, "a"), (there, "a"), (other, "b")):
        d.mkdir()
        (d / "train.jsonl").write_text(text)
        (d / "test.jsonl").write_text("t")
    gsm = dict(job(gsm8k=str(here)), preset=dict(preset, task="gsm8k"))
    with pytest.raises(ValueError, match="other options"):  # the record above was made on another task
        convergence.step0_cached(gsm, 0)
    convergence.step0_store(gsm, 3, test=0.5, val=0.75)
    assert convergence.step0_cached(dict(gsm, args=dict(gsm["args"], gsm8k=str(there))), 3)["test"] == 0.5
    with pytest.raises(ValueError, match="other options"):
        convergence.step0_cached(dict(gsm, args=dict(gsm["args"], gsm8k=str(other))), 3)
    with pytest.raises(FileNotFoundError, match="--gsm8k"):
        convergence.step0_cached(dict(gsm, args=dict(gsm["args"], gsm8k=str(tmp_path / "nowhere"))), 3)
    with pytest.raises(ValueError, match="other options"):  # the guard moves where lora_fa starts: its own record
        convergence.step0_cached(job(guard_iters=0), 0)
    convergence.step0_store(job("pissa"), 0, test=2.0, val=2.5)  # no step to guard: the option does not matter
    assert convergence.step0_cached(job("pissa", guard_iters=0), 0)["val"] == 2.5
    none = dict(job(), args=dict(args, step0_cache=None))
    convergence.step0_store(none, 2, test=1.0, val=1.0)
    assert convergence.step0_cached(none, 2) is None and sorted(os.listdir(cache)) == ["lora_fa_s0.json",
                                                                                       "lora_fa_s3.json",
                                                                                       "pissa_s0.json"]


def test_merge_meta_adds_to_an_earlier_benchmark_and_refuses_another_setup(tmp_path):
    """A second benchmark into the same --out keeps the first one's methods, commands, failures and devices; it
    refuses a different preset or first seed (the cached runs and the chosen rates depend on them)."""
    path = str(tmp_path / "meta.json")
    preset = {"batch": 16, "steps": 40}

    def meta(methods, seeds=(0, 1), **pre):
        return {"format": convergence.FORMAT, "methods": methods, "preset": {**preset, **pre},
                "args": {"seeds": list(seeds)}, "command": ["convergence.py", *methods]}

    first = convergence.merge_meta(path, meta(["lora", "pissa"]))
    assert first["commands"] == [["convergence.py", "lora", "pissa"]] and first["failed"] == {}
    convergence.write_json(path, dict(first, failed={"pissa": "tb"}, devices=[{"device": "cuda"}]))
    second = convergence.merge_meta(path, meta(["eva", "lora"], seeds=(0,)))
    assert second["methods"] == ["lora", "pissa", "eva"]
    assert second["commands"] == [["convergence.py", "lora", "pissa"], ["convergence.py", "eva", "lora"]]
    assert second["failed"] == {"pissa": "tb"} and second["devices"] == [{"device": "cuda"}]
    with pytest.raises(ValueError, match="batch"):
        convergence.merge_meta(path, meta(["eva"], batch=4))
    with pytest.raises(ValueError, match="seed 0"):
        convergence.merge_meta(path, meta(["eva"], seeds=(1, 2)))


def test_alignment_summary_gap_closed_and_extraction_table(tmp_path):
    """benchmarks/alignment.py's tables from cached runs: "gap closed" = (L_base − L) / (L_base − L_teacher) on the
    final test loss, mean ± std over seeds; the extraction table has one row per rank, one column pair per metric."""
    import argparse

    import alignment

    out = tmp_path / "align"
    (out / "runs").mkdir(parents=True)
    (out / "teacher").mkdir()
    common.write_json(str(out / "teacher" / "teacher.json"), {"test": {"loss": 0.5}})
    common.write_json(str(out / "base.json"), {"test_loss": 0.7})

    def curve(final):
        return [{"step": s, "test_loss": v, "test_acc": 0.6, "val_loss": v, "test_kl": 0.01}
                for s, v in ((0, 0.69), (30, 0.6), (60, final))]

    for kind, finals in (("task", (0.6, 0.62)), ("distill", (0.52, 0.54))):
        for seed, final in enumerate(finals):
            common.write_json(str(out / "runs" / f"{kind}_s{seed}.json"), {"kind": kind, "seed": seed,
                                                                            "curve": curve(final)})
    for rank, metric, kl in ((4, "identity", 0.02), (4, "input", 0.01), (8, "identity", 0.015)):
        common.write_json(str(out / "runs" / f"extract_{metric}_r{rank}.json"),
                          {"rank": rank, "metric": metric, "test_kl": kl, "test_loss": 0.6})
    args = argparse.Namespace(preset="classification", steps=None, n_heldout=None, n_val=None, device="cpu",
                              dtype="auto", out=str(out), rank=8)
    md = alignment.summarise(args)
    students = common.read_table(str(out / "students.csv"))[1]
    assert [r["student"] for r in students] == ["task", "distill"]
    assert students[0]["gap closed"] == "0.4500 ± 0.0707"  # (0.7 − 0.6)/0.2 = 0.5 and (0.7 − 0.62)/0.2 = 0.4
    assert students[1]["gap closed"] == "0.8500 ± 0.0707"
    assert students[0]["test loss at step 30"] == "0.6000 ± 0.0000"
    ext = common.read_table(str(out / "extraction.csv"))[1]
    assert [r["rank"] for r in ext] == ["4", "8"] and ext[0]["input: KL"] == "0.0100" and ext[1].get("input: KL") is None
    assert "teacher test loss 0.5000" in md and (out / "alignment.png").exists()


def test_alignment_teacher_grid_extends_past_an_edge_and_chooses_on_validation():
    """benchmarks/alignment.py's teacher rate: the lowest validation loss, after extending the grid one ratio past
    an end while the best sits there (at most max_extend rates per end); a non-finite loss is the worst."""
    import alignment

    lrs = [1e-5, 3e-5, 1e-4]
    assert alignment.grid_step(lrs, {1e-5: 1.0, 3e-5: 0.9, 1e-4: 0.95}, 2) == (3e-5, None)
    chosen, nxt = alignment.grid_step(lrs, {1e-5: 1.0, 3e-5: 0.9, 1e-4: 0.8}, 2)
    assert chosen is None and nxt == pytest.approx(1e-4 * 3)
    assert alignment.grid_step(lrs, {1e-5: 1.0, 3e-5: 0.9, 1e-4: 0.8, 3e-4: 0.85}, 2) == (1e-4, None)
    chosen, nxt = alignment.grid_step(lrs, {1e-5: 0.7, 3e-5: 0.9, 1e-4: 0.8}, 2)
    assert chosen is None and nxt == pytest.approx(1e-5 / 3)
    # two rates already added below the grid: the bottom edge is accepted
    assert alignment.grid_step(lrs, {1e-5 / 9: 0.5, 1e-5 / 3: 0.6, 1e-5: 0.7, 3e-5: 0.9, 1e-4: 0.8}, 2) == \
        (1e-5 / 9, None)
    chosen, nxt = alignment.grid_step(lrs, {1e-5: float("nan"), 3e-5: 0.9, 1e-4: float("inf")}, 2)
    assert (chosen, nxt) == (3e-5, None)


def test_alignment_knob_grid_one_knob_at_a_time(tmp_path, monkeypatch):
    """alignment.py --grid: distill's λ, then its τ at that λ, cyclic's task-phase length (an integer grid, extended
    past its top end) at distill's λ and τ, align_init's own λ; the choice goes to hparams.json and the students'
    knobs (_hp) read it; the table lists every grid run."""
    import argparse

    import alignment

    def val_loss(kind, hp):  # made-up validation losses with known minima
        if kind == "distill":
            return (hp["lam"] - 3) ** 2 + (hp["temperature"] - 2) ** 2
        if kind == "cyclic":
            return -min(hp["task_steps"], 40)  # better up to 40, flat beyond
        return abs(hp["lam"] - 0.1)

    calls = []

    def fake_run_student(kind, seed, args, hp=None, grid=False):
        assert grid and seed == 0
        calls.append((kind, dict(hp)))
        return {"curve": [{"val_loss": val_loss(kind, hp)}]}

    monkeypatch.setattr(alignment, "run_student", fake_run_student)
    args = argparse.Namespace(seeds=[0, 1], lam=1.0, temperature=1.0, task_steps=10, align_steps=5,
                              grid_lams=[0.3, 1.0, 3.0], grid_temperatures=[0.5, 1.0, 2.0], grid_task_steps=[5, 10, 20],
                              grid_max_extend=2, out=str(tmp_path), preset="causal")
    chosen = alignment.choose_hparams(args)
    assert chosen["distill"] == {"lam": 3.0, "temperature": 2.0, "task_steps": 10, "align_steps": 5}
    # 20 is the top: 40 and 80 are tried (two extensions), 80 no better than 40
    assert chosen["cyclic"] == {"lam": 3.0, "temperature": 2.0, "task_steps": 40, "align_steps": 5}
    # align_init: 0.3 is the bottom, 0.09 is better, 0.027 worse again
    assert chosen["align_init"]["lam"] == pytest.approx(0.09) and chosen["align_init"]["temperature"] == 2.0
    assert [hp["lam"] for kind, hp in calls if kind == "align_init"] == pytest.approx([0.3, 1.0, 3.0, 0.09, 0.027])
    cyc = [hp["task_steps"] for kind, hp in calls if kind == "cyclic"]
    assert cyc == [5, 10, 20, 40, 80] and all(hp["lam"] == 3.0 for kind, hp in calls if kind == "cyclic")
    taus = [hp for kind, hp in calls if kind == "distill" and hp["temperature"] != 1.0]
    assert taus and all(hp["lam"] == 3.0 for hp in taus)
    assert json.load(open(tmp_path / "hparams.json"))["chosen"] == chosen
    assert alignment._hp(args, "cyclic")["task_steps"] == 40 and alignment._hp(args, "distill")["temperature"] == 2.0
    assert alignment._hp(args, "task")["lam"] == 1.0  # the task student has no knobs: the command's are kept
    _, rows = common.read_table(str(tmp_path / "grid.csv"))
    assert len(rows) == len(calls) and sum(r["chosen"] == "✓" for r in rows) == 4


def test_alignment_cached_student_with_other_knobs_is_refused(tmp_path):
    """A student cached with other knobs than the ones asked for is an error (not silently reused); the same knobs
    return the cached run without loading any model."""
    import argparse

    import alignment

    (tmp_path / "runs").mkdir()
    hp = {"lam": 3.0, "temperature": 1.0, "task_steps": 10, "align_steps": 5}
    common.write_json(str(tmp_path / "runs" / "distill_s0.json"), {"kind": "distill", "hparams": hp, "curve": []})
    args = argparse.Namespace(out=str(tmp_path), lam=1.0, temperature=1.0, task_steps=10, align_steps=5)
    with pytest.raises(ValueError, match="delete it to rerun"):
        alignment.run_student("distill", 0, args)  # no hparams.json: the command's λ = 1
    assert alignment.run_student("distill", 0, args, hp=hp)["hparams"] == hp
    common.write_json(str(tmp_path / "hparams.json"), {"chosen": {"distill": hp}})
    assert alignment.run_student("distill", 0, args)["kind"] == "distill"  # the chosen knobs match


def test_alignment_students_leave_out_only_problems_whose_prompt_fills_max_length():
    """A training batch drops the problems that `collate.fits` refuses and keeps the others in their order, so a run
    whose batches hold no such problem trains on exactly the batches it trained on before."""
    import dataclasses

    import alignment
    import torch

    p = dataclasses.replace(convergence.PRESETS["causal"], steps=6, batch=3, eval_every=100)
    pool = list(range(12))
    order = convergence.train_order(pool, p, 0)
    too_long = order[2][1]  # one problem in the third batch

    class Collate:
        def __init__(self):
            self.batches = []

        def fits(self, ex):
            return ex["i"] != too_long

        def __call__(self, examples):
            self.batches.append([ex["i"] for ex in examples])
            if any(not self.fits(ex) for ex in examples):
                raise ValueError("a prompt fills max_length")
            return {"x": torch.tensor([[float(ex["i"])] for ex in examples])}

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            return type("Out", (), {"loss": (self.w * x).pow(2).mean()})()

    task = type("Task", (), {"train": [{"i": i} for i in range(12)]})()
    collate, evaluated = Collate(), []
    alignment.train_student(Model(), None, p, task, collate, {"train": pool}, 0, torch.device("cpu"), 1e-3,
                            evaluated.append)
    want = [[i for i in b if i != too_long] for b in order]
    assert collate.batches == want
    assert len(collate.batches[2]) == 2 and all(len(b) == 3 for k, b in enumerate(collate.batches) if k != 2)
    assert evaluated == [0, 6]


def test_alignment_generation_accuracy_on_the_first_n_and_refused_when_missing(tmp_path, monkeypatch, capsys):
    """--accuracy N: the first N test problems go to the runner's GSM8K evaluation; a cached student without that
    accuracy is an error (not silently reported without it); the students' table shows base and teacher counts;
    the option needs the causal preset."""
    import argparse

    import alignment
    from lorafa.eval import gsm8k

    seen = []

    def fake_evaluate(model, tokenizer, examples, progress=True):
        seen.append([ex["final"] for ex in examples])
        return {"accuracy": 1 / len(examples), "correct": 1, "n": len(examples), "records": []}

    monkeypatch.setattr(gsm8k, "evaluate_gsm8k", fake_evaluate)
    examples = [{"prompt": f"Q{i}", "final": str(i)} for i in range(10)]
    assert alignment.generation_accuracy(None, None, examples, 4) == {"acc": 0.25, "correct": 1, "n": 4}
    assert seen == [["0", "1", "2", "3"]]

    out = tmp_path / "align"
    (out / "runs").mkdir(parents=True)
    (out / "teacher").mkdir()
    common.write_json(str(out / "runs" / "task_s0.json"), {"kind": "task", "seed": 0, "curve": [
        {"step": s, "test_loss": v, "test_acc": None, "val_loss": v, "test_kl": 0.1} for s, v in ((0, 1.5), (40, 1.0))]})
    args = argparse.Namespace(out=str(out), accuracy=4, lam=1.0, temperature=1.0, task_steps=10, align_steps=5)
    with pytest.raises(ValueError, match="no generation accuracy on 4 problems.*delete it"):
        alignment.run_student("task", 0, args)
    run = json.load(open(out / "runs" / "task_s0.json"))
    run["generation_acc"] = {"acc": 0.5, "correct": 2, "n": 4}
    run["curve"][-1]["test_acc"] = 0.5
    common.write_json(str(out / "runs" / "task_s0.json"), run)
    assert alignment.run_student("task", 0, args)["generation_acc"]["correct"] == 2
    args.accuracy = 0  # not asked for: the cached run is reused as it is
    assert alignment.run_student("task", 0, args)["kind"] == "task"

    common.write_json(str(out / "teacher" / "teacher.json"),
                      {"test": {"loss": 0.8, "acc": None}, "generation_acc": {"acc": 0.75, "correct": 3, "n": 4}})
    common.write_json(str(out / "base.json"), {"test_loss": 1.7, "generation_acc": {"acc": 0.0, "correct": 0, "n": 4}})
    sargs = argparse.Namespace(preset="causal", steps=None, n_heldout=None, n_val=None, device="cpu", dtype="auto",
                               out=str(out), rank=8)
    md = alignment.summarise(sargs)
    assert "base 0/4, teacher 3/4" in md
    assert common.read_table(str(out / "students.csv"))[1][0]["final test acc"] == "0.5000"

    for argv in (["--preset", "classification", "--accuracy", "8"], ["--preset", "causal", "--forgetting",
                                                                      "--accuracy", "8"]):
        with pytest.raises(SystemExit):
            alignment.main(argv + ["--lr", "1e-3", "--teacher-lr", "1e-4", "--teacher-steps", "1",
                                   "--out", str(tmp_path / "x")])
        assert "--accuracy N is the causal preset's" in capsys.readouterr().err


def test_align_targets_are_judged_from_the_csvs(tmp_path):
    """Issue 10's targets block: the gap closed against 0.9, the forgetting rows' own verdicts, and a data-aware
    extraction metric counted only if its KL is below plain SVD's at every rank."""
    def table(folder, stem, rows):
        os.makedirs(tmp_path / folder, exist_ok=True)
        common.write_table(rows, list(rows[0]), str(tmp_path / folder / stem))

    table(tables.ALIGN_CAUSAL, "students", [{"student": "task", "seeds": 3, "gap closed": "0.80 ± 0.01"},
                                            {"student": "distill", "seeds": 3, "gap closed": "0.91 ± 0.02"}])
    table(tables.ALIGN_CLS, "students", [{"student": "distill", "seeds": 3, "gap closed": "0.72 ± 0.2"}])
    table(tables.ALIGN_CAUSAL_CPU, "students", [{"student": "distill", "seeds": 3, "gap closed": "0.89 ± 0.01"}])
    table(tables.ALIGN_FORGETTING_GPU, "forgetting", [
        {"λ": "0", "seeds": 3, "forgetting ratio": "1", "task-gain ratio": "1", "target met": "reference"},
        {"λ": "0.3", "seeds": 3, "forgetting ratio": "0.45", "task-gain ratio": "0.93", "target met": "yes"}])
    table(tables.ALIGN_CAUSAL, "extraction", [{"rank": 4, "identity: KL": "0.5", "input: KL": "0.4", "kfac: KL": "0.6"},
                                              {"rank": 8, "identity: KL": "0.4", "input: KL": "0.3", "kfac: KL": "0.3"}])
    table(tables.ALIGN_CLS, "extraction", [{"rank": 4, "identity: KL": "0.2", "input: KL": "0.1"},
                                           {"rank": 8, "identity: KL": "0.1", "input: KL": "0.1"}])
    rows = [line.split(" | ")[-1].rstrip(" |") for line in tables.render_align_targets(str(tmp_path)).splitlines()[2:]]
    assert rows == ["met on causal (H100); missed on causal (CPU); missed on classification", "met at λ = 0.3",
                    "met on causal (H100); missed on classification, q/k/v"]
    assert "input below plain SVD at r = 4/8" in tables.render_align_targets(str(tmp_path))


def test_alignment_teacher_record_without_weights_is_refused(tmp_path):
    """A committed teacher.json whose weights (ignored by git) are absent is an error before any training, not a
    teacher that then fails to load or is silently retrained."""
    import argparse

    import alignment

    (tmp_path / "teacher").mkdir()
    common.write_json(str(tmp_path / "teacher" / "teacher.json"), {"lr": 1e-4, "val_loss": 0.5})
    args = argparse.Namespace(out=str(tmp_path), teacher_lr=[1e-4])
    with pytest.raises(FileNotFoundError, match="weights are not.*delete"):
        alignment.teacher_dir(args)
    (tmp_path / "teacher" / "model.safetensors").write_bytes(b"")
    assert alignment.teacher_dir(args) == str(tmp_path / "teacher")


def test_alignment_teacher_grid_with_weightless_records_is_refused(tmp_path):
    """Grid candidates known only by their committed records: the chosen one is moved into place, then refused for
    its missing weights (the records were enough to choose it)."""
    import argparse

    import alignment

    for lr, val in ((1e-4, 0.6), (3e-4, 0.5), (9e-4, 0.7)):
        d = tmp_path / "teacher_grid" / f"lr{lr:g}"
        d.mkdir(parents=True)
        common.write_json(str(d / "teacher.json"), {"lr": lr, "val_loss": val})
    args = argparse.Namespace(out=str(tmp_path), teacher_lr=[1e-4, 3e-4, 9e-4], teacher_max_extend=2)
    with pytest.raises(FileNotFoundError, match="weights are not"):
        alignment.teacher_dir(args)
    assert json.load(open(tmp_path / "teacher" / "teacher.json"))["lr"] == 3e-4


def _sequential(values, loss, max_extend):
    """Drive harness.grid_step as alignment.py does: every given value first, then one value at a time."""
    import harness

    tried = {v: loss(v) for v in values}
    while True:
        chosen, nxt = harness.grid_step(values, tried, max_extend)
        if nxt is None:
            return chosen, sorted(tried)
        tried[nxt] = loss(nxt)


def test_grid_step_extends_past_the_edge_one_value_at_a_time():
    import math

    # minimum at 0.02, below the grid [0.1, 0.3, 0.9]: extended by the first two values' ratio (3), unrounded
    chosen, tried = _sequential([0.1, 0.3, 0.9], lambda v: (math.log(v / 0.02)) ** 2, max_extend=3)
    assert tried == pytest.approx([0.1 / 9, 0.1 / 3, 0.1, 0.3, 0.9])
    assert chosen == pytest.approx(0.1 / 3)  # 0.1/9 brackets it
    # capped: the best stays at the edge after max_extend values
    chosen, tried = _sequential([0.1, 0.3, 0.9], lambda v: -v, max_extend=2)
    assert tried == pytest.approx([0.1, 0.3, 0.9, 2.7, 8.1]) and chosen == pytest.approx(8.1)
    # interior: nothing added; a single value: not extended; a non-finite loss counts as the worst
    assert _sequential([1, 2, 4], lambda v: abs(v - 2), 3) == (2, [1, 2, 4])
    assert _sequential([5], lambda v: 1.0, 3) == (5, [5])
    assert _sequential([1, 2, 4], lambda v: float("nan") if v == 1 else v, 0) == (2, [1, 2, 4])


def test_convergence_and_alignment_share_the_harness():
    import alignment
    import harness

    assert convergence.next_rates is harness.next_values and convergence.choose_rate is harness.choose
    assert alignment.grid_step is harness.grid_step


def test_a_run_that_did_not_learn_ranks_with_the_diverged():
    """--min-gain: where every rate but the lowest leaves a classifier at chance, noise around ln 2 must not pick the
    'best' rate (and send the grid the wrong way): those runs count as failed, so the grid extends downwards."""
    import harness

    def run(lr, final):
        return {"lr": lr, "final_val_loss": final, "val_curve": [[0, 0.693], [60, final]]}

    runs = [run(1e-3, 0.6935), run(2e-3, 0.6907), run(4e-3, 0.688)]
    plain = {r["lr"]: harness.selection_loss(r) for r in runs}
    gated = {r["lr"]: harness.selection_loss(r, 0.03) for r in runs}
    assert harness.choose(plain) == (4e-3, "high")  # noise at chance: extend upwards
    assert harness.choose(gated) == (1e-3, "low") and all(v == float("inf") for v in gated.values())
    assert harness.next_values(gated, [5e-4, 1e-3, 2e-3], 2.0)["next"] == [5e-4]
    assert harness.selection_loss(run(5e-4, 0.60), 0.03) == 0.60
    assert harness.selection_loss(run(5e-4, float("nan")), 0.03) == float("inf")


# -- benchmarks/rate.py: the constant fitted on LoRA, the targets, the transfer to another preset's grid -----------
def _rate_results(root, grids: dict, probes: dict, autos: dict):
    """A rate.py results folder: grids {init: {lr: seed-0 val loss}} (the best rate also at seeds 1, 2), probes
    {init: raw polyak number} (3 seeds), autos {init: (lr, test loss)} (3 seeds)."""
    def write(path, obj):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(obj, f)

    write(os.path.join(root, "grid", "meta.json"), {"format": 2, "methods": list(grids),
                                                    "args": {"seeds": [0, 1, 2], "min_gain": None}})
    for m, val in grids.items():
        best = min(val, key=val.get)
        runs = [(lr, 0, v) for lr, v in val.items()] + [(best, s, val[best] + 0.01 * s) for s in (1, 2)]
        for lr, s, v in runs:
            write(os.path.join(root, "grid", "runs", f"{m}_{lr}_s{s}.json"),
                  {"method": m, "lr": lr, "seed": s, "final_val_loss": v, "final_loss": v, "init_s": 1.0,
                   "train_s": 99.0, "curve": [[0, 0.9], [10, v]], "val_curve": [[0, 0.9], [10, v]]})
    for m, raw in probes.items():
        for s in (0, 1, 2):
            write(os.path.join(root, "probes", f"{m}_s{s}_polyak.json"),
                  {"method": m, "seed": s, "rules": {"polyak": {"raw": raw, "seconds": 2.0, "evidence": {}}}})
    for m, (lr, loss) in autos.items():
        for s in (0, 1, 2):
            write(os.path.join(root, "auto_polyak", f"{m}_s{s}.json"),
                  {"method": m, "seed": s, "lr": lr, "final_loss": loss, "final_val_loss": loss, "suggest_s": 5.0})


def test_rate_benchmark_probes_every_rule_of_the_library():
    """rate.py's raw-constant options cover exactly lorafa.lr.RULES, each with the constant option that rule has."""
    import rate

    from lorafa import lr

    assert set(rate.RAW) == set(lr.RULES)
    assert all(set(opts) <= set(lr.RULES[rule].options) for rule, opts in rate.RAW.items())


def test_rate_probe_skips_what_earlier_probe_runs_measured(tmp_path):
    """A probe job is skipped where every rule it asks for is already probed for its (init, seed), in whichever
    files; a rule still missing, another seed or another init runs."""
    import rate

    _rate_results(str(tmp_path), {}, {"lora": 1e-3}, {})  # polyak, seeds 0-2
    with open(tmp_path / "probes" / "lora_s0_anchored.json", "w") as f:
        json.dump({"method": "lora", "seed": 0, "rules": {"anchored": {"raw": 1.0}}}, f)
    jobs = [{"method": m, "seed": s, "rules": rules, "path": f"{m}_{s}_{'-'.join(rules)}"}
            for m, s, rules in [("lora", 0, ["anchored", "polyak"]), ("lora", 1, ["anchored", "polyak"]),
                                ("lora", 1, ["polyak"]), ("lora", 5, ["polyak"]), ("pissa", 0, ["polyak"])]]
    assert [j["path"] for j in rate.unprobed(jobs, str(tmp_path))] == [
        "lora_1_anchored-polyak", "lora_5_polyak", "pissa_0_polyak"]


def test_rate_summary_with_one_grid_seed_decides_only_what_it_can(tmp_path):
    """A grid run at one seed has no seed-std: an auto run at or below its grid-best is met (a), one above it is
    undecided, shown as such and kept out of the count; the loss shows no "± nan"."""
    import rate

    root = str(tmp_path / "rate")
    grids = {"lora": {1e-3: 0.60, 2e-3: 0.50, 4e-3: 0.70}, "lora_fa": {5e-4: 0.65, 1e-3: 0.55, 2e-3: 0.68}}
    _rate_results(root, grids, {"lora": 0.04, "lora_fa": 0.04}, {"lora": (2e-3, 0.49), "lora_fa": (2e-3, 0.60)})
    for m, lr in (("lora", 2e-3), ("lora_fa", 1e-3)):
        for s in (1, 2):
            os.remove(os.path.join(root, "grid", "runs", f"{m}_{lr}_s{s}.json"))
    rate.fit(root)
    res = rate.summarise(root, os.path.join(root, "fit.json"), "toy", "polyak")
    rows = {r["init"]: r for r in common.read_table(os.path.join(root, "summary.csv"))[1]}
    assert rows["lora"]["(a) ≤ 1"] == "met" and rows["lora_fa"]["(a) ≤ 1"] == "— (one grid seed)"
    assert rows["lora_fa"]["grid-best test loss"] == "0.550" and rows["lora_fa"]["Δ in seed-stds"] in ("", None)
    assert res["verdict"]["polyak"]["a"] == [("lora", True), ("lora_fa", None)]


def test_rate_fit_summary_and_transfer(tmp_path):
    import rate

    root = str(tmp_path / "rate")
    grids = {"lora": {1e-3: 0.60, 2e-3: 0.50, 4e-3: 0.70}, "lora_fa": {5e-4: 0.65, 1e-3: 0.55, 2e-3: 0.68}}
    # the raw numbers: LoRA's 0.04 (k = 2e-3/0.04 = 0.05); LoRA-FA's gives 0.05 × 0.04 = 2e-3, twice its best
    _rate_results(root, grids, {"lora": 0.04, "lora_fa": 0.04},
                  {"lora": (2e-3, 0.505), "lora_fa": (2e-3, 0.60)})
    fit = rate.fit(root)
    assert fit["rules"]["polyak"]["k"] == pytest.approx(0.05) and fit["grid_best_lora"] == 2e-3
    res = rate.summarise(root, os.path.join(root, "fit.json"), "toy", "polyak", fixed=1.5e-3)
    rows = {r["init"]: r for r in common.read_table(os.path.join(root, "summary.csv"))[1]}
    # LoRA: 0.505 against 0.51 ± 0.01 -> within a seed-std; LoRA-FA: 0.60 against 0.56 ± 0.01 -> 4 stds above
    assert rows["lora"]["(a) ≤ 1"] == "met" and rows["lora_fa"]["(a) ≤ 1"] == "missed"
    assert rows["lora_fa"]["auto / best"] == "2.00" and rows["lora"]["cost / run"] == "0.050"
    verdict = res["verdict"]["polyak"]
    assert verdict["a"] == [("lora", True), ("lora_fa", False)]
    assert verdict["c"] == {"init": "lora_fa", "auto test loss": 0.60, "lora grid-best test loss": pytest.approx(0.51),
                            "met": False}
    assert os.path.getsize(os.path.join(root, "rate.png")) > 0
    # the runner's fixed rate beside each rule: the grid's validation loss there, midway (in log rate) for LoRA
    fixed = {r["init"]: r for r in common.read_table(os.path.join(root, "rules.csv"))[1]
             if r["rule"] == rate.FORMER}
    assert fixed["lora"]["val loss there"] == f"{0.60 + math.log(1.5) / math.log(2) * (0.50 - 0.60):.3f}"
    assert fixed["lora_fa"]["ratio"] == "1.50" and fixed["lora_fa"]["outside grid"] in ("", None)
    assert rate.runner_rate("smollm2-135m-instruct") > 0 and rate.runner_rate("no-such-model") is None
    # the same constant on "another preset" whose grids (one folder, specs renamed) put every best 4x higher
    other = str(tmp_path / "other")
    _rate_results(other, {"lora": {4e-3: 0.6, 8e-3: 0.5, 1.6e-2: 0.7}, "lora_fa:x=1": {2e-3: 0.6, 4e-3: 0.5,
                                                                                       8e-3: 0.7}}, {}, {})
    md = rate.transfer(root, os.path.join(root, "fit.json"), os.path.join(other, "grid"), {"lora_fa": "lora_fa:x=1"},
                       "toy")
    rows = {r["init"]: r for r in common.read_table(os.path.join(root, "transfer.csv"))[1]}
    assert rows["lora"]["ratio"] == "0.25" and rows["lora"]["outside grid"] == "below"
    assert rows["lora"]["k here / k there"] == "4.00" and rows["lora_fa"]["ratio (here)"] == "2.00"
    assert "lora_fa" in md
    # against this preset's own grids: LoRA's constant here is the fitted one, so every ratio is the same twice
    rate.transfer(root, os.path.join(root, "fit.json"), None, {}, "toy")
    rows = {r["init"]: r for r in common.read_table(os.path.join(root, "transfer.csv"))[1]}
    assert rows["lora_fa"]["ratio"] == rows["lora_fa"]["ratio (here)"] == "2.00"
    assert rows["lora"]["k here / k there"] == "1.00"
    # a preset whose grids ran but whose probes and auto runs have not: the tables that can be made, no summary
    res = rate.summarise(other, os.path.join(root, "fit.json"), "toy", "polyak", fixed=4e-3)
    assert "no grid-best rate against auto yet" in res["markdown"] and res["verdict"] == {}
    assert not os.path.exists(os.path.join(other, "summary.csv"))
    rules = common.read_table(os.path.join(other, "rules.csv"))[1]
    assert [(r["init"], r["rule"], r["ratio"]) for r in rules] == [("lora", rate.FORMER, "0.50")]


def test_rate_auto_with_schedule_free_adamw(tmp_path):
    """`rate.py auto --optimizer sf`: each init trains as `<init>+sf` at anchored's rate with c = schedule-free
    AdamW's own default rate, into `auto_anchored+sf`; only anchored can (the other constants are AdamW's); the
    summary sets those runs beside the same init's AdamW grid as rule `anchored+sf`."""
    import argparse

    import rate

    root = str(tmp_path / "rate")
    cargs = convergence.parser().parse_args(["--preset", "classification", "--out", os.path.join(root, "grid")])
    p = convergence.resolve_preset(cargs)
    args = argparse.Namespace(out=root, rule="anchored", optimizer="sf", inits=["lora", "lora_fa"], seeds=[0, 1],
                              k=convergence.FREE_LRS["sf"])
    jobs = rate._jobs(args, cargs, p, "auto")
    assert [(j["method"], j["seed"]) for j in jobs] == [("lora+sf", 0), ("lora+sf", 1), ("lora_fa+sf", 0),
                                                        ("lora_fa+sf", 1)]
    assert {j["lr_options"]["c"] for j in jobs} == {0.0025} and {j["lr_rule"] for j in jobs} == {"anchored"}
    assert jobs[2]["path"] == os.path.join(root, "auto_anchored+sf", "lora_fa+sf_s0.json")
    # AdamW's auto runs keep their folder
    adamw = rate._jobs(argparse.Namespace(**dict(vars(args), optimizer="adamw", k=3e-3)), cargs, p, "auto")
    assert adamw[0]["method"] == "lora" and os.path.dirname(adamw[0]["path"]) == os.path.join(root, "auto_anchored")
    with pytest.raises(SystemExit, match="--rule anchored"):
        rate.main(["auto", "--optimizer", "sf", "--rule", "polyak", "--out", root, "--preset", "classification"])

    grids = {"lora": {1e-3: 0.60, 2e-3: 0.50, 4e-3: 0.70}, "lora_fa": {5e-4: 0.65, 1e-3: 0.55, 2e-3: 0.68}}
    _rate_results(root, grids, {"lora": 0.04, "lora_fa": 0.04}, {})
    rate.fit(root)
    os.makedirs(os.path.join(root, "auto_anchored+sf"), exist_ok=True)  # _jobs made it
    for m, loss in (("lora", 0.49), ("lora_fa", 0.70)):
        for s in (0, 1, 2):
            with open(os.path.join(root, "auto_anchored+sf", f"{m}+sf_s{s}.json"), "w") as f:
                json.dump({"method": f"{m}+sf", "seed": s, "lr": 2.5e-3, "final_loss": loss, "final_val_loss": loss,
                           "suggest_s": 5.0}, f)
    res = rate.summarise(root, os.path.join(root, "fit.json"), "toy", "anchored+sf")
    rows = {(r["init"], r["rule"]): r for r in common.read_table(os.path.join(root, "summary.csv"))[1]}
    # LoRA at 0.49 against its AdamW grid's 0.51 ± 0.01: met; LoRA-FA at 0.70 against 0.56 ± 0.01: missed
    assert rows[("lora", "anchored+sf")]["(a) ≤ 1"] == "met"
    assert rows[("lora_fa", "anchored+sf")]["(a) ≤ 1"] == "missed"
    assert res["verdict"]["anchored+sf"]["c"]["init"] == "lora_fa"
    assert res["verdict"]["anchored+sf"]["a"] == [("lora", True), ("lora_fa", False)]
    # schedule-free AdamW at its one default rate (OUT/sf_default), beside its auto rate and AdamW's grid-best
    os.makedirs(os.path.join(root, "sf_default", "runs"))
    with open(os.path.join(root, "sf_default", "meta.json"), "w") as f:
        json.dump({"format": 2, "methods": ["lora_fa+sf"], "args": {"seeds": [0]}}, f)
    with open(os.path.join(root, "sf_default", "runs", "lora_fa+sf_s0.json"), "w") as f:
        json.dump({"method": "lora_fa+sf", "lr": 2.5e-3, "seed": 0, "final_val_loss": 0.9, "final_loss": 0.95}, f)
    rate.summarise(root, os.path.join(root, "fit.json"), "toy", "anchored")
    row, = common.read_table(os.path.join(root, "sf_default.csv"))[1]
    assert (row["init"], row["val at default"], row["test at default"]) == ("lora_fa", "0.900", "0.950")
    assert (row["auto rate"], row["val at auto"], row["AdamW grid-best rate"]) == ("0.0025", "0.700", "0.001")
    assert row["AdamW grid-best val"] == "0.550"


def test_rate_verdict_table_counts_each_target_from_the_results(tmp_path):
    """The targets table: (a) counts the inits within a seed-std and names the misses, (b) the cost's range, (c)
    compares with default LoRA's grid-best; a preset whose rule has no auto runs says "not run"."""
    cols = ["init", "rule", "grid-best test loss", "auto test loss", "Δ in seed-stds", "cost / run"]
    for name, rules in [("RATE_MAIN", {"anchored+sf": True}), ("RATE_CAUSAL", {"anchored+sf": True}),
                        ("RATE_CLS", {"anchored+sf": False, "anchored": True})]:
        folder = tmp_path / getattr(tables, name)
        folder.mkdir(parents=True)
        rows, verdict = [], {}
        for rule, lora_fa_ok in rules.items():
            rows += [{"init": "lora", "rule": rule, "grid-best test loss": "0.500 ± 0.010",
                      "auto test loss": "0.495 (3 seeds)", "Δ in seed-stds": "-0.50", "cost / run": "0.020"},
                     {"init": "lora_fa", "rule": rule, "grid-best test loss": "0.490 ± 0.010",
                      "auto test loss": "0.530 (3 seeds)", "Δ in seed-stds": "1.20" if not lora_fa_ok else "0.20",
                      "cost / run": "0.050"}]
            verdict[rule] = {"a": [["lora", True], ["lora_fa", lora_fa_ok]], "b": [],
                             "c": {"init": "lora_fa", "auto test loss": 0.53 if not lora_fa_ok else 0.49,
                                   "lora grid-best test loss": 0.5, "met": lora_fa_ok}}
        common.write_table(rows, cols, str(folder / "summary"))
        (folder / "verdict.json").write_text(json.dumps(verdict))
    lines = tables.render_rate_verdict(str(tmp_path)).splitlines()[2:]
    assert len(lines) == 6
    main_sf, main_adamw, _, _, cls_sf, cls_adamw = (line.split(" | ") for line in lines)
    assert main_sf[2:] == ["3", "2 of 2", "2.0-5.0%", "lora_fa 0.490", "0.500 ± 0.010", "met |"]
    assert main_adamw[3] == "not run"
    assert cls_sf[3] == "1 of 2; missed: lora_fa 1.20 stds" and cls_sf[-1] == "missed by 0.030 |"
    assert cls_adamw[3] == "2 of 2" and cls_adamw[-1] == "met |"


@pytest.mark.parametrize("out, opts", [
    ("rate_causal", "--preset causal --max-extend 3 --eval-every 40 --threads 1"),  # benchmarks/rate_causal.sh
    ("rate_main", "--preset main_job --max-extend 3 --eval-every 22 --threads 1"),  # benchmarks/rate_main.sh
])
def test_committed_step0_caches_match_the_keys_a_resumed_protocol_computes(out, opts):
    """A resumed `rate_lanes.sh` looks up every saved run's step-0 record under the options it runs with; a record
    whose key no longer matches (e.g. an option added to the key) raises and stops the resume."""
    import dataclasses
    import glob

    root = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", out)
    checked = 0
    for sub in sorted(glob.glob(os.path.join(root, "grid*")) + glob.glob(os.path.join(root, "auto_*"))):
        if not os.path.isdir(os.path.join(sub, "runs")):
            continue
        name = opts.split()[1]
        args = convergence.parser().parse_args(opts.split() + [  # the CPU batch (CUDA would take 4× by default)
            "--batch", str(convergence.PRESETS[name].batch), "--out", sub, "--step0-cache",
            os.path.join(root, "step0_cache")])
        preset = dataclasses.asdict(convergence.resolve_preset(args))
        if preset["task"] == "gsm8k" and not os.path.isfile(os.path.join(args.gsm8k, "train.jsonl")):
            pytest.skip(f"no GSM8K copy at {args.gsm8k} (the causal records are keyed by its content)")
        for r in convergence.saved_runs(sub)[0]:
            job = {"method": r["method"], "lr": r["lr"], "seed": r["seed"], "args": vars(args), "preset": preset,
                   "probe": None}
            convergence.step0_cached(job, r["seed"])  # raises on a key mismatch
            checked += 1
    assert checked >= 30
