"""The experiment runner's typed configuration: the one place where hydra's untyped tree becomes dataclasses.

Every key of the composed config must be a field here; an unknown or misspelled key is an error that names it and
the valid keys (with close matches). Defaults here are what the runner uses when a group was not selected, e.g.
`python run_exp.py` without `+init=...` gets `InitSection()`, which equals `conf/init/gradient.yaml`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .checks import check_positive_int, is_real
from .config import InitConfig
from .methods.registry import METHODS, resolve_method
from .options import OPTIONS, RENAMED, check_fields, renamed_message


@dataclass
class ModelSection:
    """`model.*`: what to fine-tune and how (HF Trainer arguments)."""

    name: str = "smollm2-135m-instruct"  # HF id, local path, or an embedded default's name
    type: str = "CausalLM"  # CausalLM | SequenceClassification
    bf16: bool = False
    load_in_4bit: bool = False  # a bitsandbytes 4-bit base (SPEC §10), quantized while loading; offset methods
    # re-quantize W − s·B·A from the full-precision checkpoint; the adapter still loads on the original base
    bnb_4bit_quant_type: str = "nf4"  # nf4 | fp4
    bnb_4bit_use_double_quant: bool = False
    max_length: int = 256
    learning_rate: float | str = "auto"  # lorafa.suggest_lr after each arm's init (SPEC §11), or a number
    lr_rule: str = "anchored"  # learning_rate=auto: suggest_lr's rule (lorafa.lr.RULES; default lr.DEFAULT_RULE)
    lr_c: float | None = None  # learning_rate=auto: the rule's constant c (anchored: the rate default LoRA trains
    # at, e.g. your own LoRA rate); None: its fitted value
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    eval_epochs: float = 1.0  # held-out loss every this many epochs
    eval_steps: int | None = 20  # or every this many steps (overrides eval_epochs)
    real_batch_size: int = 8  # global batch size: per_device_batch_size × processes × accumulation
    per_device_batch_size: int = 8
    warmup: float = 0.03  # warmup ratio
    lr_scheduler_type: str | None = None  # a transformers schedule; None: the optimiser's own (scheduler_type)
    weight_decay: float = 0.0
    prec_reg: float | None = None  # λ of PEFT's Riemannian preconditioner; None: plain optimiser
    # schedulefree (schedule-free AdamW: its own warm-up from model.warmup, lr_scheduler_type=constant) | adamw | sgd
    # | lora_pro (LoRA-Pro's projected factor gradients, AdamW underneath)
    optimizer: str = "schedulefree"
    lora_pro_damping: float = 1e-6  # lora_pro: relative damping of BᵀB and AAᵀ (lorafa.lora_pro)
    lora_pro_moments: str = "factor"  # lora_pro: factor (r × n, m × r AdamW state) | full (m × n, the paper's)
    saving: bool = False  # also merge and save a full transformers checkpoint
    logging_steps: int = 1
    save_steps: int | None = None  # checkpoint every this many steps (resume); None: only at the end
    early_stopping_patience: int | None = None
    activation_checkpointing: bool = False  # recompute activations in backward (transformers' name since v5)
    gradient_checkpointing: bool | None = None  # the older name, accepted as an alias


MODE_METHODS = {"gradient": ("lora_ga", "lora_one", "lora_fa", "corda", "eva", "extract"),
                "svd": ("pissa", "milora", "kasa", "goat"), "default": ("lora",)}
MODE_DEFAULT = {"gradient": "LoRA-FA", "svd": "pissa", "default": "lora"}  # init.method when none is given


@dataclass
class InitSection:
    """`init.*`: the InitConfig options declared in `lorafa.options` (checked when this module is imported), under
    the same names, and the runner's own keys. `method` names the init (LoRA-FA, LoRA-One, LoRA-GA or a lora_ga
    direction, pissa, ...); `direction` is the seed's name for it, accepted as written."""

    mode: str = "gradient"  # gradient (statistics-based) | svd (weight-based) | default (plain LoRA)
    method: str | None = None  # None: the mode's default (MODE_DEFAULT: LoRA-FA for gradient)
    direction: str | None = None  # the seed's name for `method`; setting both is an error unless they agree
    scale: str | None = None
    weight: str | None = None  # alias of scale (seed configs)
    stable_gamma: float | None = None
    reg: float | None = None  # lora_fa, extract: damping of the K-FAC factors
    reg_mode: str | None = None
    corda_method: str | None = None
    corda_reg: float | None = None  # corda's damping (null: 0.01)
    target: str | None = None  # lora_fa: gradient | natural (SPEC §2.5)
    step_factor: float | None = None
    line_search_from: str | None = None
    factor_gamma: float | None = None
    eva_rho: float | None = None  # eva's rank redistribution (null: 2)
    rank: str | None = None  # "auto": per-layer ranks from the method's spectra (SPEC §6)
    rank_rule: str = "energy"
    rank_budget: int | None = None
    budget_by: str = "rank"
    r_min: int = 1
    r_max: int | None = None
    tau: float = 0.9
    search_iters: int = 0  # scale=line_search: 0 searches on the statistics batches, k > 0 on k batches of others
    guard_iters: int = 2  # lora_fa, lora_one: the init step must clearly lower the loss on k batches of others (0: off)
    tuned: str | None = None  # method=extract: the fine-tuned checkpoint (HF id or path) to extract from
    metric: str | None = None  # extract: input (null: the method's default) | kfac | identity
    kasa_beta: float | None = None  # kasa: weight of Σσ² (null: 1e-4)
    kasa_gamma: float | None = None  # kasa: weight of ‖BᵀB − I‖ + ‖AAᵀ − I‖ (null: 1e-3)
    num_experts: int | None = None  # goat: E experts of rank r/E (null: 8)
    top_k: int | None = None  # goat: experts per token (null: 2)
    goat_rho: float | None = None  # goat: divisor of the experts' singular values, ÷ (s·goat_rho) (null: 10)
    eta: float | None = None  # goat: η of the expert scale √(3ηn/(r/E)) (null: 1)
    expert_scale: str | None = None  # goat: goat (√(3ηn/(r/E))) | lora (PEFT's α/r)
    residual: str | None = None  # goat: routed (output unchanged at init) | static (the authors' W − s·Σ B_i A_i)
    aux_loss_weight: float | None = None  # goat: weight of the load-balancing loss (null: 1e-3)
    align_init: bool = False  # statistics on the gradient of L_task + align_lambda · D to align.teacher (SPEC §5)
    align_lambda: float = 1.0
    bsz: int = 4
    iters: int = 4
    max_length: int = 256
    sample: str = "random"
    seed: int | None = None  # default: the run's seed
    offset: str = "auto"
    svd: str = "auto"
    sketch: int | None = None  # gradient as a streaming sketch of size k (see lorafa.stats.sketch); None: exact
    sketch_l: int | None = None  # the sketch's second size l >= k; None: 2k + 1
    accumulate_on: str | None = None  # "cpu": statistics accumulators off the GPU; None: the model's device
    stats_memory: str | None = None  # budget of the statistics held at once ("8GiB", bytes, "auto"): grouped sweeps
    stats_sharding: bool = False  # DDP: each process holds its own layers' statistics (~1/world)
    plan_only: bool = False  # print the memory plan (lorafa.plan_init), write plan.json, and stop before statistics
    dtype: str = "fp32"  # the seed's key: the statistics are always accumulated in fp32, the only value accepted
    cache: bool = True  # cache statistics (safetensors) under the output root

    def chosen_method(self) -> str:
        """The init's name as given: `method`, or the seed's `direction`, or the mode's default.

        Raises:
            ValueError: both are set and name different inits.
        """
        if self.method is not None and self.direction is not None \
                and resolve_method(self.method) != resolve_method(self.direction):
            raise ValueError(f"init.method={self.method!r} and init.direction={self.direction!r} (the seed's name for "
                             "init.method) name different inits: set one of them.")
        return self.method or self.direction or MODE_DEFAULT.get(self.mode, MODE_DEFAULT["gradient"])


RUNNER_INIT_KEYS = ("mode", "method", "direction", "weight", "search_iters", "guard_iters", "tuned", "plan_only",
                    "dtype", "cache")
check_fields(InitSection, runner=True, extra=RUNNER_INIT_KEYS)  # every other key is a declared InitConfig option


@dataclass
class PeftSection:
    """`peft.*`: the LoraConfig."""

    lora_r: int = 8
    lora_alpha: float = 16
    use_rslora: bool = True
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_loraplus: bool = False
    loraplus_lr_ratio: float = 16.0


@dataclass
class DatasetSection:
    """`dataset.*`: where the data named by `dataset_name` come from."""

    path: str | None = None  # local file/folder (needed offline for meta_math and gsm8k)
    test_path: str | None = None  # meta_math's GSM8K test set
    n_train: int | None = None
    n_test: int | None = None
    columns: dict[str, Any] = field(default_factory=dict)
    task_config: dict[str, Any] = field(default_factory=dict)  # generated tasks: the generator's settings
    validation_size: int = 64  # carved from the training data (seeded, disjoint): the held-out loss during training


@dataclass
class EvalSection:
    """`eval.*`: task accuracy before and after training (GSM8K-style generation, or classification)."""

    enabled: bool = True
    before: bool = True
    n: int | None = None  # None: the whole test split
    batch_size: int = 50
    max_new_tokens: int | None = None  # None: the task's own bound (64 for leg_counting, 256 for GSM-style)


@dataclass
class AlignSection:
    """`align.*` (SPEC §5): none | distill (task loss + λ·D to a teacher at every step) | self (the same against the
    base model, with the adapters disabled: against forgetting) | cyclic (task phases and realignment phases)."""

    mode: str = "none"
    teacher: str | None = None  # HF id or path; cyclic without one aligns to the base model (as self)
    kind: str = "fkl"  # fkl | rkl | jsd (target=logits); mse | cosine (hidden, pooled)
    lambda_: float = 1.0  # λ (in cyclic mode: of the realignment phases)
    temperature: float = 1.0
    beta: float = 0.5  # jsd's mixture weight, in (0, 1)
    target: str = "logits"  # logits | hidden | pooled
    layer_map: list | None = None  # target=hidden: [[student, teacher], ...] indices into hidden_states
    task_steps: int = 0  # cyclic: task-phase length (λ = task_lambda)
    align_steps: int = 1  # cyclic: realignment-phase length (λ = lambda_, w_task = align_task_weight)
    task_lambda: float = 0.0
    align_task_weight: float = 1.0
    warmup_steps: int = 0
    refresh: str | None = None  # cyclic with a teacher model: ema | checkpoint, at each task phase's start
    ema_mu: float = 0.99
    projection: str = "none"  # none | truncate (a padded vocabulary) | learned (a LinearMap trained with the adapters)
    teacher_dtype: str | None = None  # fp32 | bf16 | fp16; None: the student's


@dataclass
class WandbSection:
    name: str | None = None  # the run name; also names the run folder
    project: str = "lorafa"
    entity: str | None = None
    enabled: bool = False  # log to wandb (offline mode without network)


@dataclass
class RunConfig:
    dataset_name: str = "leg_counting"
    seed: int = 0
    dry_run: bool = False
    output_root: str = "outputs/runs"
    resume: bool = False
    overwrite: bool = False
    tensorboard: bool = False
    baseline: str | None = None  # also train this method (e.g. lora) on the same batches, and report it beside
    model: ModelSection = field(default_factory=ModelSection)
    init: InitSection = field(default_factory=InitSection)
    peft: PeftSection = field(default_factory=PeftSection)
    dataset: DatasetSection = field(default_factory=DatasetSection)
    eval: EvalSection = field(default_factory=EvalSection)
    wandb: WandbSection = field(default_factory=WandbSection)
    align: AlignSection = field(default_factory=AlignSection)

    def init_config(self) -> InitConfig:
        """The library's InitConfig for this run (validates the method and its options)."""
        i, allowed = self.init, MODE_METHODS
        if i.mode not in allowed:
            raise ValueError(f"init.mode must be one of {sorted(allowed)}, got {i.mode!r}")
        name = i.chosen_method()
        key = "init.direction" if i.method is None and i.direction is not None else "init.method"
        method, direction = resolve_method(name)
        if method not in allowed[i.mode]:
            other = next(m for m, methods in allowed.items() if method in methods)
            raise ValueError(f"{key}={name!r} is not a {i.mode} method; {i.mode} allows {allowed[i.mode]}"
                             f" (use +init={other}).")
        if i.dtype != "fp32":
            raise ValueError(f"init.dtype={i.dtype!r}: the statistics are always accumulated in fp32, whatever the "
                             "model's dtype, so init.dtype (the seed's key) takes only 'fp32': remove it.")
        for key_ in ("search_iters", "guard_iters"):
            check_positive_int(f"init.{key_}", getattr(i, key_), low=0)
        if i.search_iters and (i.scale or i.weight) != "line_search":
            raise ValueError("init.search_iters chooses the batches of the line search: set ++init.scale=line_search "
                             "too, or leave search_iters at 0.")
        if (method == "extract") != (i.tuned is not None):
            raise ValueError(f"{key}=extract extracts the adapter from a fine-tune: set ++init.tuned=<its HF id "
                             "or path>" if method == "extract" else
                             f"init.tuned is the fine-tune that init.method=extract starts from; {method} does not "
                             "use it")
        options = {o.name: getattr(i, o.name) for o in OPTIONS if o.runner}  # lorafa.options: the same names
        options.update(weight=i.weight, seed=self.seed if i.seed is None else i.seed)
        if direction is not None:  # a lora_ga direction given as the method's name
            options["direction"] = direction
        return InitConfig(method=method, **options)


    def baseline_init_config(self) -> InitConfig | None:
        """The InitConfig of `baseline`: that method with its own defaults, the statistics pass as in `init`."""
        if self.baseline is None:
            return None
        main = self.init_config()
        return InitConfig(method=self.baseline, **{o.name: getattr(main, o.name) for o in OPTIONS if o.baseline})


# common names of keys that live under another name: where they belong
_KEY_ALIASES = {"r": "peft.lora_r", "rank": "peft.lora_r", "alpha": "peft.lora_alpha", "dropout": "peft.lora_dropout",
                "lr": "model.learning_rate", "batch_size": "model.per_device_batch_size", "method": "init.method"}


def _key_suggestions(key: str, names: list[str], where: str) -> list[str]:
    """Where an unknown key `where + key` may belong: the same key in another section (init.lora_r -> peft.lora_r),
    a common alias, then the close matches in its own section."""
    sections = {f.name: hint for f in dataclasses.fields(RunConfig)
                if dataclasses.is_dataclass(hint := typing.get_type_hints(RunConfig)[f.name])}
    elsewhere = [f"{name}.{key}" for name, section in sections.items() if f"{name}." != where
                 and key in {f.name for f in dataclasses.fields(section)}]
    if where and key in {f.name for f in dataclasses.fields(RunConfig)} and key not in sections:
        elsewhere.append(key)  # a top-level key given inside a section
    alias = _KEY_ALIASES.get(key)
    # close matches in its own section only when the key is neither another section's as written nor a known alias
    # (model.lr means model.learning_rate, not model.lr_c)
    close = [] if elsewhere or alias else [f"{where}{c}" for c in difflib.get_close_matches(key, names, 2)]
    return list(dict.fromkeys([*elsewhere, *([alias] if alias and alias != where + key else []), *close]))


def _check_keys(cls, data: dict, where: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        hints = []
        for k in unknown:
            if where == "init." and k in RENAMED:
                hints.append(f"{renamed_message(k, where)}")
                continue
            guesses = _key_suggestions(str(k), names, where)
            hints.append(f"{where}{k}" + (f" (did you mean {' or '.join(guesses)}?)" if guesses else ""))
        raise ValueError(f"Unknown config key(s): {'; '.join(hints)}. Valid keys under '{where or 'top level'}': "
                         f"{names}")


def _build(cls, data: dict | None, where: str = ""):
    data = dict(data or {})
    _check_keys(cls, data, where)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"Config key {where}{f.name} must be a group (mapping), got {value!r}")
            value = _build(hints[f.name], value, f"{where}{f.name}.")
        kwargs[f.name] = _coerce(value, hints[f.name], f"{where}{f.name}")
    return cls(**kwargs)


def _coerce(value, hint, key: str):
    """Check scalar types loosely (YAML gives ints for floats, strings for None-able fields)."""
    if dataclasses.is_dataclass(value) or value is None:
        return value
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    base = [t for t in typing.get_args(hint) if t is not type(None)] if union else [hint]
    if any(typing.get_origin(t) in (list, dict) for t in base):
        expected = list if typing.get_origin(base[0]) is list else dict
        if not isinstance(value, expected):
            raise ValueError(f"Config key {key} must be a {expected.__name__}, got {value!r}")
        return value
    if float in base and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if bool in base and not isinstance(value, bool):
        raise ValueError(f"Config key {key} must be true/false, got {value!r}")
    if (int in base) and float not in base and isinstance(value, float) and value.is_integer():
        return int(value)
    words = str in base and isinstance(value, str)  # a field that also takes a word (learning_rate: "auto")
    quoted = ""
    if isinstance(value, str):
        try:
            float(value)
            quoted = ": write it without quotes"  # ++x='0.5' reaches here as the string '0.5'
        except ValueError:
            pass
    if int in base and float not in base and not words and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"Config key {key} must be an integer, got {value!r}{quoted}")
    if float in base and not words and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"Config key {key} must be a number, got {value!r}{quoted}")
    if str in base and not isinstance(value, str) and not (float in base and isinstance(value, float)):
        return str(value)
    return value


def _check_learning_rate(cfg: RunConfig) -> None:
    """`model.learning_rate`: a positive number, or "auto" (plain AdamW or SGD, a rule suggest_lr has)."""
    from .lr import RULES

    m = cfg.model
    lr = m.learning_rate
    number = isinstance(lr, (int, float)) and not isinstance(lr, bool)
    if not (lr == "auto" or number and 0 < lr < math.inf):
        raise ValueError(f"model.learning_rate must be a positive number or 'auto', got {lr!r}")
    if m.lr_rule not in RULES:
        raise ValueError(f"model.lr_rule must be one of {list(RULES)}, got {m.lr_rule!r}")
    if m.lr_c is not None:
        if isinstance(m.lr_c, bool) or not isinstance(m.lr_c, (int, float)) or not 0 < m.lr_c < math.inf:
            raise ValueError(f"model.lr_c must be a positive number (or null: the rule's fitted constant), got "
                             f"{m.lr_c!r}")
        if lr != "auto":
            raise ValueError(f"model.lr_c sets the constant of learning_rate=auto's rule, but model.learning_rate={lr} "
                             "is a number: set model.learning_rate=auto, or leave model.lr_c null.")
        if "c" not in RULES[m.lr_rule].options:
            raise ValueError(f"model.lr_c is the rule's constant c, but model.lr_rule={m.lr_rule} has none (its "
                             f"options: {list(RULES[m.lr_rule].options)}): leave model.lr_c null.")
    if lr == "auto" and (m.optimizer not in ("adamw", "sgd", "schedulefree") or m.prec_reg is not None
                         or cfg.peft.use_loraplus):
        raise ValueError("model.learning_rate=auto models the first step of plain AdamW, schedule-free AdamW or SGD, "
                         f"which model.optimizer={m.optimizer}, model.prec_reg={m.prec_reg} and peft.use_loraplus="
                         f"{cfg.peft.use_loraplus} change: set a number, or use ++model.optimizer=adamw without "
                         "prec_reg and LoRA+.")
    if lr == "auto" and m.optimizer == "schedulefree" and m.lr_rule != "anchored":
        raise ValueError(f"model.lr_rule={m.lr_rule}'s constant is fitted for AdamW under a decaying schedule; with "
                         "model.optimizer=schedulefree use ++model.lr_rule=anchored (its c is schedule-free AdamW's "
                         "own default rate).")


OPTIMIZERS = ("adamw", "sgd", "lora_pro", "schedulefree")


def scheduler_type(m: ModelSection) -> str:
    """`model.lr_scheduler_type`, or with none set the optimiser's own: constant for schedule-free AdamW (it
    averages its iterates instead of decaying the rate), cosine for the others."""
    if m.lr_scheduler_type is not None:
        return m.lr_scheduler_type
    return "constant" if m.optimizer == "schedulefree" else "cosine"


def _check_training(cfg: RunConfig) -> None:
    """The LoraConfig's and the Trainer's numbers, refused at parse time (run() would meet them only after loading
    the data and the model, the 'before' evaluation and the statistics pass)."""
    m, p = cfg.model, cfg.peft
    if m.optimizer not in OPTIMIZERS:
        raise ValueError(f"model.optimizer must be one of {list(OPTIMIZERS)}, got {m.optimizer!r}")
    if m.optimizer == "schedulefree":
        if m.lr_scheduler_type not in (None, "constant"):
            raise ValueError(f"model.optimizer=schedulefree replaces the schedule (it averages its iterates, after its "
                             f"own warm-up of model.warmup), so model.lr_scheduler_type={m.lr_scheduler_type!r} would "
                             "decay it twice: add ++model.lr_scheduler_type=constant (or null, the optimiser's own).")
        if m.prec_reg is not None or p.use_loraplus:
            raise ValueError("model.optimizer=schedulefree (the default) cannot be combined with model.prec_reg "
                             "(Riemannian preconditioner) or peft.use_loraplus: each builds its own AdamW. For them, "
                             "add ++model.optimizer=adamw.")
    for key in ("per_device_batch_size", "real_batch_size"):
        if getattr(m, key) < 1:
            raise ValueError(f"model.{key} must be an integer >= 1, got {getattr(m, key)}")
    if m.real_batch_size % m.per_device_batch_size:
        raise ValueError(f"model.real_batch_size={m.real_batch_size} must be a multiple of model.per_device_batch_size="
                         f"{m.per_device_batch_size} (times the number of processes): the rest is gradient "
                         "accumulation.")
    if p.lora_r < 1:
        raise ValueError(f"peft.lora_r must be an integer >= 1 (the LoRA rank), got {p.lora_r}")
    for key, r in p.rank_pattern.items():
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"peft.rank_pattern.{key} must be an integer >= 1, got {r!r}: leave the layer out of "
                             "peft.target_modules to give it no adapter")
    for key, alpha in [("peft.lora_alpha", p.lora_alpha), *((f"peft.alpha_pattern.{k}", a)
                                                             for k, a in p.alpha_pattern.items())]:
        if not (is_real(alpha) and alpha > 0):
            raise ValueError(f"{key} must be a finite number > 0 (the adapter's scale is alpha/r, or alpha/√r with "
                             f"rsLoRA), got {alpha!r}")
    if not (is_real(p.lora_dropout) and 0 <= p.lora_dropout < 1):
        raise ValueError(f"peft.lora_dropout must be a number in [0, 1) (the probability of dropping an adapter "
                         f"input), got {p.lora_dropout!r}")


def parse_run_config(data: dict) -> RunConfig:
    """Validate a composed config (a plain dict, e.g. `OmegaConf.to_container(cfg, resolve=True)`).

    Raises:
        ValueError: an unknown or misspelled key (named, with the valid ones), or a value of the wrong kind.
    """
    data = {k: v for k, v in data.items() if k != "hydra"}
    cfg = _build(RunConfig, data)
    cfg.init.method = cfg.init.chosen_method()  # recorded (run_config.json) as given, or the mode's default
    m = cfg.model
    if m.gradient_checkpointing is not None:
        if m.activation_checkpointing and not m.gradient_checkpointing:
            raise ValueError("model.activation_checkpointing and its alias model.gradient_checkpointing disagree: set one.")
        m.activation_checkpointing, m.gradient_checkpointing = m.gradient_checkpointing, None
    if m.load_in_4bit:
        if m.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ValueError(f"model.bnb_4bit_quant_type must be nf4 or fp4, got {m.bnb_4bit_quant_type!r}")
        if m.saving:
            raise ValueError("model.saving merges the adapter into the weights, which a 4-bit base cannot hold "
                             "without a second quantization error: set model.saving=false (the adapter is saved, "
                             "and loads on the original full-precision base).")
        if any(c is not None and METHODS[c.method].variant for c in (cfg.init_config(), cfg.baseline_init_config())):
            raise ValueError("model.load_in_4bit=true does not run KaSA or GOAT (they need float base layers): "
                             "choose another init, or load the model in full precision.")
    if cfg.dataset.validation_size < 0:
        raise ValueError(f"dataset.validation_size must be >= 0 (0: no validation set), got {cfg.dataset.validation_size}")
    _check_training(cfg)  # first: an unknown optimiser is named before learning_rate=auto's check meets it
    _check_learning_rate(cfg)
    cfg.init_config()  # method and options are validated up front, before any long work
    cfg.baseline_init_config()
    from .align.build import check_align_section

    check_align_section(cfg.align, [c for c in (cfg.init_config(), cfg.baseline_init_config()) if c is not None])
    if m.saving and "goat" in [c.method for c in (cfg.init_config(), cfg.baseline_init_config()) if c is not None]:
        raise ValueError("model.saving merges the adapter into the weights, but GOAT's router makes its update depend "
                         "on the input, so it cannot be merged: set model.saving=false (the adapter is saved anyway).")
    if cfg.resume and cfg.align.mode != "none" and cfg.align.projection == "learned":
        raise ValueError("resume=true cannot restore a learned alignment projection (the Trainer's checkpoints hold "
                         "the adapters, not the projection): rerun without resume, or use projection=none/truncate")
    return cfg
