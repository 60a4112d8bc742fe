"""How distinct are the LoRA-FA variants from LoRA-One? Principal angles between their init subspaces (SPEC §2.5).

For the preset's model and the same init statistics batches as `convergence.py` (its `data_split` and
`init_batches` at `--seed`), the statistics are collected once (`lorafa.stats.collect_stats`, kinds=("kfac",): the
mean gradient G, Σ and C) and every init is computed from them with `lorafa.peft_bridge.compute_init` (nothing is
written into the model). Per target layer and variant, against LoRA-One:

- B side: the cosines of the principal angles between span(B_variant) and span(B_lora_one) (column spaces in R^m);
- A side: the same between span(A_variantᵀ) and span(A_lora_oneᵀ) (row spaces of A, in R^n).

A cosine of 1 is a shared direction, 0 an orthogonal one; with ranks r_1, r_2 there are min(r_1, r_2) of them.
Written under `--out` (each file atomically): `subspaces.json` (every layer's cosines, per variant and side, and
the timings), `summary.csv`/`summary.md` (per variant and side: mean and min over layers and directions, and the mean
over layers of each layer's smallest cosine) and `subspaces.png` (each layer's mean cosine, per variant).

    python benchmarks/subspaces.py --preset causal --out benchmarks/results/subspaces_causal
    python benchmarks/subspaces.py --variants lora_fa lora_fa:target=natural,reg=1e-2 --out /tmp/sub

Variants default to `lora_fa` and every LoRA-FA spec of convergence.ABLATION.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convergence  # noqa: E402
from common import device_info, pick_device, save_figure, write_json, write_table  # noqa: E402

REFERENCE = "lora_one"
VARIANTS = ["lora_fa"] + [s for s in convergence.ABLATION if convergence.parse_spec(s)[0] == "lora_fa"]
COLUMNS = ["variant", "side", "layers", "mean cos", "min cos", "mean of layer min"]


def principal_cosines(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the column spaces of X (d × k) and Y (d × l), in descending order
    (min(k, l) values in [0, 1]): orthonormal bases by reduced QR, then the singular values of Q_xᵀ Q_y. Computed in
    float64. X and Y should have full column rank (a dependent column adds an arbitrary direction)."""
    if X.dim() != 2 or Y.dim() != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"need two matrices with the same number of rows, got {tuple(X.shape)} and {tuple(Y.shape)}")
    qx = torch.linalg.qr(X.detach().to(torch.float64), mode="reduced").Q
    qy = torch.linalg.qr(Y.detach().to(torch.float64), mode="reduced").Q
    return torch.linalg.svdvals(qx.T @ qy).clamp(0.0, 1.0)


def layer_cosines(variant: dict, reference: dict) -> dict:
    """{layer: {"B": [cosines], "A": [cosines]}} for the layers both inits have with a rank > 0 (InitResult-like
    values with .A (r × n) and .B (m × r))."""
    out = {}
    for name, ref in reference.items():
        res = variant.get(name)
        if res is None or res.A.shape[0] == 0 or ref.A.shape[0] == 0:
            continue
        out[name] = {"B": principal_cosines(res.B, ref.B).tolist(), "A": principal_cosines(res.A.T, ref.A.T).tolist()}
    return out


def summary_rows(cosines: dict) -> list[dict]:
    """Per variant and side: layers, mean and min over all layers' cosines, mean over layers of each layer's min."""
    rows = []
    for variant, layers in cosines.items():
        for side in ("B", "A"):
            per_layer = [v[side] for v in layers.values() if v[side]]
            flat = [c for cs in per_layer for c in cs]
            rows.append({"variant": variant, "side": f"{side} ({'columns' if side == 'B' else 'rows'})",
                         "layers": len(per_layer),
                         "mean cos": statistics.mean(flat) if flat else None, "min cos": min(flat) if flat else None,
                         "mean of layer min": statistics.mean(min(cs) for cs in per_layer) if per_layer else None})
    return rows


def plot(cosines: dict, out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), sharey=True)
    for ax, side in zip(axes, ("B", "A")):
        for variant, layers in cosines.items():
            ys = [statistics.mean(v[side]) if v[side] else float("nan") for v in layers.values()]
            ax.plot(range(len(ys)), ys, marker=".", ms=3, lw=0.8, label=variant)
        ax.set(xlabel="target layer (model order)", ylabel="mean principal-angle cosine vs LoRA-One",
               title=f"{title}: span({'B' if side == 'B' else 'Aᵀ'})", ylim=(-0.02, 1.02))
        ax.legend(fontsize=6)
    save_figure(fig, os.path.join(out, "subspaces.png"))
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(convergence.PRESETS), default="causal")
    ap.add_argument("--variants", nargs="+", default=None, help="lora_fa specs (default: lora_fa and the ablation's)")
    ap.add_argument("--reference", default=REFERENCE, help="the spec every variant is compared with")
    ap.add_argument("--seed", type=int, default=0, help="the seed of the init statistics batches (convergence.py's)")
    ap.add_argument("--n-val", type=int, default=None, help="as convergence.py's (it changes the init batches' pool)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--no-rslora", action="store_true")
    ap.add_argument("--gsm8k", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1)))
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    from lorafa import InitConfig
    from lorafa.peft_bridge import compute_init
    from lorafa.stats import collect_stats

    p = convergence.PRESETS[args.preset]
    if args.n_val is not None:
        p = dataclasses.replace(p, n_val=args.n_val)
    variants = args.variants or VARIANTS
    specs = [args.reference] + [v for v in variants if v != args.reference]
    configs = {}
    for spec in specs:
        name, prec, options = convergence.parse_spec(spec)
        if prec:
            raise SystemExit(f"{spec!r}: +prec is a training option; the init is the same without it")
        configs[spec] = InitConfig(method=name, bsz=p.init_bsz, iters=p.init_iters, seed=args.seed, **options)
    os.makedirs(args.out, exist_ok=True)
    device, dtype = pick_device(args.device)
    task, model, _, collate = convergence.load_everything(p, args, device, dtype)
    split = convergence.data_split(len(task.train), p.n_val, p.init_bsz * p.init_iters, args.seed)
    batches = [convergence.to_device(b, device) for b in convergence.init_batches(task, collate, p, split["init"])]
    lora_cfg = convergence.lora_config(p, args, task, True)
    t0 = time.perf_counter()
    stats = collect_stats(model, batches, lora_cfg, kinds=("kfac",), progress=False)
    timings = {"statistics_s": time.perf_counter() - t0}
    inits = {}
    for spec, cfg in configs.items():
        t0 = time.perf_counter()
        inits[spec] = compute_init(model, lora_cfg, cfg, stats=stats, batches=batches, progress=False)
        timings[spec] = time.perf_counter() - t0
        logging.info("%s: %d layers in %.1f s", spec, len(inits[spec]), timings[spec])
    reference = inits.pop(args.reference)
    cosines = {spec: layer_cosines(res, reference) for spec, res in inits.items()}
    rows = summary_rows(cosines)
    title = f"{args.preset}: principal-angle cosines against {args.reference}"
    write_json(os.path.join(args.out, "subspaces.json"), {
        "reference": args.reference, "variants": list(cosines), "seed": args.seed,
        "preset": dataclasses.asdict(p), "args": vars(args), "device": device_info(), "timings_s": timings,
        "rows": rows, "cosines": cosines, "command": sys.argv})
    md = write_table(rows, COLUMNS, os.path.join(args.out, "summary"), title)
    plot(cosines, args.out, args.preset)
    print(md)


if __name__ == "__main__":
    main()
