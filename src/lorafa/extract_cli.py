"""`lorafa-extract`: write a PEFT adapter extracted from a fine-tuned checkpoint of the base's architecture
(SPEC §5, method="extract"), and print its held-out KL to the fine-tune next to plain SVD extraction's.

    lorafa-extract --base B --tuned T --rank 8 --out DIR [--dataset gsm8k --data PATH] [--device cuda --dtype bf16]

With a dataset, the adapter is the data-aware extraction (by default in the metric of the layer inputs' covariance
Σ, from forward passes of the base over the training split; `--metric kfac` adds the output-gradient factor C) and
the KL is measured on the test split; without one, it is plain SVD extraction and no KL is measured.

The models run on --device (default cpu) in --dtype (default fp32); the fine-tune's target weights are read from its
checkpoint in that dtype, so W_tuned − W is the difference of the two models that run, and the statistics and the
factorisation are fp32 whatever the dtype. A fine-tune equal to the base on every target is refused (nothing to
extract); target layers it left unchanged are named in a warning (their adapters are zero and cannot train).
"""

from __future__ import annotations

import argparse
import logging
import math
import os

import torch

from .fsio import write_json

logger = logging.getLogger("lorafa.extract")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="lorafa-extract", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the base model (HF id, path or an embedded default's name)")
    ap.add_argument("--tuned", required=True, help="its fine-tuned checkpoint (same architecture)")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--alpha", type=float, default=None,
                    help="lora_alpha > 0 (default: the rank, so the scale alpha/rank is 1)")
    ap.add_argument("--targets", nargs="+", default=["all-linear"], help="target modules (default all-linear)")
    ap.add_argument("--out", required=True, help="the adapter folder to write")
    ap.add_argument("--dataset", default=None, help="a lorafa dataset name (gsm8k, meta_math, a .jsonl file, ...)")
    ap.add_argument("--data", default=None, help="the dataset's local path")
    ap.add_argument("--bsz", type=int, default=4, help="statistics batch size")
    ap.add_argument("--iters", type=int, default=8, help="statistics batches")
    ap.add_argument("--heldout", type=int, default=64, help="test examples for the KL (0: measure no KL)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--metric", choices=["input", "kfac"], default="input",
                    help="with a dataset: input (Σ only, forward passes; the default) or kfac (C and Σ)")
    ap.add_argument("--fisher", choices=["sampled", "empirical"], default="sampled",
                    help="metric=kfac: C from labels sampled from the base (true Fisher) or from the data's labels")
    ap.add_argument("--reg", type=float, default=1e-6, help="relative damping of C and Σ")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu",
                    help="where the models run: cpu (the default), cuda, cuda:1, mps, ... (a torch device)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                    help="the models' dtype (default fp32); the statistics and the factorisation are fp32 always")
    args = ap.parse_args(argv)
    if args.rank < 1:
        ap.error(f"--rank must be >= 1, got {args.rank}")
    if args.alpha is not None and not (math.isfinite(args.alpha) and args.alpha > 0):
        ap.error(f"--alpha is lora_alpha, the scale alpha/rank of the adapter: it must be a finite number > 0, got "
                 f"{args.alpha} (leave it out for alpha = rank)")
    for name in ("bsz", "iters", "max_length"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.heldout < 0:
        ap.error(f"--heldout is a number of test examples: it must be >= 0 (0 measures no KL), got {args.heldout}")
    if args.data and not args.dataset:
        ap.error("--data is the path of --dataset: name the dataset too")
    args.device = _device(ap, args.device)
    return args


def _device(ap, text: str) -> torch.device:
    """The torch device `--device` names, refused now (not after loading the models) when it is not usable here."""
    try:
        device = torch.device(text)
    except RuntimeError as err:
        ap.error(f"--device {text!r} is not a torch device ({err}); e.g. cpu, cuda, cuda:1, mps")
    if device.type == "meta":
        ap.error("--device meta holds no data: choose cpu or an accelerator (cuda, mps, ...)")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as err:
        ap.error(f"--device {text!r} is not usable on this machine ({err}); use --device cpu, or one of this "
                 "machine's accelerators")
    return device


def _lora_config(model, args):
    from peft import LoraConfig

    from .run_io import resolve_targets_keyword

    return LoraConfig(r=args.rank, lora_alpha=args.rank if args.alpha is None else args.alpha, lora_dropout=0.0,
                      target_modules=resolve_targets_keyword(model, args.targets))


def _load(name: str, args):
    from .models import load_causal_lm

    model, tokenizer = load_causal_lm(name, dtype=DTYPES[args.dtype])
    return model.to(args.device).eval(), tokenizer


def _tuned_source(args):
    """What `initialize(tuned=)` reads the fine-tuned target weights from: the checkpoint itself when it is stored
    as .safetensors (one target layer at a time, no model built), else the loaded model. Either way the weights are
    in --dtype, as the base's are, so that W_tuned − W is the difference of the two models that run."""
    from .models import full_precision_checkpoint

    folder = full_precision_checkpoint(args.tuned)
    if os.path.isdir(folder) and any(f.endswith(".safetensors") for f in os.listdir(folder)):
        return _Checkpoint(folder, DTYPES[args.dtype])
    return _load(args.tuned, args)[0]


class _Checkpoint:
    """A safetensors checkpoint as a read-only state dict whose tensors are read from disk when asked for, in
    `dtype`."""

    def __init__(self, folder: str, dtype: torch.dtype):
        from .weights import CheckpointTensors

        self._tensors, self.dtype = CheckpointTensors(folder), dtype

    def __contains__(self, key) -> bool:
        return key in self._tensors

    def __getitem__(self, key) -> torch.Tensor:
        return self._tensors[key].to(self.dtype)


def check_tuned_differs(base, lora_config, tuned) -> list[str]:
    """`methods.extract.check_difference` in the command line's words, before any pass and before anything is
    written: raises when the fine-tune equals the base on every target layer. The layers it left unchanged are named
    by `initialize`'s own check, once per extraction."""
    from .methods.extract import check_difference
    from .weights import tuned_weights
    from .targets import resolve_targets, weight_matrix

    targets = resolve_targets(base, lora_config)
    return check_difference({n: (lambda m=m: weight_matrix(m)) for n, m in targets.items()},
                            tuned_weights(tuned, targets, "extract"), tuned_arg="--tuned", tuned_kind="checkpoint",
                            targets_arg="--targets", warn=False)


@torch.no_grad()
def heldout_kl(model, tuned, batches) -> dict:
    """Mean KL(p_tuned ‖ p_model) over the positions the task loss scores, and the model's task loss."""
    from .align import causal_lm_mask, logit_divergence

    model.eval()
    device = next(model.parameters()).device
    kl = loss = 0.0
    for b in batches:
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
        out = model(**b)
        ref = tuned(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        kl += float(logit_divergence(out.logits, ref, causal_lm_mask(b["labels"]), kind="fkl"))
        loss += float(out.loss)
    return {"kl": kl / len(batches), "task_loss": loss / len(batches)}


def main(argv=None) -> dict:
    """Run `lorafa-extract`. At most two full models are in memory at once: the base (with its adapter) and, for
    the held-out KL only, the fine-tune; the init reads the fine-tune's target weights alone."""
    from . import InitConfig, initialize, save_adapter
    from .data import CausalLMCollator
    from .data.datasets import load_task
    from .stats import sampled_label_loss, stat_batches

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, tokenizer = _load(args.base, args)
    tuned_source = _tuned_source(args)
    check_tuned_differs(model, _lora_config(model, args), tuned_source)  # before any pass or write
    train = heldout = None
    if args.dataset:
        task = load_task(args.dataset, path=args.data, seed=args.seed)
        collate = CausalLMCollator(tokenizer, max_length=args.max_length)
        train = stat_batches(task.train, collate, args.bsz, args.iters, "random", args.seed)
        examples = task.test[: args.heldout]
        heldout = [collate(examples[i:i + args.bsz]) for i in range(0, len(examples), args.bsz)]
    report = {"base": args.base, "tuned": args.tuned, "rank": args.rank, "adapter": os.path.abspath(args.out),
              "metric": args.metric if train is not None else "identity", "device": str(args.device),
              "dtype": args.dtype}
    metrics = [args.metric, "identity"] if train is not None else ["identity"]  # the first one is saved
    tuned = None  # the fine-tuned model, loaded for the held-out KL only
    for i, metric in enumerate(metrics):
        if model is None:
            model = _load(args.base, args)[0]  # initialize wraps the model in place: a fresh base
        config = InitConfig(method="extract", metric=metric, bsz=args.bsz, iters=args.iters, seed=args.seed,
                            **({"reg": args.reg} if metric != "identity" else {}))
        loss_fn = sampled_label_loss(args.seed) if metric == "kfac" and args.fisher == "sampled" else None
        peft_model = initialize(model, _lora_config(model, args), config, batches=train, tuned=tuned_source,
                                loss_fn=loss_fn)
        if i == 0:
            save_adapter(peft_model, args.out)
        if heldout:
            if tuned is None:
                tuned = tuned_source if isinstance(tuned_source, torch.nn.Module) else _load(args.tuned, args)[0]
            if i == 0:  # extraction leaves the base as it is: without the adapter, the model is the base
                with peft_model.disable_adapter():
                    report["base_model"] = heldout_kl(peft_model, tuned, heldout)
            report[f"extract_{metric}"] = heldout_kl(peft_model, tuned, heldout)
        del peft_model
        model = None
    del tuned
    write_json(os.path.join(args.out, "extract_report.json"), report)
    _print(report)
    return report


def _print(report: dict) -> None:
    lines = [f"lorafa-extract: rank {report['rank']} adapter written to {report['adapter']}"]
    rows = [(k, v) for k, v in report.items() if isinstance(v, dict)]
    if rows:
        lines.append(f"  {'model':<18} {'held-out KL to tuned':>21} {'task loss':>10}")
        for k, v in rows:
            name = {"base_model": "base (no adapter)", "extract_kfac": "K-FAC metric", "extract_input": "input metric",
                    "extract_identity": "plain SVD"}[k]
            lines.append(f"  {name:<18} {v['kl']:>21.5f} {v['task_loss']:>10.4f}")
    else:
        lines.append("  (no --dataset: plain SVD extraction, no held-out KL measured)")
    logger.info("\n".join(lines))


if __name__ == "__main__":
    main()
