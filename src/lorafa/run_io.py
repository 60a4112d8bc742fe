"""What a run writes beside its results: its folder, resolved config, versions, metrics log and loss-curve plot."""

from __future__ import annotations

import csv
import dataclasses
import importlib.metadata
import json
import logging
import os
import socket
import sys
import time

from torch import nn
from transformers import TrainerCallback

from .fsio import write_atomic, write_json

logger = logging.getLogger("lorafa.run")
PACKAGES = ("lorafa", "torch", "transformers", "peft", "accelerate", "hydra-core", "safetensors")


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def run_name(cfg) -> str:
    if cfg.wandb.name:
        return str(cfg.wandb.name)
    return f"{cfg.dataset_name}-{cfg.init_config().method}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(cfg, state) -> str:
    """Create `<output_root>/<run name>`, refusing to overwrite a finished run unless asked; write run_config.json."""
    run_dir = os.path.abspath(os.path.join(cfg.output_root, run_name(cfg)))
    exists = os.path.exists(os.path.join(run_dir, "run_config.json"))
    state.wait_for_everyone()
    if exists and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"Run folder {run_dir} already exists: pass ++resume=true to continue it, ++overwrite=true "
                         "to replace it, or another ++wandb.name.")
    if state.is_main_process:
        os.makedirs(run_dir, exist_ok=True)
        data = dataclasses.asdict(cfg)
        data["eval"]["data_path"] = cfg.dataset.test_path or (cfg.dataset.path if cfg.dataset_name == "gsm8k" else None)
        data.update(run_dir=run_dir, argv=sys.argv, versions=package_versions(), world_size=state.num_processes)
        write_json(os.path.join(run_dir, "run_config.json"), data)
    state.wait_for_everyone()
    return run_dir


def network_reachable(host: str = "api.wandb.ai", port: int = 443, timeout: float = 2.0) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` (wandb logs offline otherwise)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def report_to(cfg) -> list[str]:
    """Trainer integrations: tensorboard and wandb when asked (wandb offline without network)."""
    out = []
    if cfg.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError as exc:
            raise ValueError("tensorboard=true needs the tensorboard package: pip install tensorboard") from exc
        out.append("tensorboard")
    if cfg.wandb.enabled:
        try:
            import wandb  # noqa: F401
        except ImportError as exc:
            raise ValueError("wandb.enabled=true needs the wandb package: pip install wandb") from exc
        os.environ.setdefault("WANDB_PROJECT", cfg.wandb.project)
        if cfg.wandb.entity:
            os.environ.setdefault("WANDB_ENTITY", cfg.wandb.entity)
        if "WANDB_MODE" not in os.environ and not network_reachable():
            logger.info("no network: wandb logs offline (sync later with `wandb sync`)")
            os.environ["WANDB_MODE"] = "offline"
        out.append("wandb")
    return out


class MetricsLogger(TrainerCallback):
    """Appends every Trainer log (loss, eval_loss, lr, ...) to `<run_dir>/metrics.jsonl`, and keeps a CSV copy."""

    def __init__(self, run_dir: str):
        self.jsonl = os.path.join(run_dir, "metrics.jsonl")
        self.csv = os.path.join(run_dir, "metrics.csv")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.write_row({"step": state.global_step, "epoch": state.epoch, **logs})

    def write_row(self, row: dict) -> None:
        """Append one record (e.g. a step's loss terms and phase, from lorafa.terms.TermsTrainer)."""
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._rewrite_csv()

    def _rewrite_csv(self) -> None:
        rows = read_metrics(os.path.dirname(self.jsonl))
        keys = list(dict.fromkeys(k for r in rows for k in r))
        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(rows)

        write_atomic(self.csv, write)


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(run_dir: str, label: str | None = None, others: dict[str, str] | None = None) -> str | None:
    """Training loss and validation loss against the step, as `<run_dir>/loss_curve.png`.

    Args:
        run_dir: the folder whose metrics.jsonl is plotted.
        label: its name in the legend (e.g. the method).
        others: more runs on the same axes, legend label -> folder (e.g. a baseline trained on the same batches).
    """
    series = {label or os.path.basename(run_dir): read_metrics(run_dir)}
    series.update({name: read_metrics(folder) for name, folder in (others or {}).items()})
    if not any(series.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (name, rows) in enumerate(series.items()):
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        held = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        aligned = [(r["step"], r["align_loss"]) for r in rows if "align_loss" in r and "loss" not in r]
        color = f"C{i}"
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.35, label=f"{name}: training loss")
        if held:
            ax.plot(*zip(*held), "o-", color=color, label=f"{name}: validation loss")
        if aligned:
            ax.plot(*zip(*aligned), ".", ms=3, color=color, label=f"{name}: alignment term D")
        if i == 0:  # the realignment phases of the first series, shaded
            for k, (a, b) in enumerate(align_spans(rows)):
                ax.axvspan(a - 0.5, b + 0.5, color="0.85", zorder=0, label="realignment phase" if k == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(os.path.basename(run_dir))
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(run_dir, "loss_curve.png")
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path


def align_spans(rows: list[dict]) -> list[tuple[int, int]]:
    """(first, last) step of each run of consecutive steps whose phase is "align" (from the per-step records)."""
    steps = sorted(r["step"] for r in rows if r.get("phase") == "align")
    spans = []
    for s in steps:
        if spans and s == spans[-1][1] + 1:
            spans[-1][1] = s
        else:
            spans.append([s, s])
    return [tuple(x) for x in spans]


def resolve_targets_keyword(model: nn.Module, target_modules: list[str]) -> list[str]:
    """Expand the group keywords `all-linear` (every Linear/Conv1D but the output head and classifier) and
    `last-block` (those of the last transformer block) into full module names; other lists pass through."""
    from .targets import SUPPORTED_LAYERS

    keys = set(target_modules)
    if not keys & {"all-linear", "last-block"}:
        return list(target_modules)
    if len(target_modules) != 1:
        raise ValueError(f"peft.target_modules: {sorted(keys)} mixes a keyword with names; use one or the other.")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    excluded = {id(head)} | {id(m) for n, m in model.named_modules() if n.split(".")[-1] in ("classifier", "score")}
    linear = [n for n, m in model.named_modules() if isinstance(m, SUPPORTED_LAYERS) and id(m) not in excluded]
    if "all-linear" in keys:
        return linear
    blocks = max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len, default=None)
    if not blocks:
        raise ValueError("peft.target_modules=[last-block]: the model has no list of blocks.")
    prefix = next(n for n, m in model.named_modules() if m is blocks[-1]) + "."
    return [n for n in linear if n.startswith(prefix)]
