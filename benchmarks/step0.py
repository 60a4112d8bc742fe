"""The held-out loss right after the init, against the base model's (issue 23, item 6): does the default init step
ever raise it? For each preset and seed, the init (lora_fa and lora_one, the methods whose init is a step) is
built twice from the same statistics batches: as `lorafa.initialize` makes it (no guard) and with the step's guard
on the 2 training batches that follow the statistics sample (`guard_batches=`, the runner's and
`initialize_trainer`'s default). The validation and test losses of both, and the base model's, are written per run
to `OUT/<preset>_<init>_s<seed>.json`. `--main-job` runs the main job's command (`run_exp.py ++baseline=lora`) for
one training step and keeps its step-0 validation losses (LoRA-FA's, guarded as the runner does by default, and the
baseline's, B = 0: the base model's) and the guard's record in `OUT/main_job.json`. `--summary` tables them all
(`OUT/step0.md|csv`).

    python benchmarks/step0.py --preset classification --seeds 0 1 2 --threads 1
    python benchmarks/step0.py --preset causal --seeds 0 1 2 --threads 1
    python benchmarks/step0.py --main-job
    python benchmarks/step0.py --decisions causal main_job classification --threads 1
    python benchmarks/step0.py --summary

The validation and test sets are the convergence protocol's (benchmarks/convergence.py), so the rows match its
runs' step-0 losses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convergence as cv  # noqa: E402
from common import write_json, write_table  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results", "step0")
INITS = ("lora_fa", "lora_one")
PROTOCOL_SEEDS = {"causal": [0, 1, 4]}  # the rate protocol's seeds (benchmarks/rate_causal.sh); others 0 1 2
RAISE_TOL = 1e-3  # a held-out loss more than this above the base model's counts as raised


def _losses(model, task, val, collate, device, p) -> dict:
    return {"val": cv.heldout(model, val, collate, device)["loss"],
            "test": cv.heldout(model, task.test[: p.n_heldout], collate, device)["loss"]}


def _init(job: dict, prepared: tuple, guarded: bool):
    """(the PEFT model, its init's seconds): the job's init from its statistics batches, guarded (as the runner and
    convergence.py's `--guard-iters`, on the first training batches, an auto run's rate batches too) or not."""
    from lorafa import InitConfig, initialize

    args, p, device, task, model, collate, seed, split = prepared
    batches = [cv.to_device(b, device) for b in cv.init_batches(task, collate, p, split["init"])]
    guard = cv.guard_batches(task, collate, cv.train_order(split["train"], p, seed), args, device) if guarded else None
    init = InitConfig(method=job["method"], bsz=p.init_bsz, iters=p.init_iters, seed=seed)
    t = time.perf_counter()
    pm = initialize(model, cv.lora_config(p, args, task, True), init, batches=batches, guard_batches=guard,
                    progress=False)
    return pm, time.perf_counter() - t


def run_one(job: dict) -> dict:
    from lorafa.saving import init_record

    res = {"preset": job["preset_name"], "init": job["method"], "seed": job["seed"]}
    for guarded in (True, False):
        prepared = cv.prepare(job)
        args, p, device, task, model, collate, seed, split = prepared
        val = [task.train[i] for i in split["val"]]
        if guarded:
            res["base"] = _losses(model, task, val, collate, device, p)
        pm, seconds = _init(job, prepared, guarded)
        key = "guarded" if guarded else "unguarded"
        res[key] = dict(_losses(pm, task, val, collate, device, p), init_s=seconds)
        if guarded:
            res["guard"] = init_record(pm).summary["guard"]
            if res["guard"]["remedy"] is None:  # the guard changed nothing: the same model as without it
                res["unguarded"] = dict(res["guarded"], same_as_guarded=True)
                break
    write_json(job["path"], res)
    return res


def decisions(presets: list[str], seeds: dict, inits, rest: list[str], out: str) -> dict:
    """The guard's decision alone (no held-out evaluation) for each preset, init and seed: where it keeps the step
    (remedy None) the guarded model is the unguarded one, so runs made without the guard stand for guarded ones.
    Each entry is the guard's record (its passes over the guard examples and its seconds among them) and the whole
    init's seconds. Written to `OUT/guard_decisions.json` (resumable: entries present are kept)."""
    from lorafa.saving import init_record

    path = os.path.join(out, "guard_decisions.json")
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            done = json.load(f)
    for preset in presets:
        cargs = cv.parser().parse_args(rest + ["--out", out, "--preset", preset])
        p = cv.resolve_preset(cargs)
        for m in inits:
            for s in seeds[preset]:
                key = f"{preset}/{m}/s{s}"
                if key in done:
                    continue
                job = {"method": m, "lr": 0.0, "seed": s, "args": vars(cargs), "preset": dataclasses.asdict(p),
                       "preset_name": preset, "probe": None}
                pm, seconds = _init(job, cv.prepare(job), guarded=True)
                done[key] = dict(init_record(pm).summary["guard"], init_s=seconds)
                write_json(path, done)
                logging.info("%s: guard remedy %s (factor %g)", key, done[key]["remedy"], done[key]["chosen"])
    return done


def main_job(out: str) -> dict:
    """The main job's command, one training step, no test evaluation: its results.json's step-0 losses and guard."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "run_exp.py", "++baseline=lora", "++model.max_steps=1", "++eval.enabled=false",
               f"++output_root={tmp}"]
        subprocess.run(cmd, cwd=ROOT, check=True)
        path = next(os.path.join(dp, "results.json") for dp, _, files in os.walk(tmp)
                    if "results.json" in files and "baseline" not in dp)
        with open(path) as f:
            res = json.load(f)
    keep = {"command": " ".join(cmd[1:-1]), "method": res["method"], "val_at_init": res["validation_loss"]["at_init"],
            "base_val": res["baseline"]["validation_loss"]["at_init"], "guard": res.get("guard")}
    write_json(os.path.join(out, "main_job.json"), keep)
    return keep


def _mean(xs) -> float:
    return statistics.mean(xs)


def summary(out: str) -> str:
    runs = [json.load(open(os.path.join(out, f))) for f in sorted(os.listdir(out))
            if f.endswith(".json") and f not in ("main_job.json", "guard_decisions.json")]
    rows = []
    for preset in sorted({r["preset"] for r in runs}):
        for init in INITS:
            mine = [r for r in runs if r["preset"] == preset and r["init"] == init]
            if not mine:
                continue
            base_v, base_t = _mean([r["base"]["val"] for r in mine]), _mean([r["base"]["test"] for r in mine])
            raised = sum(r["guarded"][k] > r["base"][k] + RAISE_TOL for r in mine for k in ("val", "test"))
            rows.append({"set-up": preset, "init": init, "seeds": len(mine),
                         "base val": f"{base_v:.4f}", "init val": f"{_mean([r['guarded']['val'] for r in mine]):.4f}",
                         "base test": f"{base_t:.4f}",
                         "init test": f"{_mean([r['guarded']['test'] for r in mine]):.4f}",
                         "raised (runs × sets)": f"{raised} of {2 * len(mine)}",
                         "largest rise": f"{max(r['guarded'][k] - r['base'][k] for r in mine for k in ('val', 'test')):+.4f}",
                         "guard shortened the step": f"{sum(r['guard']['remedy'] is not None for r in mine)} of "
                                                     f"{len(mine)}",
                         "without the guard: val / test":
                             f"{_mean([r['unguarded']['val'] for r in mine]):.4f} / "
                             f"{_mean([r['unguarded']['test'] for r in mine]):.4f}"})
    if os.path.exists(os.path.join(out, "main_job.json")):
        with open(os.path.join(out, "main_job.json")) as f:
            job = json.load(f)
        mine, base, guard = job["val_at_init"], job["base_val"], job["guard"]
        rows.append({"set-up": "main job (leg_counting, every linear layer)", "init": job["method"],
                     "seeds": 1, "base val": f"{base:.4f}", "init val": f"{mine:.4f}", "base test": None,
                     "init test": None, "raised (runs × sets)": f"{int(mine > base + RAISE_TOL)} of 1",
                     "largest rise": f"{mine - base:+.4f}",
                     "guard shortened the step": None if guard is None else
                     f"{int(guard['remedy'] is not None)} of 1",
                     "without the guard: val / test": None})
    decided = os.path.join(out, "guard_decisions.json")
    if os.path.exists(decided):
        with open(decided) as f:
            decisions_table(json.load(f), out)
    return write_table(rows, list(rows[0]), os.path.join(out, "step0"),
                       "Held-out loss right after the init (means over seeds), against the base model's")


def decisions_table(done: dict, out: str) -> str:
    """`OUT/decisions.md|csv`: per preset and init, the guard's decision at each seed, the bound it decided by, the
    factors it tried (each a pass over its examples) and its seconds against the whole init's."""
    groups: dict[tuple[str, str], list] = {}
    for key, g in done.items():
        preset, init, seed = key.split("/")
        groups.setdefault((preset, init), []).append((int(seed[1:]), g))
    rows = []
    for (preset, init), items in sorted(groups.items()):
        items.sort()
        bounds = [next(b for x, _, b in g["tried"] if x == 1.0) for _, g in items]
        rows.append({"set-up": preset, "init": init, "seeds": " ".join(str(s) for s, _ in items),
                     "examples": items[0][1]["examples"],
                     "step kept (g = 1)": f"{sum(g['remedy'] is None for _, g in items)} of {len(items)}",
                     "mean change at g = 1": " / ".join(f"{g['loss_step'] - g['loss_before']:+.3f}" for _, g in items),
                     "its upper bound": " / ".join(f"{b:+.3f}" for b in bounds),
                     "passes": " / ".join(str(len(g["tried"])) for _, g in items),
                     "guard s": " / ".join(f"{g['seconds']:.1f}" if "seconds" in g else "—" for _, g in items),
                     "init s": " / ".join(f"{g['init_s']:.1f}" if "init_s" in g else "—" for _, g in items)})
    return write_table(rows, list(rows[0]), os.path.join(out, "decisions"),
                       "The guard's decision at the rate protocol's seeds (no evaluation)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--summary", action="store_true", help="only table the runs in --out")
    ap.add_argument("--main-job", action="store_true", help="the main job's step-0 losses (one training step)")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--decisions", nargs="+", default=None, metavar="PRESET",
                    help="only the guard's decision (no evaluation) for these presets, at their protocol's seeds "
                         "(causal: 0 1 4, others: 0 1 2; --seeds replaces them)")
    ap.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    ap.add_argument("--seeds", nargs="+", type=int, default=None,
                    help="default 0 1 2; with --decisions, each preset's protocol seeds")
    args, rest = ap.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.summary:
        print(summary(args.out))
        return
    if args.decisions:
        seeds = {pr: args.seeds or PROTOCOL_SEEDS.get(pr, [0, 1, 2]) for pr in args.decisions}
        os.makedirs(args.out, exist_ok=True)
        print(json.dumps({k: v["remedy"] for k, v in decisions(args.decisions, seeds, args.inits, rest,
                                                                 args.out).items()}, indent=1))
        return
    if args.main_job:
        os.makedirs(args.out, exist_ok=True)
        print(json.dumps(main_job(args.out), indent=1))
        return
    cargs = cv.parser().parse_args(rest + ["--out", args.out])
    p = cv.resolve_preset(cargs)
    os.makedirs(args.out, exist_ok=True)
    for m in args.inits:
        for s in args.seeds or [0, 1, 2]:
            path = os.path.join(args.out, f"{cargs.preset}_{m}_s{s}.json")
            if os.path.exists(path):
                continue
            job = {"method": m, "lr": 0.0, "seed": s, "args": vars(cargs),
                   "preset": dataclasses.asdict(p), "preset_name": cargs.preset, "probe": None, "path": path}
            r = run_one(job)
            logging.info("%s %s seed %d: base %s, init %s, guard %s", cargs.preset, m, s, r["base"], r["guarded"],
                         r["guard"]["remedy"])


if __name__ == "__main__":
    main()
