"""What fits where (issue 24): `lorafa.plan_init` on the real models' shapes, built on the meta device in bf16 (their
checkpoints' dtype; nothing is downloaded or allocated), for each target set and init: the statistics held at once
in one pass, the smallest budget that works (the largest layer unit, which never splits), the passes and the
predicted peak under a few budgets, and the factorisations' predicted time on this machine.

    python benchmarks/fits.py --out benchmarks/results/fits

The predicted peak is the plan's: weights + the largest group's statistics + the larger of one layer's weight
gradient and the factorisation workspace; activations (one training step's on the statistics batch) come on top.
The factorisation time is predicted from small decompositions timed on this machine's CPU, with every whitener a
Cholesky (statistics with more tokens than the widths) and, beside it, with every Cholesky an eigh (fewer tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_info, write_json, write_table  # noqa: E402

MODELS = {  # the published configs' widths, depth and vocabulary
    "SmolLM2-135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "SmolLM2-1.7B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True),
    "Llama-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256),
    "Llama-3-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256),
}
TARGETS = {"all linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "q, k, v, o": ["q_proj", "k_proj", "v_proj", "o_proj"]}
BUDGETS = {"8 GiB": 8 << 30, "32 GiB": 32 << 30}
GIB = 2 ** 30


def plan_row(model_name: str, targets: str, method: str, r: int) -> dict:
    from peft import LoraConfig
    from transformers import LlamaConfig

    from lorafa import InitConfig, plan_init
    from lorafa.plan import input_units

    config = LlamaConfig(dtype=torch.bfloat16, **MODELS[model_name])
    lc = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS[targets])
    init = InitConfig(method=method, svd="auto")
    one = plan_init(config, lc, init)
    smallest = max(sum(lp.total for lp in unit) for unit in input_units(one.layers))
    row = {"model": model_name, "targets": targets, "method": method, "stats_gib": one.stats_bytes / GIB,
           "min_budget_gib": smallest / GIB, "weights_gib": one.weights_bytes / GIB,
           "one_pass_peak_gib": one.predicted_peak / GIB,
           "factorisation_s": sum(f["seconds"] for f in one.factorisations),
           "worst_factorisation_s": sum(f["worst_seconds"] for f in one.factorisations), "budgets": {}}
    for label, budget in BUDGETS.items():
        if budget < smallest:
            row["budgets"][label] = None  # below one layer unit's statistics: refused
            continue
        plan = plan_init(config, lc, init, memory=budget, timings=False)
        row["budgets"][label] = {"passes": plan.passes, "peak_gib": plan.predicted_peak / GIB}
    return row


def _fmt_time(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else (f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h")


def summarise(rows: list[dict], out: str) -> str:
    from lorafa.plan import fmt_bytes

    def size(gib: float) -> str:
        return fmt_bytes(gib * GIB)

    table = []
    for r in rows:
        entry = {"model": r["model"], "targets": r["targets"], "method": r["method"],
                 "statistics, one pass": size(r["stats_gib"]), "smallest budget": size(r["min_budget_gib"]),
                 "weights (bf16)": size(r["weights_gib"])}
        for label in BUDGETS:
            b = r["budgets"][label]
            entry[f"passes at {label}"] = "—" if b is None else str(b["passes"])
            entry[f"peak at {label}"] = "—" if b is None else size(b["peak_gib"])
        entry["factorisations (Cholesky / eigh)"] = (f"{_fmt_time(r['factorisation_s'])} / "
                                                     f"{_fmt_time(r['worst_factorisation_s'])}")
        table.append(entry)
    brief = [{k: e[k] for k in ("model", "statistics, one pass", "smallest budget", "passes at 8 GiB",
                                "peak at 8 GiB", "factorisations (Cholesky / eigh)")}
             for e in table if e["method"] == "lora_fa" and e["targets"] == "all linear"]
    write_table(brief, list(brief[0]), os.path.join(out, "brief"),
                "What fits where: LoRA-FA on every linear layer (statistics fp32, weights bf16)")
    return write_table(table, list(table[0]), os.path.join(out, "summary"),
                       "What fits where: the plan on the real models' shapes (statistics fp32, weights bf16)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--methods", nargs="+", default=["lora_fa", "lora_ga"])
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the timed decompositions")
    ap.add_argument("--out", required=True)
    ap.add_argument("--summary-only", action="store_true", help="rebuild the tables from runs.json")
    args = ap.parse_args(argv)
    if args.summary_only:
        print(summarise(json.load(open(os.path.join(args.out, "runs.json")))["rows"], args.out))
        return
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for model_name in args.models:
        for targets in TARGETS:
            for method in args.methods:
                rows.append(plan_row(model_name, targets, method, args.r))
                print(rows[-1], flush=True)
    write_json(os.path.join(args.out, "runs.json"), {"rows": rows, "device": device_info(), "r": args.r,
                                                     "threads": args.threads})
    print(summarise(rows, args.out))


if __name__ == "__main__":
    main()
