"""The init options, declared once: name, type, default, which methods take it, and one line of help.

`lorafa.InitConfig` (the library) and the runner's `init.*` section (`lorafa.runconfig.InitSection`) are written out
as plain dataclasses, so that IDEs, type checkers and the API reference read their fields; `check_fields` compares
each of them with this list when its module is imported, so they cannot drift apart. What is derived from the list:
the method options `InitConfig` passes to a method, under that method's own names (`method_fields`); the options the
runner passes from `init.*` to `InitConfig` and to its baseline arm; and the error messages for an option a method
does not take or a name that was renamed.

A method option means one thing: where two methods used one name for two things, each has its own name now (EVA's
and GOAT's `rho` are `eva_rho` and `goat_rho`; KaSA's `beta` and `gamma` are `kasa_beta` and `kasa_gamma`; CorDA's
damping is `corda_reg`, so `reg` is LoRA-FA's and extract's damping of the K-FAC factors). The methods' own option
dataclasses keep their short names (`EvaOptions.rho`): within one method they are unambiguous, and GOAT's are saved
in `goat.json`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

class _Same:
    def __repr__(self):
        return "SAME"


SAME = _Same()  # runner_default: the runner's default is the library's


@dataclass(frozen=True)
class Option:
    """One init option.

    Attributes:
        name: the `InitConfig` field and the runner's `init.<name>` key.
        type: its annotation in `InitConfig` (a method option's is `<type> | None`, and `<type>` is the annotation of
            the field in each method's option dataclass).
        help: one line: what it sets.
        methods: the methods that take it; () for a setting of the whole init.
        field: its name in those methods' option dataclasses, where that differs from `name`.
        default: `InitConfig`'s default (None for a method option: each method's own, see `method_defaults`).
        runner_default: `init.<name>`'s default where the runner's differs (docs/defaults.md says why).
        runner: whether the runner has the key `init.<name>` (False for lora_ga's `direction`: there the seed's
            `init.direction` is the name of the method, and a lora_ga direction name selects lora_ga with it).
        baseline: the runner's baseline arm takes this setting from `init.*` (the statistics pass's).
    """

    name: str
    type: str
    help: str
    methods: tuple[str, ...] = ()
    field: str | None = None
    default: Any = None
    runner_default: Any = SAME
    runner: bool = True
    baseline: bool = False

    @property
    def method_field(self) -> str:
        return self.field or self.name


_GRADIENT = ("lora_ga", "lora_one", "lora_fa")
_STEP = ("lora_one", "lora_fa")
_KFAC = ("lora_fa", "extract")


def _m(name, type_, help_, methods, field=None, runner=True) -> Option:
    return Option(name, type_, help_, tuple(methods), field=field, runner=runner)


METHOD_OPTIONS: tuple[Option, ...] = (
    _m("direction", "str", "lora_ga's direction: ArB2r | A2rBr | ArBr | random", ("lora_ga",), runner=False),
    _m("scale", "str", "the factors' scale: stable | gd_scale | unit | weight_svd; also kfac | line_search for "
       "lora_one and lora_fa", _GRADIENT),
    _m("stable_gamma", "float", "γ of the stable scale", _GRADIENT),
    _m("reg", "float", "damping of the K-FAC factors C and Σ (see reg_mode)", _KFAC),
    _m("reg_mode", "str", "relative (λ·tr/dim) | absolute: how reg damps", _KFAC),
    _m("corda_method", "str", "ipm (the top-r pairs) | kpm (the bottom-r)", ("corda",)),
    _m("corda_reg", "float", "corda's damping, Σ + corda_reg·mean(diag Σ)·I", ("corda",), field="reg"),
    _m("target", "str", "lora_fa's target: gradient (−Ḡ) | natural (−C⁻¹ḠΣ⁻¹)", ("lora_fa",)),
    _m("step_factor", "float", "global factor on the kfac steps", _STEP),
    _m("line_search_from", "str", "the steps line_search scales: stable | kfac", _STEP),
    _m("factor_gamma", "float", "with offset='partial', the factors' γ (norm m^{1/4}/√γ)", _STEP),
    _m("eva_rho", "float", "eva's rank redistribution: a layer takes at most round(eva_rho·r); 1: none", ("eva",),
       field="rho"),
    _m("metric", "str", "extract's metric: input | kfac | identity", ("extract",)),
    _m("kasa_beta", "float", "kasa's weight of Σσ² in the training loss", ("kasa",), field="beta"),
    _m("kasa_gamma", "float", "kasa's weight of ‖BᵀB − I‖ + ‖AAᵀ − I‖ in the training loss", ("kasa",),
       field="gamma"),
    _m("num_experts", "int", "goat's E experts of rank r/E", ("goat",)),
    _m("top_k", "int", "goat's experts per token", ("goat",)),
    _m("goat_rho", "float", "goat's divisor of the experts' singular values, ÷ (s·goat_rho)", ("goat",),
       field="rho"),
    _m("eta", "float", "goat's η of the expert scale √(3ηn/(r/E))", ("goat",)),
    _m("expert_scale", "str", "goat's expert scale: goat (√(3ηn/(r/E))) | lora (PEFT's α/r)", ("goat",)),
    _m("residual", "str", "goat's residual: routed (output unchanged at init) | static (W − s·Σ B_i A_i)",
       ("goat",)),
    _m("aux_loss_weight", "float", "goat's weight of the load-balancing loss", ("goat",)),
)

SETTINGS: tuple[Option, ...] = (
    Option("rank", 'Literal["auto"] | None', "None: the LoraConfig's r and rank_pattern; 'auto': per-layer ranks "
           "from the method's spectra"),
    Option("rank_rule", "str", "rank='auto''s rule: energy | effective | budget | importance", default="energy"),
    Option("rank_budget", "int | None", "rank='auto''s budget (default r × layers, or r·Σ(m+n) by params)"),
    Option("budget_by", 'Literal["rank", "params"]', "what rank_budget counts: rank | params", default="rank"),
    Option("r_min", "int", "rank='auto''s lower bound per layer", default=1),
    Option("r_max", "int | None", "rank='auto''s upper bound per layer (default 2r)"),
    Option("tau", "float", "the energy rule's threshold", default=0.9),
    Option("bsz", "int", "the statistics pass's batch size", default=2, runner_default=4, baseline=True),
    Option("iters", "int", "the statistics pass's number of batches", default=64, runner_default=4, baseline=True),
    Option("max_length", "int", "the statistics pass's token limit", default=1024, runner_default=256,
           baseline=True),
    Option("sample", 'Literal["random", "first"]', "the statistics sample: random (seeded) | first",
           default="random", baseline=True),
    Option("seed", "int", "seed of the sample and of every random choice in the init (runner: None, the run's)",
           default=0, runner_default=None, baseline=True),
    Option("offset", 'Literal["auto", "subtract", "none", "partial"]', "the base weight's offset: auto (the "
           "method's rule) | subtract | none | partial", default="auto"),
    Option("svd", 'Literal["auto", "exact", "randomized"]', "SVD: auto | exact | randomized", default="auto",
           baseline=True),
    Option("sketch", "int | None", "the gradient as a streaming sketch of size k (None: exact)"),
    Option("sketch_l", "int | None", "the sketch's second size l >= k (None: 2k + 1)"),
    Option("accumulate_on", "str | None", "device of the statistics accumulators (None: the weights')",
           baseline=True),
    Option("stats_memory", "int | str | None", "budget of the statistics held at once: bytes, '8GiB' or 'auto' "
           "(grouped sweeps)"),
    Option("stats_sharding", "bool", "DDP: shard the statistics over the processes, each holding its own layers'",
           default=False),
    Option("align_init", "bool", "statistics on the gradient of L_task + align_lambda·D to the teacher",
           default=False),
    Option("align_lambda", "float", "align_init's λ", default=1.0),
)

OPTIONS: tuple[Option, ...] = METHOD_OPTIONS + SETTINGS
BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
ALIASES = {"weight": "scale"}  # the seed's name of `scale`, in InitConfig and the runner


def _renamed() -> dict[str, tuple[Option, ...]]:
    """Old names that meant two things (or were only a method's), refused now: old name -> the options it became."""
    out: dict[str, list[Option]] = {}
    for o in METHOD_OPTIONS:
        if o.field and o.field not in BY_NAME:
            out.setdefault(o.field, []).append(o)
    return {k: tuple(v) for k, v in out.items()}


RENAMED: dict[str, tuple[Option, ...]] = _renamed()  # rho -> eva_rho, goat_rho; beta -> kasa_beta; gamma -> kasa_gamma


def renamed_message(name: str, prefix: str = "") -> str:
    """Why `name` is refused and what to write instead (`prefix`: "init." in the runner), e.g. for rho: "rho is now
    eva_rho (eva's rank redistribution: ...) or goat_rho (goat's divisor ...)"."""
    new = " or ".join(f"{prefix}{o.name} ({o.help})" for o in RENAMED[name])
    return f"{prefix}{name} is now {new}: one name per meaning"


def renamed_options(record: dict) -> dict:
    """An InitConfig's fields as an older lorafa wrote them (`to_dict()` in a saved initial adapter) under today's
    names: rho, beta, gamma become the option of the recorded method they meant (dropped when None), and corda's
    reg is corda_reg."""
    from .methods.registry import resolve_method

    out = dict(record)
    try:
        method = resolve_method(out.get("method", "lora_fa"))[0]
    except ValueError:
        return out  # InitConfig names the unknown method
    for old, new in RENAMED.items():
        if old in out:
            value = out.pop(old)
            match = [o.name for o in new if method in o.methods]
            if value is not None:
                out[match[0] if match else old] = value  # no match: InitConfig refuses it, naming the new names
    if method == "corda" and out.get("reg") is not None and out.get("corda_reg") is None:
        out["corda_reg"], out["reg"] = out["reg"], None
    return out


def options_of(method: str) -> list[Option]:
    """The method options `method` (a canonical name) takes, in declaration order."""
    return [o for o in METHOD_OPTIONS if method in o.methods]


def method_fields(method: str, given: dict) -> dict:
    """`given` ({option name: value}, options of `method`) under the names of the method's option dataclass."""
    return {BY_NAME[k].method_field: v for k, v in given.items()}


def misplaced_hint(method: str, name: str) -> str:
    """For an option `method` does not take: the option of `method` with the same meaning, if there is one."""
    field = BY_NAME[name].method_field if name in BY_NAME else name
    same = [o.name for o in options_of(method) if o.method_field == field]
    owners = " and ".join(f"{m}'s" for m in BY_NAME[name].methods) if name in BY_NAME else "not"
    return f" ({method}'s {field} is {' or '.join(same)}; {name} is {owners})" if same else ""


def method_defaults(option: Option) -> dict[str, Any]:
    """Each method's default of a method option (from the method's option dataclass): {method: default}."""
    from .methods.registry import METHODS

    out = {}
    for method in option.methods:
        field = {f.name: f for f in dataclasses.fields(METHODS[method].options)}[option.method_field]
        out[method] = field.default
    return out


def check_fields(cls, *, runner: bool, extra: tuple[str, ...]) -> None:
    """Raise TypeError unless `cls` (InitConfig, or the runner's InitSection with `runner=True`) has exactly the
    declared options (the runner: those with `runner=True`) plus `extra`, with the declared defaults, and, for
    InitConfig, the declared annotations. Called when the class's module is imported."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    declared = [o for o in OPTIONS if o.runner or not runner]
    names = {o.name for o in declared}
    problems = [f"{n}: declared in lorafa.options, not a field" for n in names - set(fields)]
    problems += [f"{n}: a field not declared in lorafa.options" for n in set(fields) - names - set(extra)]
    for o in declared:
        f = fields.get(o.name)
        if f is None:
            continue
        default = o.runner_default if runner and o.runner_default is not SAME else o.default
        if f.default != default or type(f.default) is not type(default):
            problems.append(f"{o.name}: default {f.default!r}, declared {default!r}")
        want = f"{o.type} | None" if o.methods else o.type
        if not runner and str(f.type).replace("'", '"') != want:
            problems.append(f"{o.name}: annotation {f.type!r}, declared {want!r}")
    if problems:
        raise TypeError(f"{cls.__qualname__} and lorafa.options disagree: {'; '.join(sorted(problems))}")


def check_methods() -> None:
    """Raise TypeError unless each method's option dataclass has exactly the options declared for it (under their
    method field names, `partial` aside: InitConfig's offset sets it), with the declared types."""
    from .methods.registry import METHODS

    problems = []
    for method, spec in METHODS.items():
        have = {f.name: f.type for f in dataclasses.fields(spec.options) if f.name != "partial"}
        want = {o.method_field: o.type for o in options_of(method)}
        if have != want:
            problems.append(f"{method}: its options {have}, declared {want}")
    unknown = {m for o in METHOD_OPTIONS for m in o.methods} - set(METHODS)
    if unknown:
        problems.append(f"declared for methods that do not exist: {sorted(unknown)}")
    if problems:
        raise TypeError(f"the methods' option dataclasses and lorafa.options disagree: {'; '.join(problems)}")
