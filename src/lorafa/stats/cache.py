"""Statistics on disk: safetensors (never pickle), with the config that produced them, written atomically."""

from __future__ import annotations

import json
import logging
import os
import tempfile

from safetensors import safe_open
from safetensors.torch import save_file

from .distributed import all_agree, world
from .sketch import GradSketch
from .types import LayerStats

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
    """
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
    header = {"format": _FORMAT, "layout": json.dumps(layout), "config": json.dumps(config or {}, sort_keys=True)}
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".stats-", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_stats_config(path: str | os.PathLike) -> dict:
    """The config stored with a statistics file by `save_stats`."""
    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
    _check_format(path, meta)
    return json.loads(meta["config"])


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
    with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        _check_format(path, meta)
        stored = json.loads(meta["config"])
        if expected_config is not None and json.loads(json.dumps(expected_config, sort_keys=True)) != stored:
            raise ValueError(
                f"Statistics cache {path!s} was produced by a different config.\n stored:   {stored}\n expected: "
                f"{expected_config}\nDelete the file or point to another cache path to recompute."
            )
        layout = json.loads(meta["layout"])
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
