"""Convergence of LoRA inits side by side: PEFT's own (default LoRA, pissa, olora, lora_ga) against lorafa's
(lora_ga, lora_one, lora_fa, with and without the prec_reg preconditioner), on the same data, seeds and optimiser.

Every run is one process (so init memory is measured cleanly), trains for a fixed number of steps and evaluates a
fixed held-out set every `--eval-every` steps. Runs are cached as JSON under `--out/runs/`, so an interrupted
benchmark resumes where it stopped. Phase 1 runs every method over the learning-rate grid at the first seed; phase 2
runs each method at its best rate (lowest final held-out loss) for the remaining seeds. Then the summary: steps to
reach default LoRA's final held-out loss, final loss, accuracy, init time and init peak memory, as markdown + CSV,
and plots (held-out curves, the grid).

    python benchmarks/convergence.py --preset causal --gsm8k ../shared/data/gsm8k --out benchmarks/results/causal
    python benchmarks/convergence.py --preset classification --seeds 0 1 2 --out benchmarks/results/cls
    python benchmarks/convergence.py --preset classification --probe --seeds 0 1 2 --out benchmarks/results/cls_probe

Method specs: `name[+prec][:key=value,...]`, e.g. `lora_fa+prec:stable_gamma=16`. Names: lora, pissa, olora,
peft_lora_ga (PEFT's), lora_ga, lora_one, lora_fa, corda, eva, milora, full (full fine-tuning).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import multiprocessing as mp
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import MALLOC_ENV, PeakMemory, device_info, pick_device, save_figure, timed, write_json, write_table  # noqa: E402

PEFT_INITS = {"lora": True, "pissa": "pissa", "olora": "olora", "peft_lora_ga": "lora_ga"}
METHODS = ["lora", "pissa", "olora", "peft_lora_ga", "lora_ga", "lora_one", "lora_fa", "lora_fa+prec"]


@dataclasses.dataclass
class Preset:
    model: str
    task: str
    targets: list
    batch: int
    steps: int
    eval_every: int
    n_heldout: int
    max_length: int
    lrs: list
    full_lrs: list
    init_bsz: int
    init_iters: int
    warmup: float = 0.05


PRESETS = {
    # the reference set-up: SmolLM2-135M, GSM8K, r=8 on q,k,v,o, batch 4
    "causal": Preset("smollm2-135m-instruct", "gsm8k", ["q_proj", "k_proj", "v_proj", "o_proj"], batch=4, steps=40,
                     eval_every=10, n_heldout=24, max_length=192, lrs=[5e-5, 2e-4, 8e-4], full_lrs=[2e-5],
                     init_bsz=4, init_iters=8),
    # the runner's classification preset: all-MiniLM-L6-v2 on rotten_tomatoes, LoRA on q,k,v
    # (batch 16 and 48 tokens, 90% of the reviews whole, so that 2 variants × 9 methods × 3 seeds fit on 2 CPU cores)
    "classification": Preset("all-minilm-l6-v2", "rotten_tomatoes", ["query", "key", "value"], batch=16, steps=60,
                             eval_every=5, n_heldout=128, max_length=48, lrs=[3e-4, 1e-3, 3e-3],
                             full_lrs=[3e-5, 1e-4, 3e-4], init_bsz=32, init_iters=4),
}


def parse_spec(spec: str) -> tuple[str, bool, dict]:
    """`lora_fa+prec:stable_gamma=16` -> ("lora_fa", True, {"stable_gamma": 16.0})."""
    head, _, opts = spec.partition(":")
    name, _, flag = head.partition("+")
    if flag not in ("", "prec"):
        raise ValueError(f"Unknown flag +{flag} in {spec!r}: the only flag is +prec (the prec_reg preconditioner).")
    options = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        for cast in (int, float, str):
            try:
                options[key] = cast(value)
                break
            except ValueError:
                continue
    return name, flag == "prec", options


# -- data and model --------------------------------------------------------------------------------------------
def load_everything(p: Preset, args, device, dtype):
    from lorafa.data import CausalLMCollator, ClassificationCollator
    from lorafa.data.datasets import load_task
    from lorafa.models import load_causal_lm, load_sequence_classifier

    if p.task == "gsm8k":
        task = load_task("gsm8k", path=args.gsm8k, seed=0)
        model, tok = load_causal_lm(p.model, dtype=dtype)
        collate = CausalLMCollator(tok, max_length=p.max_length)
    else:
        task = load_task(p.task, seed=0)
        model, tok = load_sequence_classifier(p.model, num_labels=task.num_labels, dtype=dtype)
        collate = ClassificationCollator(tok, max_length=p.max_length)
    return task, model.to(device), tok, collate


def train_order(task, p: Preset, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1000 + seed)
    need = p.batch * p.steps
    idx = torch.cat([torch.randperm(len(task.train), generator=g) for _ in range(math.ceil(need / len(task.train)))])
    return idx[:need].view(p.steps, p.batch).tolist()


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def heldout(model, examples, collate, device, batch_size=16) -> dict:
    """Mean loss over the held-out set (answer tokens for causal LMs, examples for classifiers) and accuracy."""
    was = model.training
    model.eval()
    total, weight, correct, is_cls = 0.0, 0, 0, False
    for i in range(0, len(examples), batch_size):
        b = to_device(collate(examples[i : i + batch_size]), device)
        out = model(**b)
        if b["labels"].dim() == 1:  # classification
            n, is_cls = b["labels"].numel(), True
            correct += int((out.logits.argmax(-1) == b["labels"]).sum())
        else:
            n = int((b["labels"][:, 1:] != -100).sum())
        total += float(out.loss) * n
        weight += n
    model.train(was)
    return {"loss": total / weight, "acc": correct / len(examples) if is_cls else None}


# -- linear probe (classification) --------------------------------------------------------------------------------
def probe_head(model, task, collate, device, seed: int, n: int = 1024, iters: int = 300) -> dict:
    """Fit the classification head on frozen features (logistic regression, full batch); returns its state dict."""
    head = model.classifier
    feats, labels = [], []
    handle = head.register_forward_hook(lambda m, a, o: feats.append(a[0].detach()))
    rows = task.train[:n]
    with torch.no_grad():
        model.eval()
        for i in range(0, len(rows), 64):
            b = to_device(collate(rows[i : i + 64]), device)
            labels.append(b["labels"])
            model(**b)
    handle.remove()
    x, y = torch.cat(feats).float(), torch.cat(labels)
    torch.manual_seed(seed)
    lin = torch.nn.Linear(x.shape[1], head.out_features).to(device)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    for _ in range(iters):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(x), y).backward()
        opt.step()
    return {"weight": lin.weight.detach().cpu(), "bias": lin.bias.detach().cpu()}


# -- one run ----------------------------------------------------------------------------------------------------
def lora_config(p: Preset, args, task, init):
    from peft import LoraConfig, TaskType

    return LoraConfig(r=args.rank, lora_alpha=args.alpha, use_rslora=not args.no_rslora, target_modules=p.targets,
                      init_lora_weights=init, lora_dropout=0.0,
                      task_type=TaskType.CAUSAL_LM if task.kind == "causal_lm" else TaskType.SEQ_CLS)


def build(spec: str, model, task, collate, p: Preset, args, seed: int, device):
    """The model to train (PEFT or full), after the method's init."""
    from peft import get_peft_model

    name, _, options = parse_spec(spec)
    init_batches = [collate([task.train[i] for i in idx]) for idx in
                    torch.randperm(len(task.train), generator=torch.Generator().manual_seed(seed))
                    [: p.init_bsz * p.init_iters].view(p.init_iters, p.init_bsz).tolist()]
    if name == "full":
        model.requires_grad_(True)
        return model
    if name in PEFT_INITS:
        cfg = lora_config(p, args, task, PEFT_INITS[name])
        if name == "peft_lora_ga":
            from peft import LoraGAConfig
            from peft.tuners.lora.loraga import preprocess_loraga

            cfg.lora_ga_config = LoraGAConfig(**options)

            def train_step():
                for b in init_batches:
                    model(**to_device(b, device)).loss.backward()

            preprocess_loraga(model, cfg, train_step)
        return get_peft_model(model, cfg)
    from lorafa import InitConfig, initialize

    init = InitConfig(method=name, bsz=p.init_bsz, iters=p.init_iters, seed=seed, **options)
    return initialize(model, lora_config(p, args, task, True), init,
                      batches=[to_device(b, device) for b in init_batches], progress=False)


def optimizer(model, lr: float, prec: bool, args):
    params = [q for q in model.parameters() if q.requires_grad]
    if prec:
        from peft.optimizers import create_riemannian_optimizer

        return create_riemannian_optimizer(model, torch.optim.AdamW, lr=lr, reg=args.prec_reg, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def schedule(step: int, p: Preset) -> float:
    warm = max(1, round(p.warmup * p.steps))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, p.steps - warm)))


def run_one(job: dict) -> dict:
    """Init + train + evaluate one (method, lr, seed); returns the result dict (and writes it to job["path"])."""
    args, p = argparse.Namespace(**job["args"]), Preset(**job["preset"])
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    device, dtype = pick_device(args.device)
    task, model, _, collate = load_everything(p, args, device, dtype)
    if job.get("probe") is not None:
        model.classifier.load_state_dict(torch.load(job["probe"]))
    seed = job["seed"]
    torch.manual_seed(seed)
    heldout_set = task.test[: p.n_heldout]
    res = {"method": job["method"], "lr": job["lr"], "seed": seed, "device": device_info()}
    res["base_loss"] = heldout(model, heldout_set, collate, device)["loss"]  # before any init
    with PeakMemory(device) as mem, timed(device) as t:
        model = build(job["method"], model, task, collate, p, args, seed, device)
    res["init_s"], res["init_peak_mb"] = t["s"], mem.mb
    res["curve"] = [[0, heldout(model, heldout_set, collate, device)["loss"]]]  # after init
    _, prec, _ = parse_spec(job["method"])
    opt = optimizer(model, job["lr"], prec, args)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, p))
    model.train()
    train_losses = []
    t0 = time.perf_counter()
    for step, idx in enumerate(train_order(task, p, seed), start=1):
        loss = model(**to_device(collate([task.train[i] for i in idx]), device)).loss
        if not torch.isfinite(loss):
            res["diverged_at"] = step
            break
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        train_losses.append(loss.item())
        if step % p.eval_every == 0 or step == p.steps:
            res["curve"].append([step, heldout(model, heldout_set, collate, device)["loss"]])
    res["train_s"] = time.perf_counter() - t0
    res["train_losses"] = train_losses
    if task.kind == "classification":
        res["test_acc"] = heldout(model, task.test, collate, device, batch_size=64)["acc"]
    res["final_loss"] = res["curve"][-1][1] if "diverged_at" not in res else float("inf")
    write_json(job["path"], res)
    return res


# -- orchestration ----------------------------------------------------------------------------------------------
def mid(lrs: list) -> float:
    return sorted(lrs)[len(lrs) // 2]


def run_id(method: str, lr: float, seed: int) -> str:
    return f"{method.replace(':', '_').replace(',', '_').replace('=', '')}_lr{lr:g}_s{seed}"


def run_jobs(jobs: list[dict], n_parallel: int, run: bool = True) -> list[dict]:
    """Run the jobs whose result file is missing (all cached ones are reused); returns the results present."""
    todo = [j for j in jobs if not os.path.exists(j["path"])]
    logging.info("%d runs (%d cached)", len(jobs), len(jobs) - len(todo))
    if todo and run:
        ctx = mp.get_context("spawn")
        with ctx.Pool(n_parallel, maxtasksperchild=1) as pool:
            for r in pool.imap_unordered(run_one, todo):
                logging.info("%-32s lr=%g seed=%d final=%.4f init %.1fs", r["method"], r["lr"], r["seed"],
                             r["final_loss"], r["init_s"])
    return [json.load(open(j["path"])) for j in jobs if os.path.exists(j["path"])]


def steps_to_reach(curve: list, target: float) -> float | None:
    """First step at which the held-out loss is <= target, linearly interpolated between evaluations."""
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return s0 + (s1 - s0) * ((l0 - target) / (l0 - l1) if l0 > target and l0 != l1 else 0.0)
    return None


def summary_tables(results: list[dict], methods: list[str]) -> dict:
    """The summary of a set of runs, without writing anything: `rows` (the summary table, one per method, as
    strings), `grid` (final loss per rate at the first seed), and the numbers behind them: `best_lr` and `best`
    (method -> its runs at that rate), `target` (default LoRA's mean final loss) and `ref_steps` (default LoRA's mean
    steps to it, the last step where a seed does not reach it)."""
    import statistics as st

    best_lr, grid = {}, []
    for m in methods:
        seed0 = [r for r in results if r["method"] == m and r["seed"] == min(x["seed"] for x in results)]
        for r in sorted(seed0, key=lambda r: r["lr"]):
            grid.append({"method": m, "lr": f"{r['lr']:g}", "final_loss": r["final_loss"]})
        best_lr[m] = min(seed0, key=lambda r: r["final_loss"])["lr"]
    best = {m: [r for r in results if r["method"] == m and r["lr"] == best_lr[m]] for m in methods}
    ref = "lora" if "lora" in best else methods[0]
    target = st.mean(r["final_loss"] for r in best[ref])
    ref_steps = st.mean(steps_to_reach(r["curve"], target) or r["curve"][-1][0] for r in best[ref])
    rows = []
    for m in methods:
        rs = best[m]
        steps = [steps_to_reach(r["curve"], target) for r in rs]
        reached = [s for s in steps if s is not None]

        def ms(vals, digits=3):
            vals = [v for v in vals if v is not None]
            if not vals:
                return None
            return f"{st.mean(vals):.{digits}f}" + (f" ± {st.stdev(vals):.{digits}f}" if len(vals) > 1 else "")

        rows.append({
            "method": m, "best lr": f"{best_lr[m]:g}", "seeds": len(rs),
            "loss at 0": ms([r["curve"][0][1] for r in rs]),
            "final loss": ms([r["final_loss"] for r in rs]),
            f"steps to {target:.3f}": ms(reached, 1) if len(reached) == len(rs) else f"{len(reached)}/{len(rs)} reach",
            "speed-up": f"{ref_steps / st.mean(reached):.2f}×" if len(reached) == len(rs) and reached else None,
            "test acc": ms([r.get("test_acc") for r in rs]),
            "init s": ms([r["init_s"] for r in rs], 1), "init peak MB": ms([r["init_peak_mb"] for r in rs], 0),
        })
    return {"rows": rows, "grid": grid, "best_lr": best_lr, "best": best, "target": target, "ref_steps": ref_steps}


def summarise(results: list[dict], methods: list[str], out: str, title: str) -> str:
    s = summary_tables(results, methods)
    md = write_table(s["rows"], list(s["rows"][0]), os.path.join(out, "summary"), title)
    md += "\n" + write_table(s["grid"], ["method", "lr", "final_loss"], os.path.join(out, "lr_grid"),
                             "Learning-rate grid (final held-out loss, first seed)")
    plot(s["best"], s["grid"], methods, s["target"], out, title)
    plot_bars(s["best"], methods, s["target"], s["ref_steps"], out, title)
    return md


def saved_runs(out: str) -> tuple[list[dict], list[str]]:
    """The runs cached under `<out>/runs/` and the method order of the benchmark that wrote `<out>/meta.json`
    (`--methods`, then `full` with `--full`): what `--summary-only` summarises, read without torch or the data."""
    with open(os.path.join(out, "meta.json")) as f:
        args = json.load(f)["args"]
    methods = list(args["methods"] or METHODS) + (["full"] if args.get("full") else [])
    runs_dir = os.path.join(out, "runs")
    results = []
    for name in sorted(os.listdir(runs_dir)):
        if name.endswith(".json"):
            with open(os.path.join(runs_dir, name)) as f:
                results.append(json.load(f))
    return results, [m for m in methods if any(r["method"] == m for r in results)]


def plot(best: dict, grid: list, methods: list, target: float, out: str, title: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for m in methods:
        curves = [r["curve"] for r in best[m]]
        steps = [s for s, _ in curves[0]]
        mean = [sum(c[i][1] for c in curves) / len(curves) for i in range(len(steps))]
        ax.plot(steps, mean, marker="o", ms=3, label=f"{m} (lr {best[m][0]['lr']:g})",
                ls="-" if not m.startswith(("lora", "pissa", "olora", "peft", "full")) or "_" in m else "--")
    ax.axhline(target, color="gray", lw=0.8, ls=":")
    ref = best["lora"] if "lora" in best else best[methods[0]]
    ax.set_ylim(target - 0.25 * (ref[0]["curve"][0][1] - target), ref[0]["curve"][0][1] * 1.05)  # outliers clipped
    ax.set(xlabel="step", ylabel="held-out loss", title=f"{title}: best lr per method")
    ax.legend(fontsize=7)
    for m in methods:
        pts = sorted((float(g["lr"]), g["final_loss"]) for g in grid if g["method"] == m)
        ax2.plot([a for a, _ in pts], [b if math.isfinite(b) else float("nan") for _, b in pts], marker="o", label=m)
    ax2.set(xscale="log", xlabel="learning rate", ylabel="final held-out loss", title="learning-rate grid")
    ax2.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax2.legend(fontsize=7)
    save_figure(fig, os.path.join(out, "convergence.png"))
    plt.close(fig)


def plot_bars(best: dict, methods: list, target: float, ref_steps: float, out: str, title: str) -> None:
    """Bars per method (best rate, mean over seeds): speed-up, final loss, test accuracy, init time, init memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean(m, f):
        vals = [f(r) for r in best[m]]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    def speed(r):
        s = steps_to_reach(r["curve"], target)
        return ref_steps / s if s else 0.0

    panels = [("speed-up to default LoRA's final loss\n(×, mean over seeds, 0 = not reached)", speed), ("final held-out loss", lambda r: r["final_loss"]),
              ("test accuracy", lambda r: r.get("test_acc")), ("init wall time (s)", lambda r: r["init_s"]),
              ("init peak memory (MB)", lambda r: r["init_peak_mb"])]
    panels = [p for p in panels if any(p[1](r) is not None for m in methods for r in best[m])]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4))
    for ax, (label, f) in zip(axes, panels):
        ax.bar(range(len(methods)), [mean(m, f) for m in methods], color="tab:blue")
        ax.set_xticks(range(len(methods)), methods, rotation=60, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
    fig.suptitle(title)
    save_figure(fig, os.path.join(out, "summary.png"))
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="causal")
    ap.add_argument("--methods", nargs="+", default=None, help=f"method specs (default: {' '.join(METHODS)})")
    ap.add_argument("--full", action="store_true", help="add full fine-tuning as a reference row (own lr grid)")
    ap.add_argument("--lrs", nargs="+", type=float, default=None, help="shared learning-rate grid")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--n-heldout", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--no-rslora", action="store_true")
    ap.add_argument("--prec-reg", type=float, default=1e-2, help="λ of the Riemannian preconditioner (+prec)")
    ap.add_argument("--probe", action="store_true", help="classification: fit the head on frozen features first")
    ap.add_argument("--gsm8k", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (CPU: split the cores between them)")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1)))
    ap.add_argument("--out", required=True)
    ap.add_argument("--summary-only", action="store_true", help="summarise the runs present, run nothing")
    ap.add_argument("--full-grid", action="store_true", help="run every rate, not only the ones that can win")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    preset = PRESETS[args.preset]
    if pick_device(args.device)[0].type == "cuda" and args.batch is None:  # the GPU recipe: a larger batch
        preset = dataclasses.replace(preset, batch=preset.batch * 4)
    p = dataclasses.replace(preset, **{k: v for k, v in dict(
        steps=args.steps, eval_every=args.eval_every, n_heldout=args.n_heldout, batch=args.batch,
        lrs=args.lrs).items() if v is not None})
    if args.probe and args.preset != "classification":
        ap.error("--probe is for the classification preset")
    methods = args.methods or list(METHODS)
    for m in methods:
        parse_spec(m)
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    os.environ.update(MALLOC_ENV)  # inherited by the spawned run processes (see common.PeakMemory)
    probe_files = {}
    if args.probe:
        device, dtype = pick_device(args.device)
        task, model, _, collate = load_everything(p, args, device, dtype)
        for s in args.seeds:
            probe_files[s] = os.path.join(args.out, f"probe_head_s{s}.pt")
            if not os.path.exists(probe_files[s]):
                torch.manual_seed(s)
                tmp = probe_files[s] + ".tmp"
                torch.save(probe_head(model, task, collate, device, s), tmp)
                os.replace(tmp, probe_files[s])
        del model

    def job(m, lr, s):
        return {"method": m, "lr": lr, "seed": s, "args": vars(args), "preset": dataclasses.asdict(p),
                "probe": probe_files.get(s), "path": os.path.join(args.out, "runs", run_id(m, lr, s) + ".json")}

    grid_methods = methods + (["full"] if args.full else [])
    lrs_of = {m: (p.full_lrs if m == "full" else p.lrs) for m in grid_methods}
    # the middle rate of every method first, then the higher one; the lower one only where the middle rate beat the
    # higher one (with a loss unimodal in the rate, it cannot win otherwise). `--full-grid` runs every rate.
    first = run_jobs([job(m, mid(lrs_of[m]), args.seeds[0]) for m in grid_methods], args.jobs, run=not args.summary_only)
    first += run_jobs([job(m, lr, args.seeds[0]) for m in grid_methods for lr in sorted(lrs_of[m]) if lr > mid(lrs_of[m])],
                      args.jobs, run=not args.summary_only)
    final = {(r["method"], r["lr"]): r["final_loss"] for r in first}
    lower = [job(m, lr, args.seeds[0]) for m in grid_methods for lr in sorted(lrs_of[m]) if lr < mid(lrs_of[m])
             and (args.full_grid or all(final.get((m, mid(lrs_of[m])), 0) <= final.get((m, h), float("inf"))
                                        for h in lrs_of[m] if h > mid(lrs_of[m])))]
    first += run_jobs(lower, args.jobs, run=not args.summary_only)
    best = {m: min((r for r in first if r["method"] == m), key=lambda r: r["final_loss"])["lr"] for m in grid_methods
            if any(r["method"] == m for r in first)}
    rest = run_jobs([job(m, best[m], s) for m in best for s in args.seeds[1:]], args.jobs, run=not args.summary_only)
    title = f"{args.preset}{' (linear probe first)' if args.probe else ''}"
    md = summarise(first + rest, [m for m in grid_methods if m in best], args.out, title)
    meta = {"preset": dataclasses.asdict(p), "args": vars(args), "device": device_info(), "command": sys.argv}
    write_json(os.path.join(args.out, "meta.json"), meta)
    print(md)


if __name__ == "__main__":
    main()
