"""The learning-rate benchmark (issue 23): does the rate `lorafa.suggest_lr` picks at the init land where a bracketed
grid's best rate does, for every init, at a small fraction of one run's cost? And do the rate-free optimisers
(Prodigy, schedule-free AdamW) get there with no rate at all?

The stages share one results folder `OUT` and resume where they stopped (one JSON per run or probe):

1. **The grid** is convergence.py's protocol with 2×-spaced rates (bracketed, chosen on the validation split at the
   first seed, then run at every seed), into `OUT/grid` (inits whose best rate lies elsewhere get their own folder
   `OUT/grid_<name>` with a grid around it); the rate-free rows are its `lora+prodigy` and `lora+sf`
   specs (each at its one documented rate, `convergence.FREE_LRS`). E.g. on the classification preset:

       python benchmarks/convergence.py --preset classification --lrs 0.0015 0.003 0.006 --max-extend 4 \\
           --eval-every 20 --seeds 0 1 2 --threads 1 --out benchmarks/results/rate_cls/grid \\
           --methods lora lora_fa lora_one lora_ga pissa eva peft_lora_ga lora+prodigy lora+sf

2. `probe`: for every init and seed, the init and then each rule's raw number (its constant set to 1: c·(L/gᵀd),
   c·η* and c/λ_max with c = 1, the range test's best rate undivided) on the first 2 training batches, the batches
   an auto run would use. -> `OUT/probes/<init>_s<seed>_<rules>.json`
3. `fit`: each rule's constant from **default LoRA alone** on this preset: k = (grid-best rate) / (raw number), the
   raw numbers' geometric mean over the seeds. Every other init and preset then uses the same k (`--fit PATH` reads
   another preset's fit.json). -> `OUT/fit.json`
4. `auto`: every init and seed trained at `suggest_lr`'s rate with `--rule` and its fitted constant (convergence's
   run with lr "auto"). -> `OUT/auto_<rule>/<init>_s<seed>.json`. With `--optimizer sf` the runs train with
   schedule-free AdamW instead (`<init>+sf`), at `anchored`'s rate with c = schedule-free's own default rate
   (`convergence.FREE_LRS["sf"]`, 0.0025, the rate it documents for default settings: no constant fitted) ->
   `OUT/auto_anchored+sf/`; the summary sets them beside the same AdamW grids as rule `anchored+sf`.
5. `summary`: the tables (`OUT/summary.md|csv`: grid-best against auto per init and rule trained with, with the
   targets;
   `OUT/rules.md|csv`: every rule's fitted rate per init, and the grid's validation loss at that rate, interpolated
   in log rate; `OUT/step0.md|csv`: the held-out losses right after each init against the base model's) and the
   figure `OUT/rate.png` (final validation loss against rate, one line per init, each auto run marked).
6. `transfer`: every rule's rate with another preset's constants (`--fit`) against an earlier benchmark's grid of
   this preset (`--grid-from`, `--alias init=spec`; without them, the preset's own `OUT/grid*`), beside the constant
   this preset's LoRA would fit (OUT/transfer).

    python benchmarks/rate.py probe   --preset classification --out benchmarks/results/rate_cls --seeds 0 1 2
    python benchmarks/rate.py fit     --preset classification --out benchmarks/results/rate_cls
    python benchmarks/rate.py auto    --preset classification --out benchmarks/results/rate_cls --seeds 0 1 2 \\
        --rule polyak
    python benchmarks/rate.py summary --preset classification --out benchmarks/results/rate_cls

Options after the stage's own (`--preset`, `--out`, `--inits`, `--seeds`, `--rule`, `--fit`) go to convergence.py's
command line (e.g. `--eval-every 20 --threads 1`), so the probes and auto runs are built exactly as the grid's runs
are; they must be the same options the grid was run with.

The targets (issue 23): (a) auto's mean final test loss within one seed-std (the grid-best's) of the grid-best's, for
every init; (b) the suggestion costs <= 25% of one run (the grid-best runs' init + training seconds); (c) one lorafa
run (the best lorafa init at its auto rate) ends at or below default LoRA's grid-best.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convergence as cv  # noqa: E402
from common import save_figure, write_json, write_table  # noqa: E402
from harness import choose, finite, selection_loss  # noqa: E402

INITS = ["lora", "lora_fa", "lora_one", "lora_ga", "pissa", "eva", "peft_lora_ga"]
FREE = ["lora+prodigy", "lora+sf"]
# each rule (lorafa.lr.RULES) with its constant set to 1
RAW = {"polyak": {"c": 1.0}, "anchored": {"c": 1.0}, "adam_step": {"c": 1.0}, "lambda_max": {"c": 1.0},
       "range_test": {"divisor": 1.0}}
RULES = tuple(RAW)
LORAFA_INITS = ("lora_fa", "lora_one", "lora_ga", "eva")  # the inits lorafa computes (target (c))
# the optimisers an auto run can train with: AdamW (the grids' optimiser), or schedule-free AdamW (convergence's +sf)
# at anchored's rate with c = its own default rate: only anchored's c has that meaning (default LoRA's rate)
AUTO_OPTIMIZERS = ("adamw", "sf")


def auto_label(rule: str, optimizer: str) -> str:
    """The auto runs' folder suffix and summary label: the rule, and `+sf` for schedule-free AdamW."""
    return rule if optimizer == "adamw" else f"{rule}+{optimizer}"


def init_of(method: str) -> str:
    """The init of a run's method spec: `lora_fa+sf` -> `lora_fa`."""
    return cv.parse_spec(method)[0]


def constant_option(rule: str, k: float) -> dict:
    """The suggest_lr option that makes the rule's rate k × its raw number."""
    return {"divisor": 1.0 / k} if rule == "range_test" else {"c": k}


# -- running ------------------------------------------------------------------------------------------------------
def _jobs(args, cargs, p, kind: str) -> list[dict]:
    import dataclasses

    opt = getattr(args, "optimizer", "adamw") if kind == "auto" else "adamw"
    folder = os.path.join(args.out, f"auto_{auto_label(args.rule, opt)}" if kind == "auto" else kind)
    os.makedirs(folder, exist_ok=True)
    jobs = []
    for m in (i if opt == "adamw" else f"{i}+{opt}" for i in args.inits):
        for s in args.seeds:
            job = {"method": m, "lr": "auto", "seed": s, "args": vars(cargs), "preset": dataclasses.asdict(p),
                   "probe": None, "path": os.path.join(folder, f"{cv.spec_slug(m)}_s{s}.json")}
            if kind == "probes":
                job["rules"] = args.rules
                job["path"] = os.path.join(folder, f"{cv.spec_slug(m)}_s{s}_{'-'.join(args.rules)}.json")
            if kind == "auto":
                job.update(lr_rule=args.rule, lr_options=constant_option(args.rule, args.k))
            jobs.append(job)
    return jobs


def probe_one(job: dict) -> dict:
    """The init, then every rule's raw suggestion on the first 2 training batches; written to job["path"]."""
    from lorafa import suggest_lr

    cargs, p, device, task, model, collate, seed, split = cv.prepare(job)
    t0 = time.perf_counter()
    order = cv.train_order(split["train"], p, seed)
    model, _ = cv.build(job["method"], model, task, collate, p, cargs, seed, device, split["init"],
                        cv.guard_batches(task, collate, order, cargs, device))
    res = {"method": job["method"], "seed": seed, "init_s": time.perf_counter() - t0, "device": cv.device_info(),
           "rules": {}, "guard": cv.guard_record(model)}
    batches = [cv.to_device(collate([task.train[i] for i in idx]), device) for idx in order[:2]]
    for rule in job["rules"]:
        t0 = time.perf_counter()
        try:
            sug = suggest_lr(model, batches, "adamw", rule=rule, seed=seed, **RAW[rule])
            res["rules"][rule] = {"raw": sug.lr, "evidence": sug.evidence, "seconds": time.perf_counter() - t0}
        except ValueError as e:  # e.g. no positive curvature: recorded, the rule has no number for this init
            res["rules"][rule] = {"raw": None, "error": str(e), "seconds": time.perf_counter() - t0}
        model.zero_grad(set_to_none=True)
    write_json(job["path"], res)
    return res


def _run(jobs: list[dict], fn) -> None:
    import multiprocessing as mp

    todo = [j for j in jobs if not os.path.exists(j["path"])]
    logging.info("%d jobs (%d cached)", len(jobs), len(jobs) - len(todo))
    os.environ.update(cv.MALLOC_ENV)
    with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        for r in pool.imap_unordered(fn, todo):
            if "error" in r:
                logging.error("%s seed %d FAILED:\n%s", r["method"], r["seed"], r["error"])
                continue
            logging.info("%s seed %d: %s", r["method"], r["seed"],
                         {k: v.get("raw") for k, v in r["rules"].items()} if "rules" in r
                         else f"lr {r['lr']:.4g} val {r['final_val_loss']:.4f} test {r['final_loss']:.4f}")


# -- reading the results ------------------------------------------------------------------------------------------
def _load(folder: str) -> list[dict]:
    if not os.path.isdir(folder):
        return []
    return [json.load(open(os.path.join(folder, f))) for f in sorted(os.listdir(folder)) if f.endswith(".json")]


def _probes(out: str) -> list[dict]:
    """The probes, one record per (init, seed) with every rule probed (they may come from several `probe` runs)."""
    merged = {}
    for r in _load(os.path.join(out, "probes")):
        key = (r["method"], r["seed"])
        merged.setdefault(key, dict(r, rules={}))["rules"].update(r["rules"])
    return list(merged.values())


def unprobed(jobs: list[dict], out: str) -> list[dict]:
    """The probe jobs still to run: an (init, seed) whose every asked rule is already in `out`'s probes, from any
    earlier `probe` run (whatever rules it was asked for together), is left out."""
    have = {(r["method"], r["seed"]): set(r["rules"]) for r in _probes(out)}
    return [j for j in jobs if not set(j["rules"]) <= have.get((j["method"], j["seed"]), set())]


def _gmean(xs) -> float:
    xs = [x for x in xs if x is not None and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else math.nan


def grid_from(folder: str, aliases: dict[str, str]) -> dict:
    """grid_of's {init: {"val", "best", "edge", "runs"}} from one convergence.py results folder (e.g. an earlier
    4x-grid benchmark of the same preset), its specs renamed by `aliases` ({init: spec in that folder})."""
    runs, methods = cv.saved_runs(folder)
    s0 = cv.first_seed(folder)
    s0 = min(r["seed"] for r in runs) if s0 is None else s0
    grid = {}
    for m in INITS:
        spec = aliases.get(m, m)
        mine = [r for r in runs if r["method"] == spec and r["seed"] == s0]
        if not mine:
            continue
        val = {r["lr"]: r["final_val_loss"] for r in mine}
        best, edge = choose(val)
        grid[m] = {"val": val, "best": best, "edge": edge,
                   "runs": [r for r in runs if r["method"] == spec and r["lr"] == best]}
    return grid


def transfer(out: str, fit_path: str, folder: str | None, aliases: dict[str, str], title: str) -> str:
    """Every rule's rate on this preset's probes, with the constants of `fit_path` (fitted on another preset's
    default LoRA), against the grid of an earlier benchmark `folder` of this preset (None: this preset's own grids,
    `OUT/grid*`): the rate ratio, the grid's validation loss there, and the constant this preset's own LoRA would
    have fitted (k here / k there: how far the constant is from transferring). -> OUT/transfer.md|csv"""
    grid = grid_from(folder, aliases) if folder else grid_of(out)
    with open(fit_path) as f:
        fitted = json.load(f)
    probes = _probes(out)
    rows = []
    for rule in RULES:
        k = fitted["rules"].get(rule, {}).get("k")
        raws = {m: _gmean(r["rules"][rule]["raw"] for r in probes if r["method"] == m and rule in r["rules"])
                for m in INITS}
        if not k or "lora" not in grid or not raws.get("lora") == raws.get("lora"):
            continue
        k_here = grid["lora"]["best"] / raws["lora"]
        for m in INITS:
            if m not in grid or not raws[m] == raws[m]:
                continue
            lr = k * raws[m]
            loss, where = interpolate(grid[m]["val"], lr)
            n = sum(1 for r in probes if r["method"] == m and rule in r["rules"])
            rows.append({"init": m, "rule": rule, "probe seeds": n, "rate (constant fitted there)": _g(lr),
                         "grid-best rate": _g(grid[m]["best"]), "ratio": _f(lr / grid[m]["best"], 2),
                         "val loss there": _f(loss), "grid-best val loss": _f(grid[m]["val"][grid[m]["best"]]),
                         "outside grid": where, "rate (constant fitted here)": _g(k_here * raws[m]),
                         "ratio (here)": _f(k_here * raws[m] / grid[m]["best"], 2),
                         "k here / k there": _f(k_here / k, 2)})
    return write_table(rows, list(rows[0]), os.path.join(out, "transfer"),
                       f"{title}: each rule against {os.path.basename(folder) if folder else 'its own'} grid "
                       "(seed 0)")


def grid_of(out: str) -> dict:
    """{init: {"val": {lr: seed-0 final val loss}, "best": lr, "edge": ..., "runs": [the best rate's runs]}} from
    `OUT/grid*` (convergence.py's folders, one per grid centre: an init's grid lives in one of them; the first seed
    is each folder's meta.json's)."""
    import glob

    grid = {}
    for folder in sorted(glob.glob(os.path.join(out, "grid*"))):
        runs, methods = cv.saved_runs(folder)
        s0 = cv.first_seed(folder)
        with open(os.path.join(folder, "meta.json")) as f:
            gain = json.load(f)["args"].get("min_gain")
        for m in methods:
            if m in grid:
                raise SystemExit(f"{m} has grids in two folders under {out}: keep one")
            mine = [r for r in runs if r["method"] == m and r["seed"] == s0]
            val = {r["lr"]: r["final_val_loss"] for r in mine}
            best, edge = choose({r["lr"]: selection_loss(r, gain) for r in mine})
            grid[m] = {"val": val, "best": best, "edge": edge,
                       "runs": [r for r in runs if r["method"] == m and r["lr"] == best]}
    return grid


def interpolate(val: dict, lr: float) -> tuple[float, str | None]:
    """The grid's validation loss at `lr`, linear in log rate between the two grid points around it; outside the
    grid, the nearest end's loss and "below"/"above"."""
    pts = sorted((k, finite(v)) for k, v in val.items())
    if lr <= pts[0][0]:
        return pts[0][1], ("below" if lr < pts[0][0] * (1 - 1e-9) else None)
    if lr >= pts[-1][0]:
        return pts[-1][1], ("above" if lr > pts[-1][0] * (1 + 1e-9) else None)
    for (a, la), (b, lb) in zip(pts, pts[1:]):
        if a <= lr <= b:
            if not (math.isfinite(la) and math.isfinite(lb)):
                return max(la, lb), None
            t = math.log(lr / a) / math.log(b / a)
            return la + t * (lb - la), None
    raise AssertionError("unreachable")


def fit(out: str) -> dict:
    """Each rule's constant from default LoRA alone: k = grid-best rate / geometric mean of the raw numbers."""
    grid = grid_of(out)
    if "lora" not in grid:
        raise SystemExit(f"no default-LoRA grid in {out}/grid: run the grid first (see the module docstring)")
    probes = [r for r in _probes(out) if r["method"] == "lora"]
    if not probes:
        raise SystemExit(f"no default-LoRA probes in {out}/probes: run `rate.py probe` first")
    best = grid["lora"]["best"]
    fitted = {}
    for rule in RULES:
        raw = _gmean(r["rules"].get(rule, {}).get("raw") for r in probes)
        fitted[rule] = {"k": best / raw if raw == raw else None, "raw_lora": raw,
                        "seeds": [r["seed"] for r in probes if rule in r["rules"]]}
    res = {"preset_dir": out, "fitted_on": "lora", "grid_best_lora": best, "edge": grid["lora"]["edge"],
           "rules": fitted}
    write_json(os.path.join(out, "fit.json"), res)
    return res


def _mean_std(xs: list[float]) -> tuple[float, float]:  # as numbers (harness.mean_std formats the cell)
    xs = [x for x in xs if x is not None]
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else math.nan) if xs else (math.nan, math.nan)


def _f(x, d=3) -> str | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def _g(x) -> str | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def _autos(out: str) -> dict[str, list[dict]]:
    """{label: its auto runs} from `OUT/auto_<label>`, a label per rule and optimiser (auto_label)."""
    labels = [auto_label(rule, o) for o in AUTO_OPTIMIZERS for rule in RULES]
    return {label: runs for label in labels if (runs := _load(os.path.join(out, f"auto_{label}")))}


# The rate the runner trained at before schedule-free AdamW at learning_rate=auto became its default: AdamW at 1e-3
# under a decaying schedule, for SmolLM2 (conf/model/smollm2.yaml) and MiniLM (minilm.yaml). The rules table keeps a
# row for it and the figure a dashed line: what a user of the old default got (issue 23, item 5's comparison).
FORMER_RUNNER_LR = {"smollm2-135m-instruct": 1e-3, "all-minilm-l6-v2": 1e-3}
FORMER = "runner's former rate"


def runner_rate(model: str) -> float | None:
    """The runner's former fixed AdamW rate for `model` (FORMER_RUNNER_LR), or None for a model it had none for."""
    if model not in FORMER_RUNNER_LR:
        logging.warning("the runner had no fixed rate for %r: the rules table has no former-rate row", model)
    return FORMER_RUNNER_LR.get(model)


def _pm(mean: float, std: float) -> str:
    """mean ± std, or the mean alone where one seed gives no std."""
    return f"{mean:.3f}" if std != std else f"{mean:.3f} ± {std:.3f}"


def summarise(out: str, fit_path: str, title: str, shown: str, fixed: float | None = None) -> dict:
    """The tables, the verdict per rule trained with, and the figure (its ★ are rule `shown`'s auto runs). `fixed`:
    the runner's former fixed AdamW rate, given a row per init in the rules table (the grid's validation loss there)."""
    grid = grid_of(out)
    with open(fit_path) as f:
        fitted = json.load(f)
    probes, autos = _probes(out), _autos(out)
    inits = [m for m in INITS if m in grid]
    rows, rule_rows, step0 = [], [], []
    verdict = {rule: {"a": [], "b": [], "c": None} for rule in autos}
    for m in inits:
        g = grid[m]
        best_mean, best_std = _mean_std([r["final_loss"] for r in g["runs"]])
        run_s = statistics.mean(r["init_s"] + r["train_s"] for r in g["runs"])
        for rule, runs in autos.items():
            mine = [r for r in runs if init_of(r["method"]) == m]
            if not mine:
                continue
            a_mean, _ = _mean_std([r["final_loss"] for r in mine])
            a_lr = _gmean(r["lr"] for r in mine)
            cost = statistics.mean(r["suggest_s"] for r in mine)
            delta = (a_mean - best_mean) / best_std if best_std > 0 else math.nan
            # with one grid seed there is no seed-std: at or below the grid-best mean is met, above it undecided
            met = delta <= 1.0 if delta == delta else (True if a_mean <= best_mean else None)
            verdict[rule]["a"].append((m, met))
            verdict[rule]["b"].append((m, cost / run_s <= 0.25))
            rows.append({"init": m, "rule": rule, "grid-best rate": _g(g["best"]),
                         "bracketed": "yes" if g["edge"] is None else g["edge"],
                         "grid-best test loss": _pm(best_mean, best_std), "seeds": len(g["runs"]),
                         "auto rate": _g(a_lr), "auto / best": _f(a_lr / g["best"], 2),
                         "auto test loss": _f(a_mean) + f" ({len(mine)} seeds)", "Δ in seed-stds": _f(delta, 2),
                         "(a) ≤ 1": {True: "met", False: "missed", None: "— (one grid seed)"}[met],
                         "suggest s": _f(cost, 1),
                         "one run s": _f(run_s, 1), "cost / run": _f(cost / run_s, 3)})
        for rule in RULES:
            k = fitted["rules"].get(rule, {}).get("k")
            mine_p = [r["rules"][rule] for r in probes if r["method"] == m and rule in r["rules"]]
            raws = [x["raw"] for x in mine_p]
            if not k or not raws:
                continue
            lr = k * _gmean(raws)
            loss, where = interpolate(g["val"], lr) if lr == lr else (math.nan, None)
            rule_rows.append({"init": m, "rule": rule, "fitted rate": _g(lr), "grid-best rate": _g(g["best"]),
                              "ratio": _f(lr / g["best"], 2), "val loss there": _f(loss),
                              "grid-best val loss": _f(g["val"][g["best"]]), "outside grid": where,
                              "probe s": _f(statistics.mean(x["seconds"] for x in mine_p), 1)})
        if fixed:
            loss, where = interpolate(g["val"], fixed)
            rule_rows.append({"init": m, "rule": FORMER, "fitted rate": _g(fixed),
                              "grid-best rate": _g(g["best"]), "ratio": _f(fixed / g["best"], 2),
                              "val loss there": _f(loss), "grid-best val loss": _f(g["val"][g["best"]]),
                              "outside grid": where, "probe s": None})
        s0 = [r for r in grid[m]["runs"]]
        step0.append({"init": m, "test loss at step 0": _f(_mean_std([r["curve"][0][1] for r in s0])[0]),
                      "val loss at step 0": _f(_mean_std([r["val_curve"][0][1] for r in s0])[0])})
    base = grid.get("lora")  # default LoRA's B = 0: its step-0 loss is the base model's
    if base:
        b_test = _mean_std([r["curve"][0][1] for r in base["runs"]])[0]
        b_val = _mean_std([r["val_curve"][0][1] for r in base["runs"]])[0]
        for row in step0:
            row["base test loss"], row["base val loss"] = _f(b_test), _f(b_val)
            row["raises held-out loss"] = "yes" if float(row["val loss at step 0"]) > b_val + 1e-3 else "no"
        lora_best = _mean_std([r["final_loss"] for r in base["runs"]])[0]
        for rule, runs in autos.items():
            ours = [m for m in LORAFA_INITS if any(init_of(r["method"]) == m for r in runs)]
            if ours:
                val = {m: statistics.mean(r["final_val_loss"] for r in runs if init_of(r["method"]) == m)
                       for m in ours}
                pick = min(val, key=val.get)  # the best lorafa init, chosen on validation
                test = statistics.mean(r["final_loss"] for r in runs if init_of(r["method"]) == pick)
                verdict[rule]["c"] = {"init": pick, "auto test loss": test, "lora grid-best test loss": lora_best,
                                      "met": test <= lora_best}
    free_rows = []
    for m in FREE:
        if m in grid:
            mean, std = _mean_std([r["final_loss"] for r in grid[m]["runs"]])
            free_rows.append({"optimiser": m, "rate": _g(grid[m]["best"]), "seeds": len(grid[m]["runs"]),
                              "final test loss": _pm(mean, std)})
    sf_rows = sf_default_rows(out, grid, autos.get(auto_label(shown, "sf"), []))
    def table(rows: list[dict], stem: str, what: str) -> str:  # a stage not run yet has no rows and no table
        if not rows:
            return f"({title}: no {what} yet in {out})\n"
        return write_table(rows, list(rows[0]), os.path.join(out, stem), f"{title}: {what}") + "\n"

    md = table(rows, "summary", "grid-best rate against auto")
    md += table(rule_rows, "rules", "every rule at its constant fitted on default LoRA")
    md += table(step0, "step0", "held-out loss right after the init (mean over the grid-best runs' seeds)")
    md += table(free_rows, "free", "learning-rate-free optimisers (no rate chosen)")
    md += table(sf_rows, "sf_default", "schedule-free AdamW at its default rate and at the auto rate (seed 0)")
    write_json(os.path.join(out, "verdict.json"), verdict)
    sf = auto_label(shown, "sf")  # schedule-free AdamW's auto runs beside AdamW's, if any
    plot(grid, autos.get(shown, []), inits, out,
         f"{title}: AdamW's grid (seed 0) and the {shown} rate (★, each seed)",
         fixed=fixed, others=autos.get(sf, []) if sf != shown else [])
    return {"markdown": md, "verdict": verdict}


def sf_default_rows(out: str, grid: dict, sf_autos: list[dict]) -> list[dict]:
    """Does the auto rate matter once the optimiser is schedule-free? Per init at the first seed: schedule-free AdamW
    at its one default rate (`OUT/sf_default`, convergence.py's `<init>+sf`; default LoRA's is the grid's
    `lora+sf`), at the auto rate (`sf_autos`), and AdamW's grid-best, validation and test loss each."""
    runs = cv.saved_runs(os.path.join(out, "sf_default"))[0] if os.path.isdir(os.path.join(out, "sf_default")) else []
    runs += grid["lora+sf"]["runs"] if "lora+sf" in grid else []
    rows = []
    for m in INITS:
        fixed = [r for r in runs if r["method"] == f"{m}+sf"]
        if not fixed or m not in grid:
            continue
        s0 = min(r["seed"] for r in fixed)
        f, = [r for r in fixed if r["seed"] == s0]
        auto = [r for r in sf_autos if init_of(r["method"]) == m and r["seed"] == s0]
        best = [r for r in grid[m]["runs"] if r["seed"] == s0]
        rows.append({"init": m, "seed": s0, "default rate": _g(f["lr"]), "val at default": _f(f["final_val_loss"]),
                     "test at default": _f(f["final_loss"]),
                     "auto rate": _g(auto[0]["lr"]) if auto else None,
                     "val at auto": _f(auto[0]["final_val_loss"]) if auto else None,
                     "test at auto": _f(auto[0]["final_loss"]) if auto else None,
                     "AdamW grid-best rate": _g(grid[m]["best"]),
                     "AdamW grid-best val": _f(best[0]["final_val_loss"]) if best else None,
                     "AdamW grid-best test": _f(best[0]["final_loss"]) if best else None})
    return rows


def plot(grid: dict, autos: list[dict], inits: list[str], out: str, title: str, fixed: float | None = None,
         others: list[dict] = ()) -> None:
    """Validation loss against rate, one line per init, its auto runs starred; `others` (schedule-free AdamW's auto
    runs) as diamonds; the runner's former fixed AdamW rate (if any) dashed. Both axes are logarithmic: the losses
    near each best differ by less than the blow-ups above it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, m in enumerate(inits):
        color = f"C{i}"
        pts = sorted((lr, finite(v)) for lr, v in grid[m]["val"].items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=color, label=m, ms=4)
        for runs, marker, size in ((autos, "*", 120), (others, "D", 36)):
            mine = [r for r in runs if init_of(r["method"]) == m]
            if mine:
                ax.scatter([r["lr"] for r in mine], [r["final_val_loss"] for r in mine], marker=marker, s=size,
                           color=color, edgecolors="black", linewidths=0.5, zorder=5)
    if others:  # a legend entry for the diamonds (their colours are the inits')
        ax.scatter([], [], marker="D", s=36, color="white", edgecolors="black", linewidths=0.5,
                   label="schedule-free AdamW, auto rate")
    if fixed:
        ax.axvline(fixed, color="grey", ls="--", lw=1, label=f"runner's former AdamW rate ({fixed:g})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation loss")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    save_figure(fig, os.path.join(out, "rate.png"))
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["probe", "fit", "auto", "summary", "transfer"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--inits", nargs="+", default=INITS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--rule", choices=RULES, default="polyak",
                    help="auto: the rule to train with; summary: the rule whose auto runs the figure marks")
    ap.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES), help="probe: the rules to probe")
    ap.add_argument("--optimizer", choices=AUTO_OPTIMIZERS, default="adamw",
                    help="auto: the optimiser the auto runs train with (sf: schedule-free AdamW, rule anchored with "
                         "c = its default rate); summary: the optimiser of the auto runs the figure marks")
    ap.add_argument("--fit", default=None, help="the fit.json whose constants to use (default: OUT/fit.json)")
    ap.add_argument("--grid-from", default=None,
                    help="transfer: an earlier convergence.py results folder (default: OUT's own grid* folders)")
    ap.add_argument("--alias", nargs="*", default=[], help="transfer: init=spec, the init's spec in --grid-from")
    args, rest = ap.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cargs = cv.parser().parse_args(rest + ["--out", os.path.join(args.out, "grid")])
    p = cv.resolve_preset(cargs)
    fit_path = args.fit or os.path.join(args.out, "fit.json")
    if args.stage == "probe":
        _run(unprobed(_jobs(args, cargs, p, "probes"), args.out), probe_one)
    elif args.stage == "fit":
        print(json.dumps(fit(args.out), indent=1))
    elif args.stage == "auto":
        if args.optimizer == "sf":
            if args.rule != "anchored":
                raise SystemExit("--optimizer sf takes --rule anchored: its c is default LoRA's rate, which for "
                                 "schedule-free AdamW is its own default rate; the other rules' constants are "
                                 "fitted for AdamW")
            args.k = cv.FREE_LRS["sf"]
        else:
            with open(fit_path) as f:
                args.k = json.load(f)["rules"][args.rule]["k"]
        _run(_jobs(args, cargs, p, "auto"), cv._run_caught)
    elif args.stage == "transfer":
        aliases = dict(a.split("=", 1) for a in args.alias)
        print(transfer(args.out, fit_path, args.grid_from, aliases, cargs.preset))
    else:
        res = summarise(args.out, fit_path, cargs.preset, auto_label(args.rule, args.optimizer), runner_rate(p.model))
        print(res["markdown"])
        print(json.dumps(res["verdict"], indent=1))


if __name__ == "__main__":
    main()
