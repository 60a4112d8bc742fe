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
and range-finder variants `rs_p{niter}` (more power iterations). Results: svd_accuracy.{md,csv,json} (and
_by_type.{md,csv}). It also times the whole-model `compute_init` (statistics given: whiteners, SVDs, scales) of
lora_fa, lora_one, lora_ga and pissa with svd = randomized / auto / exact: whole_model.{md,csv,json}.

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


def matrices(weight, st):
    """(kind, M, k per unit of r) exactly as lora_fa / lora_one / lora_ga / pissa hand them to top_svd."""
    from lorafa.methods.lora_fa import LoraFAOptions, whitener

    opts = LoraFAOptions()
    relative = opts.reg_mode == "relative"
    wc, ws = whitener(st.out_cov, opts.reg, relative), whitener(st.in_cov, opts.reg, relative)
    h = wc.t_mul(ws.t_mul(st.cross.T).T)
    return [("fa_H", -h.float(), 1), ("G", -st.grad, 1), ("G_2r", st.grad, 2), ("W", weight.float(), 1)]


def variants(niters):
    """name -> fn(M, k, seed) -> (U, S, Vh[, used])."""
    from lorafa.methods.common import randomized_svd, top_svd

    out = {"randomized": lambda M, k, s: top_svd(M, k, "randomized", s),
           "exact": lambda M, k, s: top_svd(M, k, "exact", s),
           "auto": lambda M, k, s: top_svd(M, k, "auto", s)}
    for p in niters:
        out[f"rs_p{p}"] = lambda M, k, s, p=p: randomized_svd(M, k, seed=s, niter=p)
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


def measure_layer(name, weight, st, ranks, fns, seed) -> list[dict]:
    """One row per (matrix kind, r, variant), against an fp64 SVD of the same fp32 matrix."""
    from lorafa.methods.common import RANDOMIZED_NITER, _range_finder, iterations_needed, range_finder_error

    rows, refs = [], {}
    for kind, M, per_r in matrices(weight, st):
        if kind == "G_2r":  # SVD(G) = (−U) S Vᵀ from SVD(−G)
            U0, S0, Vh0 = refs["G"]
            ref = (-U0, S0, Vh0)
        else:
            ref = refs[kind] = torch.linalg.svd(M.double(), full_matrices=False)
        S0 = ref[1]
        for r in ranks:
            k = per_r * r
            q = min(2 * k + 10, min(M.shape))
            ritz = _range_finder(M, k, seed, RANDOMIZED_NITER)[1]
            flat = float(S0[q] / S0[k - 1]) if q < len(S0) else 0.0
            base = {"layer": name, "type": name.rsplit(".", 1)[-1], "kind": kind, "shape": f"{M.shape[0]}x{M.shape[1]}",
                    "r": r, "k": k, "gap": float(S0[k - 1] / S0[k]), "flat": flat,
                    "ritz_ratio": float(ritz[-1] / ritz[k - 1]), "predicted": range_finder_error(ritz, k),
                    "niter_needed": iterations_needed(ritz, k)}
            for vname, fn in fns.items():
                t0 = time.perf_counter()
                res = fn(M, k, seed)
                secs = time.perf_counter() - t0
                used = res[3] if len(res) == 4 else vname
                rows.append({**base, "variant": vname, "used": used, "s": secs, **compare(*res[:3], ref, k)})
    return rows


def whole_model_time(model, stats, r, method, mode) -> float:
    from peft import LoraConfig

    from lorafa import InitConfig, compute_init

    cfg = LoraConfig(r=r, lora_alpha=16, use_rslora=True, target_modules=sorted(stats))
    t0 = time.perf_counter()
    compute_init(model, cfg, InitConfig(method=method, svd=mode), stats=stats, progress=False)
    return time.perf_counter() - t0


def e(v) -> str:
    return f"{v:.1e}"


def summarise(rows, by_type: bool) -> list[dict]:
    out = []
    keys = sorted({(r["kind"], r["r"], r["variant"]) for r in rows}, key=lambda t: (KINDS.index(t[0]), t[1], t[2]))
    for kind, r, v in keys:
        sel = [x for x in rows if (x["kind"], x["r"], x["variant"]) == (kind, r, v)]
        for typ in sorted({x["type"] for x in sel}) if by_type else [None]:
            s = [x for x in sel if typ is None or x["type"] == typ]
            used = {u: sum(x["used"] == u for x in s) for u in sorted({x["used"] for x in s})}
            out.append({"kind": kind, "r": r, "variant": v, "type": typ or "all", "layers": len(s),
                        "max sin": e(max(x["sin"] for x in s)), "median sin": e(statistics.median(x["sin"] for x in s)),
                        "max prod_err": e(max(x["prod_err"] for x in s)),
                        "median prod_err": e(statistics.median(x["prod_err"] for x in s)),
                        "sin > 1e-3": sum(x["sin"] > 1e-3 for x in s), "total s": round(sum(x["s"] for x in s), 2),
                        "min gap": round(min(x["gap"] for x in s), 4), "max flat": round(max(x["flat"] for x in s), 3),
                        "max predicted": e(max(x["predicted"] for x in s)),
                        "used": " ".join(f"{u}:{c}" for u, c in used.items())})
    return out


def prediction_check(rows) -> dict:
    """How well range_finder_error predicts the range finder's measured error (variant `randomized`), and what
    `auto`'s threshold RANDOMIZED_TOL leaves to it."""
    from lorafa.methods.common import RANDOMIZED_TOL as tol

    rs = [x for x in rows if x["variant"] == "randomized"]
    conv = [x for x in rs if x["sin"] > 1e-4 and x["predicted"] > 1e-6]  # convergence-limited, above the fp32 floor
    kept = [x for x in rs if x["predicted"] <= tol]
    ratio = [x["sin"] / x["predicted"] for x in conv]
    return {"tol": tol, "cases": len(rs), "max sin/predicted": max(ratio, default=None),
            "median sin/predicted": statistics.median(ratio) if ratio else None,
            "kept randomized": len(kept), "kept with sin > 1e-3": sum(x["sin"] > 1e-3 for x in kept),
            "max sin kept": max((x["sin"] for x in kept), default=None),
            "min predicted with sin > 1e-3": min((x["predicted"] for x in rs if x["sin"] > 1e-3), default=None)}


def whole_model(model, stats, args) -> list[dict]:
    """compute_init over every target layer, statistics given (whiteners, SVDs, scales), interleaved repetitions."""
    times: dict = {}
    for _ in range(args.reps):
        for method in args.whole_methods:
            for mode in ("randomized", "auto", "exact"):
                times.setdefault((method, mode), []).append(whole_model_time(model, stats, args.ranks[0], method, mode))
    rows = []
    for method in args.whole_methods:
        row = {"method": method, "r": args.ranks[0]}
        for mode in ("randomized", "auto", "exact"):
            row[f"{mode} s"] = round(min(times[(method, mode)]), 2)
        rows.append(row)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gsm8k", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k"))
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--bsz", type=int, default=4)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--niters", type=int, nargs="*", default=[16], help="range-finder variants' power iterations")
    ap.add_argument("--layers", type=int, default=None, help="only the first N target layers (sorted names)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stats-cache", default="/tmp/lorafa_svd_accuracy_stats.safetensors")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--no-whole-model", action="store_true")
    ap.add_argument("--reps", type=int, default=3, help="whole-model timings: repetitions (min reported)")
    ap.add_argument("--whole-methods", nargs="*", default=["lora_fa", "lora_one", "lora_ga", "pissa"],
                    help="methods whose whole-model compute_init is timed with svd = randomized / auto / exact")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    model, stats = collect(args)
    names = sorted(stats)[: args.layers]
    if not args.no_accuracy:
        accuracy(model, stats, names, args)
    if not args.no_whole_model:
        rows = whole_model(model, {n: stats[n] for n in names}, args)
        title = f"whole-model compute_init seconds (min of {args.reps}; svd = randomized / auto / exact)"
        print(write_table(rows, list(rows[0]), os.path.join(args.out, "whole_model"), title=title))
        write_json(os.path.join(args.out, "whole_model.json"),
                   {"args": vars(args), "device": device_info(), "rows": rows})


def accuracy(model, stats, names, args) -> None:
    modules = dict(model.named_modules())
    fns = variants(args.niters)
    rows = []
    t0 = time.perf_counter()
    for i, name in enumerate(names):
        rows += measure_layer(name, modules[name].weight.detach(), stats[name], args.ranks, fns, seed=i)
        logging.info("%d/%d %s (%.0f s)", i + 1, len(names), name, time.perf_counter() - t0)
    cols = ["kind", "r", "variant", "type", "layers", "max sin", "median sin", "max prod_err", "median prod_err",
            "sin > 1e-3", "total s", "min gap", "max flat", "max predicted", "used"]
    summary, by_type = summarise(rows, False), summarise(rows, True)
    print(write_table(summary, cols, os.path.join(args.out, "svd_accuracy"),
                      title="top-k SVD vs fp64 exact SVD, all target layers"))
    write_table(by_type, cols, os.path.join(args.out, "svd_accuracy_by_type"), title="by layer type")
    check = prediction_check(rows)
    print("range_finder_error as a predictor:", check)
    write_json(os.path.join(args.out, "svd_accuracy.json"),
               {"args": vars(args), "device": device_info(), "prediction_check": check, "summary": summary,
                "by_type": by_type, "layers": rows})


if __name__ == "__main__":
    main()
