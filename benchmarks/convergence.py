"""Convergence of LoRA inits side by side: PEFT's own (default LoRA, pissa, olora, lora_ga) against lorafa's
(lora_ga, lora_one, lora_fa and its variants, with and without the prec_reg preconditioner), on the same data, seeds
and optimiser.

Protocol (run-file format 2; see `FORMAT`):
- **Three disjoint pools of GSM8K/rotten_tomatoes training problems** (`data_split`): `--n-val` validation problems
  (default 64, the same for every seed), the init statistics batches (init_bsz × init_iters, drawn per seed) and the
  training pool the seeded training order draws from. The test loss is on `task.test[:n_heldout]`.
- **Every evaluation point records the validation loss, the test loss and the wall seconds so far** (init, i.e. the
  statistics pass + the init itself, plus training steps; evaluation time excluded), after the init and every
  `--eval-every` steps.
- **The learning rate is chosen on the validation loss.** At the first seed each method runs its grid: the middle
  rate and those above it, the lower ones only where the middle rate beat the higher ones (with a loss unimodal in
  the rate they cannot win otherwise; `--full-grid` runs them all). While the best validation rate is the lowest or
  highest one run, the grid is extended past that edge by the grid's own ratio (×4 for 5e-5, 2e-4, 8e-4), at most
  `--max-extend` rates per side (`next_rates`). A rate still at an edge is flagged "edge" in the summary.
- **Seeds**: the chosen rate of every method runs at each of `--seeds`; the summary reports mean ± std over them. The
  test loss is reported only at the chosen rate.
- **Speed**: "steps to X" is the step at which the test loss first reaches X, default LoRA's mean final test loss
  (linear interpolation between evaluations); "seconds to X (incl. init)" is the same on the wall-seconds axis, so
  the statistics pass and the init are paid for; the speed-ups are default LoRA's steps (seconds) over the method's.

Measured costs (SmolLM2-135M on GSM8K, 2-core CPU, 1 thread, fp32): one training step of batch 4 × 192 tokens takes
6.3 s; `heldout()` takes 17 s for 24 problems and 46 s for 64 (0.72 s a problem). The causal preset's test set was
raised from 24 to 64 problems: +29 s at each of the 5 evaluation points (about +20% on a run of 40 steps with 64
validation problems), for a test loss whose problem-to-problem noise is 1.6× smaller. (`--n-heldout 24` restores the
old set.) No base-model evaluation is made per run any more: default LoRA's test loss at 0 is the base model's.
`--step0-cache DIR` keeps each init's step-0 losses (per method and seed; the init is deterministic and does not see
the rate), so the other rates' runs evaluate only at their later points: a main-job run's evaluation goes from about
170 s to 85 s of its ~7 minutes.

Every run is one process (so init memory is measured cleanly); `--in-process` runs them all in the calling process
instead, one after another (on a GPU: no start-up per run, and seconds no other run contends for). Runs are cached
as JSON under `--out/runs/`, so an interrupted benchmark resumes where it stopped; `--summary-only` rebuilds the
tables and plots from the runs present. Results directories written before format 2 (no "val_curve" in the runs: the
rate was chosen on the test loss) are summarised the old way and titled "legacy".

    python benchmarks/convergence.py --preset causal --seeds 0 1 2 --out benchmarks/results/causal_val
    python benchmarks/convergence.py --preset causal --ablation --out benchmarks/results/causal_ablation
    python benchmarks/convergence.py --preset causal --ablation damping --out benchmarks/results/causal_damping
    python benchmarks/convergence.py --preset classification --seeds 0 1 2 --out benchmarks/results/cls_val

Method specs: `name[+flag][:key=value,...]`, the flag picking the optimiser (AdamW without one): `+prec` PEFT's
Riemannian preconditioner (`--prec-reg`), `+kfac` AdamW and `+kfac_sgd` SGD on K-FAC-preconditioned gradients from
the init's own statistics (`lorafa.optim`, `--kfac-reg`; SGD has its own rate grid, `Preset.sgd_lrs`), `+lora_pro`
AdamW on LoRA-Pro's adjusted factor gradients (`lorafa.optim.create_lora_pro_optimizer`, factor moments; any init,
e.g. `lora_fa+lora_pro`). The options
go to `lorafa.InitConfig(method=name, **options)` (to PEFT's `LoraGAConfig` for peft_lora_ga), e.g.
`lora_fa+prec:stable_gamma=16`, `lora_fa:target=natural,scale=kfac,offset=partial`, `lora_fa:target=natural,reg=1e-2`,
`lora_one:rank=auto,rank_rule=importance`. Values are read as int, else float, else string. Names: lora, pissa,
olora, peft_lora_ga (PEFT's), lora_ga, lora_one, lora_fa, corda, eva, milora, full (full fine-tuning).
`--ablation [design|damping|optimizers]` runs a named list of specs (`ABLATIONS`). A run that raises is logged, its
method leaves the benchmark, and meta.json's "failed" keeps the traceback. `--dtype float32` keeps the GPU recipe's
model in fp32 (default there: bf16); `--model PATH` replaces the preset's model (a smoke test on a tiny checkpoint).

Run file (`runs/<spec slug>_lr<lr>_s<seed>.json`, format 2): method, lr, seed, format, device, n_val, n_test,
init_s, init_peak_mb, curve ([[step, test loss], ...]: the key old results use), val_curve ([[step, val loss], ...]),
seconds ([init_s + training seconds at each evaluation point]), train_s (training only), eval_s, train_losses,
final_loss (test; inf if diverged), final_val_loss, diverged_at (if so), test_acc (classification).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import MALLOC_ENV, PeakMemory, device_info, pick_device, save_figure, timed, write_json, write_table  # noqa: E402
from harness import choose, finite, grid_ratio, mean_std, next_values, norm_value, selection_loss  # noqa: E402

FORMAT = 2  # the run-file format: 2 = validation-split protocol; runs without "val_curve" are legacy (format 1)
VAL_SEED = 7919  # the validation problems are one fixed draw, the same for every seed
PEFT_INITS = {"lora": True, "pissa": "pissa", "olora": "olora", "peft_lora_ga": "lora_ga"}
METHODS = ["lora", "pissa", "olora", "peft_lora_ga", "lora_ga", "lora_one", "lora_fa", "lora_fa+prec"]

# The init ablation (SPEC §2.5, §6). LoRA-FA's target {gradient, natural} × scale {stable, kfac, line_search} ×
# offset {none, partial} is a 10-of-12 fractional design: at offset=none the baseline (gradient, stable) and each
# factor changed alone; at offset=partial all six target × scale cells. So every main effect is measured against the
# baseline, and every two-factor interaction at one level of the third (target × scale at partial; target × offset
# at stable; scale × offset at gradient). Left out: (natural, kfac, none) and (natural, line_search, none). Then
# rank=auto at the fixed rank's parameter budget (budget_by=params): LoRA-FA's energy rule, GoRA's importance rule on
# LoRA-One, and the natural / line-search / partial variant with auto rank.
ABLATION = [
    "lora", "pissa", "peft_lora_ga", "lora_ga", "lora_one", "eva",
    "lora_fa:target=gradient,scale=stable,offset=none",
    "lora_fa:target=natural,reg=1e-2,scale=stable,offset=none",
    "lora_fa:target=gradient,scale=kfac,offset=none",
    "lora_fa:target=gradient,scale=line_search,offset=none",
    "lora_fa:target=gradient,scale=stable,offset=partial",
    "lora_fa:target=natural,reg=1e-2,scale=stable,offset=partial",
    "lora_fa:target=gradient,scale=kfac,offset=partial",
    "lora_fa:target=natural,reg=1e-2,scale=kfac,offset=partial",
    "lora_fa:target=gradient,scale=line_search,offset=partial",
    "lora_fa:target=natural,reg=1e-2,scale=line_search,offset=partial",
    "lora_fa:rank=auto,rank_rule=energy,budget_by=params",
    "lora_one:rank=auto,rank_rule=importance,budget_by=params",
    "lora_fa:target=natural,reg=1e-2,scale=line_search,offset=partial,rank=auto,rank_rule=energy,budget_by=params",
]
# The damping sweep of the natural-gradient target (λ relative to tr/dim, SPEC §2.5) with the line search and the
# partial offset (at the fixed `stable` step the natural target overshoots: docs/benchmarks.md, init probe), default
# LoRA as the reference.
DAMPING = ["lora"] + [f"lora_fa:target=natural,reg={reg},scale=line_search,offset=partial"
                      for reg in ("1e-4", "1e-3", "1e-2", "1e-1", "1")]
# The K-FAC preconditioner for training (lorafa.optim, SPEC §2.5) with AdamW and with SGD, on the
# init whose statistics it reuses, against the same init under plain AdamW and PEFT's Riemannian preconditioner.
OPTIMIZERS = ["lora", "lora_fa", "lora_fa+prec", "lora_fa+kfac", "lora_fa+kfac_sgd"]
# The variants of SPEC §9 beside LoRA-FA: KaSA and GOAT (their loss terms added as the runner adds them) and LoRA-FA
# trained with LoRA-Pro's projected gradients, against plain LoRA and LoRA-FA under AdamW.
VARIANTS = ["lora", "lora_fa", "kasa", "goat", "lora_fa+lora_pro"]
ABLATIONS = {"design": ABLATION, "damping": DAMPING, "optimizers": OPTIMIZERS, "variants": VARIANTS}
# +flag -> the optimiser: "" AdamW, prec PEFT's create_riemannian_optimizer, kfac/kfac_sgd lorafa's K-FAC one,
# lora_pro AdamW on LoRA-Pro's adjusted gradients (SPEC §9)
OPTIMIZER_FLAGS = ("", "prec", "kfac", "kfac_sgd", "lora_pro", "prodigy", "sf")
# The learning-rate-free rows (issue 23): +prodigy is Prodigy (prodigyopt) at its documented lr 1.0 under the same
# warm-up + cosine schedule as AdamW; +sf is schedule-free AdamW (schedulefree) at its default lr 0.0025 with the
# same warm-up steps and no schedule. Neither has a rate to choose: each runs only at FREE_LRS[flag].
FREE_LRS = {"prodigy": 1.0, "sf": 0.0025}


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
    n_val: int = 64
    # SGD on K-FAC-preconditioned gradients (+kfac_sgd): lr 0.5 is every layer's own Gauss-Newton step of the product
    # (lorafa.optim), which overshoots when all layers take it together (the line search scales the init's per-layer
    # K-FAC steps by 1/32), so the grid centres on 0.5/32 ≈ 0.0125. Measured: on the causal preset every rate
    # from 0.05 down to 7.3e-4 diverged (docs/benchmarks.md).
    sgd_lrs: list = dataclasses.field(default_factory=lambda: [0.003, 0.0125, 0.05])


CAUSAL_TASKS = ("gsm8k", "leg_counting")  # the presets' causal-LM tasks (the others are classification)
PRESETS = {
    # the reference set-up: SmolLM2-135M, GSM8K, r=8 on q,k,v,o, batch 4; 64 test problems (was 24: see the
    # measured costs in the module docstring)
    "causal": Preset("smollm2-135m-instruct", "gsm8k", ["q_proj", "k_proj", "v_proj", "o_proj"], batch=4, steps=40,
                     eval_every=10, n_heldout=64, max_length=192, lrs=[5e-5, 2e-4, 8e-4], full_lrs=[2e-5],
                     init_bsz=4, init_iters=8),
    # the main job's set-up (run_exp.py's defaults): SmolLM2-135M on reasoning-gym's leg_counting (256 generated
    # training problems: 64 validation, 16 for the init's statistics, 176 trained on once in 22 steps of 8), LoRA on
    # every linear layer (PEFT's all-linear for this model), max length 256, warm-up 3%
    "main_job": Preset("smollm2-135m-instruct", "leg_counting",
                       ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], batch=8,
                       steps=22, eval_every=11, n_heldout=64, max_length=256, lrs=[2.5e-4, 1e-3, 4e-3],
                       full_lrs=[2e-5], init_bsz=4, init_iters=4, warmup=0.03),
    # the runner's classification preset: all-MiniLM-L6-v2 on rotten_tomatoes, LoRA on q,k,v
    # (batch 16 and 48 tokens, 90% of the reviews whole, so that 2 variants × 9 methods × 3 seeds fit on 2 CPU cores)
    "classification": Preset("all-minilm-l6-v2", "rotten_tomatoes", ["query", "key", "value"], batch=16, steps=60,
                             eval_every=5, n_heldout=128, max_length=48, lrs=[3e-4, 1e-3, 3e-3],
                             full_lrs=[3e-5, 1e-4, 3e-4], init_bsz=32, init_iters=4),
}


def parse_spec(spec: str) -> tuple[str, str, dict]:
    """`lora_fa+prec:stable_gamma=16` -> ("lora_fa", "prec", {"stable_gamma": 16}); the flag is "" without one;
    values are int, else float, else string (`rank=auto` -> "auto", `reg=1e-2` -> 0.01, `offset=none` -> "none")."""
    head, _, opts = spec.partition(":")
    name, _, flag = head.partition("+")
    if flag not in OPTIMIZER_FLAGS:
        raise ValueError(f"Unknown flag +{flag} in {spec!r}: the flags are +prec (PEFT's Riemannian preconditioner), "
                         "+kfac (AdamW on K-FAC-preconditioned gradients), +kfac_sgd (SGD on them) and +lora_pro "
                         "(AdamW on LoRA-Pro's adjusted gradients), +prodigy (Prodigy) and +sf (schedule-free AdamW).")
    if not name:
        raise ValueError(f"No method name in spec {spec!r}.")
    options = {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key or not value:
            raise ValueError(f"Option {item!r} in {spec!r} is not key=value.")
        if key in options:
            raise ValueError(f"Option {key!r} is set twice in {spec!r}.")
        for cast in (int, float, str):
            try:
                options[key] = cast(value)
                break
            except ValueError:
                continue
    return name, flag, options


def check_spec(spec: str, p: Preset, seed: int = 0) -> None:
    """Raise (ValueError/TypeError) now, not after hours of runs, if the spec's options are not valid for its method:
    lorafa methods build their `InitConfig`."""
    name, flag, options = parse_spec(spec)
    if name == "full" or name in PEFT_INITS:
        if options and name != "peft_lora_ga":
            raise ValueError(f"{spec!r}: {name} takes no options.")
        if flag.startswith("kfac"):
            raise ValueError(f"{spec!r}: +{flag} reuses the init's K-FAC statistics; {name} collects none.")
        if flag == "lora_pro" and name == "full":
            raise ValueError(f"{spec!r}: +lora_pro adjusts LoRA factor gradients; full fine-tuning has none.")
        return
    from lorafa import InitConfig

    init = InitConfig(method=name, bsz=p.init_bsz, iters=p.init_iters, seed=seed, **options)
    if flag.startswith("kfac") and init.needs != "kfac":
        raise ValueError(f"{spec!r}: +{flag} reuses the init's K-FAC statistics; {name} with these options collects "
                         f"{init.needs!r} (use lora_fa, or lora_one:scale=kfac).")


def spec_slug(spec: str) -> str:
    """A filesystem-safe file-name stem for a spec, unique per spec: the spec itself where it has only [A-Za-z0-9_.+-],
    else a readable form (`:`/`,` -> `_`, `=` -> `-`) plus 8 hex digits of the spec's SHA-1."""
    if re.fullmatch(r"[A-Za-z0-9_.+-]+", spec):
        return spec
    readable = re.sub(r"[^A-Za-z0-9_.+-]+", "_", spec.replace("=", "-")).strip("_")
    return f"{readable}_{hashlib.sha1(spec.encode()).hexdigest()[:8]}"


# -- data and model --------------------------------------------------------------------------------------------
def load_everything(p: Preset, args, device, dtype):
    from lorafa.data import CausalLMCollator, ClassificationCollator
    from lorafa.data.datasets import load_task
    from lorafa.models import load_causal_lm, load_sequence_classifier

    if p.task in CAUSAL_TASKS:
        task = load_task(p.task, path=args.gsm8k if p.task == "gsm8k" else None, seed=0)
        model, tok = load_causal_lm(p.model, dtype=dtype)
        collate = CausalLMCollator(tok, max_length=p.max_length)
    else:
        task = load_task(p.task, seed=0)
        model, tok = load_sequence_classifier(p.model, num_labels=task.num_labels, dtype=dtype)
        collate = ClassificationCollator(tok, max_length=p.max_length)
    return task, model.to(device), tok, collate


def data_split(n_train: int, n_val: int, n_init: int, seed: int) -> dict[str, list[int]]:
    """Three disjoint sets of indices into task.train: `val` (n_val problems, one fixed draw, the same for every
    seed), `init` (the n_init problems of the init statistics batches, in batch order, drawn with `seed`) and
    `train` (all the others, ascending: the pool the seeded training order draws from)."""
    if n_val < 1 or n_init < 0 or n_val + n_init >= n_train:
        raise ValueError(f"cannot split {n_train} training examples into {n_val} validation, {n_init} init "
                         "and at least one training example")
    val = torch.randperm(n_train, generator=torch.Generator().manual_seed(VAL_SEED))[:n_val]
    keep = torch.ones(n_train, dtype=torch.bool)
    keep[val] = False
    pool = keep.nonzero().squeeze(1)
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    return {"val": val.tolist(), "init": pool[perm[:n_init]].tolist(),
            "train": pool[perm[n_init:]].sort().values.tolist()}


def train_order(pool: list[int], p: Preset, seed: int) -> list[list[int]]:
    """The training batches (indices into task.train, drawn from `pool` only): p.steps batches of p.batch, in a
    permutation seeded by 1000 + seed, repeated if the pool is smaller than steps × batch."""
    g = torch.Generator().manual_seed(1000 + seed)
    need = p.batch * p.steps
    pool_t = torch.tensor(pool, dtype=torch.long)
    idx = torch.cat([pool_t[torch.randperm(len(pool), generator=g)] for _ in range(math.ceil(need / len(pool)))])
    return idx[:need].view(p.steps, p.batch).tolist()


def init_batches(task, collate, p: Preset, init_idx: list[int]) -> list[dict]:
    """The init statistics batches: init_iters batches of init_bsz, from `data_split(...)["init"]`."""
    rows = torch.tensor(init_idx[: p.init_bsz * p.init_iters]).view(p.init_iters, p.init_bsz).tolist()
    return [collate([task.train[i] for i in idx]) for idx in rows]


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def heldout(model, examples, collate, device, batch_size=16) -> dict:
    """Mean loss over a held-out set (answer tokens for causal LMs, examples for classifiers) and accuracy."""
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
def probe_head(model, task, collate, device, seed: int, exclude=(), n: int = 1024, iters: int = 300) -> dict:
    """Fit the classification head on frozen features (logistic regression, full batch) of the first `n` training
    reviews not in `exclude` (the validation problems); returns its state dict."""
    head = model.classifier
    feats, labels = [], []
    handle = head.register_forward_hook(lambda m, a, o: feats.append(a[0].detach()))
    skip = set(exclude)
    rows = [task.train[i] for i in range(len(task.train)) if i not in skip][:n]
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


def guard_batches(task, collate, order: list[list[int]], args, device) -> list[dict]:
    """The init step's guard batches: the first `--guard-iters` training batches, which follow the statistics sample
    (as the runner's `init.guard_iters` takes them; the same batches an auto run's rate comes from)."""
    return [to_device(collate([task.train[i] for i in idx]), device)
            for idx in order[: getattr(args, "guard_iters", 0)]]


def build(spec: str, model, task, collate, p: Preset, args, seed: int, device, init_idx: list[int],
          guard: list[dict] | None = None):
    """(the model to train (PEFT or full), the init's statistics or None), after the method's init from the
    statistics batches of `init_idx`. The statistics are kept only for the K-FAC optimisers (+kfac, +kfac_sgd). For
    lora_fa and lora_one a non-empty `guard` (`guard_batches`) turns the init step's guard on, as the runner does."""
    from peft import get_peft_model

    name, flag, options = parse_spec(spec)
    batches = init_batches(task, collate, p, init_idx)
    if name == "full":
        model.requires_grad_(True)
        return model, None
    if name in PEFT_INITS:
        cfg = lora_config(p, args, task, PEFT_INITS[name])
        if name == "peft_lora_ga":
            from peft import LoraGAConfig
            from peft.tuners.lora.loraga import preprocess_loraga

            cfg.lora_ga_config = LoraGAConfig(**options)

            def train_step():
                for b in batches:
                    model(**to_device(b, device)).loss.backward()

            preprocess_loraga(model, cfg, train_step)
        return get_peft_model(model, cfg), None
    from lorafa import InitConfig, collect_stats, initialize
    from lorafa.peft_bridge import GUARDED

    init = InitConfig(method=name, bsz=p.init_bsz, iters=p.init_iters, seed=seed, **options)
    batches = [to_device(b, device) for b in batches]
    stats = None
    if flag.startswith("kfac"):  # the same pass initialize would run, kept for the optimiser
        stats = collect_stats(model, batches, p.targets, kinds=(init.needs,), sketch=init.sketch_sizes, progress=False)
    peft_model = initialize(model, lora_config(p, args, task, True), init, batches=batches, stats=stats,
                            guard_batches=guard if guard and name in GUARDED else None, progress=False)
    return peft_model, stats


def method_terms(spec: str) -> list:
    """What the method adds to the training loss (KaSA's regulariser, GOAT's load balancing), as the runner does;
    the recorded training losses stay the task loss."""
    from lorafa.methods import METHODS
    from lorafa.terms import method_terms as terms_of

    name, _, options = parse_spec(spec)
    if name not in METHODS or METHODS[name].variant is None:
        return []
    from lorafa import InitConfig

    return terms_of(InitConfig(method=name, **options))


def optimizer(model, lr: float, flag: str, args, stats=None, warmup: int = 1):
    params = [q for q in model.parameters() if q.requires_grad]
    if flag == "prec":
        from peft.optimizers import create_riemannian_optimizer

        return create_riemannian_optimizer(model, torch.optim.AdamW, lr=lr, reg=args.prec_reg, weight_decay=0.0)
    if flag in ("kfac", "kfac_sgd"):
        from lorafa.optim import create_kfac_optimizer

        cls = torch.optim.AdamW if flag == "kfac" else torch.optim.SGD
        return create_kfac_optimizer(model, stats, cls, lr=lr, reg=args.kfac_reg, weight_decay=0.0)
    if flag == "lora_pro":
        from lorafa.optim import create_lora_pro_optimizer

        return create_lora_pro_optimizer(model, torch.optim.AdamW, lr=lr, moments="factor", weight_decay=0.0)
    if flag == "prodigy":
        from prodigyopt import Prodigy

        # safeguard_warmup: Prodigy's advice when the schedule has a warm-up (ours does)
        return Prodigy(params, lr=lr, weight_decay=0.0, safeguard_warmup=True)
    if flag == "sf":
        from schedulefree import AdamWScheduleFree

        return AdamWScheduleFree(params, lr=lr, weight_decay=0.0, warmup_steps=warmup)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def warmup_steps(p: Preset) -> int:
    return max(1, round(p.warmup * p.steps))


def schedule(step: int, p: Preset) -> float:
    warm = warmup_steps(p)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, p.steps - warm)))


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def prepare(job: dict):
    """A job's set-up: (args, preset, device, task, model, collate, seed, data split), the model loaded (with the
    probed head where the job has one) and torch seeded with the job's seed."""
    args, p = argparse.Namespace(**job["args"]), Preset(**job["preset"])
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    device, dtype = pick_device(args.device, args.dtype)
    seed = job["seed"]
    torch.manual_seed(seed)  # a classifier's new head is drawn while loading: the same head for the same seed
    task, model, _, collate = load_everything(p, args, device, dtype)
    if job.get("probe") is not None:
        model.classifier.load_state_dict(torch.load(job["probe"]))
    torch.manual_seed(seed)
    return args, p, device, task, model, collate, seed, data_split(len(task.train), p.n_val, p.init_bsz * p.init_iters,
                                                                   seed)


def guard_record(model) -> dict | None:
    """What the init step's guard found (lorafa's record), or None where it did not run."""
    from lorafa.saving import init_record

    record = init_record(model)  # None for PEFT's own inits and full fine-tuning
    return None if record is None else record.summary.get("guard")


def run_one(job: dict) -> dict:
    """Init + train + evaluate one (method, lr, seed); returns the result dict (and writes it to job["path"]). A job
    whose lr is "auto" trains at `suggest_rate`'s rate (from the first `lr_batches` training batches, default 2)."""
    args, p, device, task, model, collate, seed, split = prepare(job)
    test_set, val_set = task.test[: p.n_heldout], [task.train[i] for i in split["val"]]
    res = {"format": FORMAT, "method": job["method"], "lr": job["lr"], "seed": seed, "device": device_info(),
           "n_val": len(val_set), "n_test": len(test_set)}
    order = train_order(split["train"], p, seed)
    with PeakMemory(device) as mem, timed(device) as t:
        model, stats = build(job["method"], model, task, collate, p, args, seed, device, split["init"],
                             guard_batches(task, collate, order, args, device))
    res["init_s"], res["init_peak_mb"] = t["s"], mem.mb
    guard = guard_record(model)
    if guard is not None:
        res["guard"] = guard
    res.update(curve=[], val_curve=[], seconds=[])
    eval_s = 0.0

    def evaluate(step: int, clock: float) -> None:  # both losses and the wall seconds so far (init + training)
        nonlocal eval_s
        t0 = time.perf_counter()
        res["curve"].append([step, heldout(model, test_set, collate, device)["loss"]])
        res["val_curve"].append([step, heldout(model, val_set, collate, device)["loss"]])
        res["seconds"].append(clock)
        eval_s += time.perf_counter() - t0

    cached = step0_cached(job, seed)
    if cached:  # the init's held-out losses do not depend on the rate: another run of this init and seed measured them
        res["curve"].append([0, cached["test"]])
        res["val_curve"].append([0, cached["val"]])
        res["seconds"].append(res["init_s"])
        res["step0_cached"] = True
    else:
        evaluate(0, res["init_s"])  # after the init
        step0_store(job, seed, test=res["curve"][0][1], val=res["val_curve"][0][1])
    _, flag, _ = parse_spec(job["method"])
    if job["lr"] == "auto":  # the rate from lorafa.suggest_lr on the first training batches (outside the init's)
        res.update(suggest_rate(model, [to_device(collate([task.train[i] for i in idx]), device)
                                        for idx in order[:job.get("lr_batches", 2)]], job, seed))
    opt = optimizer(model, res["lr"], flag, args, stats, warmup=warmup_steps(p))
    del stats
    # schedule-free AdamW has its own warm-up and no schedule; its evaluation point is set by opt.eval()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, (lambda s: 1.0) if flag == "sf" else (lambda s: schedule(s, p)))
    terms = method_terms(job["method"])
    model.train()
    if flag == "sf":
        opt.train()
    train_losses, train_s = [], 0.0
    for step, idx in enumerate(order, start=1):
        _sync(device)
        t0 = time.perf_counter()
        batch = to_device(collate([task.train[i] for i in idx]), device)
        out = model(**batch)
        loss = out.loss
        if not torch.isfinite(loss):
            res["diverged_at"] = step
            break
        total = loss + sum(t.weight(step - 1) * t(model, batch, out, step - 1) for t in terms)
        total.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        train_losses.append(loss.item())
        _sync(device)
        train_s += time.perf_counter() - t0
        if step % p.eval_every == 0 or step == p.steps:
            if flag == "sf":
                opt.eval()
            evaluate(step, res["init_s"] + train_s)
            if flag == "sf":
                opt.train()
                model.train()
    res["train_s"], res["eval_s"], res["train_losses"] = train_s, eval_s, train_losses
    if flag == "sf":
        opt.eval()
    if task.kind == "classification":
        res["test_acc"] = heldout(model, task.test, collate, device, batch_size=64)["acc"]
    diverged = "diverged_at" in res
    res["final_loss"] = float("inf") if diverged else res["curve"][-1][1]
    res["final_val_loss"] = float("inf") if diverged else res["val_curve"][-1][1]
    write_json(job["path"], res)
    return res


# what the held-out losses right after the init depend on, besides the method and the seed: the preset (its rate grid,
# evaluation points and steps aside) and these options
STEP0_KEY_ARGS = ("rank", "alpha", "no_rslora", "prec_reg", "kfac_reg", "probe", "gsm8k", "device", "dtype", "model")
STEP0_FREE = ("lrs", "full_lrs", "sgd_lrs", "eval_every", "steps", "warmup")


def _step0_method(spec: str) -> str:
    """The spec whose step-0 losses `spec` shares: a rate-free optimiser's flag (+prodigy, +sf) only changes the
    optimiser, so `lora_fa+sf` starts where `lora_fa` does (the K-FAC and preconditioner flags keep their own)."""
    head, colon, opts = spec.partition(":")
    name, _, flag = head.partition("+")
    return name + colon + opts if flag in FREE_LRS else spec


def _step0_record(job: dict, seed: int) -> tuple[str | None, dict]:
    """The cache file of this (method, seed) under `--step0-cache` and what its losses depend on; (None, {}) without
    a folder (nothing is kept, and the data are not hashed)."""
    folder = job["args"].get("step0_cache")
    if not folder:
        return None, {}
    from lorafa.peft_bridge import GUARDED

    method = _step0_method(job["method"])
    key = {"method": method, "seed": seed, "probe": job.get("probe"),
           "preset": {k: v for k, v in job["preset"].items() if k not in STEP0_FREE},
           "args": {k: job["args"].get(k) for k in STEP0_KEY_ARGS}}
    if parse_spec(method)[0] in GUARDED:  # the guard changes where these inits start (records before it lack this)
        key["guard_iters"] = job["args"].get("guard_iters", 0)
    return os.path.join(folder, f"{spec_slug(method)}_s{seed}.json"), _step0_key(key)


def _step0_key(key: dict) -> dict:
    """The key as stored and compared: JSON values, with the GSM8K folder named by its content (`data_fingerprint`), not
    by where it lies (each checkout and machine spells the path differently), and dropped where the task is another."""
    key = json.loads(json.dumps(key, default=str))
    path = key["args"].get("gsm8k")
    key["args"]["gsm8k"] = data_fingerprint(path) if path and key["preset"].get("task") == "gsm8k" else None
    return key


@functools.lru_cache(maxsize=None)
def data_fingerprint(folder: str) -> str:
    """'sha256:' and the first 16 hex digits of the hash of a GSM8K folder's train.jsonl and test.jsonl, so that two
    copies of the same data match wherever they lie. A missing file raises FileNotFoundError."""
    h = hashlib.sha256()
    for name in ("train.jsonl", "test.jsonl"):
        f = os.path.join(folder, name)
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f} does not exist: --gsm8k must name the GSM8K folder (train.jsonl, test.jsonl)")
        h.update(name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()[:16]


def step0_cached(job: dict, seed: int) -> dict | None:
    """The held-out losses at step 0 another run of the same init and seed measured (`--step0-cache`), else None. The
    init is deterministic and the losses do not depend on the rate, so every rate of a grid (and the auto runs) can
    share them: each run then evaluates once, at its end. A record made under other options raises ValueError."""
    path, key = _step0_record(job, seed)
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        rec = json.load(f)
    if rec["key"] != key:
        raise ValueError(f"{path} was measured under other options ({rec['key']} against {key}): use another "
                         "--step0-cache folder for this set-up")
    return rec


def step0_store(job: dict, seed: int, test: float, val: float) -> None:
    path, key = _step0_record(job, seed)
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json(path, {"key": key, "test": test, "val": val})


def suggest_rate(model, batches: list[dict], job: dict, seed: int) -> dict:
    """`lorafa.suggest_lr` on `batches` with the job's rule and options (`lr_rule`, `lr_options`): the run-file keys
    lr (the suggestion), auto (the rule), lr_suggestion (its evidence) and suggest_s (its wall seconds)."""
    from lorafa import suggest_lr

    t0 = time.perf_counter()
    sug = suggest_lr(model, batches, "adamw", rule=job.get("lr_rule", "adam_step"), seed=seed,
                     **job.get("lr_options", {}))
    model.zero_grad(set_to_none=True)
    return {"lr": sug.lr, "auto": job.get("lr_rule", "adam_step"), "lr_suggestion": sug.evidence,
            "suggest_s": time.perf_counter() - t0}


# -- choosing the learning rate: the shared grid machinery (benchmarks/harness.py) ------------------------------
choose_rate, next_rates, _finite, _norm_lr = choose, next_values, finite, norm_value


# -- orchestration ----------------------------------------------------------------------------------------------
def run_id(method: str, lr: float, seed: int) -> str:
    return f"{spec_slug(method)}_lr{lr:g}_s{seed}"


def _run_caught(job: dict) -> dict:
    """run_one, with an exception returned as {"error": traceback} so one broken spec does not stop the others."""
    try:
        return run_one(job)
    except Exception:  # noqa: BLE001 - reported by run_jobs, and the method leaves the benchmark
        import traceback

        return {"method": job["method"], "lr": job["lr"], "seed": job["seed"], "error": traceback.format_exc()}


def _in_process(todo: list[dict]):
    """The runs one after another in this process (`--in-process`): no interpreter start, imports or CUDA context
    per run. The device is warmed up first (a matrix product and an SVD load their libraries), so the first run's
    init time is not charged for that."""
    import gc

    device, _ = pick_device(todo[0]["args"]["device"], todo[0]["args"]["dtype"])
    x = torch.randn(256, 256, device=device)
    torch.linalg.svd(x @ x.T)
    for job in todo:
        yield _run_caught(job)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_jobs(jobs: list[dict], n_parallel: int, run: bool = True, failed: dict | None = None,
             in_process: bool = False) -> list[dict]:
    """Run the jobs whose result file is missing (all cached ones are reused); returns the results present. A run
    that raises is logged and, with `failed`, recorded there as {method: traceback}; it leaves no run file. Each run
    is a fresh process (n_parallel at a time), or with `in_process` all run here, one after another."""
    todo = [j for j in jobs if not os.path.exists(j["path"])]
    logging.info("%d runs (%d cached)", len(jobs), len(jobs) - len(todo))
    if todo and run:
        with contextlib.ExitStack() as stack:
            if in_process:
                runs = _in_process(todo)
            else:
                pool = stack.enter_context(mp.get_context("spawn").Pool(n_parallel, maxtasksperchild=1))
                runs = pool.imap_unordered(_run_caught, todo)
            for r in runs:
                if "error" in r:
                    logging.error("%s lr=%s seed=%d FAILED:\n%s", r["method"], r["lr"], r["seed"], r["error"])
                    if failed is not None:
                        failed.setdefault(r["method"], r["error"])
                    continue
                logging.info("%-32s lr=%.4g seed=%d val=%.4f test=%.4f init %.1fs", r["method"], r["lr"], r["seed"],
                             r["final_val_loss"], r["final_loss"], r["init_s"])
    return [json.load(open(j["path"])) for j in jobs if os.path.exists(j["path"])]


def steps_to_reach(curve: list, target: float) -> float | None:
    """First step at which the held-out loss is <= target, linearly interpolated between evaluations."""
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return s0 + (s1 - s0) * ((l0 - target) / (l0 - l1) if l0 > target and l0 != l1 else 0.0)
    return None


def seconds_to_reach(run: dict, target: float) -> float | None:
    """The same on the wall-seconds axis (`run["seconds"]`: init + training seconds at each evaluation point)."""
    return steps_to_reach([[s, loss] for s, (_, loss) in zip(run["seconds"], run["curve"])], target)


def is_legacy(results: list[dict]) -> bool:
    """Runs written before format 2 (no validation curve: their rate was chosen on the test loss)."""
    return any("val_curve" not in r for r in results)


_ms = mean_std


def summary_tables(results: list[dict], methods: list[str], first_seed: int | None = None,
                   min_gain: float | None = None) -> dict:
    """The summary of a set of runs, without writing anything: `rows` (the summary table, one per method, as
    strings), `grid` (final validation loss per rate at the first seed), and the numbers behind them: `best_lr` and
    `best` (method -> its runs at that rate), `edge` (method -> None if its rate is bracketed, else the edge),
    `target` (default LoRA's mean final test loss), `ref_steps` and `ref_seconds` (default LoRA's mean steps and
    seconds to it; the last evaluation where a seed does not reach it) and `legacy`. Legacy runs (format 1) are
    summarised as they were: rate chosen on the final test loss (`legacy_summary_tables`)."""
    if is_legacy(results):
        return legacy_summary_tables(results, methods)
    import statistics as st

    if first_seed is None:
        first_seed = min(r["seed"] for r in results)
    best_lr, edge, grid = {}, {}, []
    for m in methods:
        seed0 = [r for r in results if r["method"] == m and r["seed"] == first_seed]
        if not seed0:
            continue
        best_lr[m], edge[m] = choose_rate({r["lr"]: selection_loss(r, min_gain) for r in seed0})
        for r in sorted(seed0, key=lambda r: r["lr"]):
            grid.append({"method": m, "lr": f"{r['lr']:g}", "final val loss": r["final_val_loss"],
                         "chosen": "✓" if r["lr"] == best_lr[m] else None})
    methods = [m for m in methods if m in best_lr]
    best = {m: sorted((r for r in results if r["method"] == m and r["lr"] == best_lr[m]), key=lambda r: r["seed"])
            for m in methods}
    ref = "lora" if "lora" in best else methods[0]
    target = st.mean(r["final_loss"] for r in best[ref])
    ref_steps = st.mean(steps_to_reach(r["curve"], target) or r["curve"][-1][0] for r in best[ref])
    ref_seconds = st.mean(seconds_to_reach(r, target) or r["seconds"][-1] for r in best[ref])
    points = [s for s, _ in best[ref][0]["curve"]]
    mid = min(points, key=lambda s: abs(s - points[-1] / 2))  # the evaluation nearest half-way (early progress)
    rows = []
    for m in methods:
        rs = best[m]
        steps = [x for x in (steps_to_reach(r["curve"], target) for r in rs) if x is not None]
        secs = [x for x in (seconds_to_reach(r, target) for r in rs) if x is not None]
        all_reach = len(steps) == len(rs)
        rows.append({
            "method": m, "chosen lr": f"{best_lr[m]:g}",
            "bracketed": "yes" if edge[m] is None else "edge (one rate)" if edge[m] == "both" else f"edge ({edge[m]})",
            "seeds": len(rs),
            "final val loss": _ms([r["final_val_loss"] for r in rs]),
            "test loss at 0": _ms([r["curve"][0][1] for r in rs]),
            f"test loss at step {mid}": _ms([dict(r["curve"]).get(mid) for r in rs]),
            "final test loss": _ms([r["final_loss"] for r in rs]),
            f"steps to {target:.3f}": _ms(steps, 1) if all_reach else f"{len(steps)}/{len(rs)} reach",
            f"seconds to {target:.3f} (incl. init)": _ms(secs, 0) if all_reach else f"{len(secs)}/{len(rs)} reach",
            "step speed-up": f"{ref_steps / st.mean(steps):.2f}×" if all_reach and st.mean(steps) > 0 else None,
            "time speed-up": f"{ref_seconds / st.mean(secs):.2f}×" if all_reach and st.mean(secs) > 0 else None,
            "test acc": _ms([r.get("test_acc") for r in rs]),
            "init s": _ms([r["init_s"] for r in rs], 1), "init peak MB": _ms([r["init_peak_mb"] for r in rs], 0),
        })
    if all(r["test acc"] is None for r in rows):
        for r in rows:
            del r["test acc"]
    return {"rows": rows, "grid": grid, "best_lr": best_lr, "best": best, "edge": edge, "target": target,
            "ref_steps": ref_steps, "ref_seconds": ref_seconds, "legacy": False}


def legacy_summary_tables(results: list[dict], methods: list[str]) -> dict:
    """The format-1 summary (runs without a validation curve): each method's rate is the one with the lowest final
    *test* loss at the first seed, and no bracketing, seconds or validation columns. Kept so the results committed
    before format 2 still summarise (and their generated tables still check) as they were written."""
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
        rows.append({
            "method": m, "best lr": f"{best_lr[m]:g}", "seeds": len(rs),
            "loss at 0": _ms([r["curve"][0][1] for r in rs]),
            "final loss": _ms([r["final_loss"] for r in rs]),
            f"steps to {target:.3f}": _ms(reached, 1) if len(reached) == len(rs) else f"{len(reached)}/{len(rs)} reach",
            "speed-up": f"{ref_steps / st.mean(reached):.2f}×" if len(reached) == len(rs) and reached else None,
            "test acc": _ms([r.get("test_acc") for r in rs]),
            "init s": _ms([r["init_s"] for r in rs], 1), "init peak MB": _ms([r["init_peak_mb"] for r in rs], 0),
        })
    return {"rows": rows, "grid": grid, "best_lr": best_lr, "best": best, "edge": {}, "target": target,
            "ref_steps": ref_steps, "ref_seconds": None, "legacy": True}


def summarise(results: list[dict], methods: list[str], out: str, title: str, first_seed: int | None = None,
              min_gain: float | None = None) -> str:
    s = summary_tables(results, methods, first_seed, min_gain)
    if s["legacy"]:
        title += " (legacy protocol: rate chosen on the test loss)"
    md = write_table(s["rows"], list(s["rows"][0]), os.path.join(out, "summary"), title)
    if s["legacy"]:
        md += "\n" + write_table(s["grid"], ["method", "lr", "final_loss"], os.path.join(out, "lr_grid"),
                                 "Learning-rate grid (final held-out loss, first seed)")
    else:
        md += "\n" + write_table(s["grid"], ["method", "lr", "final val loss", "chosen"], os.path.join(out, "lr_grid"),
                                 "Learning-rate grid (final validation loss, first seed)")
    plot(s, out, title)
    plot_bars(s, out, title)
    return md


def saved_runs(out: str) -> tuple[list[dict], list[str]]:
    """The runs cached under `<out>/runs/` and the method order of the benchmark that wrote `<out>/meta.json`
    (its `methods`; before format 2: `--methods`, then `full` with `--full`): what `--summary-only` summarises, read
    without torch or the data."""
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    args = meta["args"]
    methods = meta.get("methods") or list(args["methods"] or METHODS) + (["full"] if args.get("full") else [])
    runs_dir = os.path.join(out, "runs")
    results = []
    for name in sorted(os.listdir(runs_dir)):
        if name.endswith(".json"):
            with open(os.path.join(runs_dir, name)) as f:
                results.append(json.load(f))
    return results, [m for m in methods if any(r["method"] == m for r in results)]


def merge_meta(path: str, meta: dict) -> dict:
    """The meta.json of a benchmark run into an --out that may hold an earlier one's runs: the methods join the
    earlier list (its order kept), the command joins `commands`, and earlier `failed` entries and `devices` stay. The
    cached runs are reused as they are, so the preset (batch, steps, evaluation, grid...) and the first seed (where the
    rates are chosen) must be the earlier ones; otherwise ValueError."""
    meta = dict(meta, commands=[meta["command"]], failed={}, devices=[])
    if not os.path.exists(path):
        return meta
    with open(path) as f:
        old = json.load(f)
    if old.get("format", 1) != meta["format"]:
        raise ValueError(f"{os.path.dirname(path) or '.'} holds a format-{old.get('format', 1)} benchmark: write to "
                         "another --out")
    diff = {k: (old["preset"].get(k), v) for k, v in meta["preset"].items() if old["preset"].get(k) != v}
    if diff:
        raise ValueError(f"{os.path.dirname(path) or '.'} holds runs of another set-up ({diff}, as (there, now)): "
                         "pass the options it was run with, or write to another --out")
    if old["args"]["seeds"][0] != meta["args"]["seeds"][0]:
        raise ValueError(f"{os.path.dirname(path) or '.'} chose its rates at seed {old['args']['seeds'][0]}: put that "
                         "seed first in --seeds")
    legacy_device = [old["device"]] if "device" in old else []
    return dict(meta, methods=old["methods"] + [m for m in meta["methods"] if m not in old["methods"]],
                commands=old.get("commands", [old["command"]]) + [meta["command"]],
                failed=old.get("failed") or {}, devices=old.get("devices", legacy_device))


def first_seed(out: str) -> int | None:
    """The seed the rates were chosen at (`--seeds`' first, from `<out>/meta.json`); None for a legacy results dir
    (the summary then uses the smallest seed, as format 1 did)."""
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    return meta["args"]["seeds"][0] if meta.get("format", 1) >= 2 else None


def _line_style(m: str) -> str:
    return "-" if not m.startswith(("lora", "pissa", "olora", "peft", "full")) or "_" in m else "--"


def plot(s: dict, out: str, title: str) -> None:
    """Test loss per step at each method's rate (mean over seeds); against wall seconds incl. the init (format 2);
    and the learning-rate grid (final validation loss; test loss for legacy runs)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best, methods, target, legacy = s["best"], list(s["best"]), s["target"], s["legacy"]
    many = len(methods) > 8  # then one legend below the panels instead of one inside each
    legend_h = (0.17 * math.ceil(len(methods) / 2) + 0.4) if many else 0.0  # inches
    fig, axes = plt.subplots(1, 2 if legacy else 3, figsize=(13 if legacy else 19, 4.5 + legend_h))
    ref = best["lora"] if "lora" in best else best[methods[0]]
    top = ref[0]["curve"][0][1]
    for ax, xkey in zip(axes, ["step"] if legacy else ["step", "seconds"]):
        for m in methods:
            runs = best[m]
            n = min(len(r["curve"]) for r in runs)
            ys = [sum(r["curve"][i][1] for r in runs) / len(runs) for i in range(n)]
            xs = ([runs[0]["curve"][i][0] for i in range(n)] if xkey == "step" else
                  [sum(r["seconds"][i] for r in runs) / len(runs) for i in range(n)])
            ax.plot(xs, ys, marker="o", ms=3, label=f"{m} (lr {best[m][0]['lr']:g})", ls=_line_style(m))
        ax.axhline(target, color="gray", lw=0.8, ls=":")
        ax.set_ylim(target - 0.25 * (top - target), top * 1.05)  # outliers clipped
        ax.set(xlabel="step" if xkey == "step" else "wall seconds (statistics pass + init + training)",
               ylabel="test loss", title=f"{title}: chosen lr per method" if xkey == "step" else "against wall time")
        if not many:
            ax.legend(fontsize=6)
    ax2, key = axes[-1], "final_loss" if legacy else "final val loss"
    for m in methods:
        pts = sorted((float(g["lr"]), g[key]) for g in s["grid"] if g["method"] == m)
        line, = ax2.plot([a for a, _ in pts], [b if math.isfinite(b) else float("nan") for _, b in pts], marker="o",
                         label=m)
        chosen = [(float(g["lr"]), g[key]) for g in s["grid"] if g["method"] == m and g.get("chosen")]
        if chosen:  # the rate chosen on the validation loss
            ax2.plot(*zip(*chosen), marker="*", ms=14, color=line.get_color(), ls="none")
    ax2.set(xscale="log", xlabel="learning rate", ylabel="final held-out loss" if legacy else "final validation loss",
            title="learning-rate grid (first seed)")
    ax2.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax2.set_ylim(target - 0.25 * (top - target), top * 1.05)  # diverged rates clipped
    if many:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
        fig.subplots_adjust(bottom=(legend_h + 0.5) / (4.5 + legend_h))
    else:
        ax2.legend(fontsize=6)
    save_figure(fig, os.path.join(out, "convergence.png"))
    plt.close(fig)


def plot_bars(s: dict, out: str, title: str) -> None:
    """Bars per method (chosen rate, mean over seeds): speed-ups, final test loss, test accuracy, init time and
    memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best, methods, target = s["best"], list(s["best"]), s["target"]

    def mean(m, f):
        vals = [f(r) for r in best[m]]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    def speed(r):
        x = steps_to_reach(r["curve"], target)
        return s["ref_steps"] / x if x else 0.0

    def time_speed(r):
        x = seconds_to_reach(r, target) if "seconds" in r else None
        return s["ref_seconds"] / x if x and s["ref_seconds"] else 0.0

    panels = [("step speed-up to default LoRA's final loss\n(×, mean over seeds, 0 = not reached)", speed),
              ("time speed-up (incl. statistics + init)", None if s["legacy"] else time_speed),
              ("final test loss", lambda r: r["final_loss"]),
              ("test accuracy", lambda r: r.get("test_acc")), ("init wall time (s)", lambda r: r["init_s"]),
              ("init peak memory (MB)", lambda r: r["init_peak_mb"])]
    panels = [p for p in panels if p[1] is not None and any(p[1](r) is not None for m in methods for r in best[m])]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4))
    for ax, (label, f) in zip(axes, panels):
        ax.bar(range(len(methods)), [mean(m, f) for m in methods], color="tab:blue")
        ax.set_xticks(range(len(methods)), methods, rotation=60, ha="right", fontsize=6)
        ax.set_title(label, fontsize=9)
    fig.suptitle(title)
    save_figure(fig, os.path.join(out, "summary.png"))
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    """The command line (also what benchmarks/rate.py passes through to build its jobs)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="causal")
    ap.add_argument("--methods", nargs="+", default=None, help=f"method specs (default: {' '.join(METHODS)})")
    ap.add_argument("--ablation", nargs="?", const="design", choices=sorted(ABLATIONS), default=None,
                    help="run a named list of specs (ABLATIONS; default 'design': the init ablation), after --methods")
    ap.add_argument("--full", action="store_true", help="add full fine-tuning as a reference row (own lr grid)")
    ap.add_argument("--lrs", nargs="+", type=float, default=None, help="shared learning-rate grid")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0],
                    help="the rate is chosen at the first; every method's chosen rate runs at each")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--n-heldout", type=int, default=None, help="test problems (task.test[:n])")
    ap.add_argument("--n-val", type=int, default=None, help="validation problems carved from the training set (64)")
    ap.add_argument("--max-extend", type=int, default=3,
                    help="rates added past each end of the grid while the best validation rate is at that end")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--no-rslora", action="store_true")
    ap.add_argument("--prec-reg", type=float, default=1e-2, help="λ of the Riemannian preconditioner (+prec)")
    ap.add_argument("--kfac-reg", type=float, default=1e-2,
                    help="relative damping λ of the K-FAC preconditioner (+kfac, +kfac_sgd)")
    ap.add_argument("--probe", action="store_true", help="classification: fit the head on frozen features first")
    ap.add_argument("--gsm8k", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="model dtype (auto: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--model", default=None, help="model id or local path instead of the preset's")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (CPU: split the cores between them)")
    ap.add_argument("--in-process", action="store_true",
                    help="every run in this process, one after another (GPU: no per-run start-up, uncontended "
                         "seconds; CPU memory figures then include earlier runs' leftovers)")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1)))
    ap.add_argument("--out", required=True)
    ap.add_argument("--summary-only", action="store_true", help="summarise the runs present, run nothing")
    ap.add_argument("--min-gain", type=float, default=None,
                    help="a run whose final validation loss is not this far below its step-0 one counts as failed "
                         "when choosing and extending the grid (e.g. 0.03 on the classification preset, whose "
                         "chance-level runs end within ±0.015 of ln 2 and learning ones below 0.63); default: off")
    ap.add_argument("--step0-cache", default=None,
                    help="a folder for the held-out losses right after each init (per method and seed): the runs of "
                         "other rates and the auto runs reuse them instead of evaluating at step 0 again; each record "
                         "is keyed by the options it depends on, with the GSM8K data named by content, not by path")
    ap.add_argument("--guard-iters", type=int, default=2,
                    help="lora_fa, lora_one: the init step's guard on the first k training batches (the runner's "
                         "default, init.guard_iters=2; 0: off)")
    ap.add_argument("--full-grid", action="store_true",
                    help="run every rate of the grid, not only the ones that can win")
    return ap


def resolve_preset(args) -> Preset:
    """The preset with the command line's replacements (and the GPU recipe's larger batch on CUDA)."""
    preset = PRESETS[args.preset]
    if pick_device(args.device)[0].type == "cuda" and args.batch is None:  # the GPU recipe: a larger batch
        preset = dataclasses.replace(preset, batch=preset.batch * 4)
    return dataclasses.replace(preset, **{k: v for k, v in dict(
        steps=args.steps, eval_every=args.eval_every, n_heldout=args.n_heldout, batch=args.batch,
        lrs=args.lrs, n_val=args.n_val, model=args.model).items() if v is not None})


def main(argv=None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    p = resolve_preset(args)
    if args.probe and args.preset != "classification":
        ap.error("--probe is for the classification preset")
    if args.max_extend < 0:
        ap.error("--max-extend must be >= 0")
    methods = list(args.methods or ([] if args.ablation else METHODS))
    methods += [m for m in ABLATIONS.get(args.ablation, []) if m not in methods]
    grid_methods = methods + (["full"] if args.full and "full" not in methods else [])
    if len({spec_slug(m) for m in grid_methods}) != len(grid_methods):
        ap.error("two method specs are the same")
    title = f"{args.preset}{' (linear probe first)' if args.probe else ''}"

    if args.summary_only:  # every run present, the old (format 1) results dirs included
        results, saved = saved_runs(args.out)
        present = {r["method"] for r in results}
        chosen = [m for m in (args.methods or []) + ABLATIONS.get(args.ablation, []) if m in present] or saved
        with open(os.path.join(args.out, "meta.json")) as f:
            gain = json.load(f)["args"].get("min_gain")
        print(summarise(results, chosen, args.out, title, first_seed=first_seed(args.out), min_gain=gain))
        return

    for m in grid_methods:
        try:
            check_spec(m, p, args.seeds[0])
        except (ValueError, TypeError) as e:
            ap.error(f"method spec {m!r}: {e}")
    runs_dir = os.path.join(args.out, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    for name in os.listdir(runs_dir):
        if name.endswith(".json") and "val_curve" not in json.load(open(os.path.join(runs_dir, name))):
            ap.error(f"{args.out} holds legacy (format 1) runs, e.g. {name}: write the new protocol to another --out "
                     "(or summarise the old one with --summary-only)")
    meta = {"format": FORMAT, "methods": grid_methods, "preset": dataclasses.asdict(p), "args": vars(args),
            "command": sys.argv}
    try:
        meta = merge_meta(os.path.join(args.out, "meta.json"), meta)
    except ValueError as e:
        ap.error(str(e))
    write_json(os.path.join(args.out, "meta.json"), meta)
    os.environ.update(MALLOC_ENV)  # inherited by the spawned run processes (see common.PeakMemory)
    probe_files = {}
    if args.probe:
        device, dtype = pick_device(args.device, args.dtype)
        task, model, _, collate = load_everything(p, args, device, dtype)
        val = data_split(len(task.train), p.n_val, p.init_bsz * p.init_iters, 0)["val"]  # the same for every seed
        for s in args.seeds:
            probe_files[s] = os.path.join(args.out, f"probe_head_s{s}.pt")
            if not os.path.exists(probe_files[s]):
                torch.manual_seed(s)
                tmp = probe_files[s] + ".tmp"
                torch.save(probe_head(model, task, collate, device, s, exclude=val), tmp)
                os.replace(tmp, probe_files[s])
        del model

    def job(m, lr, s):
        return {"method": m, "lr": lr, "seed": s, "args": vars(args), "preset": dataclasses.asdict(p),
                "probe": probe_files.get(s), "path": os.path.join(runs_dir, run_id(m, lr, s) + ".json")}

    if args.step0_cache:  # the runs already in --out (reused as they are) measured their inits' step-0 losses
        for r in saved_runs(args.out)[0]:
            j = job(r["method"], r["lr"], r["seed"])
            if r.get("val_curve") and r["curve"][0][0] == 0 and not step0_cached(j, r["seed"]):
                step0_store(j, r["seed"], test=r["curve"][0][1], val=r["val_curve"][0][1])
    lrs_of = {m: (p.full_lrs if m == "full" else p.sgd_lrs if parse_spec(m)[1] == "kfac_sgd"
                  else [FREE_LRS[parse_spec(m)[1]]] if parse_spec(m)[1] in FREE_LRS else p.lrs)
              for m in grid_methods}
    extend_of = {m: 0 if parse_spec(m)[1] in FREE_LRS else args.max_extend for m in grid_methods}  # no rate to choose
    ratio_of = {m: grid_ratio(lrs_of[m], default=grid_ratio(p.lrs)) for m in grid_methods}
    s0, failed = args.seeds[0], {}
    # every first-seed run already in --out counts (an earlier grid's rates, off this one's included)
    first = [r for r in saved_runs(args.out)[0] if r["seed"] == s0 and r["method"] in grid_methods]
    while True:  # the grid at the first seed, extended until every best validation rate is bracketed or capped
        todo = {}
        for m in grid_methods:
            if m in failed:  # a run of it raised: it leaves the benchmark (the error is in the log and meta.json)
                continue
            losses = {r["lr"]: selection_loss(r, args.min_gain) for r in first if r["method"] == m}
            todo[m] = next_rates(losses, lrs_of[m], ratio_of[m], extend_of[m], args.full_grid)["next"]
        # interleaved (every method's first rate, then every second one...) so an interrupted run leaves each some
        jobs = [job(m, todo[m][i], s0) for i in range(max(map(len, todo.values()), default=0))
                for m in grid_methods if i < len(todo[m])]
        got = run_jobs(jobs, args.jobs, failed=failed, in_process=args.in_process) if jobs else []
        if not got:
            break
        first += got
    best = {m: choose_rate({r["lr"]: selection_loss(r, args.min_gain) for r in first if r["method"] == m})[0]
            for m in grid_methods if m not in failed and any(r["method"] == m for r in first)}
    if args.seeds[1:]:
        run_jobs([job(m, best[m], s) for m in best for s in args.seeds[1:]], args.jobs, failed=failed,
                 in_process=args.in_process)
    failed = {**{m: tb for m, tb in meta["failed"].items() if m not in best}, **failed}
    devices = meta["devices"] + [d for d in [device_info()] if d not in meta["devices"]]
    write_json(os.path.join(args.out, "meta.json"), dict(meta, devices=devices, failed=failed))
    results, saved = saved_runs(args.out)  # this benchmark's and the earlier ones' into the same --out
    if not [m for m in saved if m not in failed]:
        sys.exit(f"no method completed a run (the tracebacks are in {args.out}/meta.json)")
    print(summarise(results, [m for m in saved if m not in failed], args.out, title, first_seed=s0,
                    min_gain=args.min_gain))


if __name__ == "__main__":
    main()
