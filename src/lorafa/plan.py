"""The memory plan of the statistics pass (SPEC §12): what each target layer's statistics cost, the groups and passes
a memory budget implies, the predicted peak, and the factorisations' time by size class, from shapes alone.

`plan_init` works on a model built on the meta device, so a 70B set-up is checked on a laptop before any weight is
loaded::

    from transformers import AutoConfig
    plan = lorafa.plan_init(AutoConfig.from_pretrained("meta-llama/Meta-Llama-3-8B"), lora_config,
                            InitConfig(method="lora_fa", stats_memory="8GiB"))
    print(plan)  # per size class, the groups, the predicted peak

The same grouping is what `initialize` runs with `InitConfig(stats_memory=...)`: the target layers, in depth order,
split into consecutive groups whose statistics fit the budget (layers that read one input, such as q, k and v, stay
in one group: they share one input covariance Σ).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
import time
from collections.abc import Mapping

import torch
from torch import nn

from .checks import check_choice, check_positive_int
from .targets import out_in_features, resolve_targets, unwrap_model

F32 = 4  # the statistics are fp32 (SPEC §1)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
AUTO_FRACTION = 0.5  # stats_memory="auto": this share of the free memory (the rest: activations, the factorisations)


def parse_memory(value, what: str = "stats_memory") -> int | str | None:
    """A memory size: None, "auto", an int of bytes, or a string such as "8GiB", "512 MB", "1.5e9" (decimal kB/MB/GB/
    TB, binary KiB/MiB/GiB/TiB). Returns None, "auto" or the bytes (an int > 0).

    Raises:
        ValueError: an unknown unit, a number that is not positive, or another type.
    """
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{what}={value!r}: give bytes (an int), a size such as '8GiB' or '512MB', 'auto' (a share "
                         "of the free device memory) or None (one pass).")
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(f"{what}={value!r} is not a size: write a number and a unit from B, kB, MB, GB, TB, KiB, "
                             "MiB, GiB, TiB (e.g. '8GiB'), or 'auto'.")
        value = float(m.group(1)) * _UNITS[unit]
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(f"{what}={value!r}: a memory budget must be at least 1 byte.")
    return int(value)


def free_memory(device: torch.device) -> int:
    """The free memory of `device` in bytes: CUDA's free memory, or the host's MemAvailable for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            return int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024
    raise ValueError(f"stats_memory='auto' cannot read the free memory of {device}: give the budget in bytes or as "
                     "a size such as '8GiB'.")


def fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclasses.dataclass
class LayerPlan:
    """One target layer: its shape, what it shares, and the bytes of each statistic it holds."""

    name: str
    out_features: int
    in_features: int
    bytes: dict[str, int]  # "grad" (G or its sketch), "in_cov" (Σ; 0 when it reuses another layer's), "out_cov" (C)
    shares_input_with: str | None = None

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


@dataclasses.dataclass
class InitPlan:
    """What the statistics pass and the init will hold and do (`plan_init`).

    Attributes:
        method, needs: the init method and the statistic kind it needs (None: no statistics).
        layers: a LayerPlan per target layer, in depth order.
        stats_bytes: the statistics of every target layer together, in bytes (one pass holds them all).
        groups: the target module names of each pass, in pass order (one group when everything fits).
        group_bytes: the statistics bytes of each group.
        budget: the budget in bytes (None: no budget, one pass).
        transient_bytes: the most the pass holds beside the statistics at once: one layer's weight gradient in the
            weights' dtype plus its fp32 copy, or one batch's d × d product XᵀX (JᵀJ) for the widest covariance.
        workspace_bytes: the most one layer's factorisation works in beside its group's statistics
            (`init_workspace`, an estimate).
        weights_bytes: the model's parameters in their dtypes.
        predicted_peak: weights + the largest group's statistics + the larger of the transient and the workspace
            (activations not included: they are the same as one training step's on the statistics batch).
        factorisations: per size class, {"op", "count", "path", "seconds", "worst_seconds"}: the decompositions
            the init runs, with the time predicted from a small one timed on `device` (scaled by the flop count).
            A whitener's Cholesky falls back to eigh (about 10× slower) where its covariance is not numerically
            positive definite, as it is when the statistics hold fewer tokens than its dimension: with `tokens`
            given, such a covariance is planned as eigh; `worst_seconds` is the time if every Cholesky falls back.
        tokens: the statistics tokens the plan was told of (None: not known).
        sharing: how input sharing was found ("forward on the meta device", "forward", or "unknown: Σ counted per
            layer, an upper bound").
    """

    method: str
    needs: str | None
    layers: list[LayerPlan]
    stats_bytes: int
    groups: list[list[str]]
    group_bytes: list[int]
    budget: int | None
    transient_bytes: int
    workspace_bytes: int
    weights_bytes: int
    predicted_peak: int
    factorisations: list[dict]
    sharing: str
    tokens: int | None = None

    @property
    def passes(self) -> int:
        return len(self.groups) if self.needs is not None else 0

    def summary(self) -> str:
        """The plan in a few lines: totals, groups, peak, factorisations by size class."""
        lines = [f"lorafa init plan: {self.method} on {len(self.layers)} target layers, statistics "
                 f"{self.needs or 'none'}"]
        if self.needs is None:
            lines.append("  no statistics pass")
        else:
            by_shape: dict[tuple, list[LayerPlan]] = {}
            for lp in self.layers:
                by_shape.setdefault((lp.out_features, lp.in_features), []).append(lp)
            for (m, n), lps in by_shape.items():
                per = {k: sum(lp.bytes[k] for lp in lps) for k in lps[0].bytes}
                lines.append(f"  {len(lps):4d} × {m}×{n}: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in per.items()))
            lines.append(f"  statistics {fmt_bytes(self.stats_bytes)} in all ({self.sharing})")
            budget = "no budget" if self.budget is None else f"budget {fmt_bytes(self.budget)}"
            lines.append(f"  {self.passes} pass{'es' if self.passes != 1 else ''} ({budget}); largest group "
                         f"{fmt_bytes(max(self.group_bytes))} ({len(max(self.groups, key=len))} layers at most)")
        lines.append(f"  predicted peak {fmt_bytes(self.predicted_peak)} = weights {fmt_bytes(self.weights_bytes)} "
                     f"+ largest group + max(pass transient {fmt_bytes(self.transient_bytes)}, factorisation "
                     f"workspace {fmt_bytes(self.workspace_bytes)}) (activations not counted)")
        for f in self.factorisations:
            lines.append(f"  {f['count']:4d} × {f['op']} [{f['path']}]: ~{f['seconds']:.1f} s")
        if self.factorisations:
            total = sum(f["seconds"] for f in self.factorisations)
            worst = sum(f["worst_seconds"] for f in self.factorisations)
            lines.append(f"  factorisations ~{total:.1f} s in all (predicted from smaller decompositions timed on the "
                         "device)")
            if worst > 1.01 * total:
                lines.append(f"  up to ~{worst:.1f} s if a Cholesky falls back to eigh (a covariance not positive "
                             "definite" + (")" if self.tokens is not None else
                                           "; tell plan_init the statistics tokens: tokens=)"))
        return "\n".join(lines)

    __str__ = summary


def _meta_model(config) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if any(a.endswith("ForSequenceClassification")
                                                     for a in (getattr(config, "architectures", None) or [])) \
        else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)  # the checkpoint's, as users load it
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return model.to(dtype) if isinstance(dtype, torch.dtype) and dtype.is_floating_point else model


def shared_inputs(model: nn.Module, targets: Mapping[str, nn.Module]) -> tuple[dict[str, str], str]:
    """{layer: the earlier layer whose input it reads} from one forward of 4 tokens (on the meta device for a meta
    model: no compute), and how it was found. A model that cannot run that forward (no `input_ids`) gets {} and
    "unknown": Σ is then counted per layer, an upper bound."""
    first: dict[int, str] = {}
    share: dict[str, str] = {}
    alive = []  # every input seen stays referenced until the forward ends, so no id is reused by a later tensor

    def hook(name):
        def record(mod, args, kwargs=None):
            x = args[0] if args else None
            if isinstance(x, torch.Tensor):
                alive.append(x)
                owner = first.setdefault(id(x), name)
                if owner != name:
                    share.setdefault(name, owner)
        return record

    handles = [mod.register_forward_pre_hook(hook(n)) for n, mod in targets.items()]
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    how = "forward on the meta device" if device.type == "meta" else "forward"
    try:
        ids = torch.zeros((1, 4), dtype=torch.long, device=device)
        with torch.no_grad():
            model(input_ids=ids)
    except Exception:  # noqa: BLE001 - any model that cannot take input_ids: the plan says so and counts per layer
        return {}, "unknown: Σ counted per layer, an upper bound"
    finally:
        for h in handles:
            h.remove()
    return share, how


def _layer_bytes(m: int, n: int, needs: str | None, sketch: tuple[int, int] | None, shared: bool) -> dict[str, int]:
    if needs is None:
        return {}
    out = {}
    if needs in ("grad", "kfac"):
        out["grad"] = F32 * (m * n if sketch is None else m * sketch[0] + sketch[1] * n)
    if needs in ("kfac", "act"):
        out["in_cov"] = 0 if shared else F32 * n * n
    if needs == "kfac":
        out["out_cov"] = F32 * m * m
    return out


def _width(d: int) -> int:
    return 8 if d <= 4096 else 4  # the whiteners and EVA's eigh run in fp64 up to 4096, fp32 above


def _whitener_bytes(d: int, eigh: bool) -> tuple[int, int]:
    """(kept, peak) bytes of one LoRA-FA whitener of a d × d covariance (`methods.lora_fa.Whitener`): its damped
    copy (fp64 up to 4096, fp32 above) and the factor it keeps, the Cholesky L, or eigh's eigenvectors with LAPACK's
    workspace (about 2·d² more while it runs)."""
    kept = _width(d) * d * d
    return kept, kept * (4 if eigh else 2)  # Cholesky measured at 2·d² (SmolLM2-1.7B widths, d = 8192)


def init_workspace(method: str, m: int, n: int, exact_svd: bool, eigh_out: bool = False,
                   eigh_in: bool = False) -> int:
    """The memory one layer's factorisation works in beside the statistics (an estimate from the code's copies):
    LoRA-FA's whiteners, C's first, kept while Σ's is made (`_whitener_bytes`; `eigh_out`, `eigh_in`: the path each
    takes), then its fp64 whitened target (three m × n); an SVD's copy of the m × n matrix and its factors; CorDA's
    fp64 W·Σ and the exact SVD; EVA's fp64 eigh of Σ."""
    if method in ("lora_fa", "extract"):
        kept_c, peak_c = _whitener_bytes(m, eigh_out)
        kept_s, peak_s = _whitener_bytes(n, eigh_in)
        return max(peak_c, kept_c + peak_s, kept_c + kept_s + 3 * 8 * m * n)
    if method == "corda":
        return 3 * 8 * m * n + 3 * 8 * n * n
    if method == "eva":
        return 3 * 8 * n * n
    if method == "lora":
        return 0
    return 2 * F32 * m * n + (F32 * min(m, n) * (m + n) if exact_svd else 0)


def input_units(layers: list[LayerPlan]) -> list[list[LayerPlan]]:
    """The layers (depth order) cut into units that are never split: a layer reading the input of the one before it
    (q, k, v; gate, up) joins that layer's unit, whose Σ tensor they share."""
    units: list[list[LayerPlan]] = []
    for lp in layers:
        if lp.shares_input_with is not None and units and any(u.name == lp.shares_input_with for u in units[-1]):
            units[-1].append(lp)
        else:
            units.append([lp])
    return units


def assign_owners(layers: list[LayerPlan], world_size: int) -> dict[str, int]:
    """{layer name: the rank that owns its statistics} (`InitConfig(stats_sharding=True)`): the input-sharing units
    (`input_units`), largest statistics first, each to the rank holding the fewest bytes so far (the lowest rank on
    a tie). A function of the shapes only, so every process computes the same owners."""
    units = input_units(layers)
    load = [0] * world_size
    owners: dict[str, int] = {}
    for i in sorted(range(len(units)), key=lambda i: (-sum(lp.total for lp in units[i]), i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        load[rank] += sum(lp.total for lp in units[i])
        owners.update({lp.name: rank for lp in units[i]})
    return owners


def stats_owners(model: nn.Module, targets: Mapping[str, nn.Module], kinds, world_size: int,
                 sketch: tuple[int, int] | None = None) -> dict[str, int]:
    """{target name: owner rank} for a sharded statistics pass of `kinds` (collect_stats's, normalised) over
    `world_size` processes: `assign_owners` on the statistics bytes of each layer, with the input sharing found by
    one forward of 4 tokens (`shared_inputs`; a model that cannot run it gets one unit per layer)."""
    share = shared_inputs(model, targets)[0] if "act" in kinds else {}
    layers = []
    for name, mod in targets.items():
        m, n = out_in_features(mod)
        b = {}
        if "grad" in kinds:
            b["grad"] = F32 * (m * n if sketch is None else m * sketch[0] + sketch[1] * n)
        if "act" in kinds:
            b["in_cov"] = 0 if name in share else F32 * n * n
        if "kfac" in kinds:
            b["out_cov"] = F32 * m * m
        layers.append(LayerPlan(name, m, n, b, share.get(name)))
    return assign_owners(layers, world_size)


def group_layers(layers: list[LayerPlan], budget: int | None) -> list[list[LayerPlan]]:
    """Consecutive groups (depth order) whose statistics fit `budget`; layers sharing an input stay together.

    Raises:
        ValueError: one layer (or one input-sharing set) alone needs more than the budget.
    """
    units = input_units(layers)
    if budget is None:
        return [list(layers)] if layers else []
    groups, current, size = [], [], 0
    for unit in units:
        need = sum(lp.total for lp in unit)
        if need > budget:
            names = ", ".join(lp.name for lp in unit)
            raise ValueError(f"stats_memory={fmt_bytes(budget)} ({budget} bytes) is smaller than the statistics of "
                             f"{names} alone ({fmt_bytes(need)}, {need} bytes): raise stats_memory to at least "
                             f"{need} bytes, or shrink them (sketch=k for the gradient, fewer target modules).")
        if current and size + need > budget:
            groups.append(current)
            current, size = [], 0
        current += unit
        size += need
    if current:
        groups.append(current)
    return groups


_OPS = {  # the decompositions each method runs per layer (SPEC §2): an SVD of the m × n target, and a Cholesky
    # (LoRA-FA's whiteners; eigh only where it fails) or eigh of Σ (n × n) and C (m × m)
    "lora_ga": ("svd",), "lora_one": ("svd",), "lora_fa": ("cholesky_in", "cholesky_out", "svd"), "pissa": ("svd",),
    "milora": ("svd",), "corda": ("svd_exact",), "eva": ("eigh_in",), "extract": ("cholesky_in", "cholesky_out", "svd"),
    "kasa": ("svd",), "goat": ("svd",), "lora": (),
}
# the sizes of the decompositions timed on the device to predict the others (as large as a second allows: small
# ones run far below the device's peak rate and overstate the large ones' time)
CALIBRATION = {"svd": 512, "eigh": 1024, "cholesky": 2048, "range_finder": 2048}
_FINDER_RANK = 8  # the range finder is timed at this rank (q = 2·8 + 10 columns) and scaled by m·n·q


@functools.lru_cache(maxsize=None)  # a device's rate is timed once per process
def _calibrate(op: str, dtype: torch.dtype, device: torch.device) -> float:
    """Seconds per flop unit (`decomposition_flops`) of one `op` ("svd", "eigh", "cholesky", "range_finder") on a
    d × d matrix, d = CALIBRATION[op]: the best of two timings. The range finder is timed as it runs
    (`methods.common.randomized_svd` at rank 8: its thin products, QRs and small SVD), not as a square product, which
    runs at a far higher rate than those thin products."""
    from .methods.common import randomized_svd

    if device.type == "meta":
        device = torch.device("cpu")
    d = CALIBRATION[op]
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
    a = a @ a.T + d * torch.eye(d, dtype=dtype, device=device)
    fn = {"svd": lambda x: torch.linalg.svd(x, full_matrices=False), "eigh": torch.linalg.eigh,
          "cholesky": torch.linalg.cholesky, "range_finder": lambda x: randomized_svd(x, _FINDER_RANK)}[op]
    best = math.inf
    for _ in range(3):  # the first call loads the library: not counted
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn(a)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0) if _ else math.inf
    return best / decomposition_flops(op, d, d, 2 * _FINDER_RANK + 10)


def decomposition_flops(kind: str, m: int, n: int, q: int | None = None) -> float:
    """The count the plan scales its timed decompositions by: d³ for "eigh" and "cholesky" (m = n = d), m·n·min(m, n)
    for the exact "svd", m·n·q·(2·niter + 1) for the range finder ("range_finder", q columns)."""
    from .methods.common import RANDOMIZED_NITER

    if kind in ("eigh", "cholesky"):
        return float(m) ** 3
    if kind == "svd":
        return float(m) * n * min(m, n)
    return float(m) * n * q * (2 * RANDOMIZED_NITER + 1)


FP32_EPS = float(torch.finfo(torch.float32).eps)  # the relative round-off of the statistics' fp32 sums


def whitener_takes_eigh(d: int, tokens: int | None, reg: float, relative: bool) -> bool:
    """Whether LoRA-FA's whitener of a d × d covariance summed over `tokens` tokens will fall back from Cholesky to
    eigh. With fewer tokens than d the covariance is singular; its largest eigenvalue is then about tr/tokens =
    mean·d/tokens, so the round-off of its fp32 sums reaches about FP32_EPS·mean·d/tokens, and the damping
    (reg·mean in relative mode) keeps it positive definite only above that. Absolute damping has no known scale: a
    singular covariance is counted as eigh. Checked against the whiteners on the tiny test model (every layer, token
    counts 11 to 212, reg 1e-9 to 1e-4: all 560 predicted) and on SmolLM2-1.7B and Llama-3-8B widths (128 tokens:
    eigh at 1e-6, Cholesky at 1e-3)."""
    if tokens is None or tokens >= d:
        return False
    return not relative or reg < FP32_EPS * d / tokens


def factorisations(layers: list[LayerPlan], method: str, rank_of: Mapping[str, int], svd: str,
                   device: torch.device, tokens: int | None = None, reg: float = 1e-6,
                   relative: bool = True) -> list[dict]:
    """Per size class: the op, its shape, how many, the path (the SVD's from methods.common.top_svd's rule; the
    precision) and the seconds predicted from a smaller decomposition timed on `device` (CALIBRATION), scaled by the flops
    (d³ for eigh and Cholesky, m·n·min(m, n) for the exact SVD, m·n·q·(2·niter + 1) matrix products for the range
    finder). The range finder's iterations are those of svd="randomized"; "auto" may take more, or the exact SVD.

    A whitener's Cholesky of a d × d covariance is planned as eigh where `whitener_takes_eigh` says the damped
    covariance is not numerically positive definite (fewer `tokens` than d and too little damping `reg`), as measured
    on SmolLM2-1.7B's widths with 128 tokens (all 11 whiteners took eigh, 217 of the init's 246 s);
    `worst_seconds` counts every Cholesky as eigh."""
    from .methods.common import EXACT_SVD_MAX_DIM

    classes: dict[tuple, dict] = {}
    for lp in layers:
        m, n, r = lp.out_features, lp.in_features, rank_of[lp.name]
        for op in _OPS.get(method, ("svd",)):
            if op.startswith("svd"):
                k = 2 * r if method == "lora_ga" else r
                exact = op == "svd_exact" or svd == "exact" or (
                    svd == "auto" and (min(m, n) <= EXACT_SVD_MAX_DIM or 2 * k + 10 >= min(m, n)))
                q = min(2 * k + 10, m, n)
                path = "exact, fp32" if exact else ("range finder, fp32" if svd == "randomized" else
                                                    "auto: range finder, or exact if the spectrum decays slowly")
                key = ("svd" if exact else "range_finder", f"svd {m}×{n}", path, torch.float32)
                flops = decomposition_flops(key[0], m, n, q)
            else:
                kind, side = op.split("_")
                if side == "in" and lp.shares_input_with is not None:
                    continue  # one Σ for the layers reading one input
                d = n if side == "in" else m
                dtype = torch.float64 if d <= 4096 else torch.float32  # as the whiteners and EVA compute them
                precision = "fp64" if dtype == torch.float64 else "fp32"
                if kind == "cholesky" and whitener_takes_eigh(d, tokens, reg, relative):
                    kind, precision = "eigh", f"{precision}; singular: {tokens} tokens < {d}, damping too small"
                elif kind == "cholesky":
                    precision += "; eigh if not positive definite"
                key = (kind, f"{kind} {d}×{d}", precision, dtype)
                flops = decomposition_flops(kind, d, d)
            c = classes.setdefault(key, {"op": key[1], "path": key[2], "count": 0, "units": 0.0})
            c["count"] += 1
            c["units"] += flops
    ops = {(k[0], k[3]) for k in classes} | {("eigh", k[3]) for k in classes if k[0] == "cholesky"}
    unit = {op: _calibrate(op[0], op[1], device) for op in ops}
    return [{"op": c["op"], "count": c["count"], "path": c["path"], "seconds": c["units"] * unit[(k[0], k[3])],
             "worst_seconds": c["units"] * unit[("eigh" if k[0] == "cholesky" else k[0], k[3])]}
            for k, c in classes.items()]


def _damping(init_config) -> tuple[float, bool]:
    """(reg, relative) of LoRA-FA's whiteners under `init_config` (its defaults where unset)."""
    from .methods.lora_fa import LoraFAOptions

    reg = init_config.reg if init_config.reg is not None else LoraFAOptions.reg
    return reg, (init_config.reg_mode or LoraFAOptions.reg_mode) == "relative"


def plan_init(model_or_config, lora_config, init_config=None, memory=None, *, device=None,
              timings: bool = True, tokens: int | None = None) -> InitPlan:
    """The memory plan of `initialize(model, lora_config, init_config)`, before anything runs.

    Args:
        model_or_config: a model (any device, the meta device included), or a transformers config (the model is
            then built on the meta device: no weights are allocated).
        lora_config: the PEFT LoraConfig (targets, r, rank_pattern).
        init_config: the InitConfig (method, sketch, svd, stats_memory); default InitConfig().
        memory: the budget (bytes, a size such as "8GiB", or "auto"); None: `init_config.stats_memory`.
        device: where the init would run, for "auto" and the factorisation timings; default the model's device
            (the CPU for a meta model).
        timings: predict the factorisations' seconds (a second or two of timing on `device`); False leaves
            `factorisations` empty.
        tokens: the number of tokens the statistics will sum (all processes, padding excluded), when known: a
            covariance wider than that is singular, and unless the damping covers its round-off
            (`whitener_takes_eigh`) LoRA-FA's whitener then takes eigh instead of Cholesky.

    Returns:
        An InitPlan: `stats_bytes`, `groups`, `group_bytes`, `predicted_peak`, `factorisations`, and `summary()`.

    Raises:
        ValueError: unknown targets, an unparsable budget, a budget smaller than one layer's statistics.
    """
    from .config import as_init_config
    from .targets import layer_rank_and_scaling

    init_config = as_init_config(init_config)
    if tokens is not None:
        check_positive_int("tokens", tokens)
    budget = parse_memory(init_config.stats_memory if memory is None else memory)
    if isinstance(model_or_config, nn.Module):
        model = unwrap_model(model_or_config)
    else:
        if not hasattr(model_or_config, "to_dict"):
            raise TypeError(f"plan_init takes a model or a transformers config, got {type(model_or_config).__name__}")
        model = _meta_model(model_or_config)
    p = next(model.parameters(), None)
    model_device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device) if device is not None else (
        torch.device("cpu") if model_device.type == "meta" else model_device)
    if budget == "auto":
        budget = max(1, int(AUTO_FRACTION * free_memory(device)))
    targets = resolve_targets(model, lora_config)
    needs = init_config.needs
    share, sharing = shared_inputs(model, targets) if needs in ("kfac", "act") else ({}, "no input covariance")
    sketch = init_config.sketch_sizes
    layers = []
    for name, mod in targets.items():
        m, n = out_in_features(mod)
        layers.append(LayerPlan(name, m, n, _layer_bytes(m, n, needs, sketch, name in share), share.get(name)))
    groups = group_layers(layers, budget) if needs is not None else []
    group_bytes = [sum(lp.total for lp in g) for g in groups] or [0]
    transient = 0
    if needs in ("grad", "kfac"):  # one layer's weight gradient in the weights' dtype and its fp32 copy
        itemsize = max((getattr(mod.weight, "element_size", lambda: 4)() for mod in targets.values()), default=4)
        transient = max((lp.out_features * lp.in_features * (itemsize + F32) for lp in layers), default=0)
    if needs in ("kfac", "act"):  # a batch's XᵀX (or JᵀJ) before it is added to its sum
        widths = [lp.in_features for lp in layers] + ([lp.out_features for lp in layers] if needs == "kfac" else [])
        transient = max([transient] + [F32 * d * d for d in widths])
    # a ZeRO-3 partition holds numel() == 0 here: its whole size is ds_numel
    weights = sum(getattr(q, "ds_numel", q.numel()) * q.element_size() for q in model.parameters())
    rank_of = {lp.name: layer_rank_and_scaling(lora_config, lp.name)[0] for lp in layers}
    check_choice("svd", init_config.svd, ("auto", "exact", "randomized"))
    reg, relative = _damping(init_config)
    workspace = max((init_workspace(init_config.method, lp.out_features, lp.in_features,
                                    init_config.svd == "exact" or min(lp.out_features, lp.in_features) <= 128,
                                    whitener_takes_eigh(lp.out_features, tokens, reg, relative),
                                    whitener_takes_eigh(lp.in_features, tokens, reg, relative))
                     for lp in layers), default=0) if needs is not None else 0
    return InitPlan(method=init_config.method, needs=needs, layers=layers,
                    stats_bytes=sum(lp.total for lp in layers), groups=[[lp.name for lp in g] for g in groups],
                    group_bytes=group_bytes if groups else [], budget=budget, transient_bytes=transient,
                    workspace_bytes=workspace, weights_bytes=weights,
                    predicted_peak=weights + max(group_bytes) + max(transient, workspace),
                    factorisations=factorisations(layers, init_config.method, rank_of, init_config.svd, device,
                                                  tokens, reg, relative) if timings else [],
                    sharing=sharing, tokens=tokens)
