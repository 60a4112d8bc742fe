"""The tables in README.md and docs/*.md that report benchmark numbers, rendered from the committed results files.

Project rule: every figure in README/docs comes from a committed results file, and its table is generated from that
file by this script, never retyped. A generated block in a markdown file is

    <!-- generated: NAME (python benchmarks/tables.py) -->

    | ... the table, owned by this script ... |

    <!-- /generated -->

where NAME is a key of `BLOCKS`. Everything between the two markers is rewritten; nothing outside them is touched.

    python benchmarks/tables.py            # rewrite every stale block in place (atomic: temp file + rename)
    python benchmarks/tables.py --check    # exit 1 naming every stale block (tests/test_benchmarks.py runs this)
    python benchmarks/tables.py --list     # the registered blocks and the results files behind each

To add a table: write `render_x(root) -> str` that reads only committed files under `root` (the repository), register
it in `BLOCKS` with those files as its sources, put an empty marker pair where the table goes, and run the script.
The benchmark scripts' own code renders the cells (`common.markdown_table`, `convergence.summary_tables`), so a table
here shows exactly what the results files say. Nothing here runs a benchmark.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import glob
import json
import os
import re
import shutil
import statistics
import sys
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convergence  # noqa: E402
import init_probe  # noqa: E402
import quant  # noqa: E402
import stats_cost  # noqa: E402
import subspaces  # noqa: E402
from common import markdown_table, read_table  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_GLOBS = ["README.md", "docs/**/*.md"]  # the files whose generated blocks the script owns

CAUSAL = "benchmarks/results/causal_cpu"
CLS = "benchmarks/results/cls_cpu"
CLS_PROBE = "benchmarks/results/cls_probe_cpu"
STATS = "benchmarks/results/stats_cpu/stats_cost.json"
STATS_FSDP = "benchmarks/results/stats_fsdp_cpu"
# the main job's results (`python run_exp.py` writes `<run_dir>/results.json`; the lead commits one here)
MAIN_JOB = "docs/results/main_job/results.json"
FIRST_COMMAND = "docs/results/main_job/first_command.json"
CLASSIFICATION_JOB = "docs/results/classification/results.json"
INIT_MEMORY = "benchmarks/results/init_memory"
# the validation-split protocol (convergence.py's run format 2) and the subspace comparison (subspaces.py): their
# blocks render a "not run yet" line until these folders are committed
CAUSAL_VAL = "benchmarks/results/causal_val"
CAUSAL_GPU = "benchmarks/results/causal_gpu"
CLS_OPTIM = "benchmarks/results/cls_optim"
VARIANTS_CLS = "benchmarks/results/variants_cls"
KASA_TRUNCATION = "benchmarks/results/kasa_truncation"
ALIGN_FORGETTING = "benchmarks/results/align_causal_forgetting"
ALIGN_FORGETTING_ALL = "benchmarks/results/align_causal_forgetting_all"
ALIGN_FORGETTING_GPU = "benchmarks/results/align_causal_forgetting_gpu"
VARIANT_JOBS = [f"benchmarks/results/variants_main_job/{m}/results.json" for m in ("kasa", "goat", "lora_pro")]
CAUSAL_ABLATION = "benchmarks/results/causal_ablation"
CAUSAL_DAMPING = "benchmarks/results/causal_damping"
SUBSPACES = "benchmarks/results/subspaces_causal"
INIT_PROBE = "benchmarks/results/init_probe_causal"
INIT_PROBE_DAMPING = "benchmarks/results/init_probe_damping"
INIT_PROBE_CLS = "benchmarks/results/init_probe_cls_probe"
INIT_PROBE_CLS_SEARCH = "benchmarks/results/init_probe_cls_probe_search"
ALIGN_CLS = "benchmarks/results/align_cls"
ALIGN_CLS_ALL = "benchmarks/results/align_cls_all"
ALIGN_CAUSAL = "benchmarks/results/align_causal_gpu"
# the same preset rerun on the CPU with the GGUF file's eos token and GSM8K accuracy (--accuracy 64)
ALIGN_CAUSAL_CPU = "benchmarks/results/align_causal"
ALIGN_CAUSAL_CPU_COMMAND = (
    "python benchmarks/alignment.py --preset causal --seeds 0 1 2 --lr 3.2e-3 --teacher-lr 6e-5 1.8e-4 5.4e-4 "
    "--teacher-steps 200 --grid --grid-temperatures 2 4 8 --grid-task-steps 1 2 4 --eval-every 20 --ranks 4 8 16 "
    f"--accuracy 64 --threads 1 --gsm8k PATH --out {ALIGN_CAUSAL_CPU}")
QUANT = "benchmarks/results/quant_cpu/results.json"

BEGIN = re.compile(r"^<!-- generated: (?P<name>[\w.-]+) \(python benchmarks/tables\.py\) -->[ \t]*$", re.M)
END = re.compile(r"^<!-- /generated -->[ \t]*$", re.M)


# -- reading the results files ---------------------------------------------------------------------------------
def _path(root: str, rel: str) -> str:
    return os.path.join(root, rel)


def _summary_csv(root: str, results_dir: str) -> tuple[list[str], list[dict]]:
    """convergence.py's summary table, as it wrote it (`summary.csv`, cells as strings)."""
    return read_table(_path(root, os.path.join(results_dir, "summary.csv")))


@functools.lru_cache(maxsize=None)
def _runs_summary(root: str, results_dir: str) -> dict:
    """The same summary recomputed from the cached runs (`runs/*.json`) with convergence.py's own code, for the raw
    numbers the CSV rounds (steps to the reference loss, default LoRA's steps, per-seed accuracies)."""
    results, methods = convergence.saved_runs(_path(root, results_dir))
    return convergence.summary_tables(results, methods, convergence.first_seed(_path(root, results_dir)))


@functools.lru_cache(maxsize=None)
def _stats(root: str) -> dict:
    with open(_path(root, STATS)) as f:
        return json.load(f)


def _stats_row(root: str, mode: str, processes: int = 1) -> dict:
    for r in _stats(root)["rows"]:
        if r["mode"] == mode and r["processes"] == processes:
            return r
    raise KeyError(f"{STATS} has no row for mode {mode!r} with {processes} process(es)")


# -- the convergence tables ------------------------------------------------------------------------------------
def render_convergence(root: str, results_dir: str) -> str:
    """The whole summary table of one convergence benchmark (docs/benchmarks.md), as `summary.md` shows it."""
    columns, rows = _summary_csv(root, results_dir)
    return markdown_table(rows, columns)


def _steps_column(columns: list[str]) -> str:
    return next(c for c in columns if c.startswith("steps to "))


def render_causal_brief(root: str, results_dir: str = CAUSAL) -> str:
    """README: the causal-LM summary without the seeds, accuracy and init-cost columns."""
    columns, rows = _summary_csv(root, results_dir)
    keep = ["method", "best lr", "loss at 0", "final loss", _steps_column(columns), "speed-up"]
    header = ["init", "best lr", "loss after init", "final loss", _steps_column(columns), "speed-up"]
    return markdown_table(rows, keep, header=header)


def render_cls_brief(root: str, random_head: str = CLS, probe_first: str = CLS_PROBE) -> str:
    """README: the two classification variants side by side (best lr, final loss, test accuracy of each)."""
    _, a = _summary_csv(root, random_head)
    _, b = _summary_csv(root, probe_first)
    by_method = {r["method"]: r for r in b}
    methods = [r["method"] for r in a] + [m for m in by_method if m not in {r["method"] for r in a}]
    first = {r["method"]: r for r in a}
    rows = []
    for m in methods:
        ra, rb = first.get(m, {}), by_method.get(m, {})
        rows.append({"init": m, "a_lr": ra.get("best lr"), "a_loss": ra.get("final loss"), "a_acc": ra.get("test acc"),
                     "b_lr": rb.get("best lr"), "b_loss": rb.get("final loss"), "b_acc": rb.get("test acc")})
    header = ["init", "random head: best lr", "final loss", "test accuracy", "probe first: best lr", "final loss",
              "test accuracy"]
    return markdown_table(rows, ["init", "a_lr", "a_loss", "a_acc", "b_lr", "b_loss", "b_acc"], header=header)


# -- the validation-split protocol (format 2) and the subspaces ---------------------------------------------------
def _not_run(results_dir: str, command: str, file: str = "") -> str:
    return f"_Not run yet: `{results_dir}/{file}` is not committed (`{command}`)._\n"


PROTOCOL_BRIEF = ["method", "chosen lr", "bracketed", "seeds", "test loss at step", "final test loss", "steps to",
                  "seconds to", "step speed-up", "time speed-up", "init s"]
# runs that shared one GPU 8 at a time: their seconds are contended, so no time columns
PROTOCOL_BRIEF_NO_TIME = ["method", "chosen lr", "seeds", "test loss at step", "final test loss", "steps to",
                          "step speed-up"]
PROTOCOL_NO_TIME = ["method", "chosen lr", "bracketed", "final val loss", "test loss at 0", "test loss at step",
                    "final test loss", "steps to", "step speed-up"]


def render_protocol(root: str, results_dir: str = CAUSAL_VAL, brief: bool = False, command: str = "",
                    columns: list | None = None, bracketed_only: bool = False) -> str:
    """A format-2 convergence summary (convergence.py's `summary.csv`): the rate chosen on the validation split, its
    bracketing, the test loss (mean ± std over seeds), steps and seconds (incl. the statistics pass and the init) to
    default LoRA's final test loss and both speed-ups. `brief`: the README's subset of the columns. A "not run yet"
    line while the folder is not committed. `columns`: column-name prefixes to show instead (e.g. PROTOCOL_NO_TIME).
    `bracketed_only`: only the methods whose chosen rate has worse rates on both sides."""
    if not os.path.exists(_path(root, os.path.join(results_dir, "summary.csv"))):
        return _not_run(results_dir, command or f"python benchmarks/convergence.py --out {results_dir}")
    present, rows = _summary_csv(root, results_dir)
    if "chosen lr" not in present:
        raise BlockError(f"{results_dir}/summary.csv is a legacy (format 1) summary; this block needs format 2")
    if bracketed_only:
        rows = [r for r in rows if r["bracketed"] == "yes"]
    keep = columns or (PROTOCOL_BRIEF if brief else None)
    if keep:
        present = [next(c for c in present if c.startswith(k)) for k in keep]
    return markdown_table(rows, present)


def render_csv_table(root: str, results_dir: str, stem: str, command: str) -> str:
    """A table a benchmark wrote with `write_table` (`<stem>.csv`), as its `.md` shows it (without the title)."""
    path = _path(root, os.path.join(results_dir, f"{stem}.csv"))
    if not os.path.exists(path):
        return _not_run(results_dir, command, f"{stem}.csv")
    columns, rows = read_table(path)
    return markdown_table(rows, columns)


ALIGN_TARGET_GAP = 0.9  # issue 10: distillation closes ≥ 90% of the base → teacher gap at rank 8


def _mean_of(cell: str) -> float:
    """The mean of a "m ± s" (or "m") cell of a benchmark's CSV."""
    return float(cell.split("±")[0])


def render_align_targets(root: str) -> str:
    """Issue 10's three targets, judged from the alignment benchmark's CSVs (students, extraction, forgetting)."""
    presets = (("causal (H100)", ALIGN_CAUSAL), ("causal (CPU)", ALIGN_CAUSAL_CPU), ("classification", ALIGN_CLS))
    rows = []
    texts, verdicts = [], []
    for name, folder in presets:
        path = _path(root, f"{folder}/students.csv")
        if not os.path.exists(path):
            texts.append(f"{name}: not run")
            continue
        distill = [r for r in read_table(path)[1] if r["student"] == "distill"]
        if distill:
            gap = distill[0]["gap closed"]
            texts.append(f"{name}: {gap} ({distill[0]['seeds']} seeds)")
            verdicts.append(f"{'met' if _mean_of(gap) >= ALIGN_TARGET_GAP else 'missed'} on {name}")
    rows.append({"target": f"distillation closes ≥ {ALIGN_TARGET_GAP:.0%} of the gap from the base's held-out loss to "
                           "the full fine-tune's (rank 8)", "measured": "; ".join(texts),
                 "verdict": "; ".join(verdicts) or "not run"})

    path = _path(root, f"{ALIGN_FORGETTING_GPU}/forgetting.csv")
    if os.path.exists(path):
        lams = [r for r in read_table(path)[1] if r["target met"] != "reference"]
        measured = "; ".join(f"λ = {r['λ']}: forgetting ratio {r['forgetting ratio']}, task gain kept "
                             f"{r['task-gain ratio']}" for r in lams)
        met = [r["λ"] for r in lams if r["target met"] == "yes"]
        rows.append({"target": "self-alignment halves forgetting at ≤ 10% loss of task gain (every linear layer, "
                               f"{lams[0]['seeds']} seeds)" if lams else "self-alignment halves forgetting",
                     "measured": measured, "verdict": f"met at λ = {', '.join(met)}" if met else "missed on the λ grid"})

    texts, verdicts = [], []
    for name, folder in (("causal (H100)", ALIGN_CAUSAL), ("causal (CPU)", ALIGN_CAUSAL_CPU),
                         ("classification, q/k/v", ALIGN_CLS),
                         ("classification, every linear layer", ALIGN_CLS_ALL)):
        path = _path(root, f"{folder}/extraction.csv")
        if not os.path.exists(path):
            continue
        columns, ext = read_table(path)
        metrics = [c.split(":")[0] for c in columns if c.endswith(": KL") and not c.startswith("identity")]
        better = [m for m in metrics
                  if all(r.get(f"{m}: KL") and float(r[f"{m}: KL"]) < float(r["identity: KL"]) for r in ext)]
        ranks = "/".join(r["rank"] for r in ext)
        texts.append(f"{name}: " + (", ".join(better) + f" below plain SVD at r = {ranks}" if better
                                    else f"no data-aware metric below plain SVD at every r of {ranks}"))
        verdicts.append(f"{'met' if better else 'missed'} on {name}")
    rows.append({"target": "data-aware extraction has a lower held-out KL to the teacher than plain SVD extraction "
                           "at every rank", "measured": "; ".join(texts), "verdict": "; ".join(verdicts)})
    return markdown_table(rows, ["target", "measured", "verdict"])


def render_subspaces(root: str, folder: str = SUBSPACES) -> str:
    """subspaces.py's summary (per LoRA-FA variant and side: mean and min principal-angle cosine against LoRA-One),
    as its `summary.md` shows it (without the title), from `subspaces.json`."""
    path = _path(root, os.path.join(folder, "subspaces.json"))
    if not os.path.exists(path):
        return _not_run(folder, f"python benchmarks/subspaces.py --out {folder}")
    with open(path) as f:
        return markdown_table(json.load(f)["rows"], subspaces.COLUMNS)


def render_init_probe(root: str, folder: str = INIT_PROBE) -> str:
    """init_probe.py's table (held-out loss right after each init, its step, its line-search factor), from
    `init_probe.json`, with the base model's losses in the last row."""
    path = _path(root, os.path.join(folder, "init_probe.json"))
    if not os.path.exists(path):
        return _not_run(folder, f"python benchmarks/init_probe.py --out {folder} --specs ...")
    with open(path) as f:
        rows = init_probe.table_rows(json.load(f))
    return markdown_table(rows, list(rows[0]))


# -- the statistics-pass tables --------------------------------------------------------------------------------
def render_stats(root: str) -> str:
    """docs/benchmarks.md: stats_cost.py's whole table, as `stats_cost.md` shows it (without its title)."""
    return markdown_table(_stats(root)["rows"], stats_cost.COLUMNS)


STATS_LABELS = {"floor": "floor", "grad": "grad (lora_ga, lora_one)", "kfac": "kfac (lora_fa)",
                "grad_offload": "grad, accumulated on CPU", "peft_lora_ga": "PEFT preprocess_loraga"}


def render_stats_brief(root: str) -> str:
    """README: seconds (with the 2-process speed-up), × floor, held MB and its ratio to the target weights, and the
    sketches' captured share and median worst cosine."""
    data = _stats(root)
    rank = data.get("args", {}).get("rank", "r")
    rows = []
    for r in data["rows"]:
        m = r["mode"]
        label = f"grad sketch k={m.split('_k')[1]}" if m.startswith("sketch_k") else STATS_LABELS.get(m, m)
        seconds = f"{r['s']:.2f}"
        if r.get("speed-up vs 1 process") is not None:
            seconds += f" ({r['speed-up vs 1 process']:.2f}× vs 1 process)"
        held = r.get("held MB")
        rows.append({"statistics": label, "processes": r["processes"], "seconds": seconds,
                     "× floor": f"{r['× floor']:.2f}",
                     "held": f"{held:.0f} MB" if held else None,
                     "ratio": f"{r['held / target fp32']:.3f}" if held else None,
                     "sketch": (f"{r['captured']:.3f}, {r['median_cos']:.2f}" if r.get("captured") is not None
                                else None)})
    header = ["statistics", "processes", "seconds", "× floor", "held", "held / target weights (fp32)",
              f"top-{rank} subspace: captured, median worst cos"]
    return markdown_table(rows, ["statistics", "processes", "seconds", "× floor", "held", "ratio", "sketch"],
                          header=header)


# -- the targets (docs/benchmarks.md) ------------------------------------------------------------------
def _reach(s: dict, method: str) -> tuple[list[float], int]:
    """Steps each seed of `method` (at its best rate) took to reach default LoRA's final loss (seeds that did), and
    the number of seeds."""
    steps = [convergence.steps_to_reach(r["curve"], s["target"]) for r in s["best"][method]]
    return [x for x in steps if x is not None], len(steps)


def _mean(vals):
    vals = [v for v in vals if v is not None]
    return statistics.mean(vals) if vals else None


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _sci(x: float) -> str:
    mant, exp = f"{x:.1e}".split("e")
    return f"{mant}e{int(exp)}"


def _verdict(met: list[str], missed: list[str]) -> str:
    if not missed:
        return "met"
    if not met:
        return "missed"
    return f"met for {', '.join(met)}; missed for {', '.join(missed)}"


def render_targets(root: str) -> str:
    """The issue's targets with what the results files say, and met / missed computed from them."""
    causal = _runs_summary(root, CAUSAL)
    variants = [("random head", _runs_summary(root, CLS)), ("probe first", _runs_summary(root, CLS_PROBE))]
    versions = [("LoRA-FA", "lora_fa"), ("LoRA-FA+prec", "lora_fa+prec")]
    rows = []

    reached, n = _reach(causal, "lora_fa")
    if len(reached) == n:
        ratio = statistics.mean(reached) / causal["ref_steps"]
        measured = f"{statistics.mean(reached):.1f} of {causal['ref_steps']:.0f} steps ({ratio:.2f})"
    else:
        ratio, measured = None, f"reached on {len(reached)} of {n} seeds"
    rows.append(("LoRA-FA reaches default LoRA's final loss in ≤ 1/3 of the steps (causal)", measured,
                 "met" if ratio is not None and ratio <= 1 / 3 else "missed"))

    parts, met, missed = [], [], []
    for label, s in variants:
        texts = []
        for name, m in versions:
            if m not in s["best"]:
                continue
            reached, n = _reach(s, m)
            if len(reached) == n:
                ratio = statistics.mean(reached) / s["ref_steps"]
                texts.append(f"{name} {statistics.mean(reached):.0f} steps vs default LoRA's {s['ref_steps']:.0f} "
                             f"({ratio:.2f})")
            else:
                ratio = None
                texts.append(f"{name} reaches it on {len(reached)} of {n} seeds")
            (met if ratio is not None and ratio <= 1 / 3 else missed).append(f"{label} {name}")
        parts.append(f"{label}: {', '.join(texts)}")
    # met when, on every variant, LoRA-FA with or without the preconditioner gets there in a third of the steps
    rows.append(("the same on the classification preset", "; ".join(parts),
                 "met" if all(any(v.startswith(lab) for v in met) for lab, _ in variants) else "missed"))

    parts, met, missed = [], [], []
    for label, s in variants:
        acc = {m: _mean(r.get("test_acc") for r in s["best"][m]) for m in s["best"]}
        texts = [f"{name} {_pct(acc[m])}" for name, m in versions if acc.get(m) is not None]
        parts.append(f"{label}: {', '.join(texts)} vs default LoRA {_pct(acc['lora'])} and PEFT's lora_ga "
                     f"{_pct(acc['peft_lora_ga'])}")
        for name, m in versions:
            if acc.get(m) is not None:
                ok = acc[m] >= acc["lora"] and acc[m] >= acc["peft_lora_ga"]
                (met if ok else missed).append(f"{label} {name}")
    if all(r.get("test_acc") is None for rs in causal["best"].values() for r in rs):
        parts.append("causal: not measured")
    rows.append(("LoRA-FA's test accuracy ≥ default LoRA and ≥ PEFT's lora_ga", "; ".join(parts),
                 _verdict(met, missed)))

    for mode, name, limit in (("grad", "grad", 1.2), ("kfac", "kfac", 1.5)):
        x = _stats_row(root, mode)["× floor"]
        rows.append((f"statistics pass ≤ {limit}× the floor ({name})", f"{x:.2f}×",
                     "met" if x <= limit else "missed"))
    grad = _stats_row(root, "grad")
    rows.append(("exact grad holds ≤ the target weights in fp32",
                 f"{grad['held / target fp32']:.2f}× ({grad['held MB']:.0f} MB)",
                 "met" if grad["held / target fp32"] <= 1.0 else "missed"))

    rank = _stats(root).get("args", {}).get("rank", "r")
    sketches = sorted((r for r in _stats(root)["rows"] if r["mode"].startswith("sketch_k") and r["processes"] == 1),
                      key=lambda r: int(r["mode"].split("_k")[1]))
    texts = []
    for i, r in enumerate(sketches):
        k = r["mode"].split("_k")[1]
        texts.append(f"k = {k}: {_pct(r['held / target fp32'])} held, median worst cosine {r['median_cos']:.2f}, "
                     f"{_pct(r['captured'])} of the rank-{rank} part captured" if i == 0 else
                     f"k = {k}: {_pct(r['held / target fp32'])}, {r['median_cos']:.2f}, {_pct(r['captured'])}")
    ok = any(r["held / target fp32"] <= 0.05 and r["median_cos"] >= 0.95 for r in sketches)
    rows.append(("sketch ≤ 5% of that, top-r cosines ≥ 0.95", "; ".join(texts) or "not measured",
                 "met" if ok else "missed"))

    peft = _stats_row(root, "peft_lora_ga")
    t, p = grad["s"] / peft["s"], grad["peak MB above model"] / peft["peak MB above model"]
    rows.append(("time and peak memory ≤ PEFT's `preprocess_loraga`",
                 f"{t:.2f}× time, {p:.2f}× peak ({grad['peak MB above model']} vs {peft['peak MB above model']} MB)",
                 "met" if t <= 1 and p <= 1 else "missed"))

    two = [r for r in _stats(root)["rows"] if r["mode"] == "grad" and r["processes"] == 2]
    rows.append(("2 processes: speed-up and equality",
                 f"{two[0]['speed-up vs 1 process']:.2f}×, max relative difference "
                 f"{_sci(two[0]['max rel diff vs 1 process'])}" if two else "not measured",
                 "reported" if two else "not run"))

    devices = [_stats(root).get("device", {})] + [r.get("device", {}) for s in [causal] + [v for _, v in variants]
                                                    for rs in s["best"].values() for r in rs]
    if os.path.isdir(_path(root, f"{CAUSAL_GPU}/runs")):
        devices += [r.get("device", {}) for rs in _runs_summary(root, CAUSAL_GPU)["best"].values() for r in rs]
    gpus = sorted({d["gpu"] for d in devices if d.get("gpu")})
    rows.append(("GPU table", f"measured on {', '.join(gpus)} (the causal ablation, {CAUSAL_GPU})" if gpus else
                 "no GPU was lent in this session; the scripts pick CUDA + bf16 + 4× batch automatically",
                 "run" if gpus else "not run"))
    return markdown_table([dict(zip(("target", "measured", "verdict"), r)) for r in rows],
                          ["target", "measured", "verdict"])


# -- the main job (run_exp.py) ---------------------------------------------------------------------------------
def _accuracy(p: dict | None) -> str | None:
    if not p or p.get("accuracy") is None:
        return None
    extra = f" ({p['correct']}/{p['n']})" if p.get("correct") is not None and p.get("n") else ""
    return f"{_pct(p['accuracy'])}{extra}"


def _seconds(x) -> str | None:
    if x is None:
        return None
    from lorafa.cli import minutes

    return f"{x:.1f} s" if x < 60 else f"{x:.1f} s ({minutes(x)})"


def render_main_job(root: str, path: str = MAIN_JOB) -> str:
    """The main job's accuracy before → after and its time, from the `results.json` that `python run_exp.py` writes
    (lorafa.train.run). Keys used (dotted = nested): `before.accuracy`, `after.accuracy` (fractions; `.correct` and
    `.n` are shown when present), `init_s`, `train_s`, `wall_s` (seconds), and optionally `method`, `steps`, and a
    `baseline` arm with the same keys but `before`/`wall_s` (a second row). A missing key renders as "—"."""
    return _job_table(_job_rows(root, path))


def render_jobs(root: str, paths: list[str]) -> str:
    """Several runner results (one `results.json` each, e.g. one per method) as rows of one main-job table."""
    return _job_table([row for path in paths for row in _job_rows(root, path)])


def _job_rows(root: str, path: str) -> list[dict]:
    full = _path(root, path)
    if not os.path.exists(full):
        raise FileNotFoundError(f"{path}: the run's results.json is not committed yet (the block needs it)")
    with open(full) as f:
        r = json.load(f)
    arms = [r] + ([r["baseline"]] if isinstance(r.get("baseline"), dict) else [])
    config = os.path.join(os.path.dirname(full), "run_config.json")  # the optimiser, when it is not AdamW
    optimizer = json.load(open(config)).get("model", {}).get("optimizer", "adamw") if os.path.exists(config) else "adamw"
    flag = "" if optimizer == "adamw" else f" + {optimizer}"
    val = lambda a: (f"{a['validation_loss']['first']:.3f} → {a['validation_loss']['last']:.3f}"  # noqa: E731
                     if a.get("validation_loss") else None)
    return [{"run": a.get("method", "main job") + flag + ("" if a is r else " (baseline)"), "steps": a.get("steps"),
             "before": _accuracy(r.get("before")), "after": _accuracy(a.get("after")), "val": val(a),
             "init": _seconds(a.get("init_s")), "train": _seconds(a.get("train_s")),
             "wall": _seconds(a.get("wall_s")) if a is r else None} for a in arms]


def _job_table(rows: list[dict]) -> str:
    return markdown_table(rows, ["run", "steps", "before", "after", "val", "init", "train", "wall"],
                          header=["run", "steps", "accuracy before", "accuracy after", "validation loss",
                                  "init (statistics + init)", "training", "whole run"])


def render_main_job_report(root: str, path: str = MAIN_JOB) -> str:
    """README: the last lines the main job printed, as the runner prints them (`lorafa.cli.report_lines`) from its
    committed `results.json`, with the paths relative to the folder the command ran in."""
    from lorafa.cli import report_lines

    with open(_path(root, path)) as f:
        r = json.load(f)
    run_dir = r.get("run_dir", "")
    prefix = run_dir[:run_dir.rfind("/outputs/") + 1] if "/outputs/" in run_dir else ""
    lines = [line.replace(prefix, "") if prefix else line for line in report_lines(r)]
    return "```text\n" + "\n".join(lines) + "\n```\n"


def render_first_command(root: str, path: str = FIRST_COMMAND) -> str:
    """The README's first command timed phase by phase in a fresh clone with an empty pip cache
    (benchmarks/first_command.py writes the file)."""
    with open(_path(root, path)) as f:
        r = json.load(f)
    rows = [{"phase": f"`{t['command'][:70]}{'…' if len(t['command']) > 70 else ''}`", "s": _seconds(t["seconds"])}
            for t in r["phases"]]
    rows += [{"phase": "**install (venv + pip, empty cache)**", "s": _seconds(r["install_s"])},
             {"phase": "**the whole first command**", "s": _seconds(r["total_s"])}]
    return markdown_table(rows, ["phase", "s"], header=["phase", "seconds"])


def render_init_memory(root: str, folder: str = INIT_MEMORY) -> str:
    """Peak and held memory of `lorafa.initialize` on the main job's set-up, before and after a change
    (benchmarks/init_memory.py writes one JSON per label)."""
    rows = []
    for label in ("before", "after"):
        with open(_path(root, f"{folder}/{label}.json")) as f:
            rows.append(json.load(f))
    return markdown_table(rows, ["label", "layers", "init_peak_mb", "held_after_init_mb"],
                          header=["code", "LoRA-FA layers", "peak during initialize (MB)", "held after it (MB)"])


def render_quant(root: str, path: str = QUANT) -> str:
    """quant.py's three tables (statistics pass fp32 vs nf4; lora_fa's and lora_ga's subspaces on nf4, and from other
    batches, against the fp32 init; the initialised nf4 model's quantization error), as its `.md` files show them,
    each under a one-line caption instead of its title, from `results.json`."""
    if not os.path.exists(_path(root, path)):
        return _not_run(os.path.dirname(path), f"python benchmarks/quant.py --out {os.path.dirname(path)}")
    with open(_path(root, path)) as f:
        rows = json.load(f)["rows"]
    parts = [("Statistics pass (kinds=(\"grad\",)), fp32 vs nf4, each model in its own process:", "stats_pass",
              quant.STATS_COLUMNS),
             ("The init's subspaces against the fp32 init's (mean principal-angle cosine per layer):", "subspaces",
              quant.SUBSPACE_COLUMNS),
             ("Quantization error of the initialised nf4 model against the fp32 model:", "quant_error",
              quant.ERROR_COLUMNS)]
    return "\n".join(f"{caption}\n\n{markdown_table(rows[stem], columns)}" for caption, stem, columns in parts)


# -- the README's "which init should I use" (the validated, rate-bracketed results) --------------------------------
# The main inits of the H200 ablation as they are named there: (the README's label, the name of the same init in
# the CPU validation-protocol run, if it ran there). lorafa's default LoRA-FA options (gradient target, `stable` step,
# no offset) are spelled out in the ablation's spec.
WHICH_INIT = {"lora_fa:target=gradient,scale=stable,offset=none": ("`lora_fa` (its defaults)", "lora_fa"),
              "lora_one": ("`lora_one`", None), "lora": ("`lora` (PEFT's default)", "lora"), "eva": ("`eva`", None),
              "peft_lora_ga": ("PEFT's LoRA-GA", None), "lora_ga": ("`lora_ga` (lorafa's)", None),
              "pissa": ("`pissa`", None)}


def _rate(x: float) -> str:
    """A learning rate as the docs write it: 0.0032 -> 3.2e-3, 0.0002 -> 2e-4, 0.0128 -> 1.28e-2."""
    mant, exp = f"{x:.2e}".split("e")
    return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"


def render_rate_grids(root: str) -> str:
    """docs/learning_rate.md: the causal and main-job rate grids: seed 0's validation loss at every rate each
    init ran (the chosen rate in bold), and the rate `anchored` gives that init at seed 0 with the classification
    constant (its probe; — where not probed yet)."""
    with open(_path(root, f"{RATE_CLS}/fit.json")) as f:
        k = json.load(f)["rules"]["anchored"]["k"]
    out = []
    for preset, results_dir in RATE_GRIDS.items():
        folders = sorted(glob.glob(_path(root, f"{results_dir}/grid*/lr_grid.csv")))  # grid, grid_low, grid_mid
        grid = [r for path in folders for r in read_table(path)[1]]
        probes = f"{results_dir}/probes"
        rates = sorted({float(r["lr"]) for r in grid})
        rows = []
        for init in dict.fromkeys(r["method"] for r in grid):
            row = {"init": init}
            for r in (r for r in grid if r["method"] == init):
                cell = f"{float(r['final val loss']):.3f}"
                row[_rate(float(r["lr"]))] = f"**{cell}**" if r["chosen"] else cell
            raw = []
            for path in sorted(glob.glob(_path(root, f"{probes}/{init}_s0_*.json"))):
                with open(path) as f:
                    raw += [v["raw"] for rule, v in json.load(f)["rules"].items() if rule == "anchored"]
            row["auto"] = _rate(float(f"{k * raw[0]:.3g}")) if raw else None
            rows.append(row)
        columns = [_rate(x) for x in rates]
        out.append(f"{preset}:\n\n" + markdown_table(rows, ["init"] + columns + ["auto"],
                                                       header=["validation loss at lr"] + columns + ["anchored"]))
    return "\n".join(out)


RATE_RULES = {"anchored+sf": "schedule-free AdamW (the runner's default)", "anchored": "AdamW"}
RATE_VERDICT_COLUMNS = ["set-up", "optimiser", "seeds", "(a) within a seed-std", "(b) cost / run",
                        "(c) lorafa's init at auto", "default LoRA's grid-best", "(c)"]


def render_rate_verdict(root: str) -> str:
    """docs/learning_rate.md: issue 23's three targets per preset, for the `anchored` rule with schedule-free AdamW
    (the runner's default) and with AdamW, read from each preset's `verdict.json` and `summary.csv` (rate.py
    summary): (a) how many inits end within one seed-std of their grid-best (the misses named, with their distance),
    (b) the suggestion's cost as a share of one run, (c) lorafa's init chosen on validation at its auto rate against
    default LoRA's grid-best."""
    rows = []
    for preset, folder in {"main job's set-up": RATE_MAIN, "causal (CPU protocol)": RATE_CAUSAL,
                           "classification": RATE_CLS}.items():
        with open(_path(root, f"{folder}/verdict.json")) as f:
            verdict = json.load(f)
        summary = read_table(_path(root, f"{folder}/summary.csv"))[1]
        for rule, optimiser in RATE_RULES.items():
            if rule not in verdict:
                rows.append({"set-up": preset, "optimiser": optimiser, "(a) within a seed-std": "not run"})
                continue
            mine = [r for r in summary if r["rule"] == rule]
            seeds = sorted({int(r["auto test loss"].split("(")[1].split()[0]) for r in mine})
            lora = next(r["grid-best test loss"] for r in mine if r["init"] == "lora")
            a = dict(verdict[rule]["a"])
            missed = [f"{r['init']} {float(r['Δ in seed-stds']):.2f}" for r in mine if a.get(r["init"]) is False]
            open_ = [r["init"] for r in mine if a.get(r["init"]) is None]
            costs = [100 * float(r["cost / run"]) for r in mine]
            c = verdict[rule]["c"]
            c_gap = c["auto test loss"] - c["lora grid-best test loss"]
            rows.append({
                "set-up": preset, "optimiser": optimiser,
                "seeds": "-".join(str(x) for x in dict.fromkeys([seeds[0], seeds[-1]])),
                "(a) within a seed-std": f"{sum(v is True for v in a.values())} of {len(a)}"
                + (f"; missed: {', '.join(missed)} stds" if missed else "")
                + (f"; undecided: {', '.join(open_)}" if open_ else ""),
                "(b) cost / run": f"{min(costs):.1f}-{max(costs):.1f}%",
                "(c) lorafa's init at auto": f"{c['init']} {c['auto test loss']:.3f}",
                "default LoRA's grid-best": lora,
                "(c)": "met" if c["met"] else f"missed by {c_gap:.3f}"})
    return markdown_table(rows, RATE_VERDICT_COLUMNS)


def render_which_init(root: str) -> str:
    """README: each main init at its own rate, chosen on the validation split and bracketed: the final test loss on
    the H200 (mean ± std over seeds) and, where it ran, on the CPU set-up; sorted by the H200 loss."""
    _, gpu = _summary_csv(root, CAUSAL_GPU)
    _, cpu = _summary_csv(root, CAUSAL_VAL)
    gpu, cpu = {r["method"]: r for r in gpu}, {r["method"]: r for r in cpu}
    rows = []
    for spec, (label, cpu_name) in WHICH_INIT.items():
        g = gpu[spec]
        if g["bracketed"] != "yes":
            raise BlockError(f"{CAUSAL_GPU}: {spec}'s rate is not bracketed; the verdict needs bracketed rates")
        c = cpu.get(cpu_name, {})
        rows.append({"init": label, "gpu": g["final test loss"], "seeds": g["seeds"],
                     "gpu_lr": _rate(float(g["chosen lr"])),
                     "cpu": c.get("final test loss") or "not run",
                     "cpu_lr": _rate(float(c["chosen lr"])) if c else None})
    rows.sort(key=lambda r: _mean_of(r["gpu"]))
    return markdown_table(rows, ["init", "gpu", "seeds", "gpu_lr", "cpu", "cpu_lr"],
                          header=["init", "H200: final test loss", "seeds", "its rate", "CPU: final test loss",
                                  "its rate"])


def render_rate_effect(root: str) -> str:
    """README: what the rate does, the H200 ablation's validation loss of each main init at every rate it ran (seed
    0, from `lr_grid.csv`); the chosen rate in bold. Ends with the range of the chosen rates."""
    _, grid = read_table(_path(root, f"{CAUSAL_GPU}/lr_grid.csv"))
    rates = sorted({float(r["lr"]) for r in grid if r["method"] in WHICH_INIT})
    rows, chosen = [], []
    for spec, (label, _) in WHICH_INIT.items():
        row = {"init": label}
        for r in (r for r in grid if r["method"] == spec):
            cell = f"{float(r['final val loss']):.3f}"
            if r["chosen"]:
                cell = f"**{cell}**"
                chosen.append(float(r["lr"]))
            row[_rate(float(r["lr"]))] = cell
        rows.append(row)
    columns = [_rate(x) for x in rates]
    table = markdown_table(rows, ["init"] + columns, header=["validation loss at lr"] + columns)
    return (f"{table}\nThe best rates run from {_rate(min(chosen))} to {_rate(max(chosen))}, "
            f"{max(chosen) / min(chosen):.0f}× apart.\n")


RATE_CLS = "benchmarks/results/rate_cls"  # issue 23's rate benchmark, classification preset (benchmarks/rate.py)
RATE_CMD = "python benchmarks/rate.py summary --preset classification --out benchmarks/results/rate_cls"
RATE_CAUSAL = "benchmarks/results/rate_causal"  # the same on the causal preset (CPU protocol, benchmarks/rate_causal.sh)
RATE_TRANSFER_CMD = ("python benchmarks/rate.py transfer --preset causal --out benchmarks/results/rate_causal "
                     "--fit benchmarks/results/rate_cls/fit.json --grid-from benchmarks/results/causal_gpu "
                     "--alias lora_fa=lora_fa:target=gradient,scale=stable,offset=none")
RATE_MAIN = "benchmarks/results/rate_main"  # the same on the main job's set-up (benchmarks/rate_main.sh)
RATE_MAIN_SF_CMD = "bash benchmarks/rate_main_sf.sh"
# the grids of the causal and main-job protocols (convergence.py writes lr_grid.csv in each of the
# results folder's grid* folders, one per grid centre)
RATE_GRIDS = {"causal (CPU protocol)": RATE_CAUSAL, "main job (leg_counting, every linear layer)": RATE_MAIN}
STEP0 = "benchmarks/results/step0"  # issue 23 item 6: the held-out loss right after the step inits (step0.py)
STATS_MEMORY = "benchmarks/results/stats_memory"  # issue 24: grouped sweeps against one pass
FACTORISATIONS = "benchmarks/results/factorisations"  # issue 24 (4): decomposition time against size
FITS = "benchmarks/results/fits"  # issue 24: what fits where, the plan on the published shapes


# -- the registry ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Block:
    render: Callable[[str], str]  # root -> the markdown between the markers
    sources: tuple[str, ...]  # the committed files it reads, relative to the root
    doc: str = ""


def csv_block(results_dir: str, stem: str, command: str, doc: str) -> Block:
    """A block showing `<results_dir>/<stem>.csv` as its benchmark wrote it (`command` is shown when it is missing)."""
    return Block(lambda root: render_csv_table(root, results_dir, stem, command), (f"{results_dir}/{stem}.csv",), doc)


BLOCKS: dict[str, Block] = {
    "causal_convergence": Block(lambda root: render_convergence(root, CAUSAL), (f"{CAUSAL}/summary.csv",),
                                "docs/benchmarks.md: the causal-LM summary"),
    "cls_convergence": Block(lambda root: render_convergence(root, CLS), (f"{CLS}/summary.csv",),
                             "docs/benchmarks.md: classification, random head"),
    "cls_probe_convergence": Block(lambda root: render_convergence(root, CLS_PROBE), (f"{CLS_PROBE}/summary.csv",),
                                   "docs/benchmarks.md: classification, probe first"),
    "stats_cost": Block(render_stats, (STATS,), "docs/benchmarks.md: the statistics pass"),
    "targets": Block(render_targets, (f"{CAUSAL}/runs/", f"{CAUSAL_GPU}/runs/", f"{CLS}/runs/", f"{CLS_PROBE}/runs/", STATS),
                     "docs/benchmarks.md: the issue's targets, met and missed"),
    "causal_convergence_brief": Block(render_causal_brief, (f"{CAUSAL}/summary.csv",), "README: causal LM"),
    "cls_convergence_brief": Block(render_cls_brief, (f"{CLS}/summary.csv", f"{CLS_PROBE}/summary.csv"),
                                   "README: classification, both variants"),
    "stats_cost_brief": Block(render_stats_brief, (STATS,), "README: the statistics pass"),
    "main_job": Block(render_main_job, (MAIN_JOB,), "the main job's before/after accuracy and time"),
    "classification_job": Block(lambda root: render_main_job(root, CLASSIFICATION_JOB), (CLASSIFICATION_JOB,),
                                "docs/main_job.md: the classification preset"),
    "first_command": Block(render_first_command, (FIRST_COMMAND,), "the README's first command, timed"),
    "causal_val": Block(lambda root: render_protocol(root, CAUSAL_VAL), (f"{CAUSAL_VAL}/summary.csv",),
                        "docs/benchmarks.md: causal LM, rate chosen on the validation split, seeds"),
    "causal_val_brief": Block(lambda root: render_protocol(root, CAUSAL_VAL, brief=True),
                              (f"{CAUSAL_VAL}/summary.csv",), "README: causal LM, validation protocol"),
    "causal_ablation": Block(
        lambda root: render_protocol(root, CAUSAL_ABLATION,
                                     command=f"python benchmarks/convergence.py --ablation --out {CAUSAL_ABLATION}"),
        (f"{CAUSAL_ABLATION}/summary.csv",), "docs/benchmarks.md: the init ablation (convergence.ABLATION)"),
    "causal_gpu": Block(
        lambda root: render_protocol(root, CAUSAL_GPU, columns=PROTOCOL_NO_TIME),
        (f"{CAUSAL_GPU}/summary.csv",), "docs/benchmarks.md: the ablation on an H200"),
    "causal_gpu_brief": Block(
        lambda root: render_protocol(root, CAUSAL_GPU, columns=PROTOCOL_BRIEF_NO_TIME, bracketed_only=True),
        (f"{CAUSAL_GPU}/summary.csv",), "README: the H200 ablation's bracketed rows"),
    "cls_optim": Block(
        lambda root: render_protocol(root, CLS_OPTIM, columns=PROTOCOL_NO_TIME, command=(
            f"python benchmarks/convergence.py --preset classification --ablation optimizers --out {CLS_OPTIM}")),
        (f"{CLS_OPTIM}/summary.csv",), "docs/benchmarks.md: the K-FAC preconditioner in training, classifier"),
    "variants_cls": Block(
        lambda root: render_protocol(root, VARIANTS_CLS, columns=PROTOCOL_NO_TIME + ["test acc"], command=(
            f"python benchmarks/convergence.py --preset classification --ablation variants --seeds 0 1 2 --out {VARIANTS_CLS}")),
        (f"{VARIANTS_CLS}/summary.csv",), "docs/benchmarks.md and README: KaSA, GOAT and LoRA-Pro beside LoRA-FA"),
    "variants_main_job": Block(lambda root: render_jobs(root, VARIANT_JOBS), tuple(VARIANT_JOBS),
                               "README: KaSA, GOAT and LoRA-Pro on the main job through the runner"),
    "align_causal_forgetting": csv_block(
        ALIGN_FORGETTING, "forgetting",
        f"python benchmarks/alignment.py --preset causal --forgetting --out {ALIGN_FORGETTING}",
        "docs/benchmarks.md: self-alignment against forgetting"),
    "align_causal_forgetting_all": csv_block(
        ALIGN_FORGETTING_ALL, "forgetting",
        f"python benchmarks/alignment.py --preset causal --forgetting --targets q_proj k_proj v_proj o_proj gate_proj "
        f"up_proj down_proj --steps 120 --general-text pydoc --out {ALIGN_FORGETTING_ALL}",
        "docs/benchmarks.md: self-alignment against forgetting, every linear layer"),
    "align_targets": Block(render_align_targets,
                           tuple(f"{d}/{f}" for d, f in ((ALIGN_CAUSAL, "students.csv"), (ALIGN_CLS, "students.csv"),
                                                         (ALIGN_CAUSAL_CPU, "students.csv"),
                                                         (ALIGN_FORGETTING_GPU, "forgetting.csv"),
                                                         (ALIGN_CAUSAL, "extraction.csv"), (ALIGN_CLS, "extraction.csv"),
                                                         (ALIGN_CAUSAL_CPU, "extraction.csv"),
                                                         (ALIGN_CLS_ALL, "extraction.csv"))),
                           "docs/benchmarks.md and README: issue 10's targets"),
    "align_causal_forgetting_gpu": csv_block(
        ALIGN_FORGETTING_GPU, "forgetting",
        f"bash benchmarks/alignment_causal.sh (--out {ALIGN_FORGETTING_GPU})",
        "docs/benchmarks.md and README: self-alignment against forgetting, every linear layer, 3 seeds (H100)"),
    "kasa_truncation": csv_block(KASA_TRUNCATION, "truncation",
                                 f"python benchmarks/kasa_truncation.py --out {KASA_TRUNCATION}",
                                 "docs/benchmarks.md: KaSA's truncation alone on SmolLM2"),
    "causal_damping": Block(
        lambda root: render_protocol(root, CAUSAL_DAMPING, command=(
            f"python benchmarks/convergence.py --ablation damping --out {CAUSAL_DAMPING}")),
        (f"{CAUSAL_DAMPING}/summary.csv",), "docs/benchmarks.md: the natural target's damping sweep"),
    "subspaces": Block(render_subspaces, (f"{SUBSPACES}/subspaces.json",),
                       "docs/benchmarks.md: LoRA-FA variants' subspaces against LoRA-One"),
    "init_probe": Block(render_init_probe, (f"{INIT_PROBE}/init_probe.json",),
                        "docs/benchmarks.md: held-out loss right after each init (no training)"),
    "init_probe_damping": Block(lambda root: render_init_probe(root, INIT_PROBE_DAMPING),
                                (f"{INIT_PROBE_DAMPING}/init_probe.json",),
                                "docs/benchmarks.md: the natural target's damping with the line search"),
    "init_probe_cls": Block(lambda root: render_init_probe(root, INIT_PROBE_CLS), (f"{INIT_PROBE_CLS}/init_probe.json",),
                            "docs/benchmarks.md: the init alone on the probe-first classifier"),
    "init_probe_cls_search": Block(lambda root: render_init_probe(root, INIT_PROBE_CLS_SEARCH),
                                   (f"{INIT_PROBE_CLS_SEARCH}/init_probe.json",),
                                   "docs/benchmarks.md: the same, line search on other training examples"),
    "align_cls_students": csv_block(ALIGN_CLS, "students", f"python benchmarks/alignment.py --out {ALIGN_CLS}",
                                    "docs/benchmarks.md: alignment students, classification"),
    "align_cls_extraction": csv_block(ALIGN_CLS, "extraction", f"python benchmarks/alignment.py --out {ALIGN_CLS}",
                                      "docs/benchmarks.md: extraction of the teacher, classification"),
    "align_cls_teacher": csv_block(ALIGN_CLS, "teacher_grid", f"python benchmarks/alignment.py --out {ALIGN_CLS}",
                                   "docs/benchmarks.md: the classification teacher's rate on validation"),
    "align_cls_grid": csv_block(ALIGN_CLS, "grid", f"python benchmarks/alignment.py --grid --out {ALIGN_CLS}",
                                "docs/benchmarks.md: the alignment's knobs on validation, classification"),
    **{f"align_causal_{stem}": csv_block(ALIGN_CAUSAL, stem, f"bash benchmarks/alignment_causal.sh (--out {ALIGN_CAUSAL})",
                                         f"docs/benchmarks.md: alignment, causal LM ({stem})")
       for stem in ("teacher_grid", "grid", "students", "extraction")},
    **{f"align_causal_cpu_{stem}": csv_block(ALIGN_CAUSAL_CPU, stem, ALIGN_CAUSAL_CPU_COMMAND,
                                             f"docs/benchmarks.md: alignment, causal LM, CPU ({stem})")
       for stem in ("teacher_grid", "grid", "students", "extraction")},
    "align_cls_extraction_all": csv_block(
        ALIGN_CLS_ALL, "extraction",
        f"python benchmarks/alignment.py --extract-targets all-linear --out {ALIGN_CLS_ALL}",
        "docs/benchmarks.md: extraction on every linear layer, classification"),
    "stats_fsdp": csv_block(
        STATS_FSDP, "stats_fsdp",
        f"python benchmarks/stats_cost.py --fsdp --targets all --threads 2 --out {STATS_FSDP}",
        "docs/benchmarks.md: the statistics pass under FSDP2, 2 processes"),
    "quant_cpu": Block(render_quant, (QUANT,), "docs/benchmarks.md: data-aware inits on a 4-bit (nf4) SmolLM2, CPU"),
    "main_job_report": Block(render_main_job_report, (MAIN_JOB,), "README: the main job's last lines, as it printed them"),
    "which_init": Block(render_which_init, (f"{CAUSAL_GPU}/summary.csv", f"{CAUSAL_VAL}/summary.csv"),
                        "README and docs/performance.md: each main init at its own bracketed rate, H200 and CPU"),
    "rate_effect": Block(render_rate_effect, (f"{CAUSAL_GPU}/lr_grid.csv",),
                         "README and docs/performance.md: the validation loss of each main init at every rate"),
    "init_memory": Block(render_init_memory, (f"{INIT_MEMORY}/before.json", f"{INIT_MEMORY}/after.json"),
                         "docs/main_job.md: memory of the init before and after issue 8"),
    "rate_cls": csv_block(RATE_CLS, "summary", RATE_CMD, "docs/learning_rate.md: grid-best rate against auto"),
    "rate_cls_rules": csv_block(RATE_CLS, "rules", RATE_CMD, "docs/learning_rate.md: every rule, fitted on LoRA"),
    "rate_cls_free": csv_block(RATE_CLS, "free", RATE_CMD, "docs/learning_rate.md: Prodigy and schedule-free AdamW"),
    "rate_causal_transfer": csv_block(RATE_CAUSAL, "transfer", RATE_TRANSFER_CMD,
                                      "docs/learning_rate.md: the classification constants on the causal preset"),
    "rate_causal": csv_block(RATE_CAUSAL, "summary", "bash benchmarks/rate_causal.sh",
                             "docs/learning_rate.md: the causal protocol, grid-best rate against auto"),
    "rate_causal_rules": csv_block(RATE_CAUSAL, "rules", "bash benchmarks/rate_causal.sh",
                                   "docs/learning_rate.md: the causal protocol, each rule and the runner's former fixed rate"),
    "rate_causal_free": csv_block(RATE_CAUSAL, "free", "bash benchmarks/rate_causal.sh",
                                  "docs/learning_rate.md: the causal preset's learning-rate-free row"),
    "rate_main": csv_block(RATE_MAIN, "summary", "bash benchmarks/rate_main.sh",
                           "docs/learning_rate.md: the main job's set-up, grid-best rate against auto"),
    "rate_main_rules": csv_block(RATE_MAIN, "rules", "bash benchmarks/rate_main.sh",
                                 "docs/learning_rate.md: the main job's set-up, each rule and the runner's former fixed rate"),
    "rate_main_free": csv_block(RATE_MAIN, "free", "bash benchmarks/rate_main.sh",
                                "docs/learning_rate.md: the main job's set-up, Prodigy and schedule-free AdamW"),
    "rate_main_sf": csv_block(RATE_MAIN, "sf_default", RATE_MAIN_SF_CMD,
                              "docs/learning_rate.md: schedule-free AdamW at its default rate and at the auto rate"),
    "rate_grids": Block(render_rate_grids, tuple(f"{d}/grid*/lr_grid.csv" for d in RATE_GRIDS.values())
                        + (f"{RATE_CLS}/fit.json", f"{RATE_CAUSAL}/probes", f"{RATE_MAIN}/probes"),
                        "docs/learning_rate.md: the causal and main-job grids, with anchored's seed-0 rate"),
    "rate_verdict": Block(render_rate_verdict, tuple(f"{d}/{f}" for d in (RATE_MAIN, RATE_CAUSAL, RATE_CLS)
                                                     for f in ("verdict.json", "summary.csv")),
                          "docs/learning_rate.md: issue 23's three targets on every preset, per optimiser"),
    "step0": csv_block(STEP0, "step0", "python benchmarks/step0.py --summary",
                       "docs/learning_rate.md: the held-out loss after the step inits, guarded, every set-up"),
    "step0_decisions": csv_block(STEP0, "decisions", "python benchmarks/step0.py --decisions classification causal "
                                 "main_job --threads 1 && python benchmarks/step0.py --summary",
                                 "docs/learning_rate.md: the guard's decision at the rate protocol's seeds"),
    "stats_memory": csv_block(STATS_MEMORY, "summary", "python benchmarks/stats_memory.py --out "
                              "benchmarks/results/stats_memory", "docs/scale.md: one pass against grouped sweeps"),
    "factorisations": csv_block(FACTORISATIONS, "summary", "python benchmarks/factorisations.py --out "
                                "benchmarks/results/factorisations",
                                "docs/scale.md: the factorisations' time against size, measured and planned"),
    "fits": csv_block(FITS, "summary", "python benchmarks/fits.py --out benchmarks/results/fits",
                      "docs/scale.md: what fits where (the plan on the published model shapes)"),
    "fits_brief": csv_block(FITS, "brief", "python benchmarks/fits.py --out benchmarks/results/fits",
                            "README: what fits where, LoRA-FA on every linear layer"),
}


# -- rewriting the blocks ----------------------------------------------------------------------------------------
class BlockError(ValueError):
    pass


def doc_files(root: str) -> list[str]:
    files = set()
    for pattern in DOC_GLOBS:
        files.update(glob.glob(os.path.join(root, pattern), recursive=True))
    return sorted(files)


def find_blocks(text: str, where: str = "") -> list[tuple[str, int, int]]:
    """(name, start, end) of each block's content: from after the opening marker's line to the closing marker."""
    out, pos = [], 0
    for m in BEGIN.finditer(text):
        if m.start() < pos:
            raise BlockError(f"{where}: block {m['name']!r} opens inside the previous block")
        end = END.search(text, m.end())
        nxt = BEGIN.search(text, m.end())
        if end is None or (nxt is not None and nxt.start() < end.start()):
            raise BlockError(f"{where}: block {m['name']!r} has no closing <!-- /generated -->")
        out.append((m["name"], m.end() + 1, end.start()))
        pos = end.end()
    if len(END.findall(text)) != len(out):  # each block is closed by the first closing marker after it
        raise BlockError(f"{where}: a <!-- /generated --> without an opening marker")
    return out


def render_block(name: str, root: str, where: str = "") -> str:
    if name not in BLOCKS:
        raise BlockError(f"{where}: unknown generated block {name!r}; known: {', '.join(BLOCKS)}")
    return "\n" + BLOCKS[name].render(root) + "\n"


def regenerate(text: str, root: str, where: str = "") -> tuple[str, list[str]]:
    """`text` with every block rendered afresh, and the names of the blocks that changed."""
    parts, stale, last = [], [], 0
    for name, start, end in find_blocks(text, where):
        new = render_block(name, root, where)
        if text[start:end] != new:
            stale.append(name)
        parts += [text[last:start], new]
        last = end
    parts.append(text[last:])
    return "".join(parts), stale


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    shutil.copymode(path, tmp)
    os.replace(tmp, path)


def run(root: str = ROOT, check: bool = False, out=sys.stdout) -> list[tuple[str, str]]:
    """Regenerate (or, with `check`, only compare) every block under `root`; returns the stale (file, block) pairs."""
    _runs_summary.cache_clear()  # read the results files afresh on every run
    _stats.cache_clear()
    stale_all = []
    for path in doc_files(root):
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
        rel = os.path.relpath(path, root)
        new, stale = regenerate(text, root, rel)
        for name in stale:
            stale_all.append((rel, name))
        if not stale:
            continue
        if check:
            for name in stale:
                print(f"stale: {rel}: block {name!r} differs from its results files "
                      f"({', '.join(BLOCKS[name].sources)}); run `python benchmarks/tables.py`", file=out)
            diff = difflib.unified_diff(text.splitlines(True), new.splitlines(True), f"{rel} (committed)",
                                        f"{rel} (from the results files)", n=0)
            out.write("".join(diff))
        else:
            atomic_write_text(path, new)
            print(f"updated {rel}: {', '.join(stale)}", file=out)
    return stale_all


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if any generated block is stale")
    ap.add_argument("--list", action="store_true", help="list the registered blocks and their results files")
    ap.add_argument("--root", default=ROOT, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.list:
        for name, b in BLOCKS.items():
            print(f"{name:26} {b.doc}\n{'':26} from {', '.join(b.sources)}")
        return 0
    try:
        stale = run(args.root, check=args.check)
    except (BlockError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check and stale:
        print(f"{len(stale)} stale generated block(s)", file=sys.stderr)
        return 1
    if not stale:
        print("every generated block is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
