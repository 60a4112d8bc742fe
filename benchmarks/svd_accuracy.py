"""Accuracy and cost of the randomized SVD against the exact one, on the matrices the init methods decompose.

For every target layer of the real model (all linear layers by default) it forms the matrices `top_svd` is called
on, exactly as the methods form them:

    fa_H    −H̃ = −F_Cᵀ Ḡ F_Σ   (lora_fa, k = r; the whitened cross term, Whitener as in lora_fa_init)
    G       −G                 (lora_one, k = r)
    G_2r    G                  (lora_ga, k = 2r)
    W       W                  (pissa and the weight_svd scale, k = r)

and compares each SVD variant's top-k triplets with an fp64 `torch.linalg.svd` of the same fp32 matrix:

    sin       max(‖sin Θ(U, U*)‖₂, ‖sin Θ(V, V*)‖₂), the largest principal-angle sine of the left/right subspaces
    prod_err  ‖U S Vᵀ − [M]_k‖_F / ‖[M]_k‖_F
    gap       σ_k / σ_{k+1} (how well defined the top-k subspace is), flat = σ_{q+1}/σ_k, q = 2k + 10

Variants: `randomized` (top_svd(svd="randomized"), the range finder `auto` used above 128 dimensions), `exact`
(top_svd(svd="exact"): fp64 up to 512, fp32 above), `auto` (top_svd(svd="auto"), whatever the current rule picks),
and range-finder variants `rs_p{niter}` (more power iterations). It also times the whole-model LoRA-FA decomposition
(`compute_init`, statistics given) with svd = randomized / auto / exact.

    python benchmarks/svd_accuracy.py --out benchmarks/results/svd_accuracy

The statistics (kfac: G, C, Σ) are collected once and cached in --stats-cache (outside the repository).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_info, write_json, write_table  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = ("fa_H", "G", "G_2r", "W")


def collect(args):
    """(model, stats) — the kfac statistics over `iters` GSM8K batches of `bsz`, cached in args.stats_cache."""
    from lorafa import collect_stats, load_stats, save_stats, stat_batches
    from lorafa.data import CausalLMCollator
    from lorafa.data.datasets import load_task
    from lorafa.models import load_causal_lm
    from lorafa.targets import resolve_targets

    model, tok = load_causal_lm(args.model, dtype=torch.float32)
    model.eval()
    targets = sorted(resolve_targets(model, ALL))
    if os.path.exists(args.stats_cache):
        return model, load_stats(args.stats_cache)
    task = load_task("gsm8k", path=args.gsm8k, seed=0)
    batches = stat_batches(task.train, CausalLMCollator(tok, max_length=args.max_length), args.bsz, args.iters, seed=0)
    t0 = time.perf_counter()
    stats = collect_stats(model, batches, targets, kinds=("kfac",), progress=False)
    logging.info("statistics pass: %.1f s, %d layers", time.perf_counter() - t0, len(stats))
    save_stats(stats, args.stats_cache)
    return model, stats


def matrices(weight, st, r):
    """(kind, M, k) exactly as lora_fa / lora_one / lora_ga / pissa hand them to top_svd."""
    from lorafa.methods.lora_fa import LoraFAOptions, whitener

    opts = LoraFAOptions()
    relative = opts.reg_mode == "relative"
    wc, ws = whitener(st.out_cov, opts.reg, relative), whitener(st.in_cov, opts.reg, relative)
    h = wc.t_mul(ws.t_mul(st.cross.T).T)
    return [("fa_H", -h.float(), r), ("G", -st.grad, r), ("G_2r", st.grad, 2 * r), ("W", weight.float(), r)]


def range_finder(M, k, seed, niter):
    from lorafa.methods.common import randomized_svd

    return randomized_svd(M, k, seed=seed, niter=niter)


def variants(niters):
    from lorafa.methods.common import top_svd

    out = {"randomized": lambda M, k, s: top_svd(M, k, "randomized", s)[:3],
           "exact": lambda M, k, s: top_svd(M, k, "exact", s)[:3],
           "auto": lambda M, k, s: top_svd(M, k, "auto", s)}
    for p in niters:
        out[f"rs_p{p}"] = lambda M, k, s, p=p: range_finder(M, k, s, p)
    return out


def sin_theta(X, Xref):
    """‖(I − Xref Xrefᵀ) X‖₂ for orthonormal columns (fp64): the largest principal-angle sine."""
    X = X.double()
    return float(torch.linalg.matrix_norm(X - Xref @ (Xref.T @ X), 2))


def compare(U, S, Vh, ref, k) -> dict:
    U0, S0, Vh0 = ref
    Mk = (U0[:, :k] * S0[:k]) @ Vh0[:k]
    approx = (U.double() * S.double()) @ Vh.double()
    return {"sin": max(sin_theta(U, U0[:, :k]), sin_theta(Vh.T, Vh0[:k].T)),
            "prod_err": float(torch.linalg.norm(approx - Mk) / torch.linalg.norm(Mk))}


def timed_call(fn, *a, reps=1):
    best, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn(*a)
        best = min(best, time.perf_counter() - t0)
    return out, best


def measure_layer(name, weight, st, r, fns, seed) -> list[dict]:
    rows = []
    for kind, M, k in matrices(weight, st, r):
        ref = torch.linalg.svd(M.double(), full_matrices=False)
        S0 = ref[1]
        q = min(2 * k + 10, min(M.shape) - 1)
        base = {"layer": name, "type": name.rsplit(".", 1)[-1], "kind": kind, "shape": f"{M.shape[0]}x{M.shape[1]}",
                "r": r, "k": k, "gap": float(S0[k - 1] / S0[k]), "flat": float(S0[q] / S0[k - 1])}
        for vname, fn in fns.items():
            res, secs = timed_call(fn, M, k, seed)
            used = res[3] if len(res) == 4 else vname
            rows.append({**base, "variant": vname, "used": used, "s": secs, **compare(*res[:3], ref, k)})
    return rows


def whole_model_time(model, stats, r, mode) -> float:
    from peft import LoraConfig

    from lorafa import InitConfig, compute_init

    cfg = LoraConfig(r=r, lora_alpha=16, use_rslora=True, target_modules=ALL)
    t0 = time.perf_counter()
    compute_init(model, cfg, InitConfig(method="lora_fa", svd=mode), stats=stats, progress=False)
    return time.perf_counter() - t0


def summarise(rows) -> list[dict]:
    out = []
    keys = sorted({(r["kind"], r["r"], r["variant"]) for r in rows}, key=lambda t: (KINDS.index(t[0]), t[1], t[2]))
    for kind, r, v in keys:
        sel = [x for x in rows if (x["kind"], x["r"], x["variant"]) == (kind, r, v)]
        for typ in [None, *sorted({x["type"] for x in sel})]:
            s = [x for x in sel if typ is None or x["type"] == typ]
            out.append({"kind": kind, "r": r, "variant": v, "type": typ or "ALL", "layers": len(s),
                        "max sin": max(x["sin"] for x in s), "median sin": statistics.median(x["sin"] for x in s),
                        "max prod_err": max(x["prod_err"] for x in s),
                        "median prod_err": statistics.median(x["prod_err"] for x in s),
                        "> 1e-3": sum(x["sin"] > 1e-3 for x in s), "total s": sum(x["s"] for x in s),
                        "min gap": min(x["gap"] for x in s), "max flat": max(x["flat"] for x in s),
                        "used": "/".join(sorted({x["used"] for x in s}))})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gsm8k", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k"))
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--bsz", type=int, default=4)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--niters", type=int, nargs="*", default=[8, 16], help="range-finder variants' power iterations")
    ap.add_argument("--layers", type=int, default=None, help="only the first N target layers (sorted names)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stats-cache", default="/tmp/lorafa_svd_accuracy_stats.safetensors")
    ap.add_argument("--no-whole-model", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    model, stats = collect(args)
    modules = dict(model.named_modules())
    names = sorted(stats)[: args.layers]
    fns = variants(args.niters)
    rows = []
    for r in args.ranks:
        for i, name in enumerate(names):
            rows += measure_layer(name, modules[name].weight.detach(), stats[name], r, fns, seed=i)
        logging.info("r=%d done", r)
    summary = summarise(rows)
    cols = ["kind", "r", "variant", "type", "layers", "max sin", "median sin", "max prod_err", "median prod_err",
            "> 1e-3", "total s", "min gap", "max flat", "used"]
    print(write_table(summary, cols, os.path.join(args.out, "svd_accuracy"), title="top-k SVD vs fp64 exact"))
    whole = {}
    if not args.no_whole_model:
        sub = {n: stats[n] for n in names}
        for r in args.ranks:
            for mode in ("randomized", "auto", "exact"):
                whole[f"r{r}_{mode}"] = min(whole_model_time(model, sub, r, mode) for _ in range(2))
        print("\nwhole-model lora_fa compute_init seconds (best of 2):", whole)
    write_json(os.path.join(args.out, "svd_accuracy.json"),
               {"args": vars(args), "device": device_info(), "whole_model_lora_fa_s": whole, "summary": summary,
                "layers": rows})


if __name__ == "__main__":
    main()
