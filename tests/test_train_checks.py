"""The runner's early checks and its statistics cache key (issue 25.12): every training prompt is checked against
max_length, and the cache key holds the run seed the data and the validation split depend on."""

from __future__ import annotations

import pytest

from lorafa import train
from lorafa.data import CausalLMCollator
from lorafa.data.datasets import TaskData

from conftest import lora_cfg, tiny_llama
from tiny_assets import char_tokenizer


def _task(prompt_chars: list[int], test_chars: int = 4) -> TaskData:
    rows = [{"prompt": "q" * n, "answer": "1", "final": "1"} for n in prompt_chars]
    return TaskData("t", "causal_lm", train=rows, test=[{"prompt": "t" * test_chars, "answer": "1", "final": "1"}])


def test_an_over_long_training_prompt_after_the_first_256_is_an_error():
    collate = CausalLMCollator(char_tokenizer(), max_length=32)
    lengths = [5 + i % 20 for i in range(600)]  # all fit (at most 24 tokens)
    train._check_lengths(_task(lengths), collate)
    for index in (300, 599):
        bad = list(lengths)
        bad[index] = 40
        with pytest.raises(ValueError, match=r"1 of 600 training prompts have max_length=32 .* has 40 tokens"):
            train._check_lengths(_task(bad), collate)
    # several, in chunks smaller than the set (the chunk boundaries lose none)
    bad = list(lengths)
    bad[10] = bad[257] = bad[598] = 32  # exactly max_length: no room left
    with pytest.raises(ValueError, match="3 of 600"):
        train._check_lengths(_task(bad), collate, chunk=7)


def test_test_prompts_are_not_held_to_the_training_max_length():
    """The evaluation generates from the test prompts without the collator: a long one is no reason to stop."""
    train._check_lengths(_task([5] * 10, test_chars=200), CausalLMCollator(char_tokenizer(), max_length=32))


def test_an_over_long_validation_prompt_is_an_error_before_training():
    """The validation split is evaluated by the same collator (the first evaluate() would raise mid-run)."""
    collate = CausalLMCollator(char_tokenizer(), max_length=32)
    validation = [{"prompt": "v" * n, "answer": "1", "final": "1"} for n in (5, 6, 40)]
    with pytest.raises(ValueError, match=r"1 of 3 validation prompts .* has 40 tokens.*model.max_length"):
        train._check_lengths(_task([5] * 10), collate, validation)


def test_the_statistics_pass_max_length_is_checked_on_the_training_prompts():
    """init.max_length (the statistics and line-search collator's) can be below model.max_length."""
    collate = CausalLMCollator(char_tokenizer(), max_length=64)
    task = _task([5] * 10 + [40])
    train._check_lengths(task, collate)  # fits the training collator
    with pytest.raises(ValueError, match=r"1 of 11 training \(statistics pass\) prompts have max_length=32 .*"
                                         r"init.max_length"):
        train._check_lengths(task, collate, stats_max_length=32)


@pytest.mark.parametrize("chars", [29, 30, 31, 32])
def test_the_length_check_agrees_with_the_collator(chars):
    """An error exactly when the collator refuses an example (its prompt fills max_length)."""
    collate = CausalLMCollator(char_tokenizer(), max_length=32)
    task = _task([3] * 300 + [chars])
    if collate.fits(task.train[-1]):
        train._check_lengths(task, collate)
        collate(task.train)
    else:
        with pytest.raises(ValueError, match="max_length"):
            collate([task.train[-1]])
        with pytest.raises(ValueError, match="max_length"):
            train._check_lengths(task, collate)


class _Key(Exception):
    pass


def _cache_key(tmp_path, monkeypatch, run_seed: int):
    """The (path, key) _stats_for_init looks the statistics up under, for a run with this seed (and a fixed
    init.seed: the statistics sample's own seed)."""
    from test_runner import composed

    from lorafa.runconfig import parse_run_config

    cfg = parse_run_config(composed(["+init=gradient", "++init.seed=3", "++init.cache=true", f"++seed={run_seed}",
                                     f"++output_root={tmp_path}"]))
    init_config = cfg.init_config()
    assert init_config.seed == 3 and init_config.needs is not None

    def lookup(path, key, device=None):
        raise _Key(path, key)

    monkeypatch.setattr(train, "load_cached_stats", lookup)
    with pytest.raises(_Key) as got:
        train._stats_for_init(cfg, tiny_llama(), lora_cfg(["q_proj", "v_proj"]), init_config, None, None, None)
    return got.value.args


def test_the_statistics_cache_key_holds_the_run_seed(tmp_path, monkeypatch):
    path0, key0 = _cache_key(tmp_path, monkeypatch, 0)
    path1, key1 = _cache_key(tmp_path, monkeypatch, 1)
    assert key0 != key1 and path0 != path1
    assert {k for k in key0 if key0[k] != key1[k]} == {"run_seed"}
    assert _cache_key(tmp_path, monkeypatch, 0) == (path0, key0)  # the same seed: the same key and file
