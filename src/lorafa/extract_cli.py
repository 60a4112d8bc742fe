"""`lorafa-extract`: write a PEFT adapter extracted from a fine-tuned checkpoint of the base's architecture
(SPEC §5, method="extract"), and print its held-out KL to the fine-tune next to plain SVD extraction's.

    lorafa-extract --base B --tuned T --rank 8 --out DIR [--dataset gsm8k --data PATH]

With a dataset, the adapter is the data-aware extraction (by default in the metric of the layer inputs' covariance
Σ, from forward passes of the base over the training split; `--metric kfac` adds the output-gradient factor C) and
the KL is measured on the test split; without one, it is plain SVD extraction and no KL is measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import torch

logger = logging.getLogger("lorafa.extract")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="lorafa-extract", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the base model (HF id, path or an embedded default's name)")
    ap.add_argument("--tuned", required=True, help="its fine-tuned checkpoint (same architecture)")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: the rank, so the scale is 1)")
    ap.add_argument("--targets", nargs="+", default=["all-linear"], help="target modules (default all-linear)")
    ap.add_argument("--out", required=True, help="the adapter folder to write")
    ap.add_argument("--dataset", default=None, help="a lorafa dataset name (gsm8k, meta_math, a .jsonl file, ...)")
    ap.add_argument("--data", default=None, help="the dataset's local path")
    ap.add_argument("--bsz", type=int, default=4, help="statistics batch size")
    ap.add_argument("--iters", type=int, default=8, help="statistics batches")
    ap.add_argument("--heldout", type=int, default=64, help="test examples for the KL")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--metric", choices=["input", "kfac"], default="input",
                    help="with a dataset: input (Σ only, forward passes; the default) or kfac (C and Σ)")
    ap.add_argument("--fisher", choices=["sampled", "empirical"], default="sampled",
                    help="metric=kfac: C from labels sampled from the base (true Fisher) or from the data's labels")
    ap.add_argument("--reg", type=float, default=1e-6, help="relative damping of C and Σ")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.rank < 1:
        ap.error("--rank must be >= 1")
    if args.data and not args.dataset:
        ap.error("--data is the path of --dataset: name the dataset too")
    return args


def _lora_config(model, args):
    from peft import LoraConfig

    from .run_io import resolve_targets_keyword

    return LoraConfig(r=args.rank, lora_alpha=args.alpha or args.rank, lora_dropout=0.0,
                      target_modules=resolve_targets_keyword(model, args.targets))


@torch.no_grad()
def heldout_kl(model, tuned, batches) -> dict:
    """Mean KL(p_tuned ‖ p_model) over the positions the task loss scores, and the model's task loss."""
    from .align import causal_lm_mask, logit_divergence

    model.eval()
    kl = loss = 0.0
    for b in batches:
        out = model(**b)
        ref = tuned(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        kl += float(logit_divergence(out.logits, ref, causal_lm_mask(b["labels"]), kind="fkl"))
        loss += float(out.loss)
    return {"kl": kl / len(batches), "task_loss": loss / len(batches)}


def main(argv=None) -> dict:
    from . import InitConfig, initialize, save_adapter
    from .data import CausalLMCollator
    from .data.datasets import load_task
    from .models import load_causal_lm
    from .stats import sampled_label_loss, stat_batches

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tuned, tokenizer = load_causal_lm(args.tuned)
    base = load_causal_lm(args.base)[0]
    train = heldout = None
    if args.dataset:
        task = load_task(args.dataset, path=args.data, seed=args.seed)
        collate = CausalLMCollator(tokenizer, max_length=args.max_length)
        train = stat_batches(task.train, collate, args.bsz, args.iters, "random", args.seed)
        examples = task.test[: args.heldout]
        heldout = [collate(examples[i:i + args.bsz]) for i in range(0, len(examples), args.bsz)]
    report = {"base": args.base, "tuned": args.tuned, "rank": args.rank, "adapter": os.path.abspath(args.out),
              "metric": args.metric if train is not None else "identity"}
    if heldout:
        report["base_model"] = heldout_kl(base, tuned, heldout)
    metrics = [args.metric, "identity"] if train is not None else ["identity"]  # the first one is saved
    for i, metric in enumerate(metrics):
        model = base if i == 0 else load_causal_lm(args.base)[0]  # initialize wraps the model in place
        config = InitConfig(method="extract", metric=metric, bsz=args.bsz, iters=args.iters, seed=args.seed,
                            **({"reg": args.reg} if metric != "identity" else {}))
        loss_fn = sampled_label_loss(args.seed) if metric == "kfac" and args.fisher == "sampled" else None
        peft_model = initialize(model, _lora_config(model, args), config, batches=train, tuned=tuned,
                                loss_fn=loss_fn)
        if i == 0:
            save_adapter(peft_model, args.out)
        if heldout:
            report[f"extract_{metric}"] = heldout_kl(peft_model, tuned, heldout)
        del peft_model, model
    tmp = os.path.join(args.out, ".extract_report.json.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, os.path.join(args.out, "extract_report.json"))
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
