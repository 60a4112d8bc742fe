"""Memory of the init on the main job's set-up: peak during `lorafa.initialize` and what stays resident after it.

SmolLM2-135M-Instruct, LoRA-FA (r = 8) on every linear layer, K-FAC statistics over 4 batches of 4 leg_counting
problems, as `python run_exp.py` does. Each measurement runs in a fresh process (MALLOC_ENV, so freed memory leaves
the resident set). `--src` points at another lorafa source tree (e.g. a `git worktree` of an older commit), so the
same script measures the code before and after a change:

    git worktree add /tmp/lorafa-before <commit>
    python benchmarks/init_memory.py --src /tmp/lorafa-before/src --label before --out benchmarks/results/init_memory
    python benchmarks/init_memory.py --label after --out benchmarks/results/init_memory
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import MALLOC_ENV, PeakMemory, _rss_bytes, markdown_table, write_json  # noqa: E402


def measure(args) -> dict:
    """In this (fresh) process: load, build the statistics batches, initialize, and read the memory."""
    import torch

    from lorafa import InitConfig, initialize, stat_batches
    from lorafa.data import CausalLMCollator, load_task
    from lorafa.models import load_causal_lm
    from lorafa.run_io import resolve_targets_keyword
    from peft import LoraConfig

    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(args.model)
    task = load_task("leg_counting", seed=0)
    batches = list(stat_batches(task.train, CausalLMCollator(tokenizer, max_length=256), args.bsz, args.iters,
                                "random", 0))
    lora_config = LoraConfig(r=8, lora_alpha=16, use_rslora=True,
                             target_modules=resolve_targets_keyword(model, ["all-linear"]))
    with torch.no_grad():  # pages in weights that the loader maps lazily, so "held" counts only what the init keeps
        model(**batches[0])
    gc.collect()
    before = _rss_bytes()
    with PeakMemory(torch.device("cpu")) as peak:
        peft_model = initialize(model, lora_config, InitConfig(method="lora_fa", bsz=args.bsz, iters=args.iters,
                                                               max_length=256), batches=batches, progress=False)
    gc.collect()
    after = _rss_bytes()
    n_layers = sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_A"))
    return {"label": args.label, "layers": n_layers, "rss_before_mb": before / 2**20,
            "init_peak_mb": peak.mb, "held_after_init_mb": (after - before) / 2**20}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True)
    p.add_argument("--src", default=os.path.join(HERE, "..", "src"), help="the lorafa source tree to measure")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--bsz", type=int, default=4)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--out", default=os.path.join(HERE, "results", "init_memory"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args)))
        return
    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": os.path.abspath(args.src)}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--label", args.label, "--model", args.model,
           "--bsz", str(args.bsz), "--iters", str(args.iters)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, f"{args.label}.json"), row)
    rows = [json.load(open(os.path.join(args.out, f))) for f in sorted(os.listdir(args.out)) if f.endswith(".json")]
    print(markdown_table(rows, ["label", "layers", "rss_before_mb", "init_peak_mb", "held_after_init_mb"]))


if __name__ == "__main__":
    main()
