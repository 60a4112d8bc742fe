"""The training recipe, read top to bottom: data -> model -> statistics + init -> Trainer -> save -> evaluate.

HF Trainer underneath (so DDP/FSDP/DeepSpeed come from accelerate), always as `lorafa.terms.TermsTrainer`: what
training adds to the task loss is a list of terms (the method registry's for the method, `align.*`'s alignment), each
bringing its own weights and parameters; with none it is HF's Trainer. lorafa's initialisation before training,
PEFT's Riemannian preconditioner (`model.prec_reg`) or LoRA+ (`peft.use_loraplus`) as the optimiser.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import time

import torch

from .peft_bridge import GUARDED, initialize
from .runconfig import RunConfig, scheduler_type
from .saving import save_adapter
from .fsio import write_json
from .run_io import MetricsLogger, plot_curves, prepare_run_dir, report_to, resolve_targets_keyword
from .stats import collect_stats, load_cached_stats, save_stats, stat_batches, weights_fingerprint
from .stats.distributed import check_same_on_all_ranks, world

logger = logging.getLogger("lorafa.train")


def _device_checks(cfg: RunConfig) -> torch.dtype:
    if cfg.model.bf16:
        if not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
            raise ValueError("model.bf16=true needs a GPU with bf16 support (CUDA compute capability >= 8.0); this "
                             "machine has none. Set ++model.bf16=false.")
        return torch.bfloat16
    return torch.float32


def _check_backend(cfg: RunConfig, distributed_type) -> None:
    """What the launcher's backend cannot run, refused before any data or model is loaded."""
    from accelerate.utils import DistributedType

    if cfg.model.optimizer == "schedulefree" and distributed_type == DistributedType.DEEPSPEED:
        raise ValueError("model.optimizer=schedulefree under DeepSpeed: DeepSpeed steps its own fp32 copy of the "
                         "weights, so the averaged weights that schedule-free AdamW evaluates and saves would not "
                         "reach the model. Launch with FSDP2 (accelerate's fsdp_version: 2) or DDP, or add "
                         "++model.optimizer=adamw.")


def _load_model(cfg: RunConfig, task, dtype, device):
    """(model, tokenizer) on `device`; with model.load_in_4bit, quantized by bitsandbytes while loading."""
    from .models import load_causal_lm, load_sequence_classifier

    kwargs = {}
    if cfg.model.load_in_4bit:
        from transformers import BitsAndBytesConfig

        from .quant import require_bitsandbytes

        require_bitsandbytes()
        kwargs = {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=cfg.model.bnb_4bit_quant_type, bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=cfg.model.bnb_4bit_use_double_quant), "device_map": {"": device}}
    if cfg.model.type == "CausalLM":
        if task.kind != "causal_lm":
            raise ValueError(f"model.type=CausalLM needs a prompt/answer dataset; {task.name} is {task.kind}.")
        model, tokenizer = load_causal_lm(cfg.model.name, dtype=dtype, **kwargs)
    elif cfg.model.type == "SequenceClassification":
        if task.kind != "classification":
            raise ValueError(f"model.type=SequenceClassification needs a text/label dataset; {task.name} is {task.kind}.")
        model, tokenizer = load_sequence_classifier(cfg.model.name, num_labels=task.num_labels, dtype=dtype, **kwargs)
    else:
        raise ValueError(f"model.type must be CausalLM or SequenceClassification, got {cfg.model.type!r}")
    if not cfg.model.load_in_4bit:  # transformers places a quantized model itself (device_map) and refuses .to()
        model.to(device)
    return model, tokenizer


def _quantization(cfg: RunConfig) -> str | None:
    m = cfg.model
    return f"bnb-{m.bnb_4bit_quant_type}{'-double' if m.bnb_4bit_use_double_quant else ''}" if m.load_in_4bit else None


def _base_weights(cfg: RunConfig, init_config):
    """For a 4-bit base and an offset method: the full-precision checkpoint the residual is computed from."""
    if not (cfg.model.load_in_4bit and init_config.subtracts()):
        return None
    from .models import full_precision_checkpoint

    return full_precision_checkpoint(cfg.model.name)


def _collator(cfg: RunConfig, task, tokenizer, max_length):
    from .data import CausalLMCollator, ClassificationCollator

    cls = CausalLMCollator if task.kind == "causal_lm" else ClassificationCollator
    return cls(tokenizer, max_length=max_length)


def _lora_config(cfg: RunConfig, model, task):
    from peft import LoraConfig, TaskType

    p = cfg.peft
    return LoraConfig(
        r=p.lora_r, lora_alpha=p.lora_alpha, use_rslora=p.use_rslora, lora_dropout=p.lora_dropout,
        target_modules=resolve_targets_keyword(model, p.target_modules), rank_pattern=dict(p.rank_pattern),
        alpha_pattern=dict(p.alpha_pattern),
        task_type=TaskType.CAUSAL_LM if task.kind == "causal_lm" else TaskType.SEQ_CLS,
    )


def _stats_for_init(cfg: RunConfig, model, lora_config, init_config, task, collate, state, align_term=None):
    """Statistics for the init: from the cache when every process has it for this config and these weights (keyed
    by a fingerprint of their values), else a pass on all processes. With `init.align_init`, on the gradient of the
    dual objective (the teacher and the divergence settings are part of the key)."""
    if init_config.needs is None:
        return None
    from .targets import resolve_targets

    targets = sorted(resolve_targets(model, lora_config))
    key = {"model": cfg.model.name, "dataset_name": cfg.dataset_name, "dataset": dataclasses.asdict(cfg.dataset),
           "kind": init_config.needs, "bsz": init_config.bsz, "iters": init_config.iters,
           "max_length": init_config.max_length, "sample": init_config.sample, "seed": init_config.seed,
           "run_seed": cfg.seed,  # the data (a generated task, a subsample) and the validation split depend on it
           "sketch": init_config.sketch_sizes,
           "targets": targets, "dtype": str(next(model.parameters()).dtype),
           "quantization": _quantization(cfg)}
    if init_config.align_init:
        key["align"] = {**dataclasses.asdict(cfg.align), "lambda_init": init_config.align_lambda}
    if cfg.init.cache or world()[1] > 1:  # keyed by content: a checkpoint overwritten in place misses the cache
        t = time.perf_counter()
        key["weights"] = weights_fingerprint(model)
        logger.info("weights fingerprint %s (%.2f s)", key["weights"], time.perf_counter() - t)
    # paths may differ between nodes (local copies); what they hold, and the pass's settings, may not
    check_same_on_all_ranks({k: v for k, v in key.items() if k not in ("model", "dataset")},
                            "statistics settings and weights fingerprint")
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cfg.output_root, ".stats_cache", f"{digest}.safetensors")
    if init_config.stats_sharding:  # each process collects its own layers' share in initialize; no cache holds all
        logger.info("init.stats_sharding: the statistics are collected by initialize, each layer on its owner process "
                    "(not cached)")
        return None
    if cfg.init.cache:
        stats = load_cached_stats(path, key, device=model.device)  # a hit only if every process hits
        if stats is not None:
            logger.info("statistics from cache %s", path)
            return stats  # with init.stats_memory, initialize refuses cached statistics that exceed it
    if init_config.stats_memory is not None:  # initialize sweeps the batches group by group; nothing to cache
        logger.info("init.stats_memory: the statistics are collected in grouped sweeps by initialize (not cached)")
        return None
    batches = stat_batches(task.train, collate, init_config.bsz, init_config.iters, init_config.sample, init_config.seed)
    loss_fn = None
    if init_config.align_init:
        from .align.term import aligned_loss

        loss_fn = aligned_loss(align_term, init_config.align_lambda)
    stats = collect_stats(model, batches, targets, kinds=(init_config.needs,), sketch=init_config.sketch_sizes,
                          accumulate_on=init_config.accumulate_on, loss_fn=loss_fn)
    if cfg.init.cache and state.is_local_main_process:  # one copy per node: nodes may not share a filesystem
        try:
            save_stats(stats, path, config=key)
        except OSError as e:  # raising here alone would strand the other processes in training's collectives
            logger.warning("statistics cache %s not written: %s", path, e)
    return stats


def _optimizer(cfg: RunConfig, model, term_params=(), total_steps: int = 1):
    """The run's optimiser over the model's trainable parameters and, in one more group at the run's learning rate
    and weight decay, the loss terms' own (`term_params`, e.g. a learned projection), built in from the start.
    `total_steps`: the run's optimiser steps, for schedule-free AdamW's own warm-up (model.warmup of them)."""
    m, p = cfg.model, cfg.peft
    extra = [{"params": list(term_params), "lr": m.learning_rate, "weight_decay": m.weight_decay}] if term_params else []
    default = type(m)()
    if m.optimizer != "lora_pro" and (m.lora_pro_damping, m.lora_pro_moments) != (default.lora_pro_damping,
                                                                                   default.lora_pro_moments):
        raise ValueError("model.lora_pro_damping / model.lora_pro_moments are set but model.optimizer is "
                         f"{m.optimizer!r}: add ++model.optimizer=lora_pro, or drop them.")
    if m.optimizer == "lora_pro":  # AdamW on LoRA-Pro's adjusted gradients (SPEC §9)
        if m.prec_reg is not None or p.use_loraplus:
            raise ValueError("model.optimizer=lora_pro cannot be combined with model.prec_reg (Riemannian "
                             "preconditioner) or peft.use_loraplus: each rewrites the LoRA step its own way; pick one.")
        from .optim import create_lora_pro_optimizer

        return create_lora_pro_optimizer(model, torch.optim.AdamW, lr=m.learning_rate, weight_decay=m.weight_decay,
                                         damping=m.lora_pro_damping, moments=m.lora_pro_moments, param_groups=extra)
    if m.optimizer == "schedulefree":  # its warm-up is its own; the Trainer's schedule is constant (runconfig)
        try:
            from schedulefree import AdamWScheduleFree
        except ImportError as e:
            raise ImportError("model.optimizer=schedulefree needs the schedulefree package (a lorafa "
                              "dependency): pip install 'schedulefree>=1.4'") from e
        # the same count the Trainer's own schedules warm up over: ceil(ratio × steps) for a ratio, else the count
        warmup = math.ceil(m.warmup * total_steps) if m.warmup < 1 else int(m.warmup)
        return AdamWScheduleFree([{"params": [q for q in model.parameters() if q.requires_grad]}, *extra],
                                 lr=m.learning_rate, weight_decay=m.weight_decay, warmup_steps=warmup)
    cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}.get(m.optimizer)
    if cls is None:
        raise ValueError(f"model.optimizer must be adamw, sgd, lora_pro or schedulefree, got {m.optimizer!r}")
    if m.prec_reg is not None and p.use_loraplus:
        raise ValueError("model.prec_reg (Riemannian preconditioner) and peft.use_loraplus cannot be combined: pick "
                         "one.")
    if m.prec_reg is not None:
        from peft.optimizers import create_riemannian_optimizer

        return create_riemannian_optimizer(model, _with_groups(cls, extra), lr=m.learning_rate, reg=m.prec_reg,
                                           weight_decay=m.weight_decay)
    if p.use_loraplus:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, _with_groups(cls, extra), lr=m.learning_rate,
                                         loraplus_lr_ratio=p.loraplus_lr_ratio, weight_decay=m.weight_decay)
    return cls([{"params": [q for q in model.parameters() if q.requires_grad]}, *extra], lr=m.learning_rate,
               weight_decay=m.weight_decay)


def _with_groups(cls, groups: list[dict]):
    """`cls` (an optimiser class) whose constructor appends `groups` to the ones it is given: PEFT's optimiser
    factories build the optimiser from the model alone, so the terms' group comes in through the class."""
    if not groups:
        return cls

    class WithGroups(cls):
        def __init__(self, params, *args, **kwargs):
            params = list(params)
            if params and not isinstance(params[0], dict):
                params = [{"params": params}]
            super().__init__(params + [dict(g) for g in groups], *args, **kwargs)

    WithGroups.__name__ = WithGroups.__qualname__ = cls.__name__
    return WithGroups


def _training_args(cfg: RunConfig, run_dir: str, n_train: int, world: int, evaluate: bool = True):
    from transformers import TrainingArguments

    m = cfg.model
    per_step = m.per_device_batch_size * world
    if m.real_batch_size % per_step:
        raise ValueError(f"model.real_batch_size={m.real_batch_size} must be a multiple of per_device_batch_size × "
                         f"processes = {per_step}.")
    accum = m.real_batch_size // per_step
    steps_per_epoch = max(1, math.ceil(n_train / m.real_batch_size))
    eval_steps = m.eval_steps or max(1, round(m.eval_epochs * steps_per_epoch))
    early = bool(m.early_stopping_patience)  # keeps the best checkpoint: saves must fall on evaluation steps
    if early and not evaluate:
        raise ValueError("model.early_stopping_patience needs a validation set: set dataset.validation_size > 0.")
    save_steps = m.save_steps or (eval_steps if early else 500)
    if early and save_steps % eval_steps:
        raise ValueError(f"model.early_stopping_patience needs model.save_steps ({save_steps}) to be a multiple of the "
                         f"evaluation interval ({eval_steps} steps).")
    return TrainingArguments(
        output_dir=os.path.join(run_dir, "checkpoints"), per_device_train_batch_size=m.per_device_batch_size,
        per_device_eval_batch_size=m.per_device_batch_size, gradient_accumulation_steps=accum,
        num_train_epochs=m.epochs, max_steps=m.max_steps, learning_rate=m.learning_rate,
        lr_scheduler_type=scheduler_type(m), **_warmup_arg(m.warmup),
        weight_decay=m.weight_decay, logging_steps=m.logging_steps, eval_strategy="steps" if evaluate else "no",
        eval_steps=eval_steps,
        save_strategy="steps" if (m.save_steps or early) else "no", save_steps=save_steps, save_total_limit=2,
        load_best_model_at_end=early, metric_for_best_model="eval_loss" if early else None,
        bf16=m.bf16, seed=cfg.seed, data_seed=cfg.seed, report_to=report_to(cfg), remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=False, **_checkpointing_arg(m.activation_checkpointing),
        run_name=os.path.basename(run_dir), use_cpu=not torch.cuda.is_available(),
    )


def _warmup_arg(warmup: float) -> dict:
    """`model.warmup` < 1 is a ratio of the training steps, >= 1 a number of steps. transformers 5 reads a fractional
    `warmup_steps` as that ratio; 4.x needs `warmup_ratio` (its `warmup_steps` must be an int count)."""
    import transformers

    if 0 < warmup < 1 and int(transformers.__version__.split(".")[0]) < 5:
        return {"warmup_ratio": warmup}
    return {"warmup_steps": int(warmup) if float(warmup).is_integer() else warmup}


def _evaluate_at_end():
    """A callback that evaluates after the last step when it is off the evaluation interval, so the last validation
    loss is the trained model's. transformers >= 5.4 does this itself (the two requests are one evaluation)."""
    from transformers import TrainerCallback

    class EvaluateAtEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if (state.global_step >= state.max_steps and args.eval_strategy == "steps" and state.eval_steps
                    and state.global_step % state.eval_steps and args.eval_delay <= state.global_step):
                control.should_evaluate = True

    return EvaluateAtEnd()


# Not merged with integrations._checkpointing (reads the field) or peft_bridge.quiet_checkpointing_rename (a warning).
def _checkpointing_arg(enabled: bool) -> dict:
    """transformers 5 renamed `gradient_checkpointing` to `activation_checkpointing` (the old name warns)."""
    import inspect

    from transformers import TrainingArguments

    new = "activation_checkpointing" in inspect.signature(TrainingArguments).parameters
    return {"activation_checkpointing" if new else "gradient_checkpointing": enabled}


def evaluate_task(cfg: RunConfig, model, tokenizer, task, collate) -> dict:
    """Accuracy on the task's test split: GSM-style answers by greedy generation, or classification."""
    examples = task.test[: cfg.eval.n] if cfg.eval.n else task.test
    if task.kind == "causal_lm":
        from .eval.gsm8k import evaluate_gsm8k

        result = evaluate_gsm8k(model, tokenizer, examples, batch_size=cfg.eval.batch_size,
                                max_new_tokens=cfg.eval.max_new_tokens or task.max_new_tokens)
    else:
        from .eval.classification import classification_accuracy

        result = classification_accuracy(model, collate, examples, batch_size=cfg.eval.batch_size)
    return result


def run(cfg: RunConfig) -> dict:
    """Run one experiment; returns the results dict (also written to `<run_dir>/results.json`).

    The training data are split into the training set and a validation set (`dataset.validation_size`, seeded,
    disjoint) that serves the held-out loss during training, early stopping and `load_best_model_at_end`; the test
    split is used only for the accuracy reported before and after training. With `baseline=<method>` a second
    adapter is initialised by that method on a freshly loaded base and trained on the same batches in the same order,
    and reported beside the first.
    """
    from accelerate import PartialState
    from transformers import set_seed

    from .data.datasets import load_task, split_validation

    # initialises torch.distributed under accelerate launch / torchrun (gloo on a CPU-only machine)
    state = PartialState(cpu=not torch.cuda.is_available())
    dtype = _device_checks(cfg)
    _check_backend(cfg, state.distributed_type)
    init_config = cfg.init_config()
    baseline_config = cfg.baseline_init_config()
    set_seed(cfg.seed)
    t_start = time.perf_counter()
    run_dir = None if cfg.dry_run else prepare_run_dir(cfg, state)  # a dry run checks data and model, writes nothing
    task = load_task(cfg.dataset_name, path=cfg.dataset.path, test_path=cfg.dataset.test_path, seed=cfg.seed,
                     n_train=cfg.dataset.n_train, n_test=cfg.dataset.n_test, columns=dict(cfg.dataset.columns) or None,
                     task_config=dict(cfg.dataset.task_config) or None)
    train_set, validation = split_validation(task.train, cfg.dataset.validation_size, cfg.seed)
    task = dataclasses.replace(task, train=train_set)  # the statistics pass and training never see the validation set
    logger.info("%s: %d training, %d validation (from the training data), %d test examples", task.name,
                len(task.train), len(validation), len(task.test))
    model, tokenizer = _load_model(cfg, task, dtype, state.device)
    collate = _collator(cfg, task, tokenizer, cfg.model.max_length)
    stats_length = None
    if init_config.needs is not None or init_config.line_search or cfg.model.learning_rate == "auto":
        stats_length = init_config.max_length  # the collator of the statistics, search and rate batches
    _check_lengths(task, collate, validation, stats_length)
    results = {"run_dir": run_dir, "dataset": task.name, "n_train": len(task.train), "n_validation": len(validation),
               "n_test": len(task.test), "model": cfg.model.name, "method": init_config.method,
               "world_size": state.num_processes, "is_main_process": state.is_main_process,
               "quantization": _quantization(cfg)}
    if cfg.dry_run:
        return results
    if cfg.init.plan_only:
        return _plan_only(cfg, model, task, init_config, run_dir, state, results,
                          _collator(cfg, task, tokenizer, init_config.max_length))

    teacher = _teacher(cfg, task, dtype, state.device, tokenizer)  # loaded and checked before any long work
    if cfg.eval.enabled and cfg.eval.before and not cfg.resume:
        t = time.perf_counter()
        results["before"] = _summary(evaluate_task(cfg, model, tokenizer, task, collate), time.perf_counter() - t)
    results.update(_train_arm(cfg, model, tokenizer, task, validation, collate, init_config, run_dir, state,
                              teacher=teacher))
    if baseline_config is not None:
        del model
        gc.collect()
        set_seed(cfg.seed)  # the same seed: the same batches in the same order, and the same adapter RNG draws
        model = _load_model(cfg, task, dtype, state.device)[0]
        if teacher is not None and cfg.align.refresh:  # the first arm moved it: the baseline starts from the same one
            teacher.reload()
        results["baseline"] = _train_arm(cfg, model, tokenizer, task, validation, collate, baseline_config,
                                         os.path.join(run_dir, "baseline"), state, merge=False, teacher=teacher)
    results["wall_s"] = round(time.perf_counter() - t_start, 2)
    for arm in [results] + ([results["baseline"]] if baseline_config is not None else []):
        if "lr_suggestion" in arm:
            logger.info("learning rate (auto), %s: %.4g from %s", arm["method"], arm["learning_rate"],
                        _brief(arm["lr_suggestion"]))
    if state.is_main_process:
        others = {f"baseline ({baseline_config.method})": os.path.join(run_dir, "baseline")} if baseline_config else {}
        results["plot"] = plot_curves(run_dir, label=init_config.method, others=others)
        write_json(os.path.join(run_dir, "results.json"), results)
    state.wait_for_everyone()
    return results


def _stats_tokens(task, stats_collate, init_config) -> int:
    """The tokens the statistics pass will sum over all processes (its batches' attention masks): the plan's guide to
    which covariances are singular (wider than this), where LoRA-FA's whitener takes eigh instead of Cholesky."""
    from .stats.sampling import sample_indices

    total = 0
    for idx in sample_indices(len(task.train), init_config.bsz, init_config.iters, init_config.sample,
                              init_config.seed):
        batch = stats_collate([task.train[i] for i in idx])
        mask = batch.get("attention_mask")
        total += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    return total


def _plan(cfg: RunConfig, model, lora_config, init_config, state, task, stats_collate):
    """The memory plan of this init (`lorafa.plan_init`), logged by the main process before the statistics pass."""
    from .plan import plan_init

    plan = plan_init(model, lora_config, init_config, timings=state.is_main_process,
                     tokens=_stats_tokens(task, stats_collate, init_config))
    if state.is_main_process:
        logger.info("%s", plan.summary())
    return plan


def _plan_only(cfg: RunConfig, model, task, init_config, run_dir, state, results, stats_collate) -> dict:
    """`init.plan_only=true`: the plan printed and written to `<run_dir>/plan.json`; no statistics, no training."""
    plan = _plan(cfg, model, _lora_config(cfg, model, task), init_config, state, task, stats_collate)
    results["plan"] = {"stats_bytes": plan.stats_bytes, "groups": plan.groups, "group_bytes": plan.group_bytes,
                       "budget": plan.budget, "predicted_peak": plan.predicted_peak,
                       "weights_bytes": plan.weights_bytes, "transient_bytes": plan.transient_bytes,
                       "workspace_bytes": plan.workspace_bytes, "factorisations": plan.factorisations,
                       "sharing": plan.sharing, "tokens": plan.tokens, "summary": plan.summary()}
    if state.is_main_process:
        print(plan.summary())
        write_json(os.path.join(run_dir, "plan.json"), results["plan"])
    state.wait_for_everyone()
    return results


def _teacher(cfg: RunConfig, task, dtype, device, tokenizer):
    """`align.*`: the phases must fit the run, and a teacher model is loaded (None for none and self)."""
    from .align.build import load_teacher, schedule_of

    if cfg.align.mode == "none":
        return None
    schedule_of(cfg.align).check_fits(_total_steps(cfg, len(task.train)))
    return load_teacher(cfg.align, task.kind, getattr(task, "num_labels", None), dtype, device, tokenizer)


def _total_steps(cfg: RunConfig, n_train: int) -> int:
    """The optimiser steps the Trainer will take (max_steps, else epochs × batches per epoch)."""
    m = cfg.model
    if m.max_steps and m.max_steps > 0:
        return m.max_steps
    return max(1, math.ceil(m.epochs * math.ceil(n_train / m.real_batch_size)))


def _terms(init_config, align, peft_model) -> list:
    """What training adds to the task loss: the method's terms, from the method registry (KaSA's regulariser,
    GOAT's load-balancing loss, SPEC §9), then `align.*`'s (SPEC §5; the init's own term with init.align_init)."""
    from .terms import method_terms

    return method_terms(init_config) + align.terms(peft_model)


def _train_arm(cfg: RunConfig, model, tokenizer, task, validation, collate, init_config, run_dir: str, state,
               merge: bool = True, teacher=None) -> dict:
    """Statistics + init -> train -> save the initial and trained adapters -> accuracy after, into `run_dir`."""
    from transformers import EarlyStoppingCallback

    from .align.build import AlignmentTerms
    from .terms import TermsTrainer, term_parameters

    os.makedirs(run_dir, exist_ok=True)
    out = {"method": init_config.method}
    lora_config = _lora_config(cfg, model, task)
    t = time.perf_counter()
    tuned = _tuned_model(cfg, model, lora_config, init_config, task, dtype=next(model.parameters()).dtype)
    align = AlignmentTerms(cfg.align, teacher, _total_steps(cfg, len(task.train)))  # each term built once
    # init.align_init: the dual objective's term at the init, on the base model; training reuses it
    align_term = align.term(model) if init_config.align_init else None
    stats_collate = _collator(cfg, task, tokenizer, init_config.max_length)
    if init_config.needs is not None:
        _plan(cfg, model, lora_config, init_config, state, task, stats_collate)
    stats = _stats_for_init(cfg, model, lora_config, init_config, task, stats_collate, state, align_term)
    initial_dir = os.path.join(run_dir, "initial_adapter")
    batches = search_batches = None
    if init_config.line_search:  # on the statistics batches, or (init.search_iters > 0) on as many batches of others
        k = cfg.init.search_iters
        batches = stat_batches(task.train, stats_collate, init_config.bsz, k or init_config.iters, init_config.sample,
                               init_config.seed, skip=init_config.iters if k else 0)
    if stats is None and init_config.needs is not None:  # grouped sweeps (init.stats_memory) over the same batches
        search_batches = batches if init_config.line_search and cfg.init.search_iters else None
        batches = stat_batches(task.train, stats_collate, init_config.bsz, init_config.iters, init_config.sample,
                               init_config.seed)
    guard_batches = None
    if cfg.init.guard_iters and init_config.method in GUARDED:  # examples after the statistics and search samples
        guard_batches = _held_out_batches(cfg, task, stats_collate, init_config, cfg.init.guard_iters)
    peft_model = initialize(model, lora_config, init_config, stats=stats, batches=batches,
                            search_batches=search_batches, initial_adapter_dir=initial_dir, align=align_term,
                            tuned=tuned, base_weights=_base_weights(cfg, init_config), guard_batches=guard_batches)
    del tuned
    out["init_s"] = round(time.perf_counter() - t, 2)
    out.update(_init_report(peft_model, run_dir, state))
    if cfg.model.learning_rate == "auto":  # this arm's own rate, from its init (SPEC §11)
        cfg = _auto_learning_rate(cfg, peft_model, task, tokenizer, init_config, out)
    terms = _terms(init_config, align, peft_model)
    optimizer = _optimizer(cfg, peft_model, term_parameters(terms),  # with the terms' own parameters
                           total_steps=_total_steps(cfg, len(task.train)))
    del stats
    state.wait_for_everyone()  # rank 0 has written the initial adapter

    args = _training_args(cfg, run_dir, len(task.train), state.num_processes, evaluate=bool(validation))
    metrics = MetricsLogger(run_dir)
    callbacks = [metrics, _evaluate_at_end()]
    if cfg.model.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(cfg.model.early_stopping_patience))
    trainer = TermsTrainer(model=peft_model, args=args, train_dataset=task.train, eval_dataset=validation or None,
                           data_collator=collate, callbacks=callbacks, optimizers=(optimizer, None), terms=terms,
                           step_log=metrics.write_row)
    t = time.perf_counter()
    resume = cfg.resume and _has_checkpoint(args.output_dir)
    at_init = trainer.evaluate()["eval_loss"] if validation and not resume else None  # what the init alone did
    train_out = trainer.train(resume_from_checkpoint=True if resume else None)
    if callable(getattr(optimizer, "eval", None)):  # schedule-free AdamW: the averaged weights are the model's
        optimizer.eval()
    out["train_s"] = round(time.perf_counter() - t, 2)  # includes the step-0 and periodic validation passes
    out["train_loss"] = train_out.training_loss
    out["steps"] = trainer.state.global_step
    held = [r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r]
    if held:  # train() starts a new log history: the step-0 value comes from the evaluate() above
        first = held[0] if at_init is None else at_init
        out["validation_loss"] = {"first": first, "last": held[-1], "best": min(held + [first])}
        if at_init is not None:
            out["validation_loss"]["at_init"] = at_init

    out["adapter_dir"] = save_adapter(peft_model, os.path.join(run_dir, "adapter"), initial_adapter=initial_dir)
    for term in terms:  # what a term was (the alignment's settings, a learned projection saved beside the adapter)
        if hasattr(term, "report"):
            out[term.name] = term.report(out["adapter_dir"], save=state.is_main_process)
    out["initial_adapter_dir"] = initial_dir
    if cfg.eval.enabled:
        t = time.perf_counter()
        out["after"] = _summary(evaluate_task(cfg, peft_model, tokenizer, task, collate), time.perf_counter() - t)
    if merge and cfg.model.saving:
        out["merged_dir"] = _save_merged(peft_model, tokenizer, run_dir, state)
    del trainer, peft_model
    gc.collect()
    return out


def _held_out_batches(cfg: RunConfig, task, collate, init_config, n: int) -> list[dict]:
    """n batches of init.bsz examples that the statistics pass and the line search did not see (the seeded order,
    continued), the same on every process: the init step's guard and the rate's suggestion use them (the same
    ones: both only evaluate)."""
    from .stats.sampling import sample_indices

    skip = init_config.iters + (cfg.init.search_iters if init_config.line_search else 0)
    chosen = sample_indices(len(task.train), init_config.bsz, n, init_config.sample, init_config.seed, skip=skip)
    return [collate([task.train[i] for i in idx]) for idx in chosen]


def _auto_learning_rate(cfg: RunConfig, peft_model, task, tokenizer, init_config, out: dict) -> RunConfig:
    """`model.learning_rate=auto`: `lorafa.suggest_lr` (`model.lr_rule`) on 2 batches of init.bsz examples outside
    the statistics and line-search samples (the same batches on every process; every process takes rank 0's
    rate). The rate and the evidence go into `out`; returns `cfg` with that rate."""
    from .lr import MAX_BATCHES, suggest_lr

    collate = _collator(cfg, task, tokenizer, init_config.max_length)
    batches = _held_out_batches(cfg, task, collate, init_config, MAX_BATCHES)
    c = {} if cfg.model.lr_c is None else {"c": float(cfg.model.lr_c)}
    s = suggest_lr(peft_model, batches, cfg.model.optimizer, rule=cfg.model.lr_rule, seed=init_config.seed, **c)
    lr, evidence = s.lr, s.evidence  # the main process's, on every process
    out["learning_rate"], out["lr_suggestion"] = lr, evidence
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, learning_rate=lr))


def _brief(evidence: dict) -> str:
    keys = ("ratio", "c", "eta_polyak", "eta_star", "curvature", "lambda_max", "best_lr", "n_batches", "seconds")
    return f"{evidence['rule']} (" + ", ".join(f"{k}={evidence[k]:.4g}" if isinstance(evidence[k], float) else
                                              f"{k}={evidence[k]}" for k in keys if k in evidence) + ")"


def _tuned_model(cfg: RunConfig, model, lora_config, init_config, task, dtype):
    """For a method that starts from a fine-tune (the registry's `tuned`: extract): `init.tuned`, its architecture
    checked against the base's targets before the statistics pass (None for the other methods)."""
    from .methods.registry import METHODS

    if not METHODS[init_config.method].tuned:
        return None
    from .weights import tuned_weights
    from .targets import resolve_targets

    from .align import ModelTeacher

    # on the CPU: each target's weight is moved to the base's device as its layer is extracted
    tuned = ModelTeacher(cfg.init.tuned, device="cpu", dtype=dtype, kind=task.kind,
                         num_labels=getattr(task, "num_labels", None)).model
    tuned_weights(tuned, resolve_targets(model, lora_config), init_config.method)
    return tuned


def _init_report(peft_model, run_dir: str, state) -> dict:
    """What the init chose, for the run's results: each layer's rank and initial step, the line search's tries, and
    a rank allocation (ranks.json and ranks.png in the run folder)."""
    from .saving import init_record
    from .ranks import write_ranks

    record = init_record(peft_model)
    report = {"init_layers": {n: {k: i[k] for k in ("rank", "step_norm", "eta", "global_factor", "offset_scale")
                                  if k in i} for n, i in record.infos.items()}}
    for key in ("line_search", "guard", "stats_groups", "stats_sharding"):  # the step's length; how the statistics were taken
        if key in record.summary:
            report[key] = record.summary[key]
    if "ranks" in record.summary:
        ranks = record.summary["ranks"]
        report["ranks"] = {k: ranks[k] for k in ("rule", "budget", "budget_by", "ranks")}
        if state.is_main_process:
            write_ranks(ranks["ranks"], run_dir, extra={k: v for k, v in ranks.items() if k != "ranks"})
    return report


def _summary(result: dict, seconds: float) -> dict:
    return {"accuracy": result["accuracy"], "correct": result["correct"], "n": result["n"], "seconds": round(seconds, 2)}


def _check_lengths(task, collate, validation=(), stats_max_length: int | None = None, chunk: int = 1024) -> None:
    """Every training and validation prompt must leave room for an answer token within the max_length of the
    collator that will see it (the runner's `model.max_length`; for the training prompts also the statistics pass's
    `init.max_length`, when given): a collator would raise it mid-run (statistics pass, training, the first
    evaluation), so it is an error before any long work.

    The prompts are tokenised as the collator tokenises them (with the special tokens), `chunk` at a time in one
    tokenizer call each (a fast tokenizer encodes a batch in parallel). The test prompts are not checked: the
    evaluation generates from them without the collator and its max_length.
    """
    if task.kind != "causal_lm":
        return

    def lengths_of(examples):
        prompts = [ex["prompt"] for ex in examples]
        out = []
        for start in range(0, len(prompts), chunk):
            out += [len(ids) for ids in collate.tokenizer(prompts[start:start + chunk],
                                                          add_special_tokens=True)["input_ids"]]
        return prompts, out

    train = lengths_of(task.train)
    checks = [("training", train, collate.max_length, "++model.max_length"),
              ("validation", lengths_of(validation), collate.max_length, "++model.max_length")]
    if stats_max_length is not None:
        checks.append(("training (statistics pass)", train, stats_max_length, "++init.max_length"))
    for what, (prompts, lengths), max_length, option in checks:
        too_long = [i for i, n in enumerate(lengths) if n >= max_length]
        if too_long:
            worst = max(too_long, key=lengths.__getitem__)
            raise ValueError(f"{len(too_long)} of {len(prompts)} {what} prompts have max_length={max_length} "
                             f"tokens or more, leaving no room for an answer token; the longest has {lengths[worst]} "
                             f"tokens ({prompts[worst][:60]!r}...). Raise {option}, or drop those examples "
                             "from the data.")


def _has_checkpoint(folder: str) -> bool:
    return os.path.isdir(folder) and any(d.startswith("checkpoint-") for d in os.listdir(folder))


def _save_merged(peft_model, tokenizer, run_dir: str, state) -> str | None:
    """`model.saving`: W + ΔW as a normal transformers checkpoint, written to a temporary folder and renamed."""
    target = os.path.join(run_dir, "merged")
    merged = peft_model.merge_and_unload()
    if state.is_main_process:
        tmp = target + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target
