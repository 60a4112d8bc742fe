"""Saving (SPEC §3): the record of an init and its initial adapter (A₀, B₀), and the trained adapter saved so that it
loads on the original base.

`initialize` keeps an `InitRecord` for each model it builds (in memory, or as the folder `save_initial_adapter`
writes). `save_adapter` expresses the trained adapter relative to the pristine base: for offset methods as
ΔW = s·B·A − s·B₀·A₀ with PEFT's weight-converting `save_pretrained`, for the others as it is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
import uuid
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import CONFIG_NAME
from safetensors.torch import load_file, save_file

from .config import InitConfig
from .fsdp import unsharded_adapters
from .fsio import check_destination, remove_owned, replace_files, swap_in
from .kasa import TRUNCATION_NOTE
from .options import renamed_options
from .methods.registry import METHODS
from .stats.distributed import agree_step, on_main_process, world

logger = logging.getLogger(__name__)


INIT_FILE = "lorafa_init.json"  # beside A₀/B₀ in an initial adapter folder, and beside every saved adapter
INITIAL_WEIGHTS = "adapter_model.safetensors"


@dataclass
class InitRecord:
    """What `save_adapter` needs to express the trained adapter relative to the original base weights (SPEC §3).

    Either `initial_state` holds A₀, B₀ in memory, or `initial_dir` names the folder `save_initial_adapter` wrote
    them to (then nothing but this small record stays in memory).
    """

    adapter_name: str
    init_config: InitConfig
    subtracted: bool
    initial_state: dict[str, torch.Tensor] | None = None  # A₀, B₀ in PEFT's state-dict format
    infos: dict[str, dict] = field(default_factory=dict)
    initial_dir: str | None = None
    summary: dict = field(default_factory=dict)  # model-wide facts of the init: rank allocation, line search

    def offset_state(self) -> dict[str, torch.Tensor]:
        """The factors of the base offset, W_base = W − s·B_off·A₀ (PEFT's conversion input, SPEC §3): A₀ and B₀,
        with each layer's B₀ scaled by its `offset_scale` (1 unless offset="partial")."""
        state = dict(self.initial_tensors())
        for key, value in state.items():
            if ".lora_B." in key:
                c = self.infos.get(_module_of_key(key), {}).get("offset_scale", 1.0)
                if c != 1.0:
                    state[key] = value * c
        return state

    def initial_tensors(self) -> dict[str, torch.Tensor]:
        if self.initial_state is not None:
            return self.initial_state
        return load_file(os.path.join(self.initial_dir, INITIAL_WEIGHTS))


def _module_of_key(key: str) -> str:
    """'base_model.model.<module>.lora_B.weight' -> '<module>'."""
    module = key.split(".lora_B.")[0].split(".lora_A.")[0]
    return module[len("base_model.model."):] if module.startswith("base_model.model.") else module


# The records of models built by `initialize` in this process, keyed weakly by the PeftModel (a record dies with its
# model; nothing is stored as attributes on modules). A deepcopy or a new process has no record: pass
# `initial_adapter=` (the folder `initialize(..., initial_adapter_dir=)` wrote) to `save_adapter` instead.
_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def remember_record(peft_model: PeftModel, record: InitRecord) -> None:
    """Keep `record` as the init of `peft_model` in this process, for `init_record` and `save_adapter`."""
    _RECORDS[peft_model] = record


def init_record(peft_model: PeftModel, initial_adapter: str | os.PathLike | None = None) -> InitRecord | None:
    """The record of this model's init: read from `initial_adapter` if given, else the one `initialize` kept in
    this process for this very object (None if there is none)."""
    if initial_adapter is not None:
        return read_initial_adapter(initial_adapter)
    return _RECORDS.get(peft_model)


def read_initial_adapter(path: str | os.PathLike) -> InitRecord:
    """The InitRecord stored in an initial adapter folder by `save_initial_adapter`.

    Raises:
        FileNotFoundError: the folder lacks the files `save_initial_adapter` writes.
        ValueError: its lorafa_init.json is not valid JSON, lacks a key, or holds an init_config this version of
            InitConfig refuses (the message names the file).
    """
    path = os.fspath(path)
    meta_path = os.path.join(path, INIT_FILE)
    if not (os.path.isfile(meta_path) and os.path.isfile(os.path.join(path, INITIAL_WEIGHTS))):
        raise FileNotFoundError(f"{path} is not an initial adapter written by lorafa (it needs {INIT_FILE} and "
                                f"{INITIAL_WEIGHTS}): pass the folder given to initialize(initial_adapter_dir=...).")
    redo = ("write the initial adapter again (initialize(..., initial_adapter_dir=) or save_initial_adapter) with "
            "this lorafa version")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{meta_path} is not valid JSON ({err}): the file is damaged; {redo}.") from None
    missing = [k for k in ("adapter_name", "init_config", "subtracted") if not isinstance(meta, dict) or k not in meta]
    if missing or not isinstance(meta["init_config"], dict):
        what = f"lacks {missing}" if missing else "has an init_config that is not a JSON object"
        raise ValueError(f"{meta_path} {what}: it is not a record lorafa wrote (or it was edited); {redo}.")
    try:
        init_config = InitConfig(**renamed_options(meta["init_config"]))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{meta_path} holds an init_config this lorafa version cannot use ({err}): it was written "
                         f"by another lorafa version, or edited; {redo}.") from None
    return InitRecord(meta["adapter_name"], init_config, bool(meta["subtracted"]),
                      infos=meta.get("infos", {}), initial_dir=path, summary=meta.get("summary", {}))


@contextmanager
def _conversion_safe_config(peft_model: PeftModel, adapter_name: str):
    """PEFT's rank-2r conversion refuses rsLoRA together with rank/alpha patterns. The same adapter is expressed
    without rsLoRA by giving every layer an explicit (r_l, α'_l = s_l·r_l), which PEFT converts correctly."""
    config = peft_model.peft_config[adapter_name]
    if not (config.use_rslora and (config.rank_pattern or config.alpha_pattern)):
        yield
        return
    layers = {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    replacement = dataclasses.replace(
        config, use_rslora=False,
        rank_pattern={re.escape(n): m.r[adapter_name] for n, m in layers.items()},
        alpha_pattern={re.escape(n): m.scaling[adapter_name] * m.r[adapter_name] for n, m in layers.items()},
    )
    peft_model.peft_config[adapter_name] = replacement
    try:
        yield
    finally:
        peft_model.peft_config[adapter_name] = config


def save_adapter(peft_model: PeftModel, path: str | os.PathLike, *, save_initial: bool = False,
                 initial_adapter: str | os.PathLike | None = None) -> str:
    """Save the adapter so that stock `PeftModel.from_pretrained(original_base, path)` reproduces the model (GOAT:
    `lorafa.load_goat(original_base, path)`, since PEFT has no GOAT router; KaSA: PEFT truncates the base again).

    For methods that offset the base weight, the trained adapter is converted to ΔW = s·B·A − s·B₀·A₀ relative to the
    pristine base, a rank-2r LoRA, with PEFT's weight-converting `save_pretrained`. Other methods are saved as they
    are. Files are written into a temporary folder and moved into `path` one by one, so a crash never leaves a
    half-written file. A `lorafa_init.json` records the init.

    Args:
        peft_model: a model returned by `initialize` (possibly trained).
        path: output directory (created if needed).
        save_initial: also write the initial adapter (A₀, B₀) to `path/initial_adapter`; for offset methods it
            belongs on the offset base W − s·B₀·A₀, for the others on the original base. A previous initial adapter
            there is replaced; a folder of that name holding anything else is refused.
        initial_adapter: the folder `initialize(..., initial_adapter_dir=)` (or `save_initial_adapter`) wrote;
            needed when the model is not the very object `initialize` returned in this process (a copy, or a model
            rebuilt in another process).

    Under torch.distributed every process calls it: factors sharded by `shard_adapters` (FSDP2) are gathered on
    every process, the main process writes, and every process returns, or raises, together.

    Returns:
        The path.

    Raises:
        ValueError: neither an initial adapter folder nor this process's record of the model's init is available.
        FileExistsError: `path` is a file; or `save_initial` and `path/initial_adapter` holds something lorafa did
            not write.
        RankFailedError: on the other processes, when one process failed.
    """
    error, record = None, None
    try:
        record = init_record(peft_model, initial_adapter)
        if record is None:
            raise ValueError("The initial adapter of this model is unknown: it is not the object lorafa.initialize "
                             "returned in this process (a copy, or another process). Pass initial_adapter=<the folder "
                             "given to initialize(initial_adapter_dir=...)>, or save a plain PEFT model with "
                             "model.save_pretrained(path).")
        _check_adapter_matches(peft_model, record)
        _check_adapter_folder(path)  # on every process, before the collectives and the work
        if save_initial and world()[0] == 0:
            check_initial_adapter_dir(os.path.join(os.fspath(path), "initial_adapter"))
    except (ValueError, OSError) as e:
        error = e
    agree_step(error, True, "checking the adapter to save")  # every process raises together, or none does
    path = os.fspath(path)
    with unsharded_adapters(peft_model, keep=world()[0] == 0):  # a collective under FSDP2: every process gathers
        on_main_process(lambda: _write_adapter(peft_model, record, path, save_initial), "saving the adapter")
    return path


def _check_adapter_folder(path: str | os.PathLike) -> None:
    """Raise if `path` cannot be the adapter's folder: it exists and is not a folder (a file, a broken link)."""
    path = os.fspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        kind = "a link to no folder" if os.path.islink(path) else "a file"
        raise FileExistsError(f"{path!r} is {kind}, not a folder: save_adapter writes a folder of files; give a new "
                              "folder (or an existing one) for the adapter.")


def _write_adapter(peft_model: PeftModel, record: InitRecord, path: str, save_initial: bool) -> None:
    os.makedirs(path, exist_ok=True)
    name = record.adapter_name
    with tempfile.TemporaryDirectory(dir=path, prefix=".lorafa-tmp-") as tmp:
        out = os.path.join(tmp, "adapter")
        if record.subtracted:
            init_dir = os.path.join(tmp, f"lorafa_initial_{uuid.uuid4().hex[:8]}")
            os.makedirs(init_dir)
            save_file(record.offset_state(), os.path.join(init_dir, INITIAL_WEIGHTS), metadata={"format": "pt"})
            with _conversion_safe_config(peft_model, name):
                peft_model.save_pretrained(out, selected_adapters=[name], path_initial_model_for_weight_conversion=init_dir)
        else:
            peft_model.save_pretrained(out, selected_adapters=[name])
        if save_initial:
            _save_initial(peft_model, record, os.path.join(tmp, "initial_adapter"))
        src = out if name == "default" else os.path.join(out, name)
        meta = {"init_config": record.init_config.to_dict(), "converted_to_original_base": record.subtracted}
        variant = METHODS[record.init_config.method].variant
        if variant == "kasa":
            logger.warning("lorafa: %s", TRUNCATION_NOTE)
            meta["base_truncated"] = TRUNCATION_NOTE
        elif variant == "goat":
            from .goat import save_goat

            save_goat(peft_model, src, adapter_name=name)
            meta["load_with"] = "lorafa.goat.load_goat(original_base, path): stock PEFT has no GOAT router"
        with open(os.path.join(src, INIT_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        if save_initial:  # checked again right before the swap; a previous initial adapter is replaced
            swap_in(os.path.join(tmp, "initial_adapter"), os.path.join(path, "initial_adapter"), is_initial_adapter,
                    INITIAL_FILES, _INITIAL, _INITIAL_HINT)
        replace_files(src, path)


def _check_adapter_matches(peft_model: PeftModel, record: InitRecord) -> None:
    if record.adapter_name not in peft_model.peft_config:
        raise ValueError(f"The initial adapter is for adapter {record.adapter_name!r}, but this model has "
                         f"{sorted(peft_model.peft_config)}: pass the initial adapter of this model.")


INITIAL_FILES = (INITIAL_WEIGHTS, CONFIG_NAME, INIT_FILE)  # all that an initial adapter folder holds
_INITIAL = "initial adapter"
_INITIAL_HINT = (" for initial_adapter_dir (the run's own folder, or a fresh one beside your checkpoints), or delete "
                 "the folder yourself if you no longer need it")


def is_initial_adapter(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder `save_initial_adapter` wrote: its three files and nothing else."""
    path = os.fspath(path)
    try:
        entries = set(os.listdir(path))
    except OSError:
        return False
    if INIT_FILE not in entries or not entries <= set(INITIAL_FILES):
        return False
    if any(os.path.islink(os.path.join(path, e)) or not os.path.isfile(os.path.join(path, e)) for e in entries):
        return False
    try:
        with open(os.path.join(path, INIT_FILE)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and {"adapter_name", "init_config", "subtracted"} <= set(meta)


def check_initial_adapter_dir(path: str | os.PathLike) -> None:
    """Raise unless `path` can take an initial adapter: absent, empty, or a previous initial adapter (replaced).

    Raises:
        FileExistsError: `path` is a file, or a folder holding anything else (which lorafa never deletes).
    """
    check_destination(path, is_initial_adapter, _INITIAL, _INITIAL_HINT)


def write_initial_folder(peft_model: PeftModel, record: InitRecord, path: str | os.PathLike) -> None:
    """Write the initial adapter into a temporary sibling of `path`, then swap it in (`fsio.swap_in`)."""
    path = os.fspath(path)
    check_initial_adapter_dir(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".lorafa-initial-", dir=parent)
    try:
        _save_initial(peft_model, record, tmp)
        swap_in(tmp, path, is_initial_adapter, INITIAL_FILES, _INITIAL, _INITIAL_HINT)
    finally:
        if os.path.isdir(tmp):
            remove_owned(tmp, INITIAL_FILES)


def save_initial_adapter(peft_model: PeftModel, path: str | os.PathLike) -> str:
    """Write the initial adapter (SPEC §3): A₀, B₀, PEFT's adapter_config.json and `lorafa_init.json` (the
    InitConfig, whether the base was offset, each layer's init info), into a temporary folder renamed to `path`.

    `path` must be new, empty, or an initial adapter written before (it is then replaced); a folder holding anything
    else is refused, never emptied. For offset methods A₀, B₀ belong on the offset base W − s·B₀·A₀; for the others on
    the original base. Only the main process writes; under torch.distributed every process calls it, and a failure
    is raised on every process. `read_initial_adapter(path)` and `save_adapter(..., initial_adapter=path)` read it.

    Raises:
        ValueError: the model was not created by `initialize` in this process.
        FileExistsError: `path` is a file, or a folder that holds anything but a previous initial adapter.
    """
    record = init_record(peft_model)
    if record is None:
        raise ValueError("save_initial_adapter needs the model returned by lorafa.initialize in this process.")
    path = os.fspath(path)
    on_main_process(lambda: write_initial_folder(peft_model, record, path), "writing the initial adapter")
    return path


def _save_initial(peft_model: PeftModel, record: InitRecord, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    save_file(record.initial_tensors(), os.path.join(directory, INITIAL_WEIGHTS), metadata={"format": "pt"})
    peft_model.peft_config[record.adapter_name].save_pretrained(directory)
    meta = {"adapter_name": record.adapter_name, "init_config": record.init_config.to_dict(),
            "subtracted": record.subtracted, "infos": _jsonable(record.infos), "summary": _jsonable(record.summary)}
    with open(os.path.join(directory, INIT_FILE), "w") as f:
        json.dump(meta, f, indent=1)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
