"""GSM8K evaluation: answer parsing, left-padded batched greedy generation, sharding over 2 processes, the CLI."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import VOCAB, tiny_gpt2, tiny_llama
from peft import LoraConfig, PeftModel
from spawn_ranks import free_port, run_ranks
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import lorafa
from lorafa.eval import answers_match, evaluate_gsm8k, extract_answer, generate, load_gsm8k_examples
from lorafa.eval import cli as eval_cli
from lorafa.eval import gsm8k

ROWS = [
    {"question": "what is 2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"},
    {"question": "a pen costs $3. how much do 5 pens cost?", "answer": "5*3=15\n#### 15"},
    {"question": "tim has 1,000 coins and loses 1. how many are left?", "answer": "#### 999"},
    {"question": "what is 3-7?", "answer": "3-7=-4\n#### -4"},
]
PROMPTS = ["Q: what is 2+2?\nA: ", "Q: 12 apples, 7 pears and 3 plums?\nA: ", "Q: hi\nA: ",
           "Q: how many pens are there in 3 boxes of 12?\nA: ", "Q: x\nA: "]


# ---------------------------------------------------------------- answer parsing

@pytest.mark.parametrize("text, expected", [
    ("so she makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("#### -3", "-3"),
    ("The temperature drops to -12 degrees", "-12"),
    ("#### 3.50", "3.5"),
    ("It costs $1,234.50.", "1234.5"),
    ("#### 1,000", "1000"),
    ("The answer is 42.", "42"),
    ("the ANSWER is -0.5 and later we mention 7", "-0.5"),
    ("First 10 then #### 5 and finally #### 6", "6"),
    ("The answer is 3 #### 8", "8"),  # #### wins over "The answer is"
    ("He has 3 apples and 5 pears, 8 fruits in total", "8"),
    ("There is no number here.", None),
    ("", None),
    (None, None),
    ("-0.5", "-0.5"),
    ("+7", "7"),
    ("A rise of 25%", "25"),
    ("16-3-4=9", "9"),  # a minus between numbers is subtraction, not a sign
    ("loss of -$5", "-5"),
    ("#### \nbut the total was 12", "12"),  # a marker without a number falls through
    ("The total is 18.", "18"),
    ("18.00", "18"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("pred, gold, expected", [
    ("1,000", "1000", True), ("3.50", "3.5", True), ("-3", "3", False), ("18", "18", True),
    ("18.0000001", "18", True), ("18.01", "18", False), (None, "3", False), ("3", None, False),
    ("$5", "5", True), ("abc", "5", False), ("nan", "nan", False),
])
def test_answers_match(pred, gold, expected):
    assert answers_match(pred, gold) is expected


# ---------------------------------------------------------------- tiny tokenizer and model

def make_tokenizer(path: Path):
    """A character-level fast tokenizer with exactly VOCAB ids (<pad>=0, <s>=1, </s>=2, <unk>=3), saved to `path`."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = string.digits + string.ascii_lowercase + " \n:?.,#$-+=QA*/()%!'<>;@"
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *chars])}
    assert len(vocab) == VOCAB
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per char
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def save_base(path: Path, hidden: int | None = None, seed: int = 0) -> LlamaForCausalLM:
    model = tiny_llama(seed) if hidden is None else _llama_with_hidden(hidden, seed)
    model.save_pretrained(path)
    make_tokenizer(path)
    return model


def _llama_with_hidden(hidden: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    make_tokenizer(path)
    return path


def _one_by_one(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                         max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("seed", [0, 1])
def test_left_padded_batches_equal_unpadded_generation(tok_dir, seed):
    tokenizer, model = AutoTokenizer.from_pretrained(tok_dir), tiny_llama(seed)
    tokenizer.padding_side = "right"
    expected = [_one_by_one(model, tokenizer, p, 12) for p in PROMPTS]
    assert any(expected), "the tiny model should produce some text for the comparison to mean something"
    got = generate(model, tokenizer, PROMPTS, batch_size=3, max_new_tokens=12, progress=False)
    assert got == expected  # same texts, in input order, although batches are sorted by length
    assert tokenizer.padding_side == "right"  # restored
    assert generate(model, tokenizer, [], batch_size=3, max_new_tokens=4) == []


def _constant_head(model, token_id: int):
    """Make `token_id` the argmax at every position (a zero head plus a bias)."""
    head = torch.nn.Linear(model.config.hidden_size, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token_id] = 1.0
    model.lm_head = head
    return model


def test_generate_stops_at_eos_and_bounds_length(tok_dir):
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    a = tokenizer.convert_tokens_to_ids("a")
    assert generate(_constant_head(tiny_llama(0), a), tokenizer, PROMPTS[:3], batch_size=2, max_new_tokens=3,
                    progress=False) == ["aaa"] * 3
    assert generate(_constant_head(tiny_llama(0), tokenizer.eos_token_id), tokenizer, PROMPTS[:3], batch_size=2,
                    max_new_tokens=5, progress=False) == [""] * 3
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(tiny_llama(0), tokenizer, PROMPTS, max_new_tokens=0)


def test_evaluate_gsm8k_scores_fake_generations(monkeypatch):
    examples = [{"prompt": f"Q: {i}\nA: ", "final": gold} for i, gold in enumerate(["18", "1000", "-3", "2.5"])]
    canned = {"Q: 0\nA: ": "9*2 = 18 #### 18", "Q: 1\nA: ": "The answer is 1,000.", "Q: 2\nA: ": "#### 3",
              "Q: 3\nA: ": "no idea"}
    seen = []

    def fake_generate(model, tokenizer, prompts, batch_size, max_new_tokens, progress):
        seen.append(list(prompts))
        return [canned[p] for p in prompts]

    monkeypatch.setattr(gsm8k, "generate", fake_generate)
    result = evaluate_gsm8k(torch.nn.Linear(1, 1), None, examples)
    assert seen == [[ex["prompt"] for ex in examples]]
    assert (result["correct"], result["n"], result["accuracy"]) == (2, 4, 0.5)
    assert [r["index"] for r in result["records"]] == [0, 1, 2, 3]
    assert [r["pred"] for r in result["records"]] == ["18", "1000", "3", None]
    assert [r["correct"] for r in result["records"]] == [True, True, False, False]
    assert set(result["records"][0]) == {"index", "prompt", "generation", "pred", "gold", "correct"}
    with pytest.raises(ValueError, match="No examples"):
        evaluate_gsm8k(torch.nn.Linear(1, 1), None, [])


# ---------------------------------------------------------------- data loading

def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_gsm8k_examples_from_folder_and_file(tmp_path):
    _write_jsonl(tmp_path / "test.jsonl", ROWS)
    examples = load_gsm8k_examples(str(tmp_path), "test")
    assert [ex["final"] for ex in examples] == ["4", "15", "999", "-4"]
    assert examples[0]["prompt"] == "Q: what is 2+2?\nA: "
    assert load_gsm8k_examples(str(tmp_path / "test.jsonl"), n=2) == examples[:2]
    with pytest.raises(ValueError, match="train.jsonl"):
        load_gsm8k_examples(str(tmp_path), "train")
    with pytest.raises(ValueError, match="positive"):
        load_gsm8k_examples(str(tmp_path), n=0)


def test_load_gsm8k_examples_from_unreachable_hub_id_says_pass_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="local path"):
        load_gsm8k_examples("no-such-owner/no-such-gsm8k-copy")


def test_load_gsm8k_examples_in_the_gsm8k_file_format(tmp_path):
    """Rows as GSM8K stores them: calculator annotations in the solution, the gold after '####', commas in numbers."""
    rows = [{"question": "Ducks lay 16 eggs; 7 are used. Eggs sell for $2. Earnings?",
             "answer": "16 - 7 = <<16-7=9>>9 eggs.\n9 * 2 = $<<9*2=18>>18.\n#### 18"},
            {"question": "A robe takes 2 bolts and half that much more. Total?", "answer": "2/2=<<2/2=1>>1\n#### 3"},
            {"question": "A house worth $80,000 gains 150% of its value minus $50,000. Profit?",
             "answer": "... #### 70,000"}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_gsm8k_examples(os.fspath(tmp_path), "test", n=3)
    assert [ex["final"] for ex in examples] == ["18", "3", "70000"]
    assert examples[0]["prompt"].startswith("Q: Ducks lay 16 eggs") and examples[0]["prompt"].endswith("A: ")
    assert load_gsm8k_examples(os.fspath(tmp_path / "test.jsonl"), n=2) == examples[:2]


SHARED_GSM8K = Path(os.environ.get("LORAFA_GSM8K_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"))


@pytest.mark.skipif(not (SHARED_GSM8K / "test.jsonl").is_file(),
                    reason="no real GSM8K copy: set LORAFA_GSM8K_DIR to a folder with test.jsonl")
def test_load_the_real_gsm8k_copy():
    examples = load_gsm8k_examples(os.fspath(SHARED_GSM8K), "test")
    assert len(examples) == 1319 and [ex["final"] for ex in examples[:3]] == ["18", "3", "70000"]


# ---------------------------------------------------------------- two processes (gloo)

def _examples() -> list[dict]:
    return [{"prompt": p, "final": str(i)} for i, p in enumerate(PROMPTS)]


def _dist_worker(rank: int, port: int, tok_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        asked = []
        real = gsm8k.generate

        def recording(model, tokenizer, prompts, *args):
            asked.extend(prompts)
            return real(model, tokenizer, prompts, *args)

        gsm8k.generate = recording
        result = evaluate_gsm8k(tiny_llama(0), AutoTokenizer.from_pretrained(tok_dir), _examples(), batch_size=2,
                                max_new_tokens=6, progress=False)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"asked": asked, "result": result}, f)
    finally:
        dist.destroy_process_group()


def test_two_processes_shard_and_gather_the_single_process_records(tok_dir, tmp_path):
    run_ranks(_dist_worker, 2, free_port(), str(tok_dir), str(tmp_path))
    single = evaluate_gsm8k(tiny_llama(0), AutoTokenizer.from_pretrained(tok_dir), _examples(), batch_size=2,
                            max_new_tokens=6, progress=False)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["asked"] == PROMPTS[rank::2]
        assert got["result"] == single  # every rank returns the full result, in the original order


# ---------------------------------------------------------------- the CLI

def _save_adapter(path: Path, base: torch.nn.Module, target_modules=("q_proj", "v_proj")) -> None:
    peft_model = lorafa.initialize(base, LoraConfig(r=2, target_modules=list(target_modules)),
                                   lorafa.InitConfig(method="lora"), progress=False)
    with torch.no_grad():  # a trained-looking adapter, so loading it changes the model
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    lorafa.save_adapter(peft_model, path)


@pytest.fixture
def run_layout(tmp_path):
    """runs/<name>/{run_config.json, adapter/} on a tiny saved base, and a 4-row GSM8K folder."""
    base_dir, data_dir, run_dir = tmp_path / "base", tmp_path / "gsm8k", tmp_path / "runs" / "tiny-run"
    save_base(base_dir)
    data_dir.mkdir()
    _write_jsonl(data_dir / "test.jsonl", ROWS)
    run_dir.mkdir(parents=True)
    _save_adapter(run_dir / "adapter", tiny_llama(0))
    (run_dir / "run_config.json").write_text(json.dumps({"model": {"name": str(base_dir)},
                                                         "eval": {"data_path": str(data_dir)}}))
    return tmp_path, base_dir, data_dir, run_dir


def test_cli_end_to_end_writes_one_result_file(run_layout, capsys):
    root, base_dir, data_dir, run_dir = run_layout
    assert eval_cli.main(["--wandb_name", "tiny-run", "--runs_root", str(root / "runs"), "--max_new_tokens", "4",
                          "--batch_size", "3"]) == 0
    result = json.loads((run_dir / "eval_gsm8k.json").read_text())
    assert {"accuracy", "correct", "n", "model", "adapter", "data", "n_processes", "wall_time_s",
            "records"} <= set(result)
    assert (result["n"], result["n_processes"], len(result["records"])) == (4, 1, 4)
    assert result["model"] == str(base_dir) and result["adapter"] == str(run_dir / "adapter")
    assert result["data"] == str(data_dir)  # from run_config.json's eval.data_path
    assert [r["gold"] for r in result["records"]] == ["4", "15", "999", "-4"]
    assert result["accuracy"] == result["correct"] / 4
    assert f"GSM8K accuracy: {result['accuracy']:.4f} ({result['correct']}/4)" in capsys.readouterr().out
    assert not [p for p in os.listdir(run_dir) if ".tmp" in p]

    out = root / "elsewhere" / "r.json"  # explicit data file, limit and output
    eval_cli.main(["--run_dir", str(run_dir), "--data_path", str(data_dir / "test.jsonl"), "--n", "2",
                   "--max_new_tokens", "2", "--out", str(out)])
    assert json.loads(out.read_text())["n"] == 2


def test_load_for_eval_loads_the_saved_adapter(run_layout):
    _, base_dir, _, run_dir = run_layout
    model, tokenizer = eval_cli.load_for_eval(str(base_dir), str(run_dir / "adapter"))
    assert isinstance(model, PeftModel) and tokenizer.pad_token_id == 0 and not model.training
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(run_dir / "adapter"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
        assert not torch.allclose(model(ids).logits, AutoModelForCausalLM.from_pretrained(base_dir)(ids).logits)


def test_adapter_from_a_different_base_is_a_clear_error(run_layout, tmp_path, monkeypatch):
    root, base_dir, _, run_dir = run_layout
    wide = tmp_path / "wide-adapter"
    _save_adapter(wide, _llama_with_hidden(48, 0))
    argv = ["--run_dir", str(run_dir), "--adapter", str(wide), "--max_new_tokens", "2"]
    with pytest.raises(ValueError, match="different base model.*--model"):
        eval_cli.main(argv)
    # PEFT's own size-mismatch error is turned into the same advice
    monkeypatch.setattr(eval_cli, "check_adapter_fits", lambda base, adapter: None)
    with pytest.raises(ValueError, match="different base model.*--model"):
        eval_cli.load_for_eval(str(base_dir), str(wide))


def test_adapter_for_other_module_names_is_a_clear_error(run_layout, tmp_path):
    _, base_dir, _, _ = run_layout
    gpt2_adapter = tmp_path / "gpt2-adapter"
    _save_adapter(gpt2_adapter, tiny_gpt2(0), target_modules=("c_attn",))
    with pytest.raises(ValueError, match="different base model"):
        eval_cli.load_for_eval(str(base_dir), str(gpt2_adapter))


def test_cli_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="--runs_root"):
        eval_cli.main(["--wandb_name", "missing", "--runs_root", str(tmp_path)])
    with pytest.raises(ValueError, match="--model"):
        eval_cli.main(["--run_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="does not exist"):
        eval_cli.main(["--model", "x", "--adapter", str(tmp_path / "nope")])


def test_cli_evaluates_a_merged_checkpoint(run_layout):
    root, base_dir, _, run_dir = run_layout
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(run_dir / "adapter"))
    peft_model.merge_and_unload().save_pretrained(run_dir / "merged")  # no tokenizer: the base model's is used
    summary = eval_cli.evaluate_run(["--run_dir", str(run_dir), "--use_merged", "--max_new_tokens", "3"])
    assert summary["merged"] == str(run_dir / "merged") and summary["adapter"] is None and summary["n"] == 4
    adapter_run = eval_cli.evaluate_run(["--run_dir", str(run_dir), "--max_new_tokens", "3",
                                         "--out", str(root / "adapter.json")])
    merged_records = json.loads((run_dir / "eval_gsm8k.json").read_text())["records"]
    adapter_records = json.loads((root / "adapter.json").read_text())["records"]
    assert adapter_run["adapter"] == str(run_dir / "adapter")
    assert [r["generation"] for r in merged_records] == [r["generation"] for r in adapter_records]


def test_generate_gives_a_tokenizer_without_pad_token_the_eos_token(tok_dir):
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    tokenizer.pad_token = None
    assert tokenizer.pad_token is None
    out = generate(tiny_llama(0), tokenizer, PROMPTS[:2], batch_size=2, max_new_tokens=3, progress=False)
    assert len(out) == 2 and tokenizer.pad_token == tokenizer.eos_token


def test_wandb_logging_is_optional_and_offline_without_network(monkeypatch):
    import sys
    import types

    calls = {}

    class FakeRun:
        def log(self, data):
            calls["log"] = data

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return FakeRun()

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(eval_cli, "network_reachable", lambda *a, **k: False)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    eval_cli._log_wandb("proj", "run", {"accuracy": 0.5, "correct": 1, "n": 2})
    assert calls["init"]["mode"] == "offline" and calls["init"]["project"] == "proj" and calls["finished"]
    assert calls["log"] == {"gsm8k/accuracy": 0.5, "gsm8k/correct": 1, "gsm8k/n": 2}
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: a warning, no error
    eval_cli._log_wandb("proj", "run", {"accuracy": 0.5, "correct": 1, "n": 2})
