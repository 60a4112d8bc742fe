"""The benchmarks' shared machinery for choosing a value on the validation split: a 1-D grid (a learning rate, λ,
τ, a phase length) run from its middle, extended past an edge while the best value sits there, at most a set number
of steps per side; and the mean ± std cells of the summaries. convergence.py, rate.py (through convergence.py) and
alignment.py use it, so every benchmark brackets and reports the same way.
"""

from __future__ import annotations

import math
import statistics


def mid(values: list) -> float:
    return sorted(values)[len(values) // 2]


def grid_ratio(values: list, default: float = 4.0) -> float:
    """The grid's own geometric ratio, (max/min)^(1/(n-1)); `default` for a one-value grid."""
    values = sorted(values)
    return (values[-1] / values[0]) ** (1 / (len(values) - 1)) if len(values) > 1 and values[-1] > values[0] \
        else default


def norm_value(x: float) -> float:
    return float(f"{x:.6g}")  # 8e-4 × 4 is 0.0032, not 0.0032000000000000002 (run-file names, dict keys)


def finite(x) -> float:
    return x if x is not None and math.isfinite(x) else math.inf  # diverged (inf) and NaN rank last


def choose(losses: dict) -> tuple[float, str | None]:
    """The best value of {value: final validation loss} (ties and all-diverged: the lower value) and where it lies
    among the values run: None (interior: bracketed), "low", "high" (an edge), or "both" (the only value run)."""
    clean = {v: finite(loss) for v, loss in losses.items()}
    best = min(clean, key=lambda v: (clean[v], v))
    lo, hi = min(clean), max(clean)
    return best, ("both" if lo == hi else "low" if best == lo else "high" if best == hi else None)


def selection_loss(run: dict, min_gain: float | None = None) -> float:
    """The validation loss a grid chooses on: the run's final one; with `min_gain`, inf unless it fell at least
    `min_gain` below the run's own step-0 validation loss. A run that did not learn (a classifier left at chance)
    then ranks with the diverged ones: where every loss is noise around chance, noise would otherwise pick the
    "best" rate and extend the grid the wrong way."""
    final = finite(run.get("final_val_loss"))
    if min_gain is None or not math.isfinite(final):
        return final
    return final if final <= run["val_curve"][0][1] - min_gain else math.inf


def next_values(losses: dict, grid: list, ratio: float, max_extend: int = 3, full_grid: bool = False,
                norm: bool = True) -> dict:
    """What to run next on one grid, from its {value: final validation loss} so far.

    1. The grid's middle value and those above it (all of the grid with `full_grid`).
    2. The values below the middle only if the best so far is the lowest value run (otherwise, with a loss unimodal
       in the value, they cannot win).
    3. While the best is the lowest (highest) value run, one value `ratio` below (above) it, at most `max_extend`
       values past each end of the grid (rounded to 6 significant digits with `norm`).

    Returns {"next": [values], "best": value or None, "edge": as `choose`, "done": bool}; done with "edge" None
    means the best value is bracketed, done with an edge means the cap was reached.
    """
    grid = sorted(grid)
    centre = mid(grid)
    first = [v for v in grid if (full_grid or v >= centre) and v not in losses]
    if first:
        return {"next": first, "best": None, "edge": None, "done": False}
    best, edge = choose(losses)
    lower = [v for v in grid if v not in losses]
    if lower and edge in ("low", "both"):
        return {"next": lower, "best": best, "edge": edge, "done": False}
    rnd = norm_value if norm else float
    nxt = []
    if edge in ("low", "both") and sum(v < grid[0] * (1 - 1e-9) for v in losses) < max_extend:
        nxt.append(rnd(min(losses) / ratio))
    if edge in ("high", "both") and sum(v > grid[-1] * (1 + 1e-9) for v in losses) < max_extend:
        nxt.append(rnd(max(losses) * ratio))
    return {"next": nxt, "best": best, "edge": edge, "done": not nxt}


def grid_step(values: list[float], val_loss: dict, max_extend: int) -> tuple[float | None, float | None]:
    """One step of a sequential search over a grid whose given values were all run: (the chosen value, or None
    while the grid is open; the next value to try, or None). `next_values` on the whole grid with the ratio of its
    first two values (×3 for a single one), one value at a time (the lower side first), unrounded; a grid with one
    value tried is not extended."""
    given = sorted(values)
    ratio = given[1] / given[0] if len(given) > 1 else 3.0
    if len(val_loss) < 2:
        return choose(val_loss)[0], None
    ans = next_values(val_loss, given, ratio, max_extend, full_grid=True, norm=False)
    return (ans["best"], None) if ans["done"] else (None, ans["next"][0])


def mean_std(values, digits: int = 3, empty=None) -> str | None:
    """"mean ± std" of the values present (None skipped), "mean" for one value, `empty` for none."""
    values = [v for v in values if v is not None]
    if not values:
        return empty
    return f"{statistics.mean(values):.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}"
                                                      if len(values) > 1 else "")
