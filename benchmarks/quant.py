"""Data-aware inits on a 4-bit base (SPEC §10): the statistics pass on an nf4 model against the fp32 one, how far the
init computed on the nf4 model is from the one computed on the fp32 model, and the quantization error of the
initialised nf4 model against the full-precision model.

    python benchmarks/quant.py --out benchmarks/results/quant_cpu

The model is SmolLM2-135M-Instruct (the embedded default), fp32 or loaded in nf4 by bitsandbytes (compute dtype
fp32, on CPU), with every linear layer of the decoder (q, k, v, o, gate, up, down: 210 layers) as targets, r = 8,
α = 16 and rsLoRA (the main job's peft/all). The statistics batches are `--iters` batches of `--bsz` training
examples of the main job's task, leg_counting, drawn by the runner's sampler (`stat_batches`, seed 0) from its 256
training examples; the held-out batches are the first `--heldout` test examples. Three measurements:

1. The statistics pass with kinds=("grad",) (what lora_ga and lora_one collect; lora_fa collects "kfac", timed once
   beside it) on each model: wall seconds (median of `--repeats` passes after a one-batch warm-up) and the peak
   resident set during the pass (the kernel's high-water mark, reset at the pass's start), absolute and above the
   pass's start. Each model runs in its own process (this script with `--one fp32|nf4`, started with
   common.MALLOC_ENV), so neither inherits the other's allocations, and its weights are first copied out of the
   checkpoint's memory map (`own_memory`), so the resident set counts them. Weight memory: the bytes of parameters,
   buffers and bitsandbytes' quantization state (absmax, code); resident after load: the resident set's growth from
   loading the model (before the process's first pass). The 1-minute load average after the timed passes says
   whether other processes shared the cores (this process alone: about `--threads`).
2. Subspace agreement of lora_fa and lora_ga computed on the nf4 model (lora_ga with `base_weights=` the fp32
   checkpoint; lora_fa, a no-offset method, without) against the same method on the fp32 model: per layer, the mean
   of the principal-angle cosines between span(B) (columns) and between span(Aᵀ) (rows), as subspaces.py computes
   them; mean and min over layers. As a yardstick, the same comparison for the fp32 inits computed from `--iters`
   other batches (the next examples of the same order): how far sampling alone moves the subspaces.
3. For the offset methods (pissa, milora, lora_ga, corda), each initialised on a fresh nf4 model from the
   full-precision checkpoint (`base_weights=`), the base becoming Q(W − s·B·A): per layer the relative weight error
   ‖Q(W − s·B·A) + s·B·A − W‖_F / ‖W‖_F (and how many layers exceed the plain nf4 model's error), the residual's
   own error ‖Q(R) − R‖_F / ‖R‖_F with R = W − s·B·A, and the offset's size ‖s·B·A‖_F / ‖W‖_F; over the held-out
   batches the relative logit error ‖logits − logits_fp32‖_F / ‖logits_fp32‖_F (unpadded positions) and the LM loss
   on the answer tokens; beside the plain nf4 model's ‖Q(W) − W‖_F / ‖W‖_F, logit error and loss.

Written under `--out`: results.json (everything, per-layer values included, with the command, device and versions),
stats_pass / subspaces / quant_error as .md + .csv, and quant.png (per-layer weight error and subspace agreement).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (MALLOC_ENV, PeakMemory, _rss_bytes, device_info, save_figure, write_json,  # noqa: E402
                    write_table)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OFFSET_METHODS = ["pissa", "milora", "lora_ga", "corda"]
SUBSPACE_METHODS = ["lora_fa", "lora_ga"]
# the results tables' columns (their .md/.csv; benchmarks/tables.py renders the docs' block from results.json)
STATS_COLUMNS = ["model", "weight MB", "resident after load MB", "grad pass s", "peak RSS MB",
                 "peak above pass start MB", "kfac pass s", "1-min load avg"]
SUBSPACE_COLUMNS = ["method", "compared", "side", "layers", "mean cos", "min layer cos", "smallest cos"]
ERROR_COLUMNS = ["model", "offset ‖sBA‖/‖W‖", "weight error %", "max layer weight error %", "layers worse than nf4",
                 "residual error %", "logit error %", "held-out loss", "init s"]
MB = 2 ** 20


def lora_config(args):
    from peft import LoraConfig

    return LoraConfig(r=args.rank, lora_alpha=args.alpha, use_rslora=True, target_modules=TARGETS, lora_dropout=0.0)


def init_config(args, method: str):
    from lorafa import InitConfig

    return InitConfig(method=method, bsz=args.bsz, iters=args.iters, max_length=args.max_length)


def load(which: str):
    """The embedded SmolLM2-135M-Instruct in fp32, or loaded in nf4 (bitsandbytes, compute dtype fp32, CPU)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lorafa.models import embedded_model_path

    kw = {}
    if which == "nf4":
        kw = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                        bnb_4bit_compute_dtype=torch.float32), "device_map": "cpu"}
    return AutoModelForCausalLM.from_pretrained(embedded_model_path(), dtype=torch.float32, **kw).eval()


def data(args, skip: int = 0):
    """(statistics batches, held-out batches): leg_counting's training examples drawn by the runner's sampler
    (`stat_batches`, seed 0; `skip` batches of that order left out: other examples), and the first `--heldout` test
    examples."""
    from transformers import AutoTokenizer

    from lorafa.data import CausalLMCollator
    from lorafa.data.datasets import load_task
    from lorafa.models import embedded_model_path
    from lorafa.stats import stat_batches

    task = load_task("leg_counting", seed=0)
    collate = CausalLMCollator(AutoTokenizer.from_pretrained(embedded_model_path()), max_length=args.max_length)
    batches = stat_batches(task.train, collate, args.bsz, args.iters, seed=0, skip=skip)
    heldout = [collate(task.test[i: min(i + args.bsz, args.heldout)]) for i in range(0, args.heldout, args.bsz)]
    return batches, heldout


def weight_bytes(model) -> int:
    """Bytes of the parameters and buffers (tied ones once), plus bitsandbytes' quantization state of 4-bit weights
    (absmax, code and their nested state), which sits on the weight, not in a buffer."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for p in model.parameters():
        add(p)
        state = getattr(p, "quant_state", None)
        while state is not None:
            add(state.absmax)
            add(state.code)
            add(getattr(state, "offset", None))
            state = state.state2 if getattr(state, "nested", False) else None
    for b in model.buffers():
        add(b)
    return total


@torch.no_grad()
def own_memory(model) -> None:
    """Copy the float parameters and buffers out of the checkpoint's memory map. transformers leaves them as views of
    the mapped safetensors file, whose pages count in the resident set only once touched, and after a 4-bit load
    the file's pages (touched to quantize) stay resident while the tied embedding keeps the mapping open: either
    way the resident set would not measure the model. Afterwards it holds exactly the model's own copies."""
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and type(p) is torch.nn.Parameter:  # not bitsandbytes' Params4bit (already owned)
                p.data = p.data.clone()
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = b.clone()
    gc.collect()


def factors(results: dict) -> dict:
    return {n: {"A": r.A.detach().float().cpu(), "B": r.B.detach().float().cpu()} for n, r in results.items()}


def inits_from(model, stats, args, nf4: bool) -> tuple[dict, dict]:
    """({method: factors}, {method: seconds}) of SUBSPACE_METHODS from `stats` (compute_init: the model is not
    changed); on the nf4 model lora_ga reads W from the fp32 checkpoint (`base_weights=`), lora_fa reads Q(W)."""
    from lorafa.models import embedded_model_path
    from lorafa.peft_bridge import compute_init

    inits, seconds = {}, {}
    for method in SUBSPACE_METHODS:
        kw = {"base_weights": embedded_model_path()} if nf4 and method == "lora_ga" else {}
        t0 = time.perf_counter()
        inits[method] = factors(compute_init(model, lora_config(args), init_config(args, method), stats=stats,
                                             progress=False, **kw))
        seconds[method] = time.perf_counter() - t0
    return inits, seconds


def one(args) -> None:
    """Measurement 1 (and the factors of measurement 2) for one model, in this process; prints a RESULT line. The
    fp32 process also computes the inits from other statistics batches (the sampling reference)."""
    from lorafa.stats.collect import collect_stats

    torch.set_num_threads(args.threads)
    batches, _ = data(args)
    rss_before = _rss_bytes()
    model = load(args.one)
    own_memory(model)
    out = {"model": args.one, "weight_bytes": weight_bytes(model), "threads": torch.get_num_threads(),
           "rss_before_load_bytes": rss_before, "rss_after_load_bytes": _rss_bytes(),
           "loadavg_at_start": os.getloadavg()}  # other processes on the machine would slow the timed passes
    collect_stats(model, batches[:1], TARGETS, kinds=("grad",), progress=False)  # warm-up
    runs = []
    for _ in range(args.repeats):
        rss0 = _rss_bytes()
        t0 = time.perf_counter()
        with PeakMemory(torch.device("cpu")) as mem:
            stats = collect_stats(model, batches, TARGETS, kinds=("grad",), progress=False)
        runs.append({"s": time.perf_counter() - t0, "rss_at_start_bytes": rss0, "peak_above_start_bytes":
                     mem.peak_bytes})
        del stats
    out["grad_runs"], out["loadavg_after_timing"] = runs, os.getloadavg()
    t0 = time.perf_counter()
    stats = collect_stats(model, batches, TARGETS, kinds=("kfac",), progress=False)  # lora_fa's kind (G, Σ, C)
    out["kfac_s"] = time.perf_counter() - t0
    saved = {}
    saved[args.one], out["init_s"] = inits_from(model, stats, args, args.one == "nf4")
    if args.one == "fp32":  # the same inits from iters other batches: how far sampling alone moves them
        del stats
        other, _ = data(args, skip=args.iters)
        stats = collect_stats(model, other, TARGETS, kinds=("kfac",), progress=False)
        saved["fp32_other"], _ = inits_from(model, stats, args, False)
    torch.save(saved, os.path.join(args.out, f"_factors_{args.one}.pt"))
    print("RESULT " + json.dumps(out), flush=True)


def launch(args, which: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", which]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k in ("bsz", "iters", "max_length", "rank", "alpha", "repeats", "threads", "heldout", "out")]
    logging.info("%s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": str(args.threads)})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"--one {which} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def subspace_agreement(fp: dict, q: dict) -> dict:
    """{method: {layer: {"B": mean cosine, "A": mean cosine, "B_min": ..., "A_min": ...}}}: span(B) and span(Aᵀ) of
    the nf4 init against the fp32 init (subspaces.principal_cosines)."""
    from subspaces import layer_cosines

    out = {}
    for method in fp:
        ns = lambda d: {n: SimpleNamespace(**v) for n, v in d.items()}  # noqa: E731
        cos = layer_cosines(ns(q[method]), ns(fp[method]))
        out[method] = {n: {"B": statistics.mean(c["B"]), "A": statistics.mean(c["A"]), "B_min": min(c["B"]),
                           "A_min": min(c["A"])} for n, c in cos.items()}
    return out


COMPARED = {"nf4": "nf4 vs fp32", "fp32_other": "fp32, other batches vs fp32"}


def subspace_rows(agree: dict) -> list[dict]:
    """agree: {which: subspace_agreement(...)}, which in COMPARED."""
    rows = []
    for method in SUBSPACE_METHODS:
        for which, by_method in agree.items():
            layers = by_method[method]
            for side in ("B", "A"):
                means = [v[side] for v in layers.values()]
                rows.append({"method": method, "compared": COMPARED[which],
                             "side": f"{side} ({'columns' if side == 'B' else 'rows'})",
                             "layers": len(means), "mean cos": statistics.mean(means), "min layer cos": min(means),
                             "smallest cos": min(v[f"{side}_min"] for v in layers.values())})
    return rows


@torch.no_grad()
def heldout_outputs(model, heldout) -> tuple[list[torch.Tensor], float]:
    """(the logits at the unpadded positions of each held-out batch, the mean LM loss on the answer tokens)."""
    logits, losses = [], []
    for b in heldout:
        out = model(**b)
        logits.append(out.logits[b["attention_mask"].bool()].float())
        losses.append(float(out.loss))
    return logits, statistics.mean(losses)


def rel_logits(logits: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    num = sum(float((a - b).double().pow(2).sum()) for a, b in zip(logits, ref))
    den = sum(float(b.double().pow(2).sum()) for b in ref)
    return (num / den) ** 0.5


def fro(t: torch.Tensor) -> float:
    return float(t.double().norm())


@torch.no_grad()
def offset_errors(pm, fp_weights: dict) -> dict:
    """Per layer of an initialised nf4 PeftModel: the effective weight's error ‖Q(R) + c·s·B·A − W‖ / ‖W‖ with
    R = W − c·s·B·A the stored residual (c: the offset's share, 1 unless offset="partial"), the residual's own error
    ‖Q(R) − R‖ / ‖R‖, and ‖c·s·B·A‖ / ‖W‖."""
    from lorafa.saving import init_record
    from lorafa.quant import dequantized_weight

    infos = init_record(pm).infos
    out = {}
    for name, layer in pm.base_model.model.named_modules():
        if not hasattr(layer, "lora_A") or "default" not in layer.lora_A:
            continue
        w = fp_weights[name]
        c = infos.get(name, {}).get("offset_scale", 1.0)
        delta = c * layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
        stored = dequantized_weight(layer)
        out[name] = {"weight_err": fro(stored + delta - w) / fro(w), "residual_err": fro(stored - (w - delta))
                     / fro(w - delta), "offset": fro(delta) / fro(w), "offset_scale": c}
    return out


def quant_errors(args, batches, heldout) -> dict:
    """Measurement 3 in this process: the fp32 reference, the plain nf4 model, each offset method on nf4."""
    import lorafa
    from lorafa.models import embedded_model_path
    from lorafa.quant import dequantized_weight

    fp = load("fp32")
    fp_layers = {n: m for n, m in fp.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(tuple(TARGETS))}
    fp_weights = {n: m.weight.detach().clone() for n, m in fp_layers.items()}
    ref_logits, ref_loss = heldout_outputs(fp, heldout)
    del fp, fp_layers
    res = {"fp32": {"heldout_loss": ref_loss}}
    plain = load("nf4")
    layers = dict(plain.named_modules())
    per_layer = {n: {"weight_err": fro(dequantized_weight(layers[n]) - w) / fro(w)} for n, w in fp_weights.items()}
    logits, loss = heldout_outputs(plain, heldout)
    res["nf4"] = {"layers": per_layer, "logit_err": rel_logits(logits, ref_logits), "heldout_loss": loss}
    del plain, layers, logits
    for method in args.methods:
        logging.info("quantization error: %s", method)
        try:
            model = load("nf4")
            t0 = time.perf_counter()
            pm = lorafa.initialize(model, lora_config(args), init_config(args, method), batches=batches,
                                   base_weights=embedded_model_path(), progress=False)
            init_s = time.perf_counter() - t0
        except Exception as err:  # a method that cannot run here is recorded, not fatal
            logging.exception("%s failed", method)
            res[method] = {"skipped": f"{type(err).__name__}: {err}"}
            continue
        logits, loss = heldout_outputs(pm, heldout)
        res[method] = {"layers": offset_errors(pm, fp_weights), "logit_err": rel_logits(logits, ref_logits),
                       "heldout_loss": loss, "init_s": init_s}
        del pm, model, logits
    return res


def error_rows(errors: dict) -> list[dict]:
    nf4 = errors["nf4"]["layers"]
    rows = [{"model": "fp32 (reference)", "held-out loss": errors["fp32"]["heldout_loss"]}]
    for name, r in errors.items():
        if name == "fp32":
            continue
        if "skipped" in r:
            rows.append({"model": f"{name} (skipped)"})
            continue
        werr = [v["weight_err"] for v in r["layers"].values()]
        row = {"model": "nf4, no adapter" if name == "nf4" else f"nf4 + {name}",
               "weight error %": 100 * statistics.mean(werr), "max layer weight error %": 100 * max(werr),
               "logit error %": 100 * r["logit_err"], "held-out loss": r["heldout_loss"]}
        if name != "nf4":
            worse = sum(v["weight_err"] > nf4[n]["weight_err"] for n, v in r["layers"].items())
            row.update({"offset ‖sBA‖/‖W‖": statistics.mean(v["offset"] for v in r["layers"].values()),
                        "layers worse than nf4": f"{worse} / {len(werr)}",
                        "residual error %": 100 * statistics.mean(v["residual_err"] for v in r["layers"].values()),
                        "init s": r["init_s"]})
        rows.append(row)
    return rows


def stats_rows(children: dict) -> list[dict]:
    rows = []
    for which, c in children.items():
        runs = c["grad_runs"]
        rows.append({"model": which, "weight MB": c["weight_bytes"] / MB,
                     "resident after load MB": (c["rss_after_load_bytes"] - c["rss_before_load_bytes"]) / MB,
                     "grad pass s": statistics.median(r["s"] for r in runs),
                     "peak RSS MB": max(r["rss_at_start_bytes"] + r["peak_above_start_bytes"] for r in runs) / MB,
                     "peak above pass start MB": max(r["peak_above_start_bytes"] for r in runs) / MB,
                     "kfac pass s": c["kfac_s"], "1-min load avg": c["loadavg_after_timing"][0]})
    return rows


def plot(errors: dict, agree: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    for name, r in errors.items():
        if "layers" in r:
            ys = [100 * v["weight_err"] for v in r["layers"].values()]
            axes[0].plot(range(len(ys)), ys, marker=".", ms=3, lw=0.8,
                         label="plain nf4: ‖Q(W) − W‖" if name == "nf4" else name, color="k" if name == "nf4" else None)
    axes[0].set(xlabel="target layer (model order)", ylabel="‖Q(W − sBA) + sBA − W‖ / ‖W‖ (%)",
                title="weight error of the initialised nf4 model")
    axes[0].legend(fontsize=7)
    for which, by_method in agree.items():
        for method, layers in by_method.items():
            for side, style in (("B", "-"), ("A", "--")):
                axes[1].plot(range(len(layers)), [v[side] for v in layers.values()], style, lw=0.8,
                             alpha=1.0 if which == "nf4" else 0.5,
                             label=f"{method}: span({'B' if side == 'B' else 'Aᵀ'}), {COMPARED[which]}")
    axes[1].set(xlabel="target layer (model order)", ylabel="mean principal-angle cosine", ylim=(-0.02, 1.02),
                title="init subspaces against the fp32 init")
    axes[1].legend(fontsize=7)
    save_figure(fig, os.path.join(out, "quant.png"))
    plt.close(fig)


def versions() -> dict:
    import bitsandbytes
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bsz", type=int, default=4, help="statistics batch size (the main job's init.bsz)")
    ap.add_argument("--iters", type=int, default=8, help="statistics batches")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8, help="r (the main job's lora_r)")
    ap.add_argument("--alpha", type=float, default=16, help="α (the main job's lora_alpha; rsLoRA: s = α/√r)")
    ap.add_argument("--repeats", type=int, default=2, help="timed statistics passes per model (median reported)")
    ap.add_argument("--heldout", type=int, default=8, help="leg_counting test examples for the logit error")
    ap.add_argument("--methods", nargs="+", default=OFFSET_METHODS, help="offset methods for the quantization error")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/quant_cpu")
    ap.add_argument("--one", choices=["fp32", "nf4"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.one:
        one(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    children = {which: launch(args, which) for which in ("fp32", "nf4")}
    paths = {which: os.path.join(args.out, f"_factors_{which}.pt") for which in children}
    facs = {which: torch.load(p) for which, p in paths.items()}
    agree = {"nf4": subspace_agreement(facs["fp32"]["fp32"], facs["nf4"]["nf4"]),
             "fp32_other": subspace_agreement(facs["fp32"]["fp32"], facs["fp32"]["fp32_other"])}
    for p in paths.values():  # they served the comparison; nothing else reads them
        os.remove(p)
    batches, heldout = data(args)
    errors = quant_errors(args, batches, heldout)
    examples = (f"leg_counting: statistics {args.iters}×{args.bsz} training examples (stat_batches, seed 0), "
                f"held-out test[:{args.heldout}]")
    setting = f"SmolLM2-135M-Instruct, 210 linear layers, r={args.rank}, α={args.alpha:g}, rsLoRA"
    tables = {
        "stats_pass": (stats_rows(children), STATS_COLUMNS,
                       f"Statistics pass, fp32 vs nf4: {setting}, {args.iters}×{args.bsz} examples, "
                       f"{args.threads} threads"),
        "subspaces": (subspace_rows(agree), SUBSPACE_COLUMNS,
                      f"Init subspaces against the fp32 init: mean principal-angle cosine per layer ({setting})"),
        "quant_error": (error_rows(errors), ERROR_COLUMNS,
                        f"Quantization error of the initialised nf4 model against fp32 ({setting})"),
    }
    for stem, (rows, cols, title) in tables.items():
        print(write_table(rows, cols, os.path.join(args.out, stem), title))
    plot(errors, agree, args.out)
    write_json(os.path.join(args.out, "results.json"), {
        "command": "python " + " ".join(["benchmarks/quant.py", *sys.argv[1:]]), "args": vars(args),
        "device": device_info(), "versions": versions(), "examples": examples, "setting": setting,
        "rows": {stem: rows for stem, (rows, _, _) in tables.items()},
        "stats_pass": children, "subspaces": agree, "quant_error": errors,
        "total_s": time.perf_counter() - t_start, "time": time.ctime()})


if __name__ == "__main__":
    main()
