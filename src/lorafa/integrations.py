"""lorafa's data-aware init for a `transformers.Trainer` (or TRL's `SFTTrainer`) that is already built.

The statistics pass must run on the base model before the adapters exist, and the Trainer must then train the
adapters. `initialize_trainer` does both in one call between building the trainer and `trainer.train()`:

    trainer = SFTTrainer(model=base_model, args=SFTConfig(...), train_dataset=ds)   # no peft_config=
    peft_model = lorafa.initialize_trainer(trainer, lora_config, lorafa.InitConfig(method="lora_fa"))
    trainer.train()

Why a function and not a `TrainerCallback`: in `Trainer._inner_training_loop` the optimizer is created from the
model's trainable parameters and the model is wrapped (DDP, FSDP, DeepSpeed) in `_prepare_for_training`, before
`on_train_begin` fires (transformers 5.24 trainer.py: `_prepare_for_training` at line 1615, `create_optimizer` at
1741, `on_train_begin` at 1653). A callback also receives the model object, not the trainer, so it cannot replace
`trainer.model` by the PeftModel; and `on_init_end` fires inside `Trainer.__init__`, before a subclass such as
`SFTTrainer` has finished preparing its data and model.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import weakref
from collections.abc import Callable, Mapping

import torch
from peft import LoraConfig, PeftModel

from .config import InitConfig, as_init_config
from .checks import check_positive_int
from .peft_bridge import GUARDED, initialize
from .stats.sampling import sample_indices, shard_batches

logger = logging.getLogger(__name__)


def trainer_stat_batches(trainer, init_config: InitConfig | None = None, *, require_labels: bool = True,
                         skip: int = 0, shard: bool = True) -> list[dict]:
    """This process's statistics batches, drawn from the data the trainer's own train dataloader reads.

    The examples are chosen as `lorafa.stat_batches` chooses them: `init_config.iters` batches of `init_config.bsz`
    examples, a seeded random sample (`sample="random"`, `seed`) or the first bsz·iters examples (`sample="first"`),
    identical on every process, batch b belonging to rank b mod world size. They are taken from the dataset of
    `trainer.get_train_dataloader()` (so after the trainer's own tokenisation, packing and column removal) and
    collated by that dataloader's collate function (the trainer's data collator). The trainer's batch size and
    shuffling are not used (InitConfig's are), and `init_config.max_length` does not apply: the trainer's own
    preprocessing sets the lengths. A streamed (iterable) training set gives its first bsz·iters examples, read by
    every process.

    Args:
        trainer: a `transformers.Trainer` (or subclass, e.g. `trl.SFTTrainer`) with a train_dataset.
        init_config: bsz, iters, sample and seed of the statistics pass (an InitConfig or a dict of its fields);
            default InitConfig().
        require_labels: check, on the first batch of all (the same one on every process, so all of them raise
            together), that the batches carry the model's labels (`trainer.label_names`, default "labels").
        skip: leave out the first `skip` batches of the sample (`skip=iters` of the statistics pass: other examples).
        shard: False gives every process all `iters` batches (the learning-rate suggestion's, the same everywhere).

    Returns:
        This process's collated batches (plain dicts, as the collator makes them); `initialize` moves each to the
        model's device.

    Raises:
        ValueError: no train_dataset, fewer examples than bsz·iters, a seeded sample of a streamed dataset, or (with
            `require_labels`) batches without labels.
    """
    init_config = as_init_config(init_config)
    bsz, iters = init_config.bsz, init_config.iters
    if trainer.train_dataset is None:
        raise ValueError("The trainer has no train_dataset: the statistics pass draws its examples from it.")
    streamed = isinstance(trainer.train_dataset, torch.utils.data.IterableDataset)
    if streamed and init_config.sample != "first":
        raise ValueError("The trainer's train_dataset is streamed (an IterableDataset): a seeded random sample of it "
                         "needs its length. Use InitConfig(sample='first') (its first bsz·iters examples).")
    if not streamed and len(trainer.train_dataset) < bsz * (iters + skip):  # before a DataLoader refuses an empty set
        after = f" after the statistics pass's {skip}" if skip else ""
        raise ValueError(f"The statistics pass needs {bsz * (iters + skip)} examples (bsz={bsz} × iters={iters}{after}"
                         f"); the trainer's train_dataset has {len(trainer.train_dataset)} after its preprocessing "
                         "(SFTTrainer drops examples whose completion max_length cut off). Lower InitConfig's bsz or "
                         "iters.")
    loader = trainer.get_train_dataloader()
    collate, dataset = loader.collate_fn, loader.dataset  # after the trainer's column removal
    if streamed:  # the raw stream, the same on every process (accelerate's shard of it differs by rank)
        dataset = list(itertools.islice(iter(trainer.train_dataset), bsz * (iters + skip)))
    chosen = sample_indices(len(dataset), bsz, iters, init_config.sample, init_config.seed, skip=skip)

    def batch(b: int) -> dict:
        out = collate([dataset[i] for i in chosen[b]])
        if not isinstance(out, Mapping):
            raise TypeError(f"The trainer's data collator returned a {type(out).__name__}; the statistics pass needs "
                            "a dict of tensors (input_ids, attention_mask, labels) per batch.")
        return dict(out)  # BatchEncoding is a Mapping, not a dict

    first = batch(0)
    if require_labels:
        _check_labels(first, list(getattr(trainer, "label_names", None) or ["labels"]), trainer.data_collator)
    return [first if b == 0 else batch(b) for b in (shard_batches(range(iters)) if shard else range(iters))]


def _check_labels(batch: dict, label_names: list[str], collator) -> None:
    missing = [name for name in label_names if batch.get(name) is None]
    if missing:
        raise ValueError(
            f"The trainer's train dataloader gives batches without {missing} (keys: {sorted(batch)}; collator: "
            f"{type(collator).__name__}), so the statistics pass has no loss to differentiate. Use a data collator "
            "that sets labels, e.g. transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False), or a dataset "
            "with a 'labels' column, or TRL's SFTTrainer (its collator sets labels, with prompt tokens masked for "
            "prompt/completion data); or pass loss_fn=."
        )


def _check_trainer(trainer) -> None:
    from transformers import Trainer

    if not isinstance(trainer, Trainer):
        raise TypeError(f"initialize_trainer needs a transformers.Trainer (or a subclass such as trl.SFTTrainer), "
                        f"got {type(trainer).__name__}; for a model of your own use lorafa.initialize.")
    if getattr(trainer, "model_init", None) is not None:
        raise ValueError("The trainer was built with model_init=, which builds a new model at train(): the "
                         "initialised adapters would be dropped. Build the trainer with model=.")
    model = trainer.model
    if isinstance(model, PeftModel) or getattr(model, "_hf_peft_config_loaded", False):
        raise ValueError("The trainer's model already has adapters; the statistics pass needs the plain base model. "
                         "Build the trainer with the base model (SFTTrainer: without peft_config=) and let "
                         "initialize_trainer add the adapters.")
    if trainer.optimizer is not None:
        raise ValueError("The trainer already has an optimizer (from train(), create_optimizer() or optimizers=), "
                         "built on the base model's parameters instead of the adapters. Call initialize_trainer "
                         "before train() and build the trainer without optimizers= (optimizer_cls_and_kwargs= is "
                         "fine: the optimizer is then created from the adapters at train()).")
    if trainer.model_wrapped is not model:
        raise ValueError("The trainer's model is already wrapped (DDP/FSDP/DeepSpeed: train() has run). Call "
                         "initialize_trainer on a freshly built trainer, before train().")


# Not merged with train._checkpointing_arg (sets the field) or peft_bridge.quiet_checkpointing_rename (a warning).
def _checkpointing(args) -> bool:
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name is an alias)
    return bool(getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False))


def _install(trainer, peft_model: PeftModel) -> None:
    """Make the trainer train `peft_model`: what Trainer.__init__ cached about the model, refreshed.

    The model-dependent flags Trainer.__init__ computes (`model_accepts_loss_kwargs`, `label_names`,
    `can_return_loss`, the signature columns) are read from the model under PEFT's wrapper, so they are unchanged.
    """
    trainer.model = trainer.model_wrapped = peft_model  # train() wraps `model_wrapped` and builds the optimizer
    trainer.callback_handler.model = peft_model  # callbacks get the model the handler was built with
    if _checkpointing(trainer.args) and hasattr(peft_model, "enable_input_require_grads"):
        # the embeddings are frozen now: under transformers 4.x's reentrant checkpointing no block input would
        # require grad and backward fails ("element 0 of tensors does not require grad", seen on 4.56); 5.x does it
        peft_model.enable_input_require_grads()


def initialize_trainer(trainer, lora_config: LoraConfig, init_config: InitConfig | None = None, *, stats=None,
                       loss_fn: Callable | None = None, adapter_name: str = "default", progress: bool = True,
                       initial_adapter_dir=None, learning_rate: float | str | None = None,
                       lr_options: dict | None = None, guard_iters: int = 2, **initialize_options) -> PeftModel:
    """Initialise LoRA adapters on an already-built trainer's base model from its own training data, and make the
    trainer train them.

    The statistics batches are `trainer_stat_batches(trainer, init_config)`: InitConfig's bsz·iters examples (a
    seeded sample or the first ones) of the trainer's prepared train dataset, collated by the trainer's collator.
    The result equals `lorafa.initialize(base, lora_config, init_config, batches=those batches)`, which is what this
    calls; the PeftModel then replaces `trainer.model`, so `trainer.train()` creates its optimizer from the adapters.
    Methods that need no statistics (lora, pissa, milora, ...) draw no batches.

    Under torchrun / accelerate every process calls it (as it calls train()): each draws its share of the batches
    (batch b on rank b mod world size), the statistics are summed across processes, and every process ends with
    the same adapters. The pass runs where the trainer put the model (`args.device`; under DeepSpeed or FSDP the
    Trainer leaves it where it was loaded).

    The loss of the statistics pass is `model(**batch).loss` unless `loss_fn` is given: for SFTTrainer's default
    loss (`loss_type="nll"`, the mean over completion tokens) that is the same loss; pass `loss_fn` for others
    (e.g. `loss_type="dft"`). For methods that offset the base weights (lora_ga, pissa, ...), save the trained
    adapter with `lorafa.save_adapter(peft_model, path)` (it loads on the original base); `trainer.save_model`
    writes it relative to the offset base.

    For lora_fa and lora_one the init step is guarded (`lorafa.initialize`'s `guard_batches=`): it must lower the
    loss, beyond the examples' noise, on `guard_iters` batches of InitConfig's bsz that the statistics pass did not
    see (the same batches as "auto"'s below); where it does not, it is shortened or taken out, and
    `lorafa.saving.init_record(peft_model).summary["guard"]` says so.

    `learning_rate="auto"` sets `trainer.args.learning_rate` (before the optimizer exists, so the optimizer and its
    schedule use it) to `lorafa.suggest_lr` on the initialised model, for the trainer's optimizer (`args.optim`:
    AdamW, with `args.adam_epsilon`, or SGD), on 2 batches of InitConfig's bsz from the trainer's data that the
    statistics pass did not see (`trainer_stat_batches(..., skip=init_config.iters)`, the same on every process).
    The suggestion is logged (INFO, logger `lorafa.integrations`) and kept with the init: `lorafa.lr_suggestion(
    peft_model)` returns it (an LrSuggestion: `.lr` and `.evidence`).

    Args:
        trainer: a `transformers.Trainer` or subclass (e.g. `trl.SFTTrainer`) built with the plain base model (no
            adapters, no `peft_config=`), not yet trained, without an optimizer.
        lora_config: the PEFT LoraConfig.
        init_config: the method and the statistics pass (bsz, iters, sample, seed): an InitConfig, or a dict of its
            fields (`{"method": "lora_ga", "bsz": 4}`); default InitConfig() (LoRA-FA).
        stats: precomputed statistics (e.g. `lorafa.load_stats`): then no batches are drawn.
        loss_fn: `loss_fn(model, batch)` for the statistics pass; without it the batches must carry labels.
        adapter_name, progress, initial_adapter_dir: as in `lorafa.initialize`.
        learning_rate: None (the trainer's own), a positive number (set as `args.learning_rate`), or "auto".
        lr_options: keyword arguments of `lorafa.suggest_lr` for "auto" (rule, seed, and the rule's options).
        guard_iters: batches for the init step's guard (lora_fa, lora_one; 0 turns it off).
        **initialize_options: further keyword arguments of `lorafa.initialize` (search_batches, guard_batches,
            align, tuned, autocast_adapter_dtype).

    Returns:
        The PeftModel, also installed as `trainer.model`.

    Raises:
        TypeError: `trainer` is not a transformers Trainer; `init_config` is neither an InitConfig nor a dict of its
            fields.
        ValueError: the trainer's model already has adapters, an optimizer exists, train() has run, the trainer
            uses model_init=, the batches carry no labels (checked before the statistics pass), too few examples;
            learning_rate neither a positive number nor "auto", "auto" with an optimizer other than AdamW or SGD
            or with optimizer_cls_and_kwargs=; and whatever `lorafa.initialize` and `lorafa.suggest_lr` raise.
    """
    init_config = as_init_config(init_config)
    _check_trainer(trainer)
    lr_optimizer = _check_learning_rate(trainer, learning_rate)  # before the init's long work
    needs_batches = (stats is None and init_config.needs is not None) or (
        init_config.line_search and initialize_options.get("search_batches") is None)
    batches = trainer_stat_batches(trainer, init_config, require_labels=loss_fn is None) if needs_batches else None
    check_positive_int("guard_iters", guard_iters, low=0)
    if guard_iters and init_config.method in GUARDED and "guard_batches" not in initialize_options:
        initialize_options["guard_batches"] = _held_out_batches(trainer, init_config, guard_iters, loss_fn)
    peft_model = initialize(trainer.model, lora_config, init_config, batches=batches, stats=stats,
                            adapter_name=adapter_name, loss_fn=loss_fn, progress=progress,
                            initial_adapter_dir=initial_adapter_dir, **initialize_options)
    _install(trainer, peft_model)
    logger.info("lorafa: %s adapters installed in %s", init_config.method, type(trainer).__name__)
    if learning_rate == "auto":
        _auto_learning_rate(trainer, peft_model, init_config, lr_optimizer, loss_fn, dict(lr_options or {}))
    elif learning_rate is not None:
        trainer.args.learning_rate = float(learning_rate)
    return peft_model


def _check_learning_rate(trainer, learning_rate) -> str | None:
    """The optimizer whose first step "auto" models ("adamw", "sgd" or "schedulefree"; None for a number or None)."""
    if learning_rate is None:
        return None
    if learning_rate != "auto":
        if not (isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool)
                and math.isfinite(learning_rate) and learning_rate > 0):
            raise ValueError(f"learning_rate must be None (the trainer's), a positive number or 'auto', got "
                             f"{learning_rate!r}")
        return None
    if getattr(trainer, "optimizer_cls_and_kwargs", None) is not None:
        raise ValueError("learning_rate='auto' sets trainer.args.learning_rate, which a trainer built with "
                         "optimizer_cls_and_kwargs= does not read (its kwargs hold the rate): put "
                         "lorafa.suggest_lr(...).lr into those kwargs, or build the trainer without them.")
    optim = str(getattr(trainer.args.optim, "value", trainer.args.optim))
    if optim.startswith(("adamw", "paged_adamw")):
        return "adamw"
    if optim == "sgd":
        return "sgd"
    if optim == "schedule_free_adamw":
        return "schedulefree"
    raise ValueError(f"learning_rate='auto' models the first step of AdamW, schedule-free AdamW or SGD; the trainer's "
                     f"optim is {optim!r}. Use TrainingArguments(optim='adamw_torch'), 'schedule_free_adamw' or "
                     "'sgd', or pass a number.")


def _auto_learning_rate(trainer, peft_model, init_config: InitConfig, optimizer: str, loss_fn, options: dict) -> None:
    from .lr import DEFAULT_RULE, MAX_BATCHES, RULES, suggest_lr

    rule = options.pop("rule", DEFAULT_RULE)
    if rule in RULES and "eps" in RULES[rule].options and optimizer in ("adamw", "schedulefree"):
        options.setdefault("eps", trainer.args.adam_epsilon)
    options.setdefault("seed", init_config.seed)
    batches = _held_out_batches(trainer, init_config, options.get("max_batches", MAX_BATCHES), loss_fn)
    suggestion = suggest_lr(peft_model, batches, optimizer, rule=rule, loss_fn=loss_fn, **options)  # rank 0's
    trainer.args.learning_rate = suggestion.lr
    _LR_SUGGESTIONS[peft_model] = suggestion
    logger.info("lorafa: learning rate %.4g from suggest_lr (%s): %s", suggestion.lr, rule, suggestion.evidence)


def _held_out_batches(trainer, init_config: InitConfig, n: int, loss_fn) -> list[dict]:
    """n batches of InitConfig's bsz from the trainer's data that the statistics pass did not see, the same on every
    process (the init step's guard and "auto"'s suggestion only evaluate on them)."""
    return trainer_stat_batches(trainer, dataclasses.replace(init_config, iters=n), require_labels=loss_fn is None,
                                skip=init_config.iters, shard=False)


_LR_SUGGESTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def lr_suggestion(peft_model):
    """The LrSuggestion (`.lr`, `.evidence`) that `initialize_trainer(..., learning_rate="auto")` set the trainer's
    rate from, for this model (None if it set none)."""
    return _LR_SUGGESTIONS.get(peft_model)
