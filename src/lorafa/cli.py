"""Hydra entry point of the experiment runner (`run_exp.py`, `lorafa-run`): compose, validate, run."""

from __future__ import annotations

import logging
import os

import hydra
from omegaconf import DictConfig, OmegaConf

from .runconfig import parse_run_config

logger = logging.getLogger("lorafa")
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "conf")


def run_from_config(cfg: DictConfig | dict) -> dict:
    """Validate a composed config at the one typed boundary, run it, and report where the results are."""
    from .train import run

    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    run_cfg = parse_run_config(data)
    results = run(run_cfg)
    if results.get("is_main_process", True):
        _report(results)
    return results


def _accuracy(p: dict) -> str:
    return f"{100 * p['accuracy']:.1f}% ({p['correct']}/{p['n']})"


def minutes(seconds: float) -> str:
    """A duration as people read it: "42.5 s" under a minute, else whole minutes and seconds ("10 min 0 s" for
    599.8 s: rounded once, so the seconds never read 60)."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60} s"


def report_lines(r: dict) -> list[str]:
    """The run's summary as the last lines a user sees: accuracy before -> after (and the baseline's), the time, and
    where the adapter, the plot and the results are."""
    arms = [r] + ([r["baseline"]] if r.get("baseline") else [])
    lines = [f"lorafa run finished: {r.get('dataset')} with {r.get('model')}"]
    if "before" in r:
        lines.append(f"  accuracy before training : {_accuracy(r['before'])}")
    for arm in arms:
        if "after" in arm:
            tag = "" if arm is r else " (baseline)"
            lines.append(f"  accuracy after, {arm['method']:<8}: {_accuracy(arm['after'])}{tag}")
    for arm in arms:
        if "validation_loss" in arm:
            v = arm["validation_loss"]
            lines.append(f"  validation loss, {arm['method']:<7}: {v['first']:.4f} -> {v['last']:.4f}")
    for arm in arms:
        if "lr_suggestion" in arm:
            ev = arm["lr_suggestion"]
            lines.append(f"  learning rate, {arm['method']:<9}: {arm['learning_rate']:.3g} (auto: {ev['rule']}, "
                         f"{ev['seconds']:.1f} s)")
    if r.get("wall_s") is not None:
        parts = ", ".join(f"{a['method']}: init {minutes(a['init_s'])}, {a['steps']} steps {minutes(a['train_s'])}"
                          for a in arms if "train_s" in a)
        lines.append(f"  time                     : {minutes(r['wall_s'])} ({parts})")
    for label, key in (("adapter", "adapter_dir"), ("merged model", "merged_dir"), ("loss curves", "plot")):
        if r.get(key):
            lines.append(f"  {label:<25}: {r[key]}")
    if r.get("baseline", {}).get("adapter_dir"):
        lines.append(f"  {'baseline adapter':<25}: {r['baseline']['adapter_dir']}")
    if r.get("run_dir"):
        lines.append(f"  {'results':<25}: {os.path.join(r['run_dir'], 'results.json')}")
    return lines


def _report(r: dict) -> None:
    logger.info("\n".join(report_lines(r)))


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    run_from_config(cfg)


if __name__ == "__main__":
    main()
