"""The checks of numeric options that every entry point shares: a clear ValueError that names the option, refuses
bools and strings where a number is meant (with "write it without quotes" for a quoted number), and non-finite
values."""

from __future__ import annotations

import math
import numbers

import torch


def is_real(value) -> bool:
    """A finite real number given as a number (not a string, not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_number(name: str, value, low: float | None = None, high: float | None = None, low_open: bool = False,
                 high_open: bool = False) -> None:
    """Raise ValueError unless `value` is a finite real number (not a string or bool) in the given bounds."""
    lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
    want = " and ".join(x for x in (lo, hi) if x)
    if not is_real(value):
        raise ValueError(f"{name} must be a finite number{' ' + want if want else ''}, got {value!r} "
                         f"({type(value).__name__}){': write it without quotes' if isinstance(value, str) else ''}")
    if (low is not None and (value <= low if low_open else value < low)) or \
            (high is not None and (value >= high if high_open else value > high)):
        raise ValueError(f"{name} must be {want}, got {value!r}")


def check_positive_int(name: str, value, low: int = 1) -> None:
    """Raise ValueError unless `value` is an integer >= `low` (default 1; not a bool, a float or a string)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r} ({type(value).__name__})"
                         f"{': write it without quotes' if isinstance(value, str) else ''}")
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_choice(name: str, value, choices) -> None:
    """Raise ValueError unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def parse_device(value, hint: str) -> torch.device | None:
    """`value` (None, a torch.device or its string) as a torch.device; None stays None. A string that names no
    device, another type, or 'meta' (which holds no data) is refused with `hint` (what the option is, what it takes)
    at the start of the message."""
    if value is None or isinstance(value, torch.device):
        device = value
    elif isinstance(value, str):
        try:
            device = torch.device(value)
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"{hint}; got {value!r}, which is not a torch device ({err})") from None
    else:
        raise ValueError(f"{hint}; got {value!r} ({type(value).__name__})")
    if device is not None and device.type == "meta":
        raise ValueError(f"{hint}; 'meta' holds no data.")
    return device
