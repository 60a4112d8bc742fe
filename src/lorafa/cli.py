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


def _report(r: dict) -> None:
    lines = [f"lorafa run finished: {r.get('run_dir')}"]
    for phase in ("before", "after"):
        if phase in r:
            p = r[phase]
            lines.append(f"  accuracy {phase:6}: {p['accuracy']:.4f} ({p['correct']}/{p['n']}, {p['seconds']} s)")
    for key in ("init_s", "train_s", "steps", "wall_s", "adapter_dir", "merged_dir", "plot"):
        if r.get(key) is not None:
            lines.append(f"  {key:14}: {r[key]}")
    if r.get("run_dir"):
        lines.append(f"  results       : {os.path.join(r['run_dir'], 'results.json')}")
    logger.info("\n".join(lines))


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    run_from_config(cfg)


if __name__ == "__main__":
    main()
