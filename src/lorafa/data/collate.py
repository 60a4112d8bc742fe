"""Tokenising prompt/answer pairs for causal-LM fine-tuning and for the statistics pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROMPT_TEMPLATE = "Q: {question}\nA: "


def format_prompt(question: str) -> str:
    """The GSM8K-style prompt used for training and evaluation (SPEC §7)."""
    return PROMPT_TEMPLATE.format(question=question)


@dataclass
class CausalLMCollator:
    """Collate `{"prompt": str, "answer": str}` examples into right-padded batches.

    Labels are the input ids with −100 on prompt tokens and padding, so the loss is the mean over answer tokens.
    The answer is followed by the tokenizer's EOS token. Sequences longer than `max_length` are truncated from the
    right; an example whose prompt alone fills `max_length` is an error (it would carry no label).
    """

    tokenizer: object
    max_length: int = 1024

    def _prompt_ids(self, ex: dict) -> list[int]:
        return self.tokenizer(ex["prompt"], add_special_tokens=True)["input_ids"]

    def _encode(self, ex: dict) -> tuple[list[int], int]:
        prompt = self._prompt_ids(ex)
        answer = self.tokenizer(ex["answer"], add_special_tokens=False)["input_ids"]
        if len(prompt) >= self.max_length:
            raise ValueError(f"A prompt has {len(prompt)} tokens, max_length is {self.max_length}: raise max_length.")
        ids = (prompt + answer + [self.tokenizer.eos_token_id])[: self.max_length]
        return ids, len(prompt)

    def fits(self, ex: dict) -> bool:
        """Whether the example's prompt leaves room for at least one label within `max_length`."""
        return len(self._prompt_ids(ex)) < self.max_length

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        encoded = [self._encode(ex) for ex in examples]
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        labels = torch.full((len(encoded), width), -100, dtype=torch.long)
        for i, (ids, n_prompt) in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
            labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class ClassificationCollator:
    """Collate `{"text": str, "label": int}` examples into right-padded batches for a sequence-classification head.

    Texts longer than `max_length` tokens are truncated from the right. Padding uses the tokenizer's pad token, or its
    EOS token when it has none (as CausalLMCollator does).

    Args:
        tokenizer: a Hugging Face tokenizer (callable on a string, returning "input_ids").
        max_length: the most tokens kept per text.

    Returns:
        (when called on a list of examples) a dict of LongTensors: input_ids and attention_mask (batch, longest
        text), labels (batch,).

    Raises:
        ValueError: the tokenizer has neither a pad nor an EOS token, or an example has no "text"/"label".
    """

    tokenizer: object
    max_length: int = 512

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else self.tokenizer.eos_token_id
        if pad is None:
            raise ValueError("The tokenizer has no pad or EOS token: set tokenizer.pad_token before collating.")
        return pad

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        missing = [i for i, ex in enumerate(examples) if "text" not in ex or "label" not in ex]
        if missing:
            raise ValueError(f"Examples {missing} lack 'text' or 'label': classification examples are "
                             "{'text': str, 'label': int} (see lorafa.data.load_task).")
        encoded = [self.tokenizer(ex["text"], add_special_tokens=True, truncation=True,
                                  max_length=self.max_length)["input_ids"][: self.max_length] for ex in examples]
        width = max(1, max(len(ids) for ids in encoded))
        input_ids = torch.full((len(encoded), width), self._pad_id(), dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, ids in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, : len(ids)] = 1
        labels = torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
