"""Cost of the statistics pass against its floor, its memory, the gradient sketch's accuracy, PEFT's
`preprocess_loraga` on the same batches, and the pass under 2 processes (torchrun, gloo on CPU).

The floor is the plain forward+backward passes over the same batches with only the target weights requiring grad
(what any gradient-based init must at least run). Every measurement runs in a fresh process, after one warm-up
batch, so peak-memory figures do not inherit an earlier phase's allocations.

    python benchmarks/stats_cost.py --gsm8k ../shared/data/gsm8k --out benchmarks/results/stats_cpu

Columns: seconds, ratio to the floor, statistics held (the accumulators' bytes, a shared input covariance counted
once), peak memory above the loaded model (CUDA allocator peak on GPU, resident-set high-water mark on CPU; it
includes the activations the floor needs too), and for sketches the smallest principal-angle cosine between the
sketch's top-r singular subspaces and the exact gradient's, over all layers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import MALLOC_ENV, PeakMemory, device_info, pick_device, timed, write_json, write_table  # noqa: E402

# the results table's columns, in order (stats_cost.csv/.md; benchmarks/tables.py renders the docs' tables from them)
COLUMNS = ["mode", "processes", "s", "× floor", "held MB", "held / target fp32", "peak MB above model", "decompose s",
           "min_cos", "median_cos", "mean_cos2", "captured", "median_rel_err", "speed-up vs 1 process",
           "max rel diff vs 1 process"]

TARGETS = {"qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"],
           "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def setup(args):
    from lorafa.data import CausalLMCollator
    from lorafa.data.datasets import load_task
    from lorafa.models import load_causal_lm
    from lorafa.stats import stat_batches
    from lorafa.targets import resolve_targets

    device, dtype = pick_device(args.device)
    task = load_task("gsm8k", path=args.gsm8k, seed=0)
    model, tok = load_causal_lm(args.model, dtype=dtype)
    model.to(device).eval()
    batches = stat_batches(task.train, CausalLMCollator(tok, max_length=args.max_length), args.bsz, args.iters, seed=0)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    targets = sorted(resolve_targets(model, TARGETS[args.targets]))
    return model, batches, targets, device


def floor(model, batches, targets) -> None:
    """The plain passes, gradients accumulated in `.grad` across batches as a training step or PEFT's
    `preprocess_loraga` would (lorafa.demo.floor_pass frees them per batch instead, which times the same)."""
    modules = dict(model.named_modules())
    flags = {id(p): p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    for n in targets:
        modules[n].weight.requires_grad_(True)
    for b in batches:
        model(**b).loss.backward()
    for n in targets:
        modules[n].weight.grad = None
    for p in model.parameters():
        p.requires_grad_(flags[id(p)])


def worker(args) -> dict:
    """One measurement in this process; prints a JSON line (rank 0)."""
    from lorafa.demo import stats_bytes
    from lorafa.stats import collect_stats, save_stats
    from lorafa.stats.distributed import world

    torch.set_num_threads(args.threads)
    if "RANK" in os.environ:
        torch.distributed.init_process_group("gloo")
    model, batches, targets, device = setup(args)
    mode, out = args.worker, {"mode": args.worker, "world": world()[1], "threads": args.threads}
    if mode.endswith("_fsdp2"):  # each decoder block one FSDP2 unit: its weights are row shards across the ranks
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world()[1],))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        mode = mode[: -len("_fsdp2")]
        collect_stats(model, batches[:1], targets, kinds=("grad",), progress=False)  # warm-up, all ranks together
    else:
        floor(model, batches[:1], targets)  # warm-up
    out["weights_mb_per_rank"] = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
                                     for p in model.parameters()) / 2**20
    modules = dict(model.named_modules())
    out["target_fp32_mb"] = sum(modules[n].weight.numel() for n in targets) * 4 / 2**20
    if world()[1] > 1:
        torch.distributed.barrier()
    with PeakMemory(device) as mem, timed(device) as t:
        if mode == "floor":
            floor(model, batches, targets)
            stats = None
        elif mode == "peft_lora_ga":
            from peft import LoraConfig, LoraGAConfig
            from peft.tuners.lora.loraga import preprocess_loraga

            cfg = LoraConfig(r=args.rank, target_modules=TARGETS[args.targets], init_lora_weights="lora_ga",
                             lora_ga_config=LoraGAConfig())

            def train_step():
                for b in batches:
                    model(**b).loss.backward()

            preprocess_loraga(model, cfg, train_step)
            stats = {n: modules[n]._peft_loraga_grad for n in targets}
        else:
            kinds = ("kfac",) if mode == "kfac" else ("grad",)
            sketch = int(mode.split("_k")[1]) if mode.startswith("sketch") else None
            stats = collect_stats(model, batches, targets, kinds=kinds, sketch=sketch, progress=False,
                                  accumulate_on="cpu" if mode == "grad_offload" else None)
    if world()[1] > 1:
        torch.distributed.barrier()
    out.update(seconds=t["s"], peak_mb=mem.mb)
    if stats is not None:
        out["held_mb"] = (sum(v.numel() * 4 for v in stats.values()) if mode == "peft_lora_ga"
                          else stats_bytes(stats)) / 2**20
    if mode in ("grad", "kfac", "peft_lora_ga"):  # the decomposition and surgery after the pass
        out.update(decompose(model, stats, mode, args, device))
    if stats is not None and mode != "peft_lora_ga" and world()[0] == 0:
        save_stats(stats, os.path.join(args.out, f"stats_{args.worker}_w{world()[1]}.safetensors"))
    if world()[0] == 0:
        print("RESULT " + json.dumps(out), flush=True)
    return out


def decompose(model, stats, mode, args, device) -> dict:
    """Seconds and peak memory of turning the statistics into a PEFT model (decomposition + surgery)."""
    from peft import LoraConfig, LoraGAConfig, get_peft_model

    from lorafa import InitConfig, initialize

    with PeakMemory(device) as mem, timed(device) as t:
        if mode == "peft_lora_ga":
            cfg = LoraConfig(r=args.rank, target_modules=TARGETS[args.targets], init_lora_weights="lora_ga",
                             lora_ga_config=LoraGAConfig())
            get_peft_model(model, cfg)
        else:
            method = "lora_fa" if mode == "kfac" else "lora_ga"
            cfg = LoraConfig(r=args.rank, lora_alpha=16, use_rslora=True, target_modules=TARGETS[args.targets])
            initialize(model, cfg, InitConfig(method=method), stats=stats, progress=False)
    return {"decompose_s": t["s"], "decompose_peak_mb": mem.mb}


def launch(args, mode: str, world_size: int = 1, threads: int | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--threads", str(threads or args.threads)]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k in ("gsm8k", "model", "bsz", "iters", "max_length", "rank", "targets", "device", "out")]
    if world_size > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world_size}",
               f"--master_port={port}", *cmd[1:]]
    logging.info("%s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV,
                                                                         "OMP_NUM_THREADS": str(threads or args.threads)})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def sketch_accuracy(out: str, mode: str, rank: int) -> dict:
    from lorafa.stats import load_stats
    from lorafa.stats.sketch import subspace_agreement

    exact = load_stats(os.path.join(out, "stats_grad_w1.safetensors"))
    sk = load_stats(os.path.join(out, f"stats_{mode}_w1.safetensors"))
    agree = [subspace_agreement(exact[n].grad, sk[n].grad_sketch.reconstruct(), rank) for n in exact]
    cos = [min(a["min_cos_left"], a["min_cos_right"]) for a in agree]
    return {"min_cos": min(cos), "median_cos": statistics.median(cos),
            "mean_cos2": statistics.mean(a["mean_cos2"] for a in agree),
            "captured": statistics.mean(a["captured"] for a in agree),
            "median_rel_err": statistics.median(a["rel_err_rank_r"] for a in agree)}


def equality(out: str, kind: str, two_kind: str | None = None) -> float:
    """Largest relative difference between the 2-process and the 1-process statistics."""
    from lorafa.stats import load_stats

    one = load_stats(os.path.join(out, f"stats_{kind}_w1.safetensors"))
    two = load_stats(os.path.join(out, f"stats_{two_kind or kind}_w2.safetensors"))
    worst = 0.0
    for n, st in one.items():
        for k, t in st.tensors().items():
            worst = max(worst, float((two[n].tensors()[k] - t).abs().max() / t.abs().max()))
    return worst


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gsm8k", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k"))
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--bsz", type=int, default=4)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8, help="r: the sketch accuracy is measured on the top-r subspaces")
    ap.add_argument("--targets", choices=sorted(TARGETS), default="qkvo")
    ap.add_argument("--sketches", type=int, nargs="*", default=[12, 24, 48], help="sketch sizes k (l = 2k + 1)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-multiprocess", action="store_true", help="skip the 2-process (torchrun) rows")
    ap.add_argument("--fsdp", action="store_true", help="only the FSDP2 comparison: grad and kfac on 1 process, "
                    "2 plain processes and 2 FSDP2 processes (fully_shard per decoder block), into stats_fsdp.*")
    ap.add_argument("--out", required=True)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.worker:
        worker(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device, _ = pick_device(args.device)
    if args.fsdp:
        fsdp_table(args)
        return
    modes = ["floor", "grad", "kfac", *[f"sketch_k{k}" for k in args.sketches], "peft_lora_ga"]
    if device.type == "cuda":
        modes.insert(2, "grad_offload")
    res = {m: launch(args, m) for m in modes}
    rows = []
    fl = res["floor"]
    for m, r in res.items():
        row = {"mode": m, "processes": 1, "s": round(r["seconds"], 2), "× floor": round(r["seconds"] / fl["seconds"], 2),
               "held MB": round(r.get("held_mb", 0.0), 1), "held / target fp32": round(r.get("held_mb", 0) / r["target_fp32_mb"], 3),
               "peak MB above model": round(r["peak_mb"]), "decompose s": round(r["decompose_s"], 2) if "decompose_s" in r else None}
        if m.startswith("sketch"):
            row.update(sketch_accuracy(args.out, m, args.rank))
        rows.append(row)
    if not args.no_multiprocess and device.type == "cpu":
        for kind in ("floor", "grad"):
            r = launch(args, kind, world_size=2, threads=max(1, args.threads // 2))
            row = {"mode": kind, "processes": 2, "s": round(r["seconds"], 2),
                   "× floor": round(r["seconds"] / fl["seconds"], 2), "peak MB above model": round(r["peak_mb"]),
                   "speed-up vs 1 process": round(res[kind]["seconds"] / r["seconds"], 2)}
            if kind == "grad":
                row["max rel diff vs 1 process"] = equality(args.out, "grad")
            rows.append(row)
    title = (f"Statistics pass: {args.model}, {args.targets} ({res['grad']['target_fp32_mb']:.0f} MB of target weights "
             f"in fp32), GSM8K {args.bsz}×{args.iters} examples, {device_info()['device']}, {args.threads} threads")
    md = write_table(rows, COLUMNS, os.path.join(args.out, "stats_cost"), title)
    write_json(os.path.join(args.out, "stats_cost.json"), {"rows": rows, "raw": res, "device": device_info(),
                                                          "args": vars(args), "time": time.ctime()})
    for f in os.listdir(args.out):  # the statistics files served the comparisons; they are large
        if f.endswith(".safetensors"):
            os.remove(os.path.join(args.out, f))
    print(md)


FSDP_COLUMNS = ["mode", "processes", "sharding", "threads per process", "s", "speed-up vs 1 process",
                "weights MB per rank", "peak MB above model", "held MB", "max rel diff vs 1 process"]


def fsdp_table(args) -> None:
    """The pass on 1 process, on 2 processes with a full model each (DDP-style), and on 2 processes under FSDP2."""
    half = max(1, args.threads // 2)
    rows, raw = [], {}
    for kind in ("grad", "kfac"):
        one = raw[f"{kind}_w1"] = launch(args, kind)
        for sharding, mode in (("none", kind), ("FSDP2", f"{kind}_fsdp2")):
            two = raw[f"{mode}_w2"] = launch(args, mode, world_size=2, threads=half)
            rows.append({"mode": kind, "processes": 2, "sharding": sharding, "threads per process": half,
                         "s": round(two["seconds"], 2), "speed-up vs 1 process": round(one["seconds"] / two["seconds"], 2),
                         "weights MB per rank": round(two["weights_mb_per_rank"]),
                         "peak MB above model": round(two["peak_mb"]), "held MB": round(two.get("held_mb", 0.0), 1),
                         "max rel diff vs 1 process": f"{equality(args.out, kind, mode):.1e}"})
        rows.insert(len(rows) - 2, {"mode": kind, "processes": 1, "sharding": "none", "threads per process": args.threads,
                                    "s": round(one["seconds"], 2), "weights MB per rank": round(one["weights_mb_per_rank"]),
                                    "peak MB above model": round(one["peak_mb"]), "held MB": round(one.get("held_mb", 0.0), 1)})
    title = (f"Statistics pass under FSDP2: {args.model}, {args.targets}, GSM8K {args.bsz}×{args.iters} examples, "
             f"{device_info()['device']}, {args.threads} threads in all")
    md = write_table(rows, FSDP_COLUMNS, os.path.join(args.out, "stats_fsdp"), title)
    write_json(os.path.join(args.out, "stats_fsdp.json"), {"rows": rows, "raw": raw, "device": device_info(),
                                                          "args": vars(args), "time": time.ctime()})
    for f in os.listdir(args.out):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(args.out, f))
    print(md)


if __name__ == "__main__":
    main()
