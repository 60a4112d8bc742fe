"""The multi-process tests' one scaffold: a test's worker run on several spawned processes, each a rank.

Each rank runs `target(rank, *args)`. A Python exception prints its traceback and exits 1; a native abort prints every
thread's Python stack (faulthandler), so a crash on CI says where it happened. A rank that returns leaves through
`os._exit(0)`: the interpreter's teardown is skipped, since torch's native threads can abort a process that has already
finished its work there ("terminate called without an active exception", pytorch/pytorch#90549).
"""
from __future__ import annotations

import faulthandler
import os
import socket
import sys
import time
import traceback

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for the ranks' rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_gloo() -> None:
    """Skip the calling test unless torch.distributed runs with gloo here."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")


def _bootstrap(target, rank: int, args: tuple) -> None:
    faulthandler.enable()
    try:
        target(rank, *args)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(target, world: int, *args, timeout: float = 300.0, check: bool = True) -> list[int]:
    """Run `target(rank, *args)` on `world` spawned processes and wait at most `timeout` seconds for all of them.

    A rank still running then is killed and fails the test (a deadlocked collective must not stall CI). With `check`,
    every rank must exit 0; otherwise the exit codes are returned for the test to judge (workers that record their own
    failures). The port for `init_process_group` is the caller's: pass `free_port()` in `args`.
    """
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_bootstrap, args=(target, r, args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    assert not hung, f"ranks {hung} still running after {timeout:.0f} s: a collective deadlocked"
    codes = [p.exitcode for p in procs]
    if check:
        failed = {r: c for r, c in enumerate(codes) if c != 0}
        assert not failed, f"ranks failed (rank: exit code) {failed}; their tracebacks are in the captured output"
    return codes
