"""Statistics memory at scale (issue 24): one pass against grouped sweeps (`InitConfig(stats_memory=...)`), on
random-weight Llama models built from configs with real layer shapes, every linear layer targeted; and the plan's
prediction (`lorafa.plan_init`) against the measured peak.

Each row is one fresh process (started with MALLOC_ENV, so freed memory leaves the resident set): the model is built
and its batches made, then `compute_init` runs under `common.PeakMemory` (the peak resident memory above the level
after the model was built: the statistics, the pass's transients and activations, the factorisations' workspace).
The plan's prediction to compare is `predicted_peak - weights_bytes` (the largest group + the pass's transient).

    python benchmarks/stats_memory.py --out benchmarks/results/stats_memory                 # the default rows
    python benchmarks/stats_memory.py --shapes llama3-8b --blocks 2 --modes one block --out ...

Modes: `one` (no budget: every layer's statistics at once), `block` (a budget of one block's statistics: a group per
block), `auto` (stats_memory="auto": half the free memory), `sharded` (2 processes, gloo, `stats_sharding=True`:
each process holds its owned layers' statistics; each process's peak is measured, the row reports the larger, and
the prediction is the larger process's owned bytes, from `plan.assign_owners`, plus the transient). `--summary-only`
rebuilds the table and plot.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import MALLOC_ENV, PeakMemory, device_info, save_figure, write_json, write_table  # noqa: E402

SHAPES = {  # the real models' widths (from their config.json); depth and vocabulary set per row
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=32),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(shape: str, blocks: int, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, num_hidden_layers=blocks, max_position_embeddings=256, **SHAPES[shape])
    return LlamaForCausalLM(cfg).eval()


def batches(n: int, bsz: int, seq: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (bsz, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def warm_up(model, batch) -> None:
    """One forward and backward and each decomposition once, outside the measurement: the libraries' first calls
    allocate their own workspaces and thread pools (about 0.1 GiB here), which are not the statistics'."""
    out = model(**batch)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    a = torch.randn(64, 64, dtype=torch.float64)
    a = a @ a.T + 64 * torch.eye(64, dtype=torch.float64)
    for x in (a, a.float()):
        torch.linalg.cholesky(x), torch.linalg.eigh(x), torch.linalg.svd(x), torch.linalg.qr(x)
        torch.linalg.solve_triangular(torch.linalg.cholesky(x), x, upper=False)
    del out


def run_row(job: dict) -> dict:
    from peft import LoraConfig

    from lorafa import InitConfig, plan_init
    from lorafa.peft_bridge import _compute_init

    torch.set_num_threads(job["threads"])
    model = build(job["shape"], job["blocks"], job["vocab"])
    data = batches(job["iters"], job["bsz"], job["seq"], job["vocab"])
    lc = LoraConfig(r=job["r"], lora_alpha=2 * job["r"], target_modules=TARGETS, lora_dropout=0.0)
    options = dict(method=job["method"], iters=job["iters"], svd="randomized", **_reg(job))
    full = plan_init(model, lc, InitConfig(**options), timings=False)
    memory = {"one": None, "block": full.stats_bytes // job["blocks"] + 1, "auto": "auto"}[job["mode"]]
    init = InitConfig(**options, stats_memory=memory)
    plan = plan_init(model, lc, init, tokens=_tokens(data))
    warm_up(model, data[0])
    t0 = time.perf_counter()
    with PeakMemory(torch.device("cpu")) as mem:
        _, _, summary, _ = _compute_init(model, lc, init, None, data, None, False)
    res = dict(job, seconds=time.perf_counter() - t0, measured_peak=mem.peak_bytes, stats_bytes=plan.stats_bytes,
               passes=len(plan.groups), largest_group=max(plan.group_bytes), transient=plan.transient_bytes,
               predicted=plan.predicted_peak - plan.weights_bytes, weights=plan.weights_bytes,
               groups_run=summary.get("stats_groups", [len(plan.layers)]), device=device_info(),
               predicted_factorisation_s=sum(f["seconds"] for f in plan.factorisations), tokens=plan.tokens)
    write_json(job["path"], res)
    return res


def _reg(job: dict) -> dict:
    """LoRA-FA's damping when the row sets one (--reg): the 8B-width rows use 1e-3 so that their 128-token
    covariances stay positive definite and the whiteners take Cholesky; at the default 1e-6 they take eigh, about
    15× longer (a 14336² eigh is hours on one CPU thread), which changes the time and not the memory."""
    return {} if job.get("reg") is None else {"reg": job["reg"]}


def _tokens(data: list[dict]) -> int:
    return int(sum(int(b["attention_mask"].sum()) for b in data))


SHARDED_WORLD = 2


def _sharded_rank(rank: int, port: int, job: dict) -> None:
    """One process of a `sharded` row: its share of the batches (batch b on rank b mod world), its peak."""
    import torch.distributed as dist
    from peft import LoraConfig

    from lorafa import InitConfig
    from lorafa.peft_bridge import _compute_init

    torch.set_num_threads(job["threads"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=SHARDED_WORLD)
    try:
        model = build(job["shape"], job["blocks"], job["vocab"])
        data = batches(job["iters"], job["bsz"], job["seq"], job["vocab"])
        lc = LoraConfig(r=job["r"], lora_alpha=2 * job["r"], target_modules=TARGETS, lora_dropout=0.0)
        init = InitConfig(method=job["method"], iters=job["iters"], svd="randomized", stats_sharding=True,
                          **_reg(job))
        warm_up(model, data[0])
        dist.barrier()
        t0 = time.perf_counter()
        with PeakMemory(torch.device("cpu")) as mem:
            _compute_init(model, lc, init, None, data[rank::SHARDED_WORLD], None, False)
        write_json(f"{job['path']}.rank{rank}", {"peak": mem.peak_bytes, "seconds": time.perf_counter() - t0})
    finally:
        dist.destroy_process_group()


def run_sharded(job: dict) -> dict:
    """A `sharded` row: SHARDED_WORLD fresh processes (spawned from the main process: pool workers cannot start
    processes); the plan's per-process statistics from the owners `initialize` assigns."""
    import socket

    import torch.multiprocessing as tmp
    from peft import LoraConfig

    from lorafa import InitConfig, plan_init
    from lorafa.plan import assign_owners

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tmp.spawn(_sharded_rank, args=(port, job), nprocs=SHARDED_WORLD, join=True)
    ranks = [json.load(open(f"{job['path']}.rank{r}")) for r in range(SHARDED_WORLD)]
    for r in range(SHARDED_WORLD):
        os.remove(f"{job['path']}.rank{r}")
    model = build(job["shape"], job["blocks"], job["vocab"])
    lc = LoraConfig(r=job["r"], lora_alpha=2 * job["r"], target_modules=TARGETS, lora_dropout=0.0)
    plan = plan_init(model, lc, InitConfig(method=job["method"], iters=job["iters"], svd="randomized", **_reg(job)),
                     timings=False, tokens=_tokens(batches(job["iters"], job["bsz"], job["seq"], job["vocab"])))
    owners = assign_owners(plan.layers, SHARDED_WORLD)
    held = [sum(lp.total for lp in plan.layers if owners[lp.name] == r) for r in range(SHARDED_WORLD)]
    res = dict(job, seconds=max(r["seconds"] for r in ranks), measured_peak=max(r["peak"] for r in ranks),
               rank_peaks=[r["peak"] for r in ranks], stats_bytes=plan.stats_bytes, passes=1,
               largest_group=max(held), rank_stats_bytes=held, transient=plan.transient_bytes,
               predicted=max(held) + max(plan.transient_bytes, plan.workspace_bytes), weights=plan.weights_bytes,
               groups_run=[len(plan.layers)], device=device_info())
    write_json(job["path"], res)
    return res


def _gb(x: float) -> str:
    return f"{x / 2**30:.2f}"


def summarise(out: str) -> str:
    rows = [json.load(open(os.path.join(out, "runs", f))) for f in sorted(os.listdir(os.path.join(out, "runs")))
            if f.endswith(".json")]  # not a sharded row's per-rank files while it runs
    rows.sort(key=lambda r: (list(SHAPES).index(r["shape"]), r["method"], r["blocks"], r["mode"]))
    table = [{"shape": r["shape"], "blocks": r["blocks"], "method": r["method"], "mode": r["mode"],
              "passes": r["passes"], "statistics GiB (all layers)": _gb(r["stats_bytes"]),
              "largest group GiB": _gb(r["largest_group"]), "predicted peak GiB": _gb(r["predicted"]),
              "measured peak GiB": _gb(r["measured_peak"]),
              "measured / predicted": f"{r['measured_peak'] / r['predicted']:.2f}", "init s": f"{r['seconds']:.1f}",
              "predicted factorisations s": (f"{r['predicted_factorisation_s']:.1f}"
                                             if "predicted_factorisation_s" in r else ""),
              "damping": r.get("reg") or "1e-06"}
             for r in rows]
    md = write_table(table, list(table[0]), os.path.join(out, "summary"),
                     "Statistics memory: one pass against grouped sweeps (peak above the loaded model)")
    plot(rows, out)
    return md


def plot(rows: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (shape, method) in enumerate(sorted({(r["shape"], r["method"]) for r in rows})):
        for mode, style in (("one", "-o"), ("block", "--s"), ("sharded", ":^")):
            pts = sorted((r["blocks"], r["measured_peak"] / 2**30) for r in rows
                         if r["shape"] == shape and r["method"] == method and r["mode"] == mode)
            if pts:
                ax.plot(*zip(*pts), style, color=f"C{i}", label=f"{shape} {method} ({mode})")
    ax.set_xlabel("blocks (depth)")
    ax.set_ylabel("measured peak above the model (GiB)")
    ax.set_title("One pass grows with depth; one group per block stays flat")
    ax.legend(fontsize=7)
    save_figure(fig, os.path.join(out, "stats_memory.png"))
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["smollm2-135m"], choices=sorted(SHAPES))
    ap.add_argument("--blocks", nargs="+", type=int, default=[2, 4, 8])
    ap.add_argument("--modes", nargs="+", default=["one", "block"], choices=["one", "block", "auto", "sharded"])
    ap.add_argument("--methods", nargs="+", default=["lora_fa"])
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--bsz", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reg", type=float, default=None, help="LoRA-FA's damping (default: the library's, 1e-6)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--summary-only", action="store_true")
    args = ap.parse_args(argv)
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    if not args.summary_only:
        os.environ.update(MALLOC_ENV)
        jobs = [dict(shape=s, blocks=b, mode=mo, method=me, vocab=args.vocab, iters=args.iters, bsz=args.bsz,
                     seq=args.seq, r=args.r, threads=args.threads, reg=args.reg,
                     path=os.path.join(args.out, "runs", f"{s}_{me}_b{b}_{mo}.json"))
                for s in args.shapes for me in args.methods for b in args.blocks for mo in args.modes]
        todo = [j for j in jobs if not os.path.exists(j["path"])]
        def report(r):
            print(f"{r['shape']} {r['method']} blocks={r['blocks']} {r['mode']}: measured "
                  f"{_gb(r['measured_peak'])} GiB, predicted {_gb(r['predicted'])} GiB, {r['seconds']:.1f} s",
                  flush=True)

        for j in todo:
            if j["mode"] == "sharded":
                report(run_sharded(j))
        with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
            for r in pool.imap(run_row, [j for j in todo if j["mode"] != "sharded"]):
                report(r)
    print(summarise(args.out))


if __name__ == "__main__":
    main()
