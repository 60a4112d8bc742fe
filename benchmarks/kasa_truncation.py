"""What KaSA's base truncation alone does to the embedded model (SPEC §9): each linear layer loses its r smallest
singular pairs, as PEFT's `KasaConfig` does when the adapter is added, before any training.

    python benchmarks/kasa_truncation.py --out benchmarks/results/kasa_truncation

For each kind of layer of SmolLM2-135M-Instruct (q/k/v/o, gate/up/down), it measures the share of the Frobenius
norm the r smallest pairs carry, ‖S[k−r:]‖ / ‖S‖ (min and max over the model's layers). It then measures the
language-model loss on the first `--n` training examples of the main job's task, leg_counting (prompt and
solution, every token), in three cases: the base model, every layer of one kind truncated, and every linear layer
truncated (the main job's `all-linear` KaSA).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_info, write_json, write_table  # noqa: E402

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def truncated(W: torch.Tensor, r: int) -> tuple[torch.Tensor, float]:
    """([W]_{k−r}, the share of ‖W‖_F in the r dropped pairs), in fp32."""
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    k = S.numel()
    return (U[:, : k - r] * S[: k - r]) @ Vh[: k - r], float(S[k - r:].norm() / S.norm())


@torch.no_grad()
def lm_loss(model, batches) -> float:
    losses = [model(**b, labels=b["input_ids"]).loss.item() for b in batches]
    return sum(losses) / len(losses)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rank", type=int, default=8, help="r: the pairs KaSA drops (the main job's lora_r)")
    ap.add_argument("--n", type=int, default=16, help="leg_counting training examples for the loss")
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lorafa.data.datasets import load_task
    from lorafa.models import load_causal_lm

    model, tok = load_causal_lm(args.model, dtype=torch.float32)
    model.eval()
    task = load_task("leg_counting", seed=0, n_train=args.n, n_test=1)
    batches = [tok(ex["prompt"] + ex["answer"], return_tensors="pt") for ex in task.train[: args.n]]
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(KINDS)}
    original = {n: m.weight.detach().clone() for n, m in linears.items()}
    cut, share = {}, {}
    for n, W in original.items():
        cut[n], share[n] = truncated(W, args.rank)
    base = lm_loss(model, batches)
    rows = []
    for kind in KINDS + ("all",):
        for n, m in linears.items():
            m.weight.data = cut[n] if kind == "all" or n.endswith(kind) else original[n]
        shares = [s for n, s in share.items() if kind == "all" or n.endswith(kind)]
        rows.append({"layers truncated": kind, "count": len(shares), "dropped share min": min(shares),
                     "dropped share max": max(shares), "LM loss": lm_loss(model, batches), "base LM loss": base})
    os.makedirs(args.out, exist_ok=True)
    cols = ["layers truncated", "count", "dropped share min", "dropped share max", "LM loss", "base LM loss"]
    print(write_table(rows, cols, os.path.join(args.out, "truncation"),
                      f"KaSA's truncation of the r={args.rank} smallest pairs, {args.model}, no training"))
    write_json(os.path.join(args.out, "meta.json"), {"args": vars(args), "command": sys.argv, "device": device_info(),
                                                    "examples": f"leg_counting train[:{args.n}] (seed 0)"})


if __name__ == "__main__":
    main()
