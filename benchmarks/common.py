"""Shared pieces of the benchmark scripts: device choice, peak-memory sampling, result tables and plots.

Benchmarks never run inside the unit tests; they print tables, write markdown + CSV and draw PNG plots.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import threading
import time
from contextlib import contextmanager

import torch


def device_info() -> dict:
    """What the numbers were measured on (recorded in every results file)."""
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "machine": platform.machine()}
    if torch.cuda.is_available():
        info.update(device="cuda", gpu=torch.cuda.get_device_name(0))
    else:
        info.update(device="cpu")
    return info


def pick_device(requested: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16 when present (the GPU recipe), else CPU fp32; `dtype` ("float32", "bfloat16") overrides."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if dtype != "auto":
        return device, {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    return device, torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_hwm() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux: `echo 5 > /proc/self/clear_refs`)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM")


# Large allocations always mmapped, so freed memory leaves the resident set at once and RSS tracks live memory
# (glibc's dynamic threshold would otherwise keep freed blocks on the heap). Set for the benchmark's child processes.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


class PeakMemory:
    """Peak memory above the level at entry: the CUDA allocator's peak on GPU; on CPU the kernel's resident-set
    high-water mark (reset at entry), or RSS sampled every 2 ms where the mark cannot be reset.

    The CPU figure counts transient buffers. Run each measurement in a fresh process started with MALLOC_ENV, as
    the benchmarks do, so memory freed by an earlier phase does not hide part of it.
    """

    def __init__(self, device: torch.device):
        self.device, self.peak_bytes = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        elif _reset_hwm():
            self._base, self._thread = _rss_bytes(), None
        else:
            self._base = _rss_bytes()
            self._peak, self._stop = self._base, threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
        elif self._thread is None:
            self.peak_bytes = _hwm_bytes() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._peak, _rss_bytes()) - self._base
        return False

    @property
    def mb(self) -> float:
        return self.peak_bytes / 2**20


@contextmanager
def timed(device: torch.device):
    """`with timed(device) as t: ...; t["s"]` — wall seconds, synchronising CUDA."""
    out = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    yield out
    if device.type == "cuda":
        torch.cuda.synchronize()
    out["s"] = time.perf_counter() - t0


def atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1, default=str))


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[str], title: str = "", header: list[str] | None = None) -> str:
    """`rows` as a markdown table (cells through `fmt`, a missing or None cell as "—"), under `### title` if given.
    `header` renames the columns in the header line only. The one renderer of every results table: the `.md` files
    the benchmarks write and the generated blocks in README/docs (benchmarks/tables.py)."""
    lines = ([f"### {title}", ""] if title else []) + ["| " + " | ".join(header or columns) + " |",
                                                      "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict], columns: list[str], path_stem: str, title: str = "") -> str:
    """Write `rows` as `<stem>.csv` and `<stem>.md`; returns the markdown (also printed by callers)."""
    tmp = f"{path_stem}.csv.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, f"{path_stem}.csv")
    md = markdown_table(rows, columns, title)
    atomic_write(f"{path_stem}.md", md)
    return md


def read_table(path: str) -> tuple[list[str], list[dict]]:
    """A CSV written by `write_table`, back as (columns, rows): cells stay strings and an empty cell is None (as it
    was before writing). For a table of string cells (convergence.py's summaries) `markdown_table(rows, columns)`
    then renders exactly the `.md` beside it; a table of floats needs its JSON (floats print with `fmt`'s digits)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [{k: (v if v != "" else None) for k, v in r.items()} for r in reader]
        return list(reader.fieldnames or []), rows


def save_figure(fig, path: str) -> str:
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return path
