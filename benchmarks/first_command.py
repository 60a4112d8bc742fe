"""Time the README's first command as a new user meets it: a fresh clone, a new venv, an empty pip cache.

The command is read from the README (its first bash line), so what is timed is what users type. It runs in a
fresh `git clone` of this repository (committed files only), with `PIP_NO_CACHE_DIR=1`, one phase per `&&`-part,
and writes the phases' seconds, the run's `results.json` and `run_config.json` to `--out`:

    python benchmarks/first_command.py --out docs/results/main_job
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import write_json  # noqa: E402


def readme_first_command(readme: str) -> str:
    """The first line of the README's first bash block."""
    block = re.search(r"```bash\n(.*?)```", readme, re.S)
    if not block:
        raise ValueError("README.md has no bash block")
    return next(line for line in block.group(1).splitlines() if line.strip())


def phases(command: str) -> list[str]:
    """The `&&`-separated parts: venv, installs, the run."""
    return [p.strip() for p in command.split("&&")]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "main_job"))
    p.add_argument("--keep", action="store_true", help="keep the temporary clone")
    args = p.parse_args(argv)
    command = readme_first_command(open(os.path.join(ROOT, "README.md")).read())
    work = tempfile.mkdtemp(prefix="lorafa-first-command-")
    clone = os.path.join(work, "lorafa")
    subprocess.run(["git", "clone", "-q", ROOT, clone], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env.update(PIP_NO_CACHE_DIR="1", LORAFA_CACHE=os.path.join(work, "lorafa-cache"), HF_HOME=os.path.join(work, "hf"))
    timings, t_all = [], time.perf_counter()
    for part in phases(command):
        t = time.perf_counter()
        proc = subprocess.run(part, shell=True, cwd=clone, env=env, capture_output=True, text=True)
        timings.append({"command": part, "seconds": round(time.perf_counter() - t, 1), "rc": proc.returncode})
        print(f"{timings[-1]['seconds']:8.1f} s  {part}", flush=True)
        if proc.returncode:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            break
        if "run_exp.py" in part:
            tail = proc.stdout.strip().splitlines()[-12:]
    total = round(time.perf_counter() - t_all, 1)
    run_at = next((i for i, t in enumerate(timings) if "run_exp.py" in t["command"]), len(timings))
    install = round(sum(t["seconds"] for t in timings[:run_at]), 1)  # everything before the run: venv and pip
    summary = {"command": command, "phases": timings, "install_s": install, "total_s": total,
               "pip_cache": "empty (PIP_NO_CACHE_DIR=1)", "ok": all(t["rc"] == 0 for t in timings)}
    os.makedirs(args.out, exist_ok=True)
    if summary["ok"]:
        summary["last_lines"] = tail
        run_dir = next(os.path.join(dp, "") for dp, _, files in os.walk(os.path.join(clone, "outputs", "runs"))
                       if "results.json" in files and "baseline" not in dp)
        for name in ("results.json", "run_config.json"):
            shutil.copyfile(os.path.join(run_dir, name), os.path.join(args.out, name))
        shutil.copyfile(os.path.join(run_dir, "loss_curve.png"), os.path.join(args.out, "loss_curve.png"))
    write_json(os.path.join(args.out, "first_command.json"), summary)
    print(json.dumps({k: summary[k] for k in ("install_s", "total_s", "ok")}))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
