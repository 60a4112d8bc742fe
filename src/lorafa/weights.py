"""Reading weights one layer at a time as the SPEC's fp32 `out × in` matrix W, for the init.

The sources: the base model's own layers (float, or dequantized by `lorafa.quant` through `targets.weight_matrix`),
a full-precision checkpoint or state dict for a quantized base (`base_weights=`), and a fine-tuned model for
method="extract" (`tuned=`). Checkpoints are opened lazily: one tensor is read from disk when it is asked for.
"""

from __future__ import annotations

import os

import torch

from .methods.registry import METHODS
from .targets import as_matrix, is_quantized, is_transposed, out_in_features, unwrap_model, weight_matrix


def tuned_weights(tuned, targets, method: str):
    """{target name: a function giving its fine-tuned weight (out × in, fp32)} from a model or a state dict, every
    layer checked now (presence, shape) so a wrong architecture fails before the statistics pass; the weights are
    read one layer at a time. None for methods that do not use one."""
    if not METHODS[method].tuned:
        if tuned is not None:
            raise ValueError(f"tuned= is the fine-tuned model that method='extract' starts from; {method} does not "
                             "use it")
        return None
    if tuned is None:
        raise ValueError("method='extract' needs the fine-tuned model: pass tuned= (a model of the base's "
                         "architecture, or its state dict)")
    return layer_weights(tuned, targets, "the fine-tuned model", "extract needs a fine-tune of the same "
                         "architecture as the base (the same module names and shapes)")


def layer_weights(source, targets, what: str, hint: str) -> dict:
    """{target name: a function giving that layer's weight from `source` as an fp32 `out × in` matrix on the
    target's device}, read one layer at a time; every layer's presence and shape is checked now.

    Args:
        source: a model (its layers are read as `weight_matrix` reads them: dequantized if quantized), a state dict,
            or a checkpoint: a `.safetensors` file or a folder of them (sharded checkpoints included), opened lazily.
        targets: name -> target module of the base.
        what, hint: for error messages (what the source is; what it must be).
    """
    if isinstance(source, torch.nn.Module):
        modules = dict(unwrap_model(source).named_modules())
        found = {n: modules[n] for n in targets if n in modules and hasattr(modules[n], "weight")}
        shapes = {n: out_in_features(m) for n, m in found.items()}
        read = lambda n: weight_matrix(found[n])  # noqa: E731
    else:
        tensors = CheckpointTensors(source) if isinstance(source, (str, os.PathLike)) else source
        # a task model's checkpoint may be its backbone's (keys without `bert.`/`model.`), as transformers allows;
        # the exact key, looked at last, wins
        found = {n: k for n in targets for k in (f"{n.partition('.')[2]}.weight", f"{n}.weight") if k in tensors}
        shapes = {n: _stored_shape(tensors, k, targets[n]) for n, k in found.items()}
        read = lambda n: as_matrix(tensors[found[n]], targets[n])  # noqa: E731
    missing = [n for n in targets if n not in found]
    if missing:
        raise ValueError(f"{what} has no {missing[:4]}{' ...' if len(missing) > 4 else ''}: {hint}")
    for name in targets:
        if shapes[name] != out_in_features(targets[name]):
            raise ValueError(f"{what}'s {name!r} is {shapes[name][0]} × {shapes[name][1]} (out × in), the base's "
                             f"{out_in_features(targets[name])}: {hint}")
    return {n: (lambda n=n: read(n).to(targets[n].weight.device)) for n in targets}


def _stored_shape(tensors, key: str, like) -> tuple[int, int]:
    shape = tensors.shape(key) if isinstance(tensors, CheckpointTensors) else tuple(tensors[key].shape)
    if len(shape) != 2:
        return shape
    return (shape[1], shape[0]) if is_transposed(like) else shape


class CheckpointTensors:
    """A read-only mapping key -> tensor over a `.safetensors` file or a folder of them, each tensor read from disk
    only when asked for (one layer at a time, never the whole checkpoint)."""

    def __init__(self, path):
        from safetensors import safe_open

        path = os.fspath(path)
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors")) \
            if os.path.isdir(path) else [path]
        if not files or not all(os.path.isfile(f) for f in files):
            raise ValueError(f"{path!r} is neither a .safetensors file nor a folder holding .safetensors files: pass "
                             "the full-precision checkpoint's folder (as saved by save_pretrained), a state dict or "
                             "a model.")
        self._files = {}
        for f in files:
            with safe_open(f, framework="pt") as h:
                for k in h.keys():
                    self._files[k] = f
        self._open = safe_open

    def __contains__(self, key) -> bool:
        return key in self._files

    def shape(self, key) -> tuple:
        with self._open(self._files[key], framework="pt") as h:
            return tuple(h.get_slice(key).get_shape())

    def __getitem__(self, key) -> torch.Tensor:
        with self._open(self._files[key], framework="pt") as h:
            return h.get_tensor(key)


def base_weight_readers(base_weights, targets, init_config) -> dict:
    """{target name: a function giving W, the weight the factors are computed from and the offset is taken from}.

    Float targets: their own weight. bitsandbytes-quantized targets: their dequantized weight Q(W), or, with
    `base_weights` (the full-precision checkpoint), the original W, read one layer at a time; an offset method then
    stores Q(W − s·B·A): closer to W than Q(W) is when the offset comes out of W (pissa, corda; QPiSSA), further when
    it enlarges the residual (lora_ga; docs/benchmarks.md, "4-bit bases"). Offset methods on quantized targets need
    `base_weights` (or `base_weights="dequantized"` to accept Q(Q(W) − s·B·A), which adds a second quantization
    error), so that the loss of accuracy is never silent.
    """
    quantized = [n for n, m in targets.items() if is_quantized(m)]
    if base_weights is None or isinstance(base_weights, str) and base_weights == "dequantized":
        if quantized and base_weights is None and init_config.subtracts():
            raise ValueError(
                f"{init_config.method} offsets the base by its factors, and the targets ({quantized[:2]}...) are "
                "quantized: the residual W − s·B·A must come from the full-precision W, or it carries the 4-bit "
                "error twice. Pass base_weights=<the full-precision checkpoint folder, state dict or model> "
                "(read one layer at a time), or base_weights='dequantized' to start from the quantized weights.")
        return {n: (lambda m=m: weight_matrix(m)) for n, m in targets.items()}
    if not quantized:
        raise ValueError("base_weights= gives the full-precision weights of quantized targets, but no target is "
                         "quantized: drop it (the model's own weights are used).")
    return layer_weights(base_weights, targets, "base_weights", "pass the full-precision checkpoint the quantized "
                         "model was loaded from")
