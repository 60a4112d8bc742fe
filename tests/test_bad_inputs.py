"""The bad-input sweep (issue 25): every public entry point, fed inputs it must refuse.

One table, `CASES`: each `Case(entry, id, call, exc, phrase)` calls one entry point with one bad input (`call` builds
its inputs itself, in the case's temporary folder, which is the working directory) and names the exception type
and a regex its message must contain. The project's standard (README, "Bad input"): a clear error that says what to
do, never a silent fallback, never a half-written file. So each case also checks that

- nothing outside the temporary folders changed: the repository tree and lorafa's model cache are snapshotted
  (path, size, mtime) before and after the call;
- no temporary file of an interrupted write (`.lorafa-*`, `.stats-*`, `*.tmp`) is left in the case's folder;
- where a case hands lorafa a folder holding the user's files, those files are still there, unchanged
  (`keeps_files`).

A case that is not refused clearly today (accepted silently, or an obscure error from deep inside a library) is
marked `xfail(strict=True)` with what happens now, so the sweep turns red the day it is fixed and the mark must go.

Tiny models are built once per module (and deep-copied per case); batches are 1-2 tiny batches.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.config import KasaConfig
from torch import nn

import lorafa
from lorafa import InitConfig, LayerStats, collect_stats, initialize
from lorafa import align as A
from lorafa import goat as G
from lorafa import kasa as K
from lorafa import lora_pro as LP
from lorafa import optim as O
from lorafa import quant as Q
from lorafa import ranks as R

from conftest import lora_cfg, make_batches, tiny_gpt2, tiny_llama
from tiny_assets import char_tokenizer, save_tiny_causal_lm

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "src" / "lorafa" / "conf"
QV = ["q_proj", "v_proj"]
Q_NAME = "model.layers.0.self_attn.q_proj"
V_NAME = "model.layers.0.self_attn.v_proj"


# ---------------------------------------------------------------------------------------------------------------
# shared tiny inputs: built once per module, copied per case


_SHARED: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _shared_inputs(tmp_path_factory):
    """The module's cache of tiny models and folders; saved checkpoints live in a pytest temporary folder."""
    _SHARED.clear()
    _SHARED["root"] = tmp_path_factory.mktemp("bad_inputs_shared")
    yield
    _SHARED.clear()


def _once(key: str, build: Callable):
    if key not in _SHARED:
        _SHARED[key] = build()
    return _SHARED[key]


def shared_dir(name: str) -> Path:
    root = _SHARED.get("root")
    if root is None:  # the fixture did not run (a case called outside the test): a folder of the working directory
        root = Path.cwd()
    return root / name


def llama() -> nn.Module:
    return copy.deepcopy(_once("llama", tiny_llama))


def gpt2() -> nn.Module:
    return copy.deepcopy(_once("gpt2", tiny_gpt2))


def batches(n: int = 1) -> list[dict]:
    return make_batches(n_batches=n, bsz=2, seq=8)


def cfg(targets=QV, r: int = 2, **kw):
    return lora_cfg(targets, r=r, **kw)


def kfac_stats() -> dict[str, LayerStats]:
    """K-FAC statistics of q_proj and v_proj of the tiny Llama (shared: copy before changing one)."""
    stats = _once("kfac", lambda: collect_stats(tiny_llama(), batches(), QV, kinds=("kfac",), progress=False))
    return {n: dataclasses.replace(s) for n, s in stats.items()}


def init(method: str = "lora", model=None, lcfg=None, initial_adapter_dir=None, **kw):
    """A PeftModel from lorafa.initialize on a fresh copy of the tiny Llama (q_proj, v_proj, r=2); `kw` are
    InitConfig's fields."""
    icfg = InitConfig(method=method, **kw)
    stats = kfac_stats() if icfg.needs is not None else None
    return initialize(model if model is not None else llama(), lcfg or cfg(), icfg, stats=stats, progress=False,
                      initial_adapter_dir=initial_adapter_dir)


def plain_peft(lcfg=None, model=None):
    """A PeftModel from peft.get_peft_model (lorafa has no record of it)."""
    from peft import get_peft_model

    from lorafa.peft_bridge import quiet_checkpointing_rename

    with quiet_checkpointing_rename():
        return get_peft_model(model if model is not None else llama(), lcfg or cfg())


def lm_dir(seed: int = 0) -> str:
    """A tiny Llama with a character tokenizer saved like a hub checkpoint (for the CLIs and ModelTeacher)."""
    return _once(f"lm_dir{seed}", lambda: save_tiny_causal_lm(str(shared_dir(f"tiny-lm-{seed}")), seed=seed))


def nf4_model():
    """The tiny Llama reloaded as a bitsandbytes nf4 model on CPU (as tests/test_quant.py makes one)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(lm_dir(), quantization_config=qc, device_map="cpu",
                                                dtype=torch.float32).eval()


def linear4bit(quantized: bool = True):
    """One bitsandbytes Linear4bit layer (64 → 32); quantized by its first .to(device), as bitsandbytes does."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(nn.Linear(64, 32, bias=False).state_dict())
    return layer.to("cpu") if quantized else layer


def nan_grad_loss(model, batch):
    """A finite loss whose gradient w.r.t. q_proj of layer 0 is NaN (the unselected branch of a where)."""
    loss = model(**batch).loss
    w = dict(model.named_modules())[Q_NAME].weight
    return torch.where(torch.tensor(True), loss, torch.sqrt(-w.abs().sum() - 1.0))


def keeps_files(folder, fn: Callable) -> Callable:
    """A call of `fn` that must leave every file under `folder` as it was (it is expected to raise)."""

    def call():
        before = _tree(Path(folder))
        try:
            return fn()
        finally:
            after = _tree(Path(folder))
            if after != before:
                changed = sorted(set(before.items()) ^ set(after.items()))[:6]
                raise AssertionError(f"the user's files in {folder} changed: {changed}")

    return call


def write(path, text: str = "x") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def user_folder(name: str) -> Path:
    """A folder holding the user's own files (a checkpoint and a runs/ subfolder), in the working directory."""
    folder = Path.cwd() / name
    write(folder / "checkpoint.pt", "weights")
    write(folder / "runs" / "events.log", "log")
    return folder


# ---------------------------------------------------------------------------------------------------------------
# the file-system check


_SKIP_DIRS = {".git", ".venv", ".cache", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"}
# Someone editing the project while the sweep runs changes source files; lorafa never writes these kinds of file.
_SOURCE_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".sh", ".txt", ".ipynb")
_TEMP_NAME = re.compile(r"^\.(lorafa|stats|tmp)|\.tmp$|^tmp[a-z0-9_]{6,}$")


def _tree(root: Path) -> dict[str, tuple]:
    """relative path -> (size, mtime_ns) of every file, None for every folder, under `root`."""
    out: dict[str, tuple | None] = {}
    if not root.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
        rel = os.path.relpath(dirpath, root)
        out[rel] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            try:
                st = os.stat(p, follow_symlinks=False)
            except FileNotFoundError:
                continue
            out[os.path.join(rel, f)] = (st.st_size, st.st_mtime_ns)
    return out


def _watched() -> dict[str, dict]:
    from lorafa.models import cache_root

    return {str(ROOT): _tree(ROOT), cache_root(): _tree(Path(cache_root()))}


def _outside_changes(before: dict, after: dict) -> list[str]:
    problems = []
    for root in before:
        b, a = before[root], after[root]
        for path in sorted(set(b) | set(a)):
            if b.get(path, "absent") == a.get(path, "absent"):
                continue
            if path in b and path in a and b[path] is None and a[path] is None:
                continue
            edited_source = path.endswith(_SOURCE_SUFFIXES) and path in a  # created or modified by an editor
            if edited_source:
                continue
            what = "created" if path not in b else "removed" if path not in a else "modified"
            problems.append(f"{what}: {os.path.join(root, path)}")
    return problems


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if _TEMP_NAME.search(p.name))


# ---------------------------------------------------------------------------------------------------------------
# the table


@dataclass
class Case:
    entry: str
    id: str
    call: Callable[[], object]
    exc: type[BaseException] | tuple[type[BaseException], ...]
    phrase: str
    xfail: str | None = None  # what happens today, for a case that is not refused clearly yet


CASES: list[Case] = []


def case(entry: str, id: str, call: Callable, exc, phrase: str, xfail: str | None = None) -> None:
    CASES.append(Case(entry, id, call, exc, phrase, xfail))


# -- InitConfig: the method's options (test_config_validation.py holds the common fields' types and ranges) -------
E = "InitConfig"
case(E, "unknown-key", lambda: InitConfig(bogus=1), TypeError,
     r"unexpected keyword argument 'bogus': it is not one of InitConfig's fields, which are method, direction")
case(E, "unknown-method", lambda: InitConfig(method="lora-xx"), ValueError, r"Unknown init method 'lora-xx'; known")
case(E, "option-the-method-lacks", lambda: InitConfig(method="pissa", stable_gamma=4.0), ValueError,
     r"sets \['stable_gamma'\], which pissa does not have.*Remove them")
case(E, "stable_gamma-negative", lambda: InitConfig(method="lora_ga", stable_gamma=-1.0), ValueError,
     r"stable_gamma must be > 0")
case(E, "stable_gamma-string", lambda: InitConfig(method="lora_ga", stable_gamma="16"), ValueError,
     r"stable_gamma must be a finite number, got '16' \(str\): write it without quotes")
case(E, "stable_gamma-bool", lambda: InitConfig(method="lora_fa", stable_gamma=True), ValueError,
     r"stable_gamma.*True")
case(E, "step_factor-string", lambda: InitConfig(method="lora_one", scale="kfac", step_factor="2"), ValueError,
     r"step_factor.*(number|float)")
case(E, "reg-negative", lambda: InitConfig(method="lora_fa", reg=-1.0), ValueError, r"reg must be >= 0, got -1.0")
case(E, "reg-string", lambda: InitConfig(method="lora_fa", reg="1e-3"), ValueError, r"reg.*(number|float)")
case(E, "reg-inf", lambda: InitConfig(method="lora_fa", reg=math.inf), ValueError, r"reg.*finite")
case(E, "stable_gamma-inf", lambda: InitConfig(method="lora_ga", stable_gamma=math.inf), ValueError,
     r"stable_gamma.*finite")
case(E, "eva-rho-string", lambda: InitConfig(method="eva", eva_rho="2"), ValueError, r"eva_rho.*(number|float)")
case(E, "unknown-scale", lambda: InitConfig(method="lora_fa", scale="bogus"), ValueError,
     r"Unknown scale 'bogus'; choose from")
case(E, "unknown-direction", lambda: InitConfig(method="lora_ga", direction="ArB3r"), ValueError,
     r"Unknown lora_ga direction 'ArB3r'; choose from")
case(E, "goat-num_experts-bool", lambda: InitConfig(method="goat", num_experts=True, top_k=1), ValueError,
     r"num_experts.*True")
case(E, "goat-rho-string", lambda: InitConfig(method="goat", goat_rho="10"), ValueError, r"goat_rho.*(number|float)")
case(E, "goat-top_k-above-experts", lambda: InitConfig(method="goat", num_experts=2, top_k=3), ValueError,
     r"top_k must be in \[1, num_experts=2\]")
case(E, "kasa-beta-negative", lambda: InitConfig(method="kasa", kasa_beta=-1.0), ValueError,
     r"KaSA's beta \(InitConfig's kasa_beta\) must be a finite number >= 0")
case(E, "kasa-beta-bool", lambda: InitConfig(method="kasa", kasa_beta=True), ValueError, r"kasa_beta.*True")
case(E, "kasa-with-offset", lambda: InitConfig(method="kasa", offset="subtract"), ValueError,
     r"kasa is a LoRA variant .* Use offset='auto'")
case(E, "eva-rho-below-1", lambda: InitConfig(method="eva", eva_rho=0.5), ValueError,
     r"eva's rho \(InitConfig's eva_rho\) must be >= 1")
# the names that meant two things are refused, naming the options that replaced them
case(E, "rho-renamed", lambda: InitConfig(method="eva", rho=2.0), TypeError, r"rho is now eva_rho .* or goat_rho")
case(E, "gamma-renamed", lambda: InitConfig(method="kasa", gamma=0.1), TypeError, r"gamma is now kasa_gamma")
case(E, "corda-reg", lambda: InitConfig(method="corda", reg=0.1), ValueError,
     r"\['reg'\], which corda does not have \(corda's reg is corda_reg; reg is lora_fa's and extract's\)")
case(E, "rank-auto-without-spectrum", lambda: InitConfig(method="pissa", rank="auto"), ValueError,
     r"pissa has none\. Use one of")
case(E, "rank-int", lambda: InitConfig(rank=8), ValueError, r"rank must be None .* or 'auto'.*rank_pattern")
case(E, "sketch-without-gradient", lambda: InitConfig(method="pissa", sketch=8), ValueError,
     r"which pissa does not use: drop it")


# -- initialize -------------------------------------------------------------------------------------------------
E = "initialize"


def _stats_with(**change) -> dict:
    stats = kfac_stats()
    stats[Q_NAME] = dataclasses.replace(stats[Q_NAME], **change)
    return stats


def _goat_on_gpt2_leaves_the_model():
    model = gpt2()
    try:
        initialize(model, cfg(["c_attn"], r=8), InitConfig(method="goat", num_experts=2), progress=False)
    finally:
        assert not hasattr(model, "peft_config") and not any("lora" in n for n, _ in model.named_modules()), \
            "the model was wrapped by PEFT before the error"


def _initial_adapter_dir_is_cwd():
    write("notes.txt", "mine")
    write("runs/events.log", "mine")
    return keeps_files(".", lambda: init("lora", initial_adapter_dir="."))()


case(E, "unknown-target", lambda: initialize(llama(), cfg(["q_projj"]), InitConfig(method="pissa"), progress=False),
     ValueError, r"'q_projj' \(close: \['q_proj'.*Fix the names")
case(E, "unknown-target-regex", lambda: initialize(llama(), LoraConfig(target_modules=".*\\.attn_q"),
                                                    InitConfig(method="pissa"), progress=False),
     ValueError, r"regex .* matches no module")
case(E, "target-not-linear", lambda: initialize(llama(), cfg(["embed_tokens"]), InitConfig(method="pissa"),
                                                 progress=False),
     ValueError, r"is a Embedding; lorafa initialises nn.Linear .* Remove it from target_modules")
case(E, "rank-above-min-m-n", lambda: initialize(llama(), cfg(r=40), InitConfig(method="pissa"), progress=False),
     ValueError, r"rank 40 is invalid for a 32×32 weight.*Lower lora_r")
case(E, "rank_pattern-above-min-m-n", lambda: initialize(llama(), cfg(rank_pattern={"q_proj": 64}),
                                                          InitConfig(method="milora"), progress=False),
     ValueError, r"rank 64 is invalid for a 32×32 weight")
case(E, "lora_ga-2r-above-min-m-n", lambda: initialize(llama(), cfg(r=12), InitConfig(method="lora_ga"),
                                                        stats=kfac_stats(), progress=False),
     ValueError, r"rank 12 is invalid for a 16×32 weight.*2·r singular pairs")
case(E, "stats-missing-a-target", lambda: initialize(llama(), cfg(), InitConfig(method="lora_fa"),
                                                      stats={Q_NAME: kfac_stats()[Q_NAME]}, progress=False),
     ValueError, r"No statistics for target modules \['model\.layers\.0\.self_attn\.v_proj'.*Recompute them")
case(E, "stats-of-the-wrong-kind", lambda: initialize(llama(), cfg(), InitConfig(method="lora_fa"),
                                                       stats=_stats_with(out_cov=None), progress=False),
     ValueError, r"lora_fa needs 'kfac' statistics for .* which are missing.*kinds=\('kfac',\)")
case(E, "stats-nan-gradient", lambda: initialize(llama(), cfg(), InitConfig(method="lora_ga"),
                                                  stats=_stats_with(grad=torch.full((32, 32), math.nan)),
                                                  progress=False),
     ValueError, r"grad statistics for .* contain NaN/inf; recompute them")
case(E, "stats-of-another-shape", lambda: initialize(llama(), cfg(), InitConfig(method="lora_ga"),
                                                      stats=_stats_with(grad=torch.ones(3, 3)), progress=False),
     ValueError, r"have shape \(3, 3\), the layer needs \(32, 32\): they were computed for another model")
case(E, "no-batches-no-stats", lambda: initialize(llama(), cfg(), InitConfig(method="lora_fa"), progress=False),
     ValueError, r"lora_fa needs 'kfac' statistics: pass batches= \(or stats=\)")
case(E, "empty-batches", lambda: initialize(llama(), cfg(), InitConfig(method="lora_ga"), batches=[],
                                             progress=False),
     ValueError, r"saw no batches")
case(E, "nan-inputs", lambda: initialize(llama(), cfg(), InitConfig(method="lora_ga", iters=1), progress=False,
                                          batches=[{"inputs_embeds": torch.full((2, 8, 32), math.nan),
                                                    "labels": torch.ones(2, 8, dtype=torch.long)}]),
     ValueError, r"Non-finite loss nan on statistics batch 0")
case(E, "nan-gradient", lambda: initialize(llama(), cfg(), InitConfig(method="lora_ga", iters=1),
                                            batches=batches(), loss_fn=nan_grad_loss, progress=False),
     ValueError, r"Non-finite \(NaN/inf\) statistics in \['model\.layers\.0\.self_attn\.q_proj\.grad'")
case(E, "batches-without-labels", lambda: initialize(llama(), cfg(), InitConfig(method="lora_ga", iters=1),
                                                      batches=[{"input_ids": torch.ones(2, 8, dtype=torch.long)}],
                                                      progress=False),
     ValueError, r"returned no loss: give batches with 'labels', or pass loss_fn")
case(E, "batch-not-a-mapping", lambda: initialize(llama(), cfg(), InitConfig(method="lora_ga", iters=1),
                                                   batches=[torch.ones(2, 8, dtype=torch.long)], progress=False),
     TypeError, r"Each batch must be a mapping of tensors")
case(E, "stats-values-not-LayerStats", lambda: initialize(llama(), cfg(), InitConfig(method="lora_fa"),
                                                          stats={n: "x" for n in kfac_stats()}, progress=False),
     TypeError, r"stats\['model\.layers\.0\.self_attn\.q_proj'\] is a str, not a LayerStats")
case(E, "init_lora_weights-pissa", lambda: initialize(llama(), cfg(init_lora_weights="pissa"),
                                                       InitConfig(method="lora_fa"), progress=False),
     ValueError, r"init_lora_weights='pissa': choose the method with InitConfig\(method=")
case(E, "use_dora-with-data-aware-init", lambda: initialize(llama(), cfg(use_dora=True), InitConfig(method="pissa"),
                                                             progress=False),
     ValueError, r"use_dora is not supported with data-aware inits")
case(E, "kasa_config-with-lora_ga", lambda: initialize(llama(), cfg(kasa_config=KasaConfig()),
                                                        InitConfig(method="lora_ga"), stats=kfac_stats(),
                                                        progress=False),
     ValueError, r"KaSA \(lora_config.kasa_config\) truncates the base weight.*Use one of them")
case(E, "lora_config-a-dict", lambda: initialize(llama(), {"r": 2, "target_modules": QV}, InitConfig(method="lora"),
                                                  progress=False),
     TypeError, r"lora_config must be a peft.LoraConfig, got dict")
case(E, "init_config-a-string", lambda: initialize(llama(), cfg(), "pissa", progress=False),
     TypeError, r"init_config must be a lorafa.InitConfig .* got str \('pissa'\): write InitConfig\(method='pissa'\)")
case(E, "init_config-a-dict-with-an-unknown-key", lambda: initialize(llama(), cfg(), {"metod": "pissa"},
                                                                     progress=False),
     TypeError, r"init_config has keys that are not InitConfig fields: \['metod'\]")
case(E, "model-a-PeftModel", lambda: initialize(plain_peft(), cfg(), InitConfig(method="pissa"), progress=False),
     TypeError, r"not a PeftModel")
case(E, "initial_adapter_dir-a-file", lambda: init("lora", initial_adapter_dir=write("adapter_file")),
     FileExistsError, r"is a file, not a folder: give a new or empty folder")
case(E, "initial_adapter_dir-a-user-folder",
     lambda: keeps_files(user_folder("ckpt"), lambda: init("lora", initial_adapter_dir="ckpt"))(),
     FileExistsError, r"not empty and is not a initial adapter .* lorafa never deletes a folder")
case(E, "initial_adapter_dir-the-working-directory", _initial_adapter_dir_is_cwd,
     FileExistsError, r"not empty .* lorafa never deletes a folder it did not write")
case(E, "line_search-without-batches", lambda: init("lora_one", scale="line_search"),
     ValueError, r"scale='line_search' chooses the step by the loss on the statistics batches: pass batches=")
case(E, "align-without-align_init", lambda: initialize(llama(), cfg(), InitConfig(method="lora_fa"),
                                                        stats=kfac_stats(), align=object(), progress=False),
     ValueError, r"align= is used by InitConfig\(align_init=True\) only")
case(E, "align_init-without-align", lambda: initialize(llama(), cfg(), InitConfig(method="lora_fa", align_init=True),
                                                        batches=batches(), progress=False),
     ValueError, r"align_init=True\) needs the teacher: pass align=AlignmentTerm")
case(E, "tuned-for-a-method-without-it", lambda: initialize(llama(), cfg(), InitConfig(method="pissa"), tuned=llama(),
                                                             progress=False),
     ValueError, r"tuned= is the fine-tuned model that method='extract' starts from; pissa does not use it")
case(E, "extract-without-tuned", lambda: initialize(llama(), cfg(), InitConfig(method="extract", metric="identity"),
                                                     progress=False),
     ValueError, r"method='extract' needs the fine-tuned model: pass tuned=")
case(E, "extract-tuned-of-another-architecture",
     lambda: initialize(llama(), cfg(), InitConfig(method="extract", metric="identity"), tuned=gpt2(),
                        progress=False),
     ValueError, r"the fine-tuned model has no .*same architecture")
case(E, "base_weights-on-a-float-model", lambda: initialize(llama(), cfg(), InitConfig(method="pissa"),
                                                             base_weights=llama(), progress=False),
     ValueError, r"no target is quantized: drop it")
case(E, "rank-budget-below-r_min", lambda: init("lora_ga", rank="auto", r_min=2, rank_budget=1),
     ValueError, r"rank_budget=1 .* cannot give each of the 4 target layers r_min=2.*Raise the budget")
case(E, "sketch-smaller-than-r", lambda: initialize(llama(), cfg(r=4), InitConfig(method="lora_one", sketch=2),
                                                     batches=batches(), progress=False),
     ValueError, r"sketch=2 keeps 2 gradient directions.*set sketch >= 4")
case(E, "kasa-r-equal-min-m-n", lambda: init("kasa", lcfg=cfg(["v_proj"], r=16)),
     ValueError, r"needs r < min\(m, n\) = 16, got r=16")
case(E, "goat-r-not-divisible-by-experts", lambda: init("goat", lcfg=cfg(r=2)),
     ValueError, r"choose r divisible by num_experts \(r=2, num_experts=8\)")
case(E, "goat-on-conv1d", _goat_on_gpt2_leaves_the_model,
     ValueError, r"GOAT supports nn.Linear layers .* leave it out of target_modules")
case(E, "lora_r-zero", lambda: initialize(llama(), cfg(r=0), InitConfig(method="pissa"), progress=False),
     ValueError, r"\br\b.*(>= 1|positive)")
case(E, "rank_pattern-zero", lambda: initialize(llama(), cfg(rank_pattern={"q_proj": 0}), InitConfig(method="pissa"),
                                                 progress=False),
     ValueError, r"rank_pattern.*(>= 1|positive)")
case(E, "lora_r-negative", lambda: initialize(llama(), cfg(r=-2), InitConfig(method="pissa"), progress=False),
     ValueError, r"\br\b.*-2.*(>= 1|positive)")
case(E, "lora_alpha-zero", lambda: initialize(llama(), cfg(alpha=0), InitConfig(method="pissa"), progress=False),
     ValueError, r"lora_config.lora_alpha=0: .* must be a finite number > 0")
case(E, "extract-tuned-equal-to-the-base",
     lambda: initialize(llama(), cfg(), InitConfig(method="extract", metric="identity"), tuned=llama(),
                        progress=False),
     ValueError, r"The fine-tune equals the base on every target layer .* Check that tuned= names the fine-tuned model")


# -- initialize_trainer -------------------------------------------------------------------------------------------
E = "initialize_trainer"


def trainer(rows: int | None = 12, collator=None, model=None, model_init=None, **kw):
    """A transformers Trainer on the tiny Llama of tiny_assets' character tokenizer, writing only under the
    working directory."""
    from transformers import (DataCollatorForLanguageModeling, LlamaConfig, LlamaForCausalLM, Trainer,
                              TrainingArguments)

    tok = _once("char_tok", char_tokenizer)

    def build():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64, pad_token_id=tok.pad_token_id))

    if model_init:
        kw["model_init"] = build
    elif model is None:
        model = build()
    data = None if rows is None else [{"input_ids": tok(f"{i}+{i}={2 * i}")["input_ids"]} for i in range(rows)]
    args = TrainingArguments(output_dir=str(Path.cwd() / "trainer_out"), max_steps=1, per_device_train_batch_size=2,
                             report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                             dataloader_pin_memory=False)
    return Trainer(model=model, args=args, train_dataset=data,
                   data_collator=collator or DataCollatorForLanguageModeling(tok, mlm=False), **kw)


def _trainer_with_optimizer():
    t = trainer()
    t.create_optimizer()
    return t


def _collator_without_labels():
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(_once("char_tok", char_tokenizer))


case(E, "not-a-trainer", lambda: lorafa.initialize_trainer(object(), cfg()), TypeError,
     r"needs a transformers.Trainer .* use lorafa.initialize")
case(E, "dict-with-unknown-key", lambda: lorafa.initialize_trainer(trainer(), cfg(), {"metod": "lora_ga"},
                                                                    progress=False),
     TypeError, r"not InitConfig fields: \['metod'\]\. The fields are: method")
case(E, "dict-with-unknown-method", lambda: lorafa.initialize_trainer(trainer(), cfg(), {"method": "bogus"},
                                                                       progress=False),
     ValueError, r"Unknown init method 'bogus'; known")
case(E, "dict-bsz-bool", lambda: lorafa.initialize_trainer(trainer(), cfg(), {"bsz": True}, progress=False),
     ValueError, r"bsz must be an integer, got True \(bool\)")
case(E, "init_config-a-string", lambda: lorafa.initialize_trainer(trainer(), cfg(), "lora_ga", progress=False),
     TypeError, r"init_config must be a lorafa.InitConfig .* got str")
case(E, "optimizer-exists", lambda: lorafa.initialize_trainer(_trainer_with_optimizer(), cfg(),
                                                               InitConfig(bsz=2, iters=1), progress=False),
     ValueError, r"already has an optimizer .* Call initialize_trainer before train\(\)")
case(E, "model-already-has-adapters", lambda: lorafa.initialize_trainer(trainer(model=plain_peft()), cfg(),
                                                                         InitConfig(bsz=2, iters=1), progress=False),
     ValueError, r"already has adapters; the statistics pass needs the plain base model")
case(E, "too-few-examples", lambda: lorafa.initialize_trainer(trainer(rows=3), cfg(), InitConfig(bsz=2, iters=2),
                                                               progress=False),
     ValueError, r"needs 4 examples \(bsz=2 × iters=2\); .* has 3 .* Lower InitConfig's bsz or iters")
case(E, "no-train_dataset", lambda: lorafa.initialize_trainer(trainer(rows=None), cfg(), InitConfig(bsz=2, iters=1),
                                                               progress=False),
     ValueError, r"has no train_dataset")
case(E, "collator-without-labels", lambda: lorafa.initialize_trainer(trainer(collator=_collator_without_labels()),
                                                                      cfg(), InitConfig(bsz=2, iters=1),
                                                                      progress=False),
     ValueError, r"without \['labels'\].*DataCollatorForLanguageModeling")
case(E, "model_init", lambda: lorafa.initialize_trainer(trainer(model_init=True), cfg(),
                                                         InitConfig(bsz=2, iters=1), progress=False),
     ValueError, r"built with model_init=.*Build the trainer with model=")
case(E, "unknown-target", lambda: lorafa.initialize_trainer(trainer(), cfg(["qproj"]), InitConfig(bsz=2, iters=1),
                                                             progress=False),
     ValueError, r"'qproj' \(close: \['q_proj'")


# -- collect_stats --------------------------------------------------------------------------------------------------
E = "collect_stats"


class _TwoLayers(nn.Module):
    """A model whose second target layer is never used in the forward pass."""

    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.used(x)


def _stats(model=None, bs=None, targets=QV, **kw):
    kw.setdefault("progress", False)
    return collect_stats(model if model is not None else llama(), batches() if bs is None else bs, targets, **kw)


case(E, "unknown-kind", lambda: _stats(kinds=("bogus",)), ValueError,
     r"Unknown statistics kinds \['bogus'\]; choose from \('grad', 'kfac', 'act'\)")
case(E, "no-kind", lambda: _stats(kinds=()), ValueError, r"Unknown statistics kinds .*; choose from")
case(E, "empty-batches", lambda: _stats(bs=[]), ValueError, r"saw no batches: `batches` is empty")
case(E, "empty-batch", lambda: _stats(bs=[{k: v[:0] for k, v in batches()[0].items()}]), ValueError,
     r"Statistics batch 0 is empty: its 'input_ids' has 0 rows .* Drop empty batches")
case(E, "unknown-target", lambda: _stats(targets=["q_prj"]), ValueError, r"'q_prj' \(close: \['q_proj'")
case(E, "no-labels", lambda: _stats(bs=[{"input_ids": torch.ones(2, 8, dtype=torch.long)}]), ValueError,
     r"returned no loss: give batches with 'labels', or pass loss_fn")
case(E, "nan-loss", lambda: _stats(loss_fn=lambda m, b: m(**b).loss * math.nan), ValueError,
     r"Non-finite loss nan on statistics batch 0: check the data and dtype")
case(E, "nan-gradient", lambda: _stats(loss_fn=nan_grad_loss), ValueError,
     r"Non-finite \(NaN/inf\) statistics in .*Use fp32 or bf16 instead of fp16")
case(E, "loss-independent-of-targets", lambda: _stats(loss_fn=lambda m, b: m(**b).loss.detach()),
     ValueError, r"The loss does not depend on any target module's weights")
case(E, "target-unused-in-forward", lambda: _stats(model=_TwoLayers(), bs=[{"x": torch.ones(2, 4)}],
                                                    targets=["used", "unused"],
                                                    loss_fn=lambda m, b: m(b["x"]).sum()),
     ValueError, r"'unused' received no gradient during the statistics pass.*Remove it from target_modules")
case(E, "a-PeftModel", lambda: _stats(model=plain_peft()), TypeError,
     r"pass the model you will give to get_peft_model, not a PeftModel")
case(E, "sketch-without-gradient", lambda: _stats(kinds=("act",), sketch=4), ValueError,
     r"sketch= sketches the gradient, but kinds=\['act'\] has none")
case(E, "sketch-zero", lambda: _stats(sketch=0), ValueError, r"Sketch sizes need integers 1 <= k <= l, got k=0")
case(E, "loss_fn-not-a-scalar", lambda: _stats(loss_fn=lambda m, b: m(**b).logits.mean((1, 2))), ValueError,
     r"loss_fn\(model, batch\) must return a scalar tensor, got shape \(2,\): reduce")
case(E, "loss_fn-returns-a-float", lambda: _stats(loss_fn=lambda m, b: m(**b).loss.item()), TypeError,
     r"loss_fn\(model, batch\) must return a scalar tensor .* got float: return the tensor itself")
case(E, "grad_from-unknown", lambda: _stats(grad_from="weights"), ValueError,
     r"grad_from='weights': choose from \('auto', 'weight', 'hooks'\)")
case(E, "accumulate_on-not-a-device", lambda: _stats(accumulate_on="tpu9"), ValueError,
     r"accumulate_on is the device .* got 'tpu9', which is not a torch device")
case(E, "max_batches-negative", lambda: _stats(max_batches=-1), ValueError,
     r"max_batches must be an integer >= 1, got -1 \(or None: every batch\)")
case(E, "attention_mask-of-another-shape", lambda: _stats(
    model=_TwoLayers(), bs=[{"x": torch.ones(2, 8, 4), "attention_mask": torch.ones(2, 5, dtype=torch.long)}],
    targets=["used"], kinds=("act",), loss_fn=lambda m, b: m(b["x"]).sum()),
     ValueError, r"Cannot align the input of 'used' \(shape \(2, 8, 4\)\) with attention_mask \(2, 5\): pass batches")


# -- save_stats / load_stats / read_stats_config / stat_batches --------------------------------------------------
E = "stats-io"


def _saved_stats(name="stats.safetensors", config=None) -> Path:
    path = Path.cwd() / name
    lorafa.save_stats(kfac_stats(), path, config=config)
    return path


def _plain_safetensors() -> Path:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(Path.cwd() / "other.safetensors"))
    return Path.cwd() / "other.safetensors"


case(E, "load-missing-file", lambda: lorafa.load_stats("missing.safetensors"), FileNotFoundError,
     r"No statistics cache at missing.safetensors: run the statistics pass \(collect_stats\) first")
case(E, "load-corrupt-file", lambda: lorafa.load_stats(write("stats.safetensors", "not a safetensors file")),
     ValueError, r"stats.safetensors cannot be read .* corrupt or truncated .* Delete it and recompute")
case(E, "load-truncated-file", lambda: lorafa.load_stats(write(
    "stats.safetensors", _saved_stats("full.safetensors").read_bytes()[:200].decode("latin-1"))),
     ValueError, r"stats.safetensors cannot be read .* corrupt or truncated .* Delete it and recompute")
case(E, "load-not-lorafa-statistics", lambda: lorafa.load_stats(_plain_safetensors()), ValueError,
     r"other.safetensors is not a lorafa statistics file")
case(E, "load-other-config", lambda: lorafa.load_stats(_saved_stats(config={"iters": 4}), {"iters": 8}),
     ValueError, r"was produced by a different config.*Delete the file or point to another cache path")
case(E, "read-config-missing-file", lambda: lorafa.read_stats_config("missing.safetensors"), FileNotFoundError,
     r"missing.safetensors")
def _save_stats_onto_a_folder():
    (Path.cwd() / "folder").mkdir()
    lorafa.save_stats(kfac_stats(), "folder")


case(E, "save-to-a-folder", _save_stats_onto_a_folder,
     IsADirectoryError, r"'folder' is a folder: save_stats writes one file; give a file path")
case(E, "save-not-LayerStats", lambda: lorafa.save_stats({Q_NAME: torch.zeros(2)}, "stats.safetensors"),
     TypeError, r"stats\['model.layers.0.self_attn.q_proj'\] is a Tensor, not a LayerStats")
case(E, "save-config-not-json", lambda: lorafa.save_stats(kfac_stats(), "stats.safetensors",
                                                          config={"w": torch.zeros(1)}),
     TypeError, r"config\['w'\] is not JSON serializable")
case(E, "stat_batches-bsz-zero", lambda: lorafa.stat_batches(list(range(8)), list, 0, 2), ValueError,
     r"bsz must be an integer >= 1, got 0")
case(E, "stat_batches-too-few-examples", lambda: lorafa.stat_batches(list(range(3)), list, 2, 2), ValueError,
     r"needs 4 examples \(bsz=2 × 2 batches\), the dataset has 3: lower init.iters")
case(E, "stat_batches-bsz-bool", lambda: lorafa.stat_batches(list(range(8)), list, True, 2), ValueError,
     r"bsz must be an integer >= 1, got True \(bool\)")
case(E, "stat_batches-unknown-sample", lambda: lorafa.stat_batches(list(range(8)), list, 2, 2, sample="last"),
     ValueError, r"sample must be 'random' or 'first', got 'last'")


# -- allocate_ranks, rank_patterns, eva_ranks ----------------------------------------------------------------------
E = "allocate_ranks"
SPECTRA = {"a": torch.tensor([3.0, 2.0, 1.0, 0.5]), "b": torch.tensor([1.0, 1.0, 0.1, 0.0])}


def _alloc(spectra=None, budget=4, **kw):
    return lorafa.allocate_ranks(SPECTRA if spectra is None else spectra, budget, **kw)


case(E, "empty-spectra", lambda: _alloc({}), ValueError, r"spectra is empty: pass one 1-D spectrum per adapted layer")
case(E, "unknown-rule", lambda: _alloc(rule="entropy"), ValueError,
     r"Unknown rule 'entropy': use one of energy, effective")
case(E, "budget-float", lambda: _alloc(budget=4.0), TypeError, r"budget must be an int .* got 4.0")
case(E, "budget-bool", lambda: _alloc(budget=True), TypeError, r"budget must be an int")
case(E, "budget-negative", lambda: _alloc(budget=-1), ValueError, r"budget = -1 < 0")
case(E, "budget-above-maximum", lambda: _alloc(budget=100), ValueError,
     r"budget = 100 rank is above the 8 the layers can take.*lower the budget or raise r_max")
case(E, "budget-below-r_min", lambda: _alloc(budget=3, r_min=2), ValueError,
     r"budget = 3 rank is below the 4 that r_min = 2 needs.*raise the budget or lower r_min")
case(E, "r_min-above-r_max", lambda: _alloc(r_min=3, r_max=2), ValueError, r"r_min = 3 > r_max = 2")
case(E, "r_min-negative", lambda: _alloc(r_min=-1), ValueError, r"r_min = -1 < 0")
case(E, "r_max-float", lambda: _alloc(r_max=2.5), TypeError, r"r_max must be an int or None, got 2.5")
case(E, "r_min-above-spectrum-length", lambda: _alloc(budget=10, r_min=5), ValueError,
     r"r_min = 5 > r_max = 4 for layer 'a' .* lower r_min")
case(E, "tau-zero", lambda: _alloc(tau=0.0), ValueError, r"tau = 0.0 must be in \(0, 1\]")
case(E, "tau-above-one", lambda: _alloc(tau=1.5), ValueError, r"tau = 1.5 must be in \(0, 1\]")
case(E, "tau-string", lambda: _alloc(tau="0.9"), ValueError, r"tau = '0.9' must be in \(0, 1\]")
case(E, "spectrum-nan", lambda: _alloc({"a": torch.tensor([1.0, math.nan])}, budget=1), ValueError,
     r"spectrum of 'a' contains NaN or inf: check the statistics pass")
case(E, "spectrum-negative", lambda: _alloc({"a": torch.tensor([1.0, -1.0])}, budget=1), ValueError,
     r"spectrum of 'a' has negative entries")
case(E, "spectrum-2d", lambda: _alloc({"a": torch.ones(2, 2)}, budget=1), ValueError,
     r"spectrum of 'a' has shape \(2, 2\): pass a 1-D tensor")
case(E, "spectrum-strings", lambda: _alloc({"a": ["x", "y"]}, budget=1), ValueError,
     r"spectrum of 'a' is not a 1-D array of numbers")
case(E, "importance-missing", lambda: _alloc(rule="importance"), ValueError,
     r"rule='importance' needs importance=\{name: I_l\}")
case(E, "importance-for-another-rule", lambda: _alloc(importance={"a": 1.0, "b": 1.0}), ValueError,
     r"importance is only used by rule='importance'")
case(E, "importance-negative", lambda: _alloc(rule="importance", importance={"a": -1.0, "b": 1.0}), ValueError,
     r"importance\['a'\] = -1.0: importance must be finite and ≥ 0")
case(E, "params-budget-without-sizes", lambda: _alloc(budget_by="params"), ValueError,
     r"budget_by='params' needs sizes")
case(E, "sizes-for-other-layers", lambda: _alloc(budget_by="params", budget=100, sizes={"a": (4, 4), "c": (4, 4)}),
     ValueError, r"sizes must have exactly one entry per layer .* missing for \['b'\]; given for unknown layers")
case(E, "unknown-budget_by", lambda: _alloc(budget_by="flops"), ValueError, r"Unknown budget_by 'flops'")
case("rank_patterns", "r-zero", lambda: R.rank_patterns({"a": 2}, 0, 4.0), ValueError,
     r"r = 0 < 1: pass the config's base rank")
case("rank_patterns", "alpha-negative", lambda: R.rank_patterns({"a": 2}, 2, -4.0), ValueError,
     r"alpha = -4.0: pass the config's lora_alpha, a finite positive number")
case("rank_patterns", "every-rank-zero", lambda: R.rank_patterns({"a": 0, "b": 0}, 2, 4.0), ValueError,
     r"Every layer has rank 0: there is no adapter to build")
case("rank_patterns", "rank-float", lambda: R.rank_patterns({"a": 2.0}, 2, 4.0), TypeError,
     r"ranks\['a'\] = 2.0 is not an int")
case("rank_patterns", "eva-rho-below-1", lambda: R.eva_ranks(SPECTRA, 2, rho=0.5), ValueError,
     r"rho = 0.5: EVA's rho must be a finite number ≥ 1")


# -- init_factors (one layer's factors) ----------------------------------------------------------------------------
E = "init_factors"
W = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))

case(E, "rank-above-min-m-n", lambda: lorafa.init_factors("pissa", W, rank=7, scaling=1.0), ValueError,
     r"rank 7 is invalid for a 8×6 weight: needs r ≤ min\(m, n\), so r ≤ 6")
case(E, "rank-float", lambda: lorafa.init_factors("pissa", W, rank=2.0, scaling=1.0), ValueError,
     r"rank 2.0 is invalid")
case(E, "rank-bool", lambda: lorafa.init_factors("pissa", W, rank=True, scaling=1.0), ValueError,
     r"rank True is invalid .* must be an integer")
case(E, "integer-weight", lambda: lorafa.init_factors("pissa", W.long(), rank=2, scaling=1.0), TypeError,
     r"must be a 2-D floating tensor, got torch.int64")
case(E, "scaling-zero", lambda: lorafa.init_factors("pissa", W, rank=2, scaling=0.0), ValueError,
     r"scaling must be > 0, got 0.0")
case(E, "scaling-nan", lambda: lorafa.init_factors("pissa", W, rank=2, scaling=math.nan), ValueError,
     r"scaling must be > 0, got nan")
case(E, "missing-statistics", lambda: lorafa.init_factors("lora_ga", W, rank=2, scaling=1.0, name="layer"),
     ValueError, r"lora_ga needs 'grad' statistics for 'layer', which are missing. Run collect_stats")
case(E, "statistics-of-another-shape", lambda: lorafa.init_factors(
    "lora_ga", W, LayerStats(grad=torch.ones(6, 8), n_batches=1), rank=2, scaling=1.0), ValueError,
     r"grad statistics for 'this layer' have shape \(6, 8\), the layer needs \(8, 6\)")
case(E, "unknown-option", lambda: lorafa.init_factors("pissa", W, rank=2, scaling=1.0, gamma=1.0), ValueError,
     r"pissa has no option\(s\) \['gamma'\]; its options are none")


# -- save_adapter / save_initial_adapter / read_initial_adapter -----------------------------------------------------
E = "save/load adapter"


def _initial_adapter(name="initial", **change) -> Path:
    """An initial adapter folder written by lorafa, its lorafa_init.json then rewritten by `change`."""
    folder = Path.cwd() / name
    init("lora", initial_adapter_dir=folder)
    if change:
        meta_path = folder / "lorafa_init.json"
        if "raw" in change:
            meta_path.write_text(change["raw"])
        else:
            meta = json.loads(meta_path.read_text())
            for key, value in change.items():
                if value is None:
                    meta.pop(key)
                else:
                    meta[key] = value
            meta_path.write_text(json.dumps(meta))
    return folder


def _save_into_a_user_folder():
    folder = user_folder("out")
    user_folder("out/initial_adapter")
    return keeps_files(folder, lambda: lorafa.save_adapter(init("pissa"), folder, save_initial=True))()


def _save_initial_into_cwd():
    write("notes.txt", "mine")
    pm = init("lora")
    return keeps_files(".", lambda: lorafa.save_initial_adapter(pm, "."))()


case(E, "save-a-copy-of-the-model", lambda: lorafa.save_adapter(copy.deepcopy(init("pissa")), "out"), ValueError,
     r"initial adapter of this model is unknown.*Pass initial_adapter=")
case(E, "save-a-plain-peft-model", lambda: lorafa.save_adapter(plain_peft(), "out"), ValueError,
     r"initial adapter of this model is unknown.*model.save_pretrained\(path\)")
case(E, "save-to-an-existing-file", lambda: lorafa.save_adapter(init("pissa"), write("out")),
     FileExistsError, r"'?out'? is a file, not a folder")
case(E, "save-initial-into-a-user-folder", _save_into_a_user_folder, FileExistsError,
     r"initial_adapter' is not empty and is not a initial adapter that lorafa wrote")
case(E, "save-with-a-missing-initial-adapter", lambda: lorafa.save_adapter(init("pissa"), "out",
                                                                           initial_adapter="missing"),
     FileNotFoundError, r"missing is not an initial adapter written by lorafa .* pass the folder given to initialize")
case(E, "save-with-another-adapters-initial-adapter", lambda: lorafa.save_adapter(
    plain_peft(), "out", initial_adapter=_initial_adapter(adapter_name="other")), ValueError,
     r"initial adapter is for adapter 'other', but this model has \['default'\]")
case(E, "save_initial-a-plain-peft-model", lambda: lorafa.save_initial_adapter(plain_peft(), "initial"), ValueError,
     r"save_initial_adapter needs the model returned by lorafa.initialize")
case(E, "save_initial-to-an-existing-file", lambda: lorafa.save_initial_adapter(init("lora"), write("initial")),
     FileExistsError, r"'initial' is a file, not a folder")
case(E, "save_initial-into-the-working-directory", _save_initial_into_cwd, FileExistsError,
     r"'\.' is not empty and is not a initial adapter .* never deletes")
case(E, "read-missing-folder", lambda: lorafa.read_initial_adapter("missing"), FileNotFoundError,
     r"missing is not an initial adapter written by lorafa \(it needs lorafa_init.json")
case(E, "read-corrupt-json", lambda: lorafa.read_initial_adapter(_initial_adapter(raw="{not json")), ValueError,
     r"lorafa_init.json is not valid JSON .* write the initial adapter again")
case(E, "read-json-missing-a-key", lambda: lorafa.read_initial_adapter(_initial_adapter(adapter_name=None)),
     ValueError, r"lorafa_init.json lacks \['adapter_name'\]")
case(E, "read-json-unknown-init-config-key", lambda: lorafa.read_initial_adapter(
    _initial_adapter(init_config={"method": "lora", "bogus": 1})), ValueError,
     r"lorafa_init.json holds an init_config .*'bogus'.* written by another lorafa version")


# -- align: AlignmentTerm, teachers, divergences, schedule, mappings ------------------------------------------------

E = "align"


def teacher():
    return A.ModelTeacher(llama())


def logits(*shape, fill=None, dtype=torch.float32):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape))).to(dtype)
    if fill is not None:
        t[0, 0] = fill
    return t


case(E, "term-unknown-kind", lambda: A.AlignmentTerm(teacher(), kind="kl"), ValueError,
     r"divergence kind must be one of fkl, rkl, jsd; got 'kl'")
case(E, "term-hidden-kind-on-logits", lambda: A.AlignmentTerm(teacher(), kind="mse"), ValueError,
     r"divergence kind must be one of fkl, rkl, jsd; got 'mse'")
case(E, "term-temperature-zero", lambda: A.AlignmentTerm(teacher(), temperature=0), ValueError,
     r"temperature must be > 0, got 0")
case(E, "term-temperature-string", lambda: A.AlignmentTerm(teacher(), temperature="2"), ValueError,
     r"temperature must be a finite number > 0, got '2' \(str\): write it without quotes")
case(E, "term-jsd-beta-one", lambda: A.AlignmentTerm(teacher(), kind="jsd", beta=1.0), ValueError,
     r"jsd needs beta, a number in \(0, 1\), got 1.0")
case(E, "term-unknown-target", lambda: A.AlignmentTerm(teacher(), target="attention"), ValueError,
     r"alignment target must be one of logits, hidden, pooled, got 'attention'")
case(E, "term-truncate-on-hidden", lambda: A.AlignmentTerm(teacher(), target="hidden", layer_map=[(1, 1)],
                                                           teacher_map=A.TruncateVocab(8)), ValueError,
     r"TruncateVocab keeps the first logits .* use a LinearMap")
case(E, "term-layer_map-out-of-range", lambda: A.AlignmentTerm(teacher(), target="hidden", student=llama(),
                                                               layer_map=[(5, 1)]), ValueError,
     r"layer map \(5, 1\): the student has hidden states 0\.\.2")
case(E, "term-hidden-without-student-or-map", lambda: A.AlignmentTerm(teacher(), target="hidden"), ValueError,
     r"target='hidden' without a layer_map needs the student")
case(E, "term-refresh-a-string", lambda: A.AlignmentTerm(teacher(), refresh="ema"), ValueError,
     r"refresh must be None, \('ema', mu\) or \('checkpoint', path\); got 'ema'")
case(E, "term-refresh-ema-mu-above-one", lambda: A.AlignmentTerm(teacher(), refresh=("ema", 1.5)), ValueError,
     r"the EMA refresh needs mu, a number in \[0, 1\), got 1.5")
case(E, "term-refresh-checkpoint-without-path", lambda: A.AlignmentTerm(teacher(), refresh=("checkpoint", None)),
     ValueError, r"refresh=\('checkpoint', path\) needs the path")
case(E, "term-refresh-of-a-self-teacher", lambda: A.AlignmentTerm(A.SelfTeacher(init("lora")), refresh=("ema", 0.9)),
     ValueError, r"a refreshed teacher must be a separate model \(ModelTeacher\)")
case(E, "term-refresh-ema-of-a-goat-student", lambda: A.AlignmentTerm(
    teacher(), refresh=("ema", 0.9), student=init("goat", lcfg=cfg(r=4), num_experts=2)), ValueError,
     r"GOAT layers: the router makes their update input-dependent.*Use refresh=\('checkpoint', path\)")
def _resized(vocab: int):
    model = llama()
    model.resize_token_embeddings(vocab)
    return model


case(E, "term-vocabularies-differ", lambda: A.AlignmentTerm(A.ModelTeacher(_resized(80)), student=llama()),
     ValueError, r"the student has 64 outputs and the teacher 80 .* needs a mapping \(TruncateVocab")
case(E, "teacher-path-missing", lambda: A.ModelTeacher("./no_such_model"), ValueError,
     r"Cannot load model './no_such_model': not a local checkpoint, and the hub is unreachable or has no such id")
case(E, "teacher-unknown-kind", lambda: A.ModelTeacher(lm_dir(), kind="regression"), ValueError,
     r"teacher kind must be causal_lm or classification, got 'regression'")
case(E, "teacher-device-not-a-device", lambda: A.ModelTeacher(llama(), device="tpu9"), ValueError,
     r"ModelTeacher's device .* got 'tpu9', which is not a torch device")
case(E, "teacher-ema-mu-one", lambda: teacher().refresh_ema(init("lora"), 1.0), ValueError,
     r"the EMA refresh needs mu, a number in \[0, 1\), got 1.0")
case(E, "teacher-ema-of-another-architecture", lambda: A.ModelTeacher(tiny_gpt2()).refresh_ema(init("lora"), 0.9),
     ValueError, r"an EMA refresh needs a teacher with the student's architecture")
case(E, "teacher-reload-without-path", lambda: teacher().reload(), ValueError,
     r"given as a model object: pass the checkpoint path to reload from")
case(E, "self-teacher-of-a-plain-model", lambda: A.SelfTeacher(llama()), ValueError,
     r"SelfTeacher needs the student as a PEFT model with LoRA adapters.*use ModelTeacher")
case(E, "self-teacher-of-an-offset-init", lambda: A.SelfTeacher(init("pissa")), ValueError,
     r"'pissa' offset them by −s·B·A. Use an init that does not")
case(E, "self-teacher-of-kasa", lambda: A.SelfTeacher(init("kasa")), ValueError,
     r"kasa truncates them.*or a separate teacher")
case(E, "divergence-shapes-differ", lambda: A.logit_divergence(logits(2, 3, 8), logits(2, 3, 9)), ValueError,
     r"student logits \(2, 3, 8\) and teacher logits \(2, 3, 9\) differ: .* needs a mapping")
case(E, "divergence-nan-teacher", lambda: A.logit_divergence(logits(2, 3, 8), logits(2, 3, 8, fill=math.nan)),
     ValueError, r"the teacher's outputs contain NaN or \+inf at 1 of the 6 positions.*load it in bf16 or fp32")
case(E, "divergence-fp16-teacher-overflow", lambda: A.logit_divergence(
    logits(2, 3, 8), logits(2, 3, 8, fill=math.inf, dtype=torch.float16)), ValueError,
     r"they are float16, which overflows above 65504")
case(E, "divergence-all-minus-inf-row", lambda: A.logit_divergence(logits(2, 3, 8), logits(2, 3, 8, fill=-math.inf)),
     ValueError, r"the teacher gives every logit −inf at 1 positions \(no distribution\): mask those positions out")
case(E, "divergence-rkl-infinite", lambda: A.logit_divergence(
    logits(1, 1, 4), torch.tensor([[[0.0, -math.inf, 0.0, 0.0]]]), kind="rkl"), ValueError,
     r"rkl is infinite: the teacher gives probability 0 .* Use kind='jsd'")
case(E, "divergence-chunk_size-zero", lambda: A.logit_divergence(logits(2, 3, 8), logits(2, 3, 8), chunk_size=0),
     ValueError, r"chunk_size must be an integer >= 1, got 0")
case(E, "divergence-chunk_size-negative", lambda: A.logit_divergence(logits(2, 3, 8), logits(2, 3, 8),
                                                                     chunk_size=-1),
     ValueError, r"chunk_size must be an integer >= 1, got -1")
case(E, "divergence-mask-of-another-shape", lambda: A.logit_divergence(logits(2, 3, 8), logits(2, 3, 8),
                                                                       mask=torch.ones(2, 4, dtype=torch.bool)),
     ValueError, r"the mask has shape \(2, 4\), the positions \(2, 3\)")
case(E, "hidden-logit-kind", lambda: A.hidden_divergence(logits(2, 3, 8), logits(2, 3, 8), kind="fkl"), ValueError,
     r"divergence kind must be one of mse, cosine; got 'fkl'")
case(E, "hidden-widths-differ", lambda: A.hidden_divergence(logits(2, 3, 8), logits(2, 3, 6)), ValueError,
     r"differ: map one of them \(lorafa.align.LinearMap\)")
case(E, "hidden-nan-student", lambda: A.hidden_divergence(logits(2, 3, 8, fill=math.nan), logits(2, 3, 8)),
     ValueError, r"the student's outputs contain NaN or \+inf .*lower the learning rate")
case(E, "schedule-align_steps-zero", lambda: A.CyclicSchedule(task_steps=2, align_steps=0), ValueError,
     r"align_steps must be >= 1: with no realignment steps the teacher is never used")
case(E, "schedule-task_steps-negative", lambda: A.CyclicSchedule(task_steps=-1, align_steps=1), ValueError,
     r"task_steps must be an integer >= 0, got -1")
case(E, "schedule-task_steps-float", lambda: A.CyclicSchedule(task_steps=1.5, align_steps=1), ValueError,
     r"task_steps must be an integer >= 0, got 1.5")
case(E, "schedule-warmup-bool", lambda: A.CyclicSchedule(task_steps=1, align_steps=1, warmup_steps=True), ValueError,
     r"warmup_steps must be an integer >= 0, got True")
case(E, "schedule-lambda-nan", lambda: A.CyclicSchedule(1, 1, task_lambda=math.nan), ValueError,
     r"task_lambda must be a finite number >= 0, got nan")
case(E, "schedule-lambda-string", lambda: A.CyclicSchedule(1, 1, align_lambda="1"), ValueError,
     r"align_lambda must be a finite number >= 0, got '1'")
case(E, "schedule-lambda-bool", lambda: A.CyclicSchedule(1, 1, align_lambda=True), ValueError,
     r"align_lambda must be a finite number >= 0, got True")
case(E, "schedule-negative-step", lambda: A.CyclicSchedule(1, 1).phase(-1), ValueError, r"step must be >= 0, got -1")
case(E, "schedule-longer-than-the-run", lambda: A.CyclicSchedule(10, 1).check_fits(5), ValueError,
     r"first realignment step is step 10 .* but the run has 5 steps: shorten the phases or train longer")
case(E, "linear-map-weight-of-another-shape", lambda: A.LinearMap(4, 3, weight=torch.ones(4, 3)), ValueError,
     r"LinearMap weight has shape \(4, 3\), expected \(3, 4\)")
case(E, "linear-map-input-of-another-width", lambda: A.LinearMap(4, 3)(torch.ones(2, 5)), ValueError,
     r"LinearMap expects 4 features, got 5")
case(E, "truncate-vocab-zero", lambda: A.TruncateVocab(0), ValueError,
     r"TruncateVocab size must be an integer >= 1, got 0")
case(E, "truncate-vocab-float", lambda: A.TruncateVocab(2.5), ValueError,
     r"TruncateVocab size must be an integer >= 1, got 2.5")
case(E, "truncate-vocab-too-few-logits", lambda: A.TruncateVocab(10)(torch.ones(2, 8)), ValueError,
     r"TruncateVocab\(10\) got only 8 logits")
case(E, "load-mapping-missing", lambda: A.load_mapping("missing"), FileNotFoundError,
     r"missing has no saved alignment mapping")
case(E, "save-mapping-of-truncate", lambda: A.save_mapping(A.TruncateVocab(4), "out"), TypeError,
     r"only a LinearMap has weights to save, got TruncateVocab")
case(E, "layer-map-empty", lambda: A.check_layer_map([], 2, 2), ValueError, r"the layer map is empty")
case(E, "layer-map-float-index", lambda: A.check_layer_map([(1.0, 2)], 2, 2), ValueError,
     r"layer map entries are \(student, teacher\) integer pairs, got \(1.0, 2\)")
case(E, "default-layer-map-zero-pairs", lambda: A.default_layer_map(2, 4, pairs=0), ValueError,
     r"pairs must be in \[1, 2\]")


# -- quant: bitsandbytes layers, other schemes ----------------------------------------------------------------------

E = "quant"


def _int8_linear():
    layer = nn.Linear(4, 4)
    layer.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    return layer


case(E, "integer-weights-of-an-unknown-scheme", lambda: Q.quant_kind(_int8_linear()), ValueError,
     r"quantized with an unrecognised scheme storing torch.int8 .* load the model in fp32/bf16/fp16")
case(E, "integer-weights-as-a-target", lambda: initialize(
    nn.Sequential(_int8_linear()), lora_cfg(["0"]), InitConfig(method="pissa"), progress=False), ValueError,
     r"Target '0': .* unrecognised scheme storing torch.int8")
def _requantize_a_float_layer():
    pytest.importorskip("bitsandbytes")  # requantize_ imports it first
    Q.requantize_(nn.Linear(4, 4), torch.zeros(4, 4))


case(E, "requantize-a-float-layer", _requantize_a_float_layer, ValueError,
     r"Linear is not quantized: write its weight directly")
case(E, "requantize-another-shape", lambda: Q.requantize_(linear4bit(), torch.zeros(32, 32)), ValueError,
     r"new_weight must be a finite \(32, 64\) matrix, got \(32, 32\)")
case(E, "requantize-nan", lambda: Q.requantize_(linear4bit(), torch.full((32, 64), math.nan)), ValueError,
     r"new_weight must be a finite \(32, 64\) matrix.*\(finite: False\)")
case(E, "dequantize-before-quantization", lambda: Q.dequantized_weight(linear4bit(quantized=False)), ValueError,
     r"has not quantized yet .* move the model to its device first")
case(E, "check-unknown-target-names", lambda: Q.check_quantized_model(llama(), ["model.layers.9.q"], False, False),
     ValueError, r"targets not found in the model: \['model.layers.9.q'\]")
case(E, "kasa-on-4bit", lambda: initialize(nf4_model(), cfg(["q_proj"]), InitConfig(method="kasa"),
                                           base_weights=lm_dir(), progress=False), ValueError,
     r"kasa on quantized layers .* is not supported: KaSA truncates .* Load the model in fp32/bf16")
case(E, "goat-on-4bit", lambda: initialize(nf4_model(), cfg(["q_proj"], r=8), InitConfig(method="goat"),
                                           base_weights=lm_dir(), progress=False), ValueError,
     r"goat on quantized layers .* GOAT variant runs on float nn.Linear layers only")
case(E, "offset-init-on-4bit-without-base_weights", lambda: initialize(nf4_model(), cfg(["q_proj"]),
                                                                       InitConfig(method="pissa"), progress=False),
     ValueError, r"Pass base_weights=<the full-precision checkpoint .* or base_weights='dequantized'")
case(E, "base_weights-of-another-model", lambda: initialize(nf4_model(), cfg(["q_proj"]), InitConfig(method="pissa"),
                                                            base_weights=gpt2(), progress=False),
     ValueError, r"base_weights has no .* pass the full-precision checkpoint the quantized model was loaded from")


# -- goat -----------------------------------------------------------------------------------------------------------

E = "goat"


def _goat_adapter(meta_change=None, raw=None) -> Path:
    pm = init("goat", lcfg=cfg(r=4), num_experts=2)
    folder = Path.cwd() / "goat"
    lorafa.save_adapter(pm, folder)
    if raw is not None:
        (folder / G.GOAT_FILE).write_text(raw)
    elif meta_change:
        meta = json.loads((folder / G.GOAT_FILE).read_text())
        meta.update(meta_change)
        (folder / G.GOAT_FILE).write_text(json.dumps(meta))
    return folder


def _plain_adapter() -> Path:
    pm = init("lora")
    lorafa.save_adapter(pm, Path.cwd() / "plain")
    return Path.cwd() / "plain"


case(E, "options-zero-experts", lambda: G.GoatOptions(num_experts=0), ValueError,
     r"GoatOptions: num_experts must be an integer >= 1")
case(E, "options-top_k-above-experts", lambda: G.GoatOptions(num_experts=2, top_k=3), ValueError,
     r"top_k must be in \[1, num_experts=2\] \(lower top_k or raise num_experts\)")
case(E, "options-rho-negative", lambda: G.GoatOptions(rho=-1.0), ValueError,
     r"GoatOptions: rho \(InitConfig's goat_rho\) must be > 0, got -1.0")
case(E, "options-unknown-residual", lambda: G.GoatOptions(residual="dynamic"), ValueError,
     r"residual must be 'routed' or 'static'")
case(E, "options-unknown-expert_scale", lambda: G.GoatOptions(expert_scale="pissa"), ValueError,
     r"expert_scale must be 'goat' or 'lora'")
case(E, "options-aux-weight-negative", lambda: G.GoatOptions(aux_loss_weight=-1.0), ValueError,
     r"aux_loss_weight must be >= 0")
case(E, "options-eta-inf", lambda: G.GoatOptions(eta=math.inf), ValueError,
     r"GoatOptions: eta must be a finite number > 0, got inf")
case(E, "options-aux-weight-inf", lambda: G.GoatOptions(aux_loss_weight=math.inf), ValueError,
     r"GoatOptions: aux_loss_weight must be a finite number >= 0, got inf")
case(E, "options-experts-float", lambda: G.GoatOptions(num_experts=2.0), ValueError,
     r"num_experts must be an integer >= 1")
case(E, "options-eta-string", lambda: G.GoatOptions(eta="1"), ValueError,
     r"GoatOptions: eta must be a finite number > 0, got '1' \(str\): write it without quotes")
case(E, "rank-not-divisible", lambda: G.GoatOptions(num_experts=4).check(6, 32, 32), ValueError,
     r"choose r divisible by num_experts \(r=6, num_experts=4\)")
case(E, "experts-overlap", lambda: G.GoatOptions(num_experts=2).check(20, 16, 32), ValueError,
     r"r/E=10 > ⌊k/E⌋=8 would overlap or exceed the spectrum. Lower r or num_experts")
case(E, "apply-to-an-offset-peft-init", lambda: G.apply_goat(plain_peft(cfg(init_lora_weights="pissa"))), ValueError,
     r"GOAT needs the unmodified base and no LoRA bias: init_lora_weights=True")
case(E, "apply-with-factors-for-other-layers", lambda: G.apply_goat(plain_peft(cfg(r=8)), factors={
    "nope": (torch.zeros(8, 32), torch.zeros(32, 8))}), ValueError,
     r"GOAT factors given for unknown layers \['nope'\], missing for")
case(E, "apply-to-conv1d", lambda: G.apply_goat(plain_peft(cfg(["c_attn"], r=8), model=gpt2())), ValueError,
     r"GOAT supports nn.Linear layers \(weight out×in\) only; .* wraps a Conv1D")
case(E, "apply-to-dora", lambda: G.apply_goat(plain_peft(cfg(r=8, use_dora=True))), ValueError,
     r"already runs the LoRA variant DoraLinearVariant; GOAT .*turn off use_dora")
case(E, "load-missing-folder", lambda: G.load_goat(llama(), "missing"), ValueError,
     r"missing holds no PEFT adapter \(no adapter_config.json\)")
case(E, "load-a-plain-lora-adapter", lambda: G.load_goat(llama(), _plain_adapter()), ValueError,
     r"is not a GOAT adapter \(no goat.json\): .* load a plain LoRA adapter with PeftModel.from_pretrained")
case(E, "load-another-format-version", lambda: G.load_goat(llama(), _goat_adapter({"format_version": 99})),
     ValueError, r"goat.json has format version 99; lorafa reads 1")
case(E, "load-corrupt-goat-json", lambda: G.load_goat(llama(), _goat_adapter(raw="{")), ValueError,
     r"goat.json is not valid JSON .* save it again")
case(E, "aux-loss-without-goat", lambda: G.goat_aux_loss(init("lora")), ValueError,
     r"No GOAT layer has run a forward yet \(or the model has none\)")
case(E, "merge-a-goat-model", lambda: list(A.merged_weights(init("goat", lcfg=cfg(r=4), num_experts=2))), ValueError,
     r"merging needs the student's merged weights .* GOAT layers")


# -- kasa -----------------------------------------------------------------------------------------------------------

E = "kasa"
case(E, "loss-of-a-plain-model", lambda: K.kasa_loss(llama()), TypeError,
     r"kasa_loss needs a PEFT LoRA model \(PeftModel\), got LlamaForCausalLM")
case(E, "loss-without-kasa-layers", lambda: K.kasa_loss(init("lora")), ValueError,
     r"The model has no KaSA layer for these adapters: build it with InitConfig\(method='kasa'\)")
case(E, "config-with-other-weights", lambda: initialize(
    llama(), cfg(kasa_config=KasaConfig(beta=0.5)),
    InitConfig(method="kasa"), progress=False), ValueError,
     r"kasa_config has beta=0.5, .* set them in one place \(InitConfig's kasa_beta/kasa_gamma\)")
case(E, "gamma-nan", lambda: init("kasa", kasa_gamma=math.nan), ValueError,
     r"KaSA's gamma \(InitConfig's kasa_gamma\) must be a finite number >= 0")
case(E, "loss-of-an-unknown-adapter", lambda: K.kasa_loss(init("kasa"), adapter_names=["other"]), ValueError,
     r"(no KaSA layer|adapter 'other'|\['other'\])")


# -- lora_pro -------------------------------------------------------------------------------------------------------

E = "lora_pro"
_g = torch.Generator().manual_seed(0)
PA, PB = torch.randn(2, 6, generator=_g), torch.randn(5, 2, generator=_g)  # A: r × n, B: m × r
GA, GB = torch.randn(2, 6, generator=_g), torch.randn(5, 2, generator=_g)


def _frozen(pm, which=("lora_A", "lora_B")):
    for n, p in pm.named_parameters():
        if any(w in n for w in which):
            p.requires_grad_(False)
    return pm


case(E, "factor-shapes", lambda: LP.lora_pro_gradients(PA, PB.T, GA, GB, 1.0), ValueError,
     r"A must be r × n and B m × r")
case(E, "gradient-shapes", lambda: LP.lora_pro_gradients(PA, PB, GA.T, GB, 1.0), ValueError,
     r"Gradient shapes \(6, 2\), \(5, 2\) do not match A \(2, 6\), B \(5, 2\)")
case(E, "nan-gradient", lambda: LP.lora_pro_gradients(PA, PB, torch.full_like(GA, math.nan), GB, 1.0), ValueError,
     r"grad_A has NaN or inf entries: LoRA-Pro cannot project a non-finite step")
case(E, "scaling-zero", lambda: LP.lora_pro_gradients(PA, PB, GA, GB, 0.0), ValueError,
     r"The LoRA scaling s must be finite and nonzero, got 0.0")
case(E, "damping-negative", lambda: LP.lora_pro_gradients(PA, PB, GA, GB, 1.0, damping=-1.0), ValueError,
     r"damping must be >= 0, got -1.0")
case(E, "damping-string", lambda: LP.lora_pro_gradients(PA, PB, GA, GB, 1.0, damping="1e-6"), ValueError,
     r"damping must be a finite number >= 0, got '1e-6' \(str\): write it without quotes")
case(E, "rank-deficient-A", lambda: LP.lora_pro_gradients(torch.zeros(2, 6), PB, GA, GB, 1.0), ValueError,
     r"A \(\(2, 6\)\) has linearly dependent rows .* raise damping")
case(E, "zero-B-with-A-gradient", lambda: LP.lora_pro_gradients(PA, torch.zeros(5, 2), GA, GB, 1.0), ValueError,
     r"B is zero but grad_A is not, so grad_A is not s·Bᵀg")
case(E, "pairs-no-trainable-parameters", lambda: LP.lora_pro_pairs(_frozen(init("lora"))), ValueError,
     r"The model has no trainable LoRA \(A, B\) pairs of adapter 'default'")
case(E, "pairs-of-a-model-without-lora", lambda: LP.lora_pro_pairs(llama()), ValueError,
     r"no trainable LoRA \(A, B\) pairs")
case(E, "pairs-one-factor-frozen", lambda: LP.lora_pro_pairs(_frozen(init("lora"), ("lora_A",))), ValueError,
     r"LoRA-Pro moves A and B together, but one of them is frozen")
case(E, "pairs-of-a-kasa-model", lambda: LP.lora_pro_pairs(init("kasa")), ValueError,
     r"LoRA-Pro needs ΔW = s·B·A with 2-D factors; this layer is a LoRA variant")
case(E, "optimizer-unknown-moments", lambda: O.create_lora_pro_optimizer(init("lora"), lr=1e-3,
                                                                                   moments="second"),
     ValueError, r"moments must be 'factor' or 'full', got 'second'")
case(E, "optimizer-full-moments-with-sgd", lambda: O.create_lora_pro_optimizer(
    init("lora"), torch.optim.SGD, lr=1e-3, moments="full"), ValueError, r"pass .*torch.optim.AdamW")
case(E, "step-without-gradients", lambda: LP.with_gradients(LP.lora_pro_pairs(init("lora"))), ValueError,
     r"No LoRA factor has a gradient at this step: LoRA-Pro reads them from .grad after the backward pass")


# -- the command lines: lorafa-extract, lorafa-eval-gsm8k, lorafa-demo, lorafa-run (their main(argv), in-process) --


def extract_cli(*argv):
    from lorafa.extract_cli import main

    return main([str(a) for a in argv])


def extract_args(**change) -> list[str]:
    args = {"--base": lm_dir(), "--tuned": lm_dir(1), "--rank": "2", "--out": "out", **change}
    return [x for k, v in args.items() if v is not None for x in (k, str(v))]


E = "lorafa-extract"
case(E, "rank-zero", lambda: extract_cli(*extract_args(**{"--rank": 0})), SystemExit, r"--rank must be >= 1, got 0")
case(E, "rank-not-a-number", lambda: extract_cli(*extract_args(**{"--rank": "two"})), SystemExit,
     r"argument --rank: invalid int value: 'two'")
case(E, "alpha-zero", lambda: extract_cli(*extract_args(**{"--alpha": 0})), SystemExit,
     r"--alpha is lora_alpha, .* must be a finite number > 0, got 0.0")
case(E, "heldout-negative", lambda: extract_cli(*extract_args(**{"--heldout": -1})), SystemExit,
     r"--heldout is a number of test examples: it must be >= 0")
case(E, "bsz-zero", lambda: extract_cli(*extract_args(**{"--bsz": 0})), SystemExit, r"--bsz must be >= 1, got 0")
case(E, "data-without-dataset", lambda: extract_cli(*extract_args(**{"--data": "x.jsonl"})), SystemExit,
     r"--data is the path of --dataset: name the dataset too")
case(E, "device-not-a-device", lambda: extract_cli(*extract_args(**{"--device": "tpu9"})), SystemExit,
     r"--device 'tpu9' is not a torch device")
case(E, "device-meta", lambda: extract_cli(*extract_args(**{"--device": "meta"})), SystemExit,
     r"--device meta holds no data")
case(E, "dtype-unknown", lambda: extract_cli(*extract_args(**{"--dtype": "fp8"})), SystemExit,
     r"argument --dtype: invalid choice: 'fp8'")
case(E, "tuned-missing", lambda: extract_cli(*extract_args(**{"--tuned": None})), SystemExit,
     r"the following arguments are required: --tuned")
case(E, "base-missing", lambda: extract_cli(*extract_args(**{"--base": "./no_such_model"})), ValueError,
     r"Cannot load model './no_such_model': not a local checkpoint")
case(E, "tuned-equals-base", lambda: extract_cli(*extract_args(**{"--tuned": lm_dir()})), ValueError,
     r"The fine-tune equals the base on every target layer .* Check that --tuned names the fine-tuned checkpoint")
case(E, "unknown-target", lambda: extract_cli(*extract_args(), "--targets", "q_prj"), ValueError,
     r"'q_prj' \(close: \['q_proj'")
case(E, "out-an-existing-file", lambda: extract_cli(*extract_args(**{"--out": write("out")})), FileExistsError,
     r"'?out'? is a file, not a folder")


def eval_cli(*argv):
    from lorafa.eval.cli import main

    return main([str(a) for a in argv])


def gsm_rows(name="test.jsonl", text=None) -> Path:
    rows = [{"question": f"What is {i} plus 1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"} for i in range(2)]
    return write(Path.cwd() / "gsm" / name, text if text is not None else "\n".join(json.dumps(r) for r in rows))


def gpt2_adapter() -> Path:
    plain_peft(cfg(["c_attn"]), model=gpt2()).save_pretrained(str(Path.cwd() / "gpt2_adapter"))
    return Path.cwd() / "gpt2_adapter"


E = "lorafa-eval-gsm8k"
case(E, "run-missing", lambda: eval_cli("--wandb_name", "nope"), ValueError,
     r"Run directory .*nope does not exist: pass --runs_root \(or set LORAFA_RUNS\) or --run_dir")
case(E, "use_merged-without-run", lambda: eval_cli("--use_merged"), ValueError,
     r"--use_merged needs a run directory: pass --wandb_name or --run_dir, or --merged PATH")
case(E, "model-missing", lambda: eval_cli("--model", "./no_such_model", "--data_path", gsm_rows()), ValueError,
     r"Cannot load model './no_such_model': not a local checkpoint")
case(E, "adapter-missing", lambda: eval_cli("--model", lm_dir(), "--adapter", "missing"), ValueError,
     r"The adapter folder missing does not exist")
case(E, "limit-not-a-number", lambda: eval_cli("--limit", "abc"), SystemExit,
     r"argument --limit/--n: invalid int value: 'abc'")
case(E, "limit-zero", lambda: eval_cli("--model", lm_dir(), "--data_path", gsm_rows(), "--limit", 0), ValueError,
     r"n=0: pass a positive number of examples")
case(E, "batch_size-zero", lambda: eval_cli("--model", lm_dir(), "--data_path", gsm_rows(), "--batch_size", 0,
                                            "--max_new_tokens", 2), ValueError,
     r"batch_size=0 and max_new_tokens=2 must both be >= 1")
case(E, "adapter-of-another-model", lambda: eval_cli("--model", lm_dir(), "--adapter", gpt2_adapter()), ValueError,
     r"targets .*c_attn.*, which the base model does not have: .* Pass --model with the right base")
case(E, "data-not-json", lambda: eval_cli("--model", lm_dir(), "--data_path", gsm_rows(text="{oops")), ValueError,
     r"test.jsonl:1 is not valid JSON .* fix or regenerate it")
case(E, "data-folder-without-split", lambda: eval_cli("--model", lm_dir(), "--data_path",
                                                     gsm_rows("train.jsonl").parent),
     ValueError, r"has no test.jsonl: pass a folder with that file")


def demo_cli(*argv):
    from lorafa.demo import main

    return main([str(a) for a in argv])


E = "lorafa-demo"
case(E, "bsz-not-a-number", lambda: demo_cli("--bsz", "two"), SystemExit, r"argument --bsz: invalid int value: 'two'")
case(E, "alpha-not-a-number", lambda: demo_cli("--alpha", "big"), SystemExit,
     r"argument --alpha: invalid float value: 'big'")
# refused by the argument check, before the model is loaded (a model name that does not exist proves it)
case(E, "unknown-method", lambda: demo_cli("--model", "./no_such_model", "--method", "bogus"), SystemExit,
     r"Unknown init method 'bogus'")
case(E, "rank-zero", lambda: demo_cli("--model", "./no_such_model", "--rank", 0), SystemExit,
     r"--rank must be >= 1, got 0")
case(E, "iters-zero", lambda: demo_cli("--model", "./no_such_model", "--iters", 0), SystemExit,
     r"--iters must be >= 1, got 0")
case(E, "alpha-zero", lambda: demo_cli("--model", "./no_such_model", "--alpha", 0), SystemExit,
     r"--alpha is lora_alpha .* must be a finite number > 0, got 0.0")


def run_cli(*overrides):
    """`lorafa-run <overrides>` in-process: hydra's main with sys.argv set, its global state and logging restored."""
    import logging

    from hydra.core.global_hydra import GlobalHydra

    from lorafa import cli

    root = logging.getLogger()
    saved = (sys.argv, root.handlers[:], root.level)
    sys.argv = ["lorafa-run", *overrides]
    try:
        return cli.main()
    finally:
        sys.argv = saved[0]
        root.handlers[:] = saved[1]
        root.setLevel(saved[2])
        GlobalHydra.instance().clear()


E = "lorafa-run"
case(E, "unknown-init-key", lambda: run_cli("++init.bogus=1"), (SystemExit, ValueError),
     r"Unknown config key\(s\): init.bogus")
case(E, "unknown-model-key", lambda: run_cli("++model.bogus=1"), (SystemExit, ValueError),
     r"Unknown config key\(s\): model.bogus")
case(E, "unknown-group-option", lambda: run_cli("+init=bogus"), (SystemExit, Exception),
     r"Could not find 'init/bogus'")
case(E, "bad-value", lambda: run_cli("++init.iters=0"), (SystemExit, ValueError), r"iters must be an integer >= 1")


def composed(*overrides) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)


def run_config(*overrides):
    from lorafa.runconfig import parse_run_config

    return parse_run_config(composed(*overrides))


E = "runner config"
case(E, "unknown-init-key", lambda: run_config("++init.bogus=1"), ValueError,
     r"Unknown config key\(s\): init.bogus\. Valid keys under 'init.'")  # no "(did you mean ?)" without a guess
case(E, "unknown-model-key", lambda: run_config("++model.bogus=1"), ValueError, r"Unknown config key\(s\): model.bogus")
case(E, "unknown-top-level-key", lambda: run_config("++bogus=1"), ValueError,
     r"Unknown config key\(s\): bogus\. Valid keys under 'top level'")
case(E, "key-in-the-wrong-section", lambda: run_config("++init.lora_r=4"), ValueError,
     r"init.lora_r \(did you mean peft.lora_r\?\)")
case(E, "bool-as-a-word", lambda: run_config("++model.bf16=yes"), ValueError,
     r"Config key model.bf16 must be true/false, got 'yes'")
case(E, "bool-for-an-int", lambda: run_config("++init.bsz=true"), ValueError,
     r"Config key init.bsz must be an integer, got True")
case(E, "string-for-an-int", lambda: run_config("++init.iters=many"), ValueError,
     r"iters must be an integer, got 'many'")
case(E, "string-for-a-float", lambda: run_config("++model.learning_rate=fast"), ValueError,
     r"model.learning_rate.*'fast'")
case(E, "string-for-a-list", lambda: run_config("++peft.target_modules=q_proj"), ValueError,
     r"Config key peft.target_modules must be a list, got 'q_proj'")
case(E, "unknown-method", lambda: run_config("++init.direction=LoRA-XX"), ValueError,
     r"Unknown init method 'LoRA-XX'")
case(E, "method-of-another-mode", lambda: run_config("+init=svd", "++init.direction=LoRA-GA"), ValueError,
     r"is not a svd method; svd allows .* \(use \+init=gradient\)")
case(E, "tau-above-one", lambda: run_config("++init.tau=1.5"), ValueError, r"tau .* must be a number in \(0, 1\]")
case(E, "validation_size-negative", lambda: run_config("++dataset.validation_size=-1"), ValueError,
     r"dataset.validation_size must be >= 0")
case(E, "align-unknown-mode", lambda: run_config("++align.mode=mirror"), ValueError,
     r"align.mode must be one of .* got 'mirror'")
case(E, "align-lambda-negative", lambda: run_config("+align=distill", "++align.teacher=x", "++align.lambda_=-1"),
     ValueError, r"lambda_")
case(E, "4bit-quant-type", lambda: run_config("++model.load_in_4bit=true", "++model.bnb_4bit_quant_type=int4"),
     ValueError, r"model.bnb_4bit_quant_type must be nf4 or fp4, got 'int4'")
case(E, "lora_r-zero", lambda: run_config("++peft.lora_r=0"), ValueError,
     r"peft.lora_r must be an integer >= 1 \(the LoRA rank\), got 0")
case(E, "lora_dropout-above-one", lambda: run_config("++peft.lora_dropout=1.5"), ValueError,
     r"peft.lora_dropout must be a number in \[0, 1\)")
case(E, "lora_alpha-zero", lambda: run_config("++peft.lora_alpha=0"), ValueError,
     r"peft.lora_alpha must be a finite number > 0")
case(E, "rank_pattern-zero", lambda: run_config("++peft.rank_pattern={q_proj:0}"), ValueError,
     r"peft.rank_pattern.q_proj must be an integer >= 1, got 0")
case(E, "per_device_batch_size-zero", lambda: run_config("++model.per_device_batch_size=0"), ValueError,
     r"model.per_device_batch_size must be an integer >= 1, got 0")
case(E, "real_batch_size-not-a-multiple", lambda: run_config("++model.real_batch_size=6",
                                                             "++model.per_device_batch_size=4"), ValueError,
     r"model.real_batch_size=6 must be a multiple of model.per_device_batch_size=4")
case(E, "optimizer-unknown", lambda: run_config("++model.optimizer=adam"), ValueError,
     r"model.optimizer must be one of \['adamw', 'sgd', 'lora_pro', 'schedulefree'\]")
case(E, "schedulefree-with-a-decaying-schedule", lambda: run_config("++model.lr_scheduler_type=cosine"), ValueError,
     r"model.optimizer=schedulefree replaces the schedule .* add \+\+model.lr_scheduler_type=constant")
case(E, "schedulefree-with-loraplus", lambda: run_config("++peft.use_loraplus=true"), ValueError,
     r"model.optimizer=schedulefree \(the default\) cannot be combined with model.prec_reg .* or peft.use_loraplus"
     r".* add \+\+model.optimizer=adamw")
case(E, "schedulefree-auto-with-another-rule", lambda: run_config("++model.lr_rule=polyak"), ValueError,
     r"model.lr_rule=polyak's constant is fitted for AdamW .* use \+\+model.lr_rule=anchored")
case(E, "string-for-a-number", lambda: run_config("++model.warmup=abc"), ValueError,
     r"Config key model.warmup must be a number, got 'abc'")
case(E, "alias-of-a-key", lambda: run_config("++model.lr=1e-3"), ValueError,
     r"model.lr \(did you mean model.learning_rate\?\)")


# ---------------------------------------------------------------------------------------------------------------
# the test


def _param(c: Case):
    marks = [pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []
    return pytest.param(c, id=f"{c.entry}:{c.id}", marks=marks)


@pytest.mark.parametrize("c", [_param(c) for c in CASES])
def test_bad_input_is_refused_clearly(c: Case, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    before = _watched()
    with pytest.raises(c.exc) as raised:
        c.call()
    text = str(raised.value)
    if isinstance(raised.value, SystemExit):  # argparse / hydra: the message went to stderr
        out = capsys.readouterr()
        text = f"{text}\n{out.err}\n{out.out}"
        assert raised.value.code not in (0, None), f"exit status {raised.value.code}: {text}"
    assert re.search(c.phrase, text, re.S), f"{type(raised.value).__name__}: {text!r}\ndoes not match {c.phrase!r}"
    changed = _outside_changes(before, _watched())
    assert not changed, f"files outside the temporary folders changed: {changed[:10]}"
    left = _leftovers(tmp_path)
    assert not left, f"temporary files of an interrupted write were left behind: {left[:10]}"


def test_the_sweep_covers_every_entry_point():
    """The size reported in the issue's note: entry points × inputs tried."""
    entries = {c.entry for c in CASES}
    assert len(entries) >= 10 and len(CASES) >= 60, (len(entries), len(CASES))
    assert len({(c.entry, c.id) for c in CASES}) == len(CASES), "duplicate case ids"
