"""Statistics on disk: safetensors (never pickle), with the config that produced them, written atomically."""

from __future__ import annotations

import json
import logging
import os

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..fsio import write_atomic
from .distributed import all_agree, world
from .sketch import GradSketch
from .types import LayerStats, check_stats_dict

logger = logging.getLogger(__name__)
_FORMAT = "lorafa.stats.v1"


def save_stats(stats: dict[str, LayerStats], path: str | os.PathLike, config: dict | None = None) -> None:
    """Write statistics to a safetensors file.

    A shared input covariance (q/k/v reading one input) is stored once. The file is written under a temporary name
    and renamed, so an interrupted save never leaves a truncated cache.

    Args:
        stats: module name -> LayerStats, as returned by `collect_stats`.
        path: destination file.
        config: JSON-serialisable description of what produced the statistics (stored in the header).

    Raises:
        IsADirectoryError: `path` is a folder. TypeError: a value of `stats` is not a LayerStats, or `config` holds
            a value JSON cannot store (named by its key). All are raised before anything is written.
    """
    path = os.fspath(path)
    if os.path.isdir(path):  # checked before anything is written: a rename onto a folder fails only at the end
        raise IsADirectoryError(f"{path!r} is a folder: save_stats writes one file; give a file path, e.g. "
                                f"{os.path.join(path, 'stats.safetensors')!r}")
    check_stats_dict(stats)
    config_text = _config_json(config)
    tensors, layout, owners = {}, {}, {}
    for name, st in stats.items():
        entry = {"n_tokens": st.n_tokens, "n_batches": st.n_batches, "fisher_weight": st.fisher_weight}
        if st.grad_sketch is not None:
            entry["sketch_seed"] = st.grad_sketch.seed
        for kind, t in st.tensors().items():
            if kind == "in_cov" and id(t) in owners:
                entry["in_cov_shared_with"] = owners[id(t)]
                continue
            if kind == "in_cov":
                owners[id(t)] = name
            tensors[f"{name}::{kind}"] = t.detach().float().contiguous().cpu()
        layout[name] = entry
    header = {"format": _FORMAT, "layout": json.dumps(layout), "config": config_text}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def _config_json(config) -> str:
    """`config` as the JSON text stored in the header; a value JSON cannot hold is named by its key."""
    try:
        return json.dumps(config or {}, sort_keys=True)
    except (TypeError, ValueError) as err:
        where = _not_json(config, "config")
        raise TypeError(f"{where or 'config'} is not JSON serializable ({err}): the config is stored as JSON in the "
                        "statistics file; pass plain numbers, strings, lists and dicts (e.g. str() or .tolist() "
                        "it).") from None


def _not_json(value, where: str) -> str | None:
    """The path (config['a'][0]) of the first value inside `value` that json cannot write, or None."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            return where
        return None
    for key, item in items:
        if isinstance(value, dict) and not isinstance(key, (str, int, float, bool)) and key is not None:
            return f"the key {key!r} of {where}"
        found = _not_json(item, f"{where}[{key!r}]")
        if found:
            return found
    return None


def _unreadable(path, err: Exception) -> ValueError:
    return ValueError(f"{os.fspath(path)} cannot be read as a lorafa statistics file: it is corrupt or truncated (an "
                      f"interrupted copy?) ({type(err).__name__}: {err}). Delete it and recompute the statistics "
                      "(collect_stats, or the run, which writes the cache again).")


def _open(path, device="cpu"):
    """safe_open, with a damaged file refused by its path."""
    try:
        return safe_open(os.fspath(path), framework="pt", device=str(device))
    except SafetensorError as err:
        raise _unreadable(path, err) from None


def _header(path, f) -> tuple[dict, dict]:
    """(stored config, layout) from an open statistics file's header."""
    meta = f.metadata() or {}
    _check_format(path, meta)
    try:
        config, layout = json.loads(meta["config"]), json.loads(meta["layout"])
    except (KeyError, ValueError) as err:
        raise _unreadable(path, err) from None
    return config, layout


def read_stats_config(path: str | os.PathLike) -> dict:
    """The config stored with a statistics file by `save_stats`."""
    with _open(path) as f:
        return _header(path, f)[0]


def load_stats(path: str | os.PathLike, expected_config: dict | None = None, device="cpu") -> dict[str, LayerStats]:
    """Read statistics written by `save_stats`.

    Args:
        path: the safetensors file.
        expected_config: if given, must equal the stored config, so a stale cache is never used silently.
        device: where to put the tensors.

    Raises:
        FileNotFoundError, ValueError: missing file, not a lorafa statistics file, or a config mismatch.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"No statistics cache at {path!s}: run the statistics pass (collect_stats) first.")
    with _open(path, device) as f:
        stored, layout = _header(path, f)
        if expected_config is not None and json.loads(json.dumps(expected_config, sort_keys=True)) != stored:
            raise ValueError(
                f"Statistics cache {path!s} was produced by a different config.\n stored:   {stored}\n expected: "
                f"{expected_config}\nDelete the file or point to another cache path to recompute."
            )
        try:
            out = _read_layers(f, layout)
        except (SafetensorError, KeyError, TypeError, AttributeError, ValueError) as err:
            raise _unreadable(path, err) from None
    return out


def _read_layers(f, layout: dict) -> dict[str, LayerStats]:
    out = {}
    for name, entry in layout.items():
        get = lambda kind, n=name: f.get_tensor(f"{n}::{kind}") if f"{n}::{kind}" in f.keys() else None  # noqa: E731
        out[name] = LayerStats(
            grad=get("grad"), in_cov=get("in_cov"), out_cov=get("out_cov"),
            n_tokens=int(entry["n_tokens"]), n_batches=int(entry["n_batches"]),
            fisher_weight=int(entry.get("fisher_weight", 0)),
        )
        if "sketch_seed" in entry:
            out[name].grad_sketch = GradSketch(get("grad_sketch.y"), get("grad_sketch.z"), int(entry["sketch_seed"]))
    for name, entry in layout.items():
        if "in_cov_shared_with" in entry:
            out[name].in_cov = out[entry["in_cov_shared_with"]].in_cov
    return out


def load_cached_stats(path: str | os.PathLike, expected_config: dict, device="cpu") -> dict[str, LayerStats] | None:
    """Statistics from a cache file if every process can load it with `expected_config`, else None on every process.

    Under torch.distributed each process tries its own copy (nodes may not share a filesystem), then they agree: a
    hit only if all of them hit, otherwise all recompute. A per-process decision would deadlock (the processes that
    missed wait in the pass's all-reduces for those that hit). A missing, unreadable or mismatched file is a miss.

    Args:
        path: the safetensors file (may differ between processes).
        expected_config: must equal the stored config (include a weights fingerprint, see `weights_fingerprint`).
        device: where to put the tensors.

    Returns:
        The statistics (identical on every process if the caches were), or None on every process.
    """
    stats = None
    if os.path.exists(path):
        try:
            stats = load_stats(path, expected_config=expected_config, device=device)
        except Exception as e:  # noqa: BLE001 - any unreadable cache is a miss: recompute and overwrite it
            logger.warning("statistics cache %s not used (rank %d): %s", path, world()[0], e)
    if all_agree(stats is not None):
        return stats
    if stats is not None:
        logger.info("statistics cache %s found here but not on every process: recomputing", path)
    return None


def _check_format(path, meta: dict) -> None:
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path!s} is not a lorafa statistics file (format={meta.get('format')!r}).")
