"""The factorisations at scale (issue 24, item 4): the time of each decomposition the inits run, against its size,
beside the time `lorafa.plan_init` predicts for it (a small decomposition timed on the device, scaled by the flops:
`plan.decomposition_flops`).

Each decomposition runs once on a random positive definite matrix (covariances: B·Bᵀ/k + I, the shape of a
statistics sum; SVDs: a random m × n matrix) in the precision lorafa uses at that size: LoRA-FA's whiteners are a
Cholesky in fp64 up to 4096 and in fp32 above (eigh where the Cholesky fails), EVA's Σ is an eigh in the same rule,
and the gradient SVDs of the Llama-3-8B / 70B projection shapes take the range finder (svd="auto" and "randomized"
start there; `methods.common.EXACT_SVD_MAX_DIM` = 128 is the largest side the exact SVD is taken for).
The accuracy of each path is the SVD benchmark's (svd_accuracy.py) and the SPEC's; this one measures time.

    python benchmarks/factorisations.py --out benchmarks/results/factorisations               # CPU, sizes to 8192
    python benchmarks/factorisations.py --device cuda --sizes 4096 8192 14336 28672 --out ...  # a lent GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_info, save_figure, write_json, write_table  # noqa: E402

from lorafa.plan import _calibrate, decomposition_flops  # noqa: E402

SVD_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192), (8192, 28672)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _covariance(d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(d)
    b = torch.randn(d, d, generator=g, device=device, dtype=torch.float32)
    a = (b @ b.T).div_(d).to(dtype)
    a.diagonal().add_(1.0)
    return a


def time_one(kind: str, m: int, n: int, device: torch.device, rank: int) -> dict:
    """One decomposition: measured seconds (after an untimed small one of the same kind, which loads the library),
    the plan's predicted seconds, the precision."""
    from lorafa.methods.common import randomized_svd

    if kind in ("cholesky", "eigh"):
        dtype = torch.float64 if m <= 4096 else torch.float32
        x = _covariance(m, dtype, device)
        fn = torch.linalg.cholesky if kind == "cholesky" else torch.linalg.eigh
        q = None
    else:
        dtype = torch.float32
        x = torch.randn(m, n, generator=torch.Generator(device=device).manual_seed(m + n), device=device)
        q = min(2 * rank + 10, m, n)
        fn = (lambda a: torch.linalg.svd(a, full_matrices=False)) if kind == "svd" else (
            lambda a: randomized_svd(a, rank))
    fn(x[:64, :64].contiguous() if kind in ("cholesky", "eigh") else x[:256, :256].contiguous())  # loads the library
    _sync(device)
    t0 = time.perf_counter()
    fn(x)
    _sync(device)
    seconds = time.perf_counter() - t0
    predicted = _calibrate(kind, dtype, device) * decomposition_flops(kind, m, n, q)
    del x
    return {"op": kind, "m": m, "n": n, "dtype": str(dtype).replace("torch.", ""), "seconds": seconds,
            "predicted_s": predicted}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    ap.add_argument("--eigh-max", type=int, default=8192, help="the largest eigh to run (they are ~10× a Cholesky)")
    ap.add_argument("--svd-max", type=int, default=14336, help="the largest side of the SVD shapes to run")
    ap.add_argument("--exact-svd-max", type=int, default=4096, help="the largest exact SVD to run")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for d in args.sizes:
        for kind in ("cholesky", "eigh"):
            if kind == "eigh" and d > args.eigh_max:
                continue
            rows.append(time_one(kind, d, d, device, args.rank))
            print(rows[-1], flush=True)
    for m, n in SVD_SHAPES:
        if max(m, n) > args.svd_max:
            continue
        rows.append(time_one("range_finder", m, n, device, args.rank))
        print(rows[-1], flush=True)
        if max(m, n) <= args.exact_svd_max:
            rows.append(time_one("svd", m, n, device, args.rank))
            print(rows[-1], flush=True)
    write_json(os.path.join(args.out, "runs.json"), {"rows": rows, "device": device_info(),
                                                     "threads": torch.get_num_threads()})
    table = [{"op": r["op"], "shape": f"{r['m']}×{r['n']}", "precision": r["dtype"],
              "measured s": f"{r['seconds']:.2f}", "predicted s": f"{r['predicted_s']:.2f}",
              "measured / predicted": f"{r['seconds'] / r['predicted_s']:.2f}"} for r in rows]
    print(write_table(table, list(table[0]), os.path.join(args.out, "summary"),
                      f"Factorisation time against size ({device.type}, {torch.get_num_threads()} threads)"))
    plot(rows, args.out)


def plot(rows: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, kind in enumerate(("cholesky", "eigh")):
        pts = sorted((r["m"], r["seconds"], r["predicted_s"]) for r in rows if r["op"] == kind)
        if pts:
            d, s, p = zip(*pts)
            ax.loglog(d, s, "o-", color=f"C{i}", label=f"{kind} (measured)")
            ax.loglog(d, p, ":", color=f"C{i}", label=f"{kind} (plan)")
    ax.set_xlabel("d (a d × d covariance)")
    ax.set_ylabel("seconds")
    ax.set_title("Whitener factorisations: time against size")
    ax.legend(fontsize=8)
    save_figure(fig, os.path.join(out, "factorisations.png"))
    plt.close(fig)


if __name__ == "__main__":
    main()
