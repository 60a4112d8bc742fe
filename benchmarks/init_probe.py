"""What the init alone does, before any training: the held-out loss right after each init (validation problems
carved from the training data, and test problems), the initial step's size, the line search's tries and the rank
allocation, for many init variants on ONE statistics pass. Cheap (forward passes only after the pass), so it is
where the damping λ of the `natural` target and the step options are swept before the training benchmark.

    python benchmarks/init_probe.py --out benchmarks/results/init_probe_causal \
        --specs lora_one lora_fa lora_fa:target=natural,reg=1e-2 lora_fa:scale=line_search

Specs are `method[:key=value,...]` with InitConfig keys. Same model, data, statistics batches and held-out problems
as `convergence.py --preset causal` (statistics batches drawn the same way, outside the validation problems) (SmolLM2-135M-Instruct on GSM8K, r = 8, α = 16, rsLoRA on q, k, v, o).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_info, pick_device, write_json, write_table  # noqa: E402
from convergence import PRESETS, heldout, load_everything, lora_config, parse_spec, probe_head, to_device  # noqa: E402


def init_batches(task, p, seed, exclude=()):
    pool = [i for i in range(len(task.train)) if i not in set(exclude)]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[: p.init_bsz * p.init_iters]
    return [[pool[int(j)] for j in order[b * p.init_bsz:(b + 1) * p.init_bsz]] for b in range(p.init_iters)]


def table_rows(data: dict) -> list[dict]:
    """The table of an `init_probe.json` (one row per init, as strings; the base model's losses last): what this
    script prints and what benchmarks/tables.py puts in the docs."""
    rows = []
    for spec, r in data["runs"].items():
        ls = r["summary"].get("line_search")
        ranks = r["summary"].get("ranks")
        rows.append({"init": spec, "val loss": f"{r['val_loss']:.4f}", "test loss": f"{r['test_loss']:.4f}",
                     "median ‖ΔW‖₂": "—" if r["step_norm_median"] is None else f"{r['step_norm_median']:.3g}",
                     "line-search factor": f"{ls['chosen']:g}" if ls else "—",
                     "search-batch loss: base → chosen": (f"{ls['loss_before']:.3f} → {ls['loss_chosen']:.3f}"
                                                          if ls else "—"),
                     "ranks (min–max)": (f"{min(ranks['ranks'].values())}–{max(ranks['ranks'].values())}"
                                         if ranks else "fixed"),
                     "init s": f"{r['init_s']:.1f}"})
    rows.append({"init": "(base model, before any init)", "val loss": f"{data['base']['val']:.4f}",
                 "test loss": f"{data['base']['test']:.4f}", "median ‖ΔW‖₂": "0", "line-search factor": "—",
                 "search-batch loss: base → chosen": "—", "ranks (min–max)": "—", "init s": "—"})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--specs", nargs="+", required=True)
    ap.add_argument("--preset", default="causal")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-val", type=int, default=64)
    ap.add_argument("--n-test", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--no-rslora", action="store_true")
    ap.add_argument("--gsm8k", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--search-iters", type=int, default=0, help="line search on this many other training batches "
                    "(disjoint from the statistics and validation problems) instead of the statistics batches")
    ap.add_argument("--probe", action="store_true", help="classification: fit the head on frozen features first "
                    "(the set-up where a fixed init step overshoots)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    from lorafa import InitConfig, collect_stats, initialize, load_stats, save_stats
    from lorafa.saving import init_record

    p = PRESETS[args.preset]
    device, dtype = pick_device(args.device)
    task, model, _, collate = load_everything(p, args, device, dtype)
    val_idx = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(10_000 + args.seed))[: args.n_val].tolist()
    val = [task.train[i] for i in val_idx]
    test = task.test[: args.n_test]
    if args.probe:
        model.classifier.load_state_dict(probe_head(model, task, collate, device, args.seed, exclude=val_idx))
    stat_idx = init_batches(task, p, args.seed, exclude=val_idx)
    batches = [to_device(collate([task.train[i] for i in b]), device) for b in stat_idx]
    search = None
    if args.search_iters:
        used = set(val_idx) | {i for b in stat_idx for i in b}
        pool = [i for i in range(len(task.train)) if i not in used]
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(20_000 + args.seed))
        search = [to_device(collate([task.train[pool[int(j)]] for j in order[k * p.init_bsz:(k + 1) * p.init_bsz]]),
                            device) for k in range(args.search_iters)]
    base = {"val": heldout(model, val, collate, device)["loss"], "test": heldout(model, test, collate, device)["loss"]}
    t = time.perf_counter()
    cfg0 = lora_config(p, args, task, True)
    cache = os.path.join(args.out, f"stats_s{args.seed}.safetensors")  # not committed (.gitignore)
    if os.path.exists(cache):
        stats = load_stats(cache, device=device)
    else:
        stats = collect_stats(model, batches, cfg0, kinds=("kfac",), progress=False)
        save_stats(stats, cache)
    stats_s = time.perf_counter() - t
    runs = {}
    saved = os.path.join(args.out, "init_probe.json")
    if os.path.exists(saved):  # add to the specs measured before on the same set-up (same base losses)
        with open(saved) as f:
            old = json.load(f)
        if old["base"] == base and old["args"]["seed"] == args.seed:
            runs = {k: v for k, v in old["runs"].items() if k not in args.specs}
    for spec in args.specs:
        name, _, options = parse_spec(spec)
        init = InitConfig(method=name, bsz=p.init_bsz, iters=p.init_iters, seed=args.seed, **options)
        work = copy.deepcopy(model)
        t = time.perf_counter()
        pm = initialize(work, lora_config(p, args, task, True), init, stats=stats,
                        batches=batches if init.line_search else None, search_batches=search, progress=False)
        init_s = time.perf_counter() - t
        rec = init_record(pm)
        steps = [i.get("step_norm") for i in rec.infos.values() if i.get("step_norm") is not None]
        res = {"spec": spec, "val_loss": heldout(pm, val, collate, device)["loss"],
               "test_loss": heldout(pm, test, collate, device)["loss"], "init_s": init_s,
               "step_norm_median": float(torch.tensor(steps).median()) if steps else None,
               "summary": rec.summary, "infos": {n: {k: v for k, v in i.items() if k != "h_sigma"}
                                                 for n, i in rec.infos.items()}}
        runs[spec] = res
        print(spec, {k: res[k] for k in ("val_loss", "test_loss", "step_norm_median", "init_s")}, flush=True)
        del pm, work
        write_json(os.path.join(args.out, "init_probe.json"),
                   {"base": base, "stats_s": stats_s, "runs": runs, "args": vars(args), "device": device_info()})
    rows = table_rows({"base": base, "runs": runs})  # every spec in the folder, this invocation's and earlier ones
    md = write_table(rows, list(rows[0]), os.path.join(args.out, "init_probe"),
                     f"Held-out loss right after the init (before: val {base['val']:.4f}, test {base['test']:.4f})")
    print(md)


if __name__ == "__main__":
    main()
