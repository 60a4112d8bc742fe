"""Print pip constraints that pin each direct dependency of lorafa (and of its `dev` extra) to the lower bound that
pyproject.toml declares, one `name==version` a line. CI installs with them and runs the default test suite, so a
bound that is not true fails CI (the bounds are read from pyproject, so the two cannot drift).

    python3 ci/lowest_constraints.py [--skip NAME ...] [--extras dev trl quant] > lowest.txt
    pip install -e ".[dev,trl,quant]" -c lowest.txt

Every requirement must carry a `>=` lower bound; `--skip` leaves a package out (CI skips torch: see pyproject).
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")


def lower_bounds(extras=("dev",)) -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    pins: dict[str, str] = {}
    for req in reqs:
        name, _, spec = REQ.match(req.split(";")[0]).groups()
        lower = [v.strip() for op, v in re.findall(r"(>=|==|~=)\s*([^,\s]+)", spec)]
        if len(lower) != 1:
            raise SystemExit(f"{req!r}: expected exactly one lower bound (>=, ~= or ==)")
        key = re.sub(r"[-_.]+", "-", name).lower()
        if pins.setdefault(key, lower[0]) != lower[0]:
            raise SystemExit(f"{key}: declared with two lower bounds, {pins[key]} and {lower[0]}")
    return pins


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip", nargs="*", default=[], help="package names to leave out")
    ap.add_argument("--extras", nargs="*", default=["dev"], help="the optional-dependency groups to pin too")
    args = ap.parse_args(argv)
    skip = {re.sub(r"[-_.]+", "-", s).lower() for s in args.skip}
    for name, version in lower_bounds(tuple(args.extras)).items():
        if name not in skip:
            print(f"{name}=={version}")


if __name__ == "__main__":
    sys.exit(main())
