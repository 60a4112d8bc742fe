"""GSM8K evaluation (SPEC §7): answer matching, batched greedy generation, sharding over processes, data loading.

The answers are parsed by `lorafa.data.answers.extract_answer` (importable from here and from `lorafa.eval`)."""

from __future__ import annotations

import json
import logging
import os
from decimal import Decimal, InvalidOperation

import torch
from tqdm.auto import tqdm

from ..data.answers import extract_answer
from ..data.collate import format_prompt
from ..stats.distributed import all_gather_objects, world

logger = logging.getLogger(__name__)

TOLERANCE = Decimal("1e-6")


def _to_decimal(value: str | None) -> Decimal | None:
    if value is None:
        return None
    cleaned = str(value).strip().replace(",", "").replace("$", "").replace("%", "").rstrip(".").replace("\u2212", "-")
    try:
        number = Decimal(cleaned)
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def answers_match(pred: str | None, gold: str | None) -> bool:
    """Whether two numeric answers are equal (absolute tolerance 1e-6), so "1,000" == "1000" and "-3" != "3".

    Args:
        pred: the predicted answer, e.g. from `extract_answer`.
        gold: the reference answer.

    Returns:
        True when both parse as finite numbers that agree; None or an unparseable string never matches.
    """
    a, b = _to_decimal(pred), _to_decimal(gold)
    return a is not None and b is not None and abs(a - b) <= TOLERANCE


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], batch_size: int = 16, max_new_tokens: int = 256,
             progress: bool = True) -> list[str]:
    """Greedy continuations of `prompts`, generated in left-padded batches.

    Prompts are sorted by token length so that a batch holds prompts of similar length (less padding); the
    continuations are returned in the original order. Each sequence stops at EOS or after `max_new_tokens` tokens.
    The tokenizer's padding side is set to "left" for the call and restored after; a tokenizer without a pad token
    gets EOS as its pad token (kept).

    Args:
        model: a causal LM (transformers or PEFT), already on its device.
        tokenizer: its tokenizer.
        prompts: the prompts, formatted.
        batch_size: prompts per `generate` call.
        max_new_tokens: bound on the continuation's length.
        progress: show a progress bar (rank 0 only).

    Returns:
        The continuations only (prompt removed, special tokens skipped), one per prompt, in input order.

    Raises:
        ValueError: batch_size or max_new_tokens < 1, or the tokenizer has neither a pad nor an EOS token.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size={batch_size} and max_new_tokens={max_new_tokens} must both be >= 1.")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has neither a pad nor an EOS token: set tokenizer.pad_token first.")
        tokenizer.pad_token = tokenizer.eos_token
    lengths = [len(ids) for ids in tokenizer(list(prompts))["input_ids"]] if prompts else []
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # longest first: memory trouble shows at once
    outputs: list[str | None] = [None] * len(prompts)
    device, saved_side = _model_device(model), tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="gsm8k generate", disable=not progress or world()[0] != 0, leave=False):
            idx = order[start:start + batch_size]
            batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
            out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False,
                                 num_beams=1, use_cache=True, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(idx, texts):
                outputs[i] = text
    finally:
        tokenizer.padding_side = saved_side
        model.train(was_training)
    return outputs


def evaluate_gsm8k(model, tokenizer, examples: list[dict], batch_size: int = 16, max_new_tokens: int = 256,
                   progress: bool = True) -> dict:
    """Accuracy of greedy generations on GSM8K-style examples, sharded over processes.

    Under an initialised torch.distributed, rank r generates for `examples[r::world_size]` and the records are
    gathered (`all_gather_object`), so every rank returns the same full result. Every rank must call this.

    Args:
        model: a causal LM on its device (put in eval mode for the call).
        tokenizer: its tokenizer.
        examples: dicts with "prompt" (formatted, e.g. "Q: ...\\nA: ") and "final" (the gold numeric string).
        batch_size, max_new_tokens, progress: as for `generate`.

    Returns:
        {"accuracy", "correct", "n", "records"}, records in the order of `examples`, each
        {"index", "prompt", "generation", "pred", "gold", "correct"}.

    Raises:
        ValueError: no examples, or an example without "prompt"/"final".
    """
    if not examples:
        raise ValueError("No examples to evaluate: check the data path, split and n.")
    missing = [i for i, ex in enumerate(examples) if "prompt" not in ex or "final" not in ex]
    if missing:
        raise ValueError(f"Examples {missing[:5]} lack 'prompt' or 'final': build them with load_gsm8k_examples.")
    rank, size = world()
    mine = list(range(len(examples)))[rank::size]
    generations = generate(model, tokenizer, [examples[i]["prompt"] for i in mine], batch_size, max_new_tokens,
                           progress)
    shard = []
    for i, text in zip(mine, generations):
        pred, gold = extract_answer(text), examples[i]["final"]
        shard.append({"index": i, "prompt": examples[i]["prompt"], "generation": text, "pred": pred, "gold": gold,
                      "correct": answers_match(pred, gold)})
    records = sorted((r for part in all_gather_objects(shard) for r in part), key=lambda r: r["index"])
    correct = sum(r["correct"] for r in records)
    return {"accuracy": correct / len(records), "correct": correct, "n": len(records), "records": records}


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{line_no} is not valid JSON ({exc}): fix or regenerate it.") from exc
    return rows


def _load_hub(path_or_id: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError as exc:
        raise ValueError(f"{path_or_id!r} is not a local file or folder and the `datasets` package is not installed: "
                         f"pass a local path (a folder with {split}.jsonl, or a .jsonl file) or pip install datasets."
                         ) from exc
    try:
        return list(datasets.load_dataset(path_or_id, "main", split=split))
    except Exception as exc:  # offline, unknown id, missing split: all the same advice
        raise ValueError(f"Could not load {path_or_id!r} (split {split!r}) with datasets.load_dataset ({exc}): "
                         f"pass a local path (a folder with {split}.jsonl, or a .jsonl file).") from exc


def load_gsm8k_examples(path_or_id: str = "openai/gsm8k", split: str = "test", n: int | None = None) -> list[dict]:
    """GSM8K examples as {"prompt": format_prompt(question), "final": gold answer}.

    Args:
        path_or_id: a folder holding `{split}.jsonl`, a `.jsonl` file (rows with "question" and "answer", the gold
            after "####"), or a Hugging Face dataset id (loaded with config "main", needs `datasets` and a network
            or a cache).
        split: the split ("test" or "train").
        n: keep the first n examples (None: all).

    Returns:
        The examples, in file order.

    Raises:
        ValueError: n < 1, a folder without `{split}.jsonl`, rows lacking question/answer or a gold number, or a
            hub id that cannot be loaded.
    """
    if n is not None and n < 1:
        raise ValueError(f"n={n}: pass a positive number of examples, or None for all.")
    path = os.fspath(path_or_id)
    if os.path.isdir(path):
        file = os.path.join(path, f"{split}.jsonl")
        if not os.path.isfile(file):
            raise ValueError(f"{path} has no {split}.jsonl: pass a folder with that file, or the .jsonl file itself.")
        rows = _read_jsonl(file)
    elif os.path.isfile(path):
        rows = _read_jsonl(path)
    else:
        rows = _load_hub(path, split)
    rows = rows[:n] if n is not None else rows
    examples = []
    for i, row in enumerate(rows):
        if "question" not in row or "answer" not in row:
            raise ValueError(f"Row {i} of {path} lacks 'question' or 'answer': GSM8K rows have both.")
        final = extract_answer(row["answer"])
        if final is None:
            raise ValueError(f"Row {i} of {path} has no number in its answer: expected '#### <number>' at the end.")
        examples.append({"prompt": format_prompt(row["question"]), "final": final})
    logger.info("gsm8k: %d examples from %s (%s)", len(examples), path, split)
    return examples
