"""Model surgery: InitResults into a PEFT LoraModel, base-weight offsets, and saving relative to the pristine base."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import tempfile
import uuid
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import InitConfig
from .methods.common import InitResult
from .methods.lora_fa import whitener_scope
from .methods.registry import init_factors
from .stats.collect import collect_stats
from .stats.distributed import world
from .targets import is_transposed, resolve_targets, unwrap_model, weight_matrix

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

    def initial_tensors(self) -> dict[str, torch.Tensor]:
        if self.initial_state is not None:
            return self.initial_state
        return load_file(os.path.join(self.initial_dir, INITIAL_WEIGHTS))


# The records of models built by `initialize` in this process, keyed weakly by the PeftModel (a record dies with its
# model; nothing is stored as attributes on modules). A deepcopy or a new process has no record: pass
# `initial_adapter=` (the folder `initialize(..., initial_adapter_dir=)` wrote) to `save_adapter` instead.
_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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
    """
    path = os.fspath(path)
    meta_path = os.path.join(path, INIT_FILE)
    if not (os.path.isfile(meta_path) and os.path.isfile(os.path.join(path, INITIAL_WEIGHTS))):
        raise FileNotFoundError(f"{path} is not an initial adapter written by lorafa (it needs {INIT_FILE} and "
                                f"{INITIAL_WEIGHTS}): pass the folder given to initialize(initial_adapter_dir=...).")
    with open(meta_path) as f:
        meta = json.load(f)
    return InitRecord(meta["adapter_name"], InitConfig(**meta["init_config"]), bool(meta["subtracted"]),
                      infos=meta.get("infos", {}), initial_dir=path)


def layer_rank_and_scaling(lora_config: LoraConfig, name: str) -> tuple[int, float]:
    """r and s for one module, resolving rank_pattern/alpha_pattern exactly as PEFT does."""
    r = lora_config.rank_pattern.get(get_pattern_key(lora_config.rank_pattern.keys(), name), lora_config.r)
    alpha = lora_config.alpha_pattern.get(get_pattern_key(lora_config.alpha_pattern.keys(), name), lora_config.lora_alpha)
    return r, alpha / math.sqrt(r) if lora_config.use_rslora else alpha / r


def _check_lora_config(lora_config, init_config: InitConfig) -> None:
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}")
    if lora_config.init_lora_weights is not True:
        raise ValueError(
            f"lora_config.init_lora_weights={lora_config.init_lora_weights!r}: choose the method with "
            f"InitConfig(method=...) and leave init_lora_weights=True, so PEFT does not run a second init."
        )
    if lora_config.use_dora and init_config.method != "lora":
        raise ValueError("use_dora is not supported with data-aware inits (DoRA's magnitude would be taken from the "
                         "wrong weight). Use InitConfig(method='lora') with DoRA, or turn DoRA off.")


def compute_init(model, lora_config: LoraConfig, init_config: InitConfig, stats=None, batches=None, loss_fn=None,
                 progress: bool = True) -> dict[str, InitResult]:
    """Every target layer's InitResult, computed from the untouched base model (nothing is modified).

    Raises:
        ValueError: see `initialize`.
    """
    base = unwrap_model(model)
    targets = resolve_targets(base, lora_config)
    if init_config.needs is not None and stats is None:
        if batches is None:
            raise ValueError(f"{init_config.method} needs '{init_config.needs}' statistics: pass batches= (or stats=).")
        rank, world_size = world()
        # init.iters counts batches over all processes: batch b belongs to rank b mod world_size
        stats = collect_stats(base, batches, list(targets), kinds=(init_config.needs,), loss_fn=loss_fn,
                              max_batches=len(range(rank, init_config.iters, world_size)), progress=progress,
                              sketch=init_config.sketch_sizes, accumulate_on=init_config.accumulate_on)
    if stats is not None and init_config.needs is not None:
        missing = [n for n in targets if n not in stats]
        if missing:
            raise ValueError(f"No statistics for target modules {missing[:6]}{' ...' if len(missing) > 6 else ''}: "
                             "they were collected for other target_modules. Recompute them for this LoraConfig.")
    with whitener_scope():
        return _init_layers(targets, lora_config, init_config, stats, init_config.method_options(), progress)


def _init_layers(targets, lora_config, init_config, stats, opts, progress) -> dict[str, InitResult]:
    results = {}
    for i, (name, module) in enumerate(tqdm(targets.items(), desc=f"lorafa {init_config.method} init",
                                            disable=not progress or world()[0] != 0, leave=False)):
        r, s = layer_rank_and_scaling(lora_config, name)
        results[name] = init_factors(init_config.method, weight_matrix(module), None if stats is None else stats.get(name),
                                     rank=r, scaling=s, svd=init_config.svd, seed=init_config.seed + i, name=name, **opts)
    return results


def initialize(model, lora_config: LoraConfig, init_config: InitConfig | None = None, batches=None, stats=None, *,
               adapter_name: str = "default", loss_fn=None, progress: bool = True,
               initial_adapter_dir: str | os.PathLike | None = None,
               autocast_adapter_dtype: bool = True) -> PeftModel:
    """Build a PEFT model whose adapters are initialised by `init_config`.

    Runs the statistics pass over `batches` if the method needs statistics and `stats` is None, computes every
    layer's factors from the untouched weights (so a bad input fails before the model is changed), then calls
    `peft.get_peft_model`, writes A and B in the adapter dtype and, for offset methods, sets the base weight to
    W − s·B·A computed from the *cast* factors.

    Args:
        model: a transformers model (or any nn.Module with nn.Linear/Conv1D targets). Modified in place, as by PEFT.
        lora_config: the PEFT LoraConfig (r, lora_alpha, use_rslora, rank_pattern, alpha_pattern, targets...).
        init_config: the method and its options; default InitConfig() (LoRA-FA).
        batches: statistics batches (HF-style dicts) for this process; at most its share of `init_config.iters`
            batches (batch b belongs to rank b mod world size) is used.
        stats: precomputed statistics (module name -> LayerStats), e.g. from `load_stats`.
        adapter_name: PEFT adapter name.
        loss_fn: `loss_fn(model, batch)`, default `model(**batch).loss`.
        initial_adapter_dir: if given, the initial adapter (A₀, B₀, the LoraConfig and the InitConfig, SPEC §3) is
            written there at once (`save_initial_adapter`) and A₀, B₀ are not kept in memory; `save_adapter` reads
            them back, also from another process or for a copy of the model (`initial_adapter=`).
        autocast_adapter_dtype: as in `peft.get_peft_model`: True upcasts fp16/bf16 adapters to fp32, False keeps
            them in the model's dtype (the offset is computed from the factors in that dtype either way).

    Returns:
        The PeftModel. `save_adapter` writes it so that it loads on the original base.

    Raises:
        ValueError/TypeError: unknown targets, unsupported layers, invalid rank, missing or bad statistics, an option
        the method lacks, quantized weights, a conflicting init_lora_weights.
    """
    init_config = init_config or InitConfig()
    _check_lora_config(lora_config, init_config)
    results = compute_init(model, lora_config, init_config, stats, batches, loss_fn, progress)
    subtract = init_config.subtracts()
    with quiet_checkpointing_rename():
        peft_model = get_peft_model(unwrap_model(model), lora_config, adapter_name=adapter_name,
                                    autocast_adapter_dtype=autocast_adapter_dtype)
    layers = {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    for name, res in results.items():
        _write_layer(name, layers[name], adapter_name, res, subtract, *layer_rank_and_scaling(lora_config, name))
    initial = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_model, adapter_name=adapter_name).items()}
    record = InitRecord(adapter_name, init_config, subtract, initial, {n: r.info for n, r in results.items()})
    _RECORDS[peft_model] = record
    if initial_adapter_dir is not None:
        save_initial_adapter(peft_model, initial_adapter_dir)
        record.initial_dir, record.initial_state = os.fspath(initial_adapter_dir), None
    logger.info("lorafa: %s init of %d layers (offset: %s)", init_config.method, len(results), subtract)
    return peft_model


@contextmanager
def quiet_checkpointing_rename():
    """PEFT reads transformers' old `is_gradient_checkpointing` property, which warns since transformers 5; the
    warning is PEFT's to fix and says nothing about the user's code, so it is hidden here (and only it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


@torch.no_grad()
def _write_layer(name, layer, adapter_name, res: InitResult, subtract: bool, r: int, s: float) -> None:
    lora_A, lora_B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    if layer.r[adapter_name] != r or not math.isclose(layer.scaling[adapter_name], s, rel_tol=1e-6):
        raise RuntimeError(f"PEFT built {name!r} with r={layer.r[adapter_name]}, s={layer.scaling[adapter_name]}, "
                           f"lorafa expected r={r}, s={s}: please report this.")
    lora_A.copy_(res.A.to(lora_A.device, lora_A.dtype))
    lora_B.copy_(res.B.to(lora_B.device, lora_B.dtype))
    if subtract:
        base = layer.get_base_layer()
        w = weight_matrix(base) - s * (lora_B.float() @ lora_A.float()).to(base.weight.device)
        base.weight.copy_((w.t() if is_transposed(base) else w).to(base.weight.dtype))


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
    """Save the adapter so that stock `PeftModel.from_pretrained(original_base, path)` reproduces the model.

    For methods that offset the base weight, the trained adapter is converted to ΔW = s·B·A − s·B₀·A₀ relative to the
    pristine base, a rank-2r LoRA, with PEFT's weight-converting `save_pretrained`. Other methods are saved as they
    are. Files are written into a temporary folder and moved into `path` one by one, so a crash never leaves a
    half-written file. A `lorafa_init.json` records the init.

    Args:
        peft_model: a model returned by `initialize` (possibly trained).
        path: output directory (created if needed).
        save_initial: also write the initial adapter (A₀, B₀) to `path/initial_adapter`; for offset methods it
            belongs on the offset base W − s·B₀·A₀, for the others on the original base.
        initial_adapter: the folder `initialize(..., initial_adapter_dir=)` (or `save_initial_adapter`) wrote;
            needed when the model is not the very object `initialize` returned in this process (a copy, or a model
            rebuilt in another process).

    Returns:
        The path.

    Raises:
        ValueError: neither an initial adapter folder nor this process's record of the model's init is available.
    """
    record = init_record(peft_model, initial_adapter)
    if record is None:
        raise ValueError("The initial adapter of this model is unknown: it is not the object lorafa.initialize "
                         "returned in this process (a copy, or another process). Pass initial_adapter=<the folder "
                         "given to initialize(initial_adapter_dir=...)>, or save a plain PEFT model with "
                         "model.save_pretrained(path).")
    _check_adapter_matches(peft_model, record)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    if world()[0] != 0:
        return path
    name = record.adapter_name
    with tempfile.TemporaryDirectory(dir=path, prefix=".lorafa-tmp-") as tmp:
        out = os.path.join(tmp, "adapter")
        if record.subtracted:
            init_dir = os.path.join(tmp, f"lorafa_initial_{uuid.uuid4().hex[:8]}")
            os.makedirs(init_dir)
            save_file(record.initial_tensors(), os.path.join(init_dir, INITIAL_WEIGHTS), metadata={"format": "pt"})
            with _conversion_safe_config(peft_model, name):
                peft_model.save_pretrained(out, selected_adapters=[name], path_initial_model_for_weight_conversion=init_dir)
        else:
            peft_model.save_pretrained(out, selected_adapters=[name])
        if save_initial:
            _save_initial(peft_model, record, os.path.join(tmp, "initial_adapter"))
        src = out if name == "default" else os.path.join(out, name)
        with open(os.path.join(src, INIT_FILE), "w") as f:
            json.dump({"init_config": record.init_config.to_dict(), "converted_to_original_base": record.subtracted}, f, indent=2)
        for fname in os.listdir(src):
            if os.path.isfile(os.path.join(src, fname)):
                os.replace(os.path.join(src, fname), os.path.join(path, fname))
        if save_initial:
            target = os.path.join(path, "initial_adapter")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(os.path.join(tmp, "initial_adapter"), target)
    return path


def _check_adapter_matches(peft_model: PeftModel, record: InitRecord) -> None:
    if record.adapter_name not in peft_model.peft_config:
        raise ValueError(f"The initial adapter is for adapter {record.adapter_name!r}, but this model has "
                         f"{sorted(peft_model.peft_config)}: pass the initial adapter of this model.")


def save_initial_adapter(peft_model: PeftModel, path: str | os.PathLike) -> str:
    """Write the initial adapter (SPEC §3): A₀, B₀, PEFT's adapter_config.json and `lorafa_init.json` (the
    InitConfig, whether the base was offset, each layer's init info), into a temporary folder renamed to `path`.

    For offset methods A₀, B₀ belong on the offset base W − s·B₀·A₀; for the others on the original base.
    Only the main process writes. `read_initial_adapter(path)` and `save_adapter(..., initial_adapter=path)` read it.

    Raises:
        ValueError: the model was not created by `initialize` in this process.
    """
    record = init_record(peft_model)
    if record is None:
        raise ValueError("save_initial_adapter needs the model returned by lorafa.initialize in this process.")
    path = os.fspath(path)
    if world()[0] != 0:
        return path
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".lorafa-initial-", dir=parent)
    try:
        _save_initial(peft_model, record, tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _save_initial(peft_model: PeftModel, record: InitRecord, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    save_file(record.initial_tensors(), os.path.join(directory, INITIAL_WEIGHTS), metadata={"format": "pt"})
    peft_model.peft_config[record.adapter_name].save_pretrained(directory)
    meta = {"adapter_name": record.adapter_name, "init_config": record.init_config.to_dict(),
            "subtracted": record.subtracted, "infos": _jsonable(record.infos)}
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
