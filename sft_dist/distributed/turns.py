"""The ranks of a node taking turns at a step that holds much host memory for a while (a random base quantized
from host memory: 2 bytes a parameter on every rank), so that together they never hold more than the node has.
Where the node's available memory covers every rank at once, there is one turn and nothing waits."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# What the ranks' copies may take together of the memory the OS reports available; the rest is left to the run's
# own growth, the page cache and the writer of a kept base.
SHARE = 0.8
OVERRIDE = "SFT_DIST_HOST_MEMORY_BYTES"


def available_host_memory() -> int:
    """Bytes of host memory available now (Linux's MemAvailable), or what SFT_DIST_HOST_MEMORY_BYTES says: the
    memory a cgroup-limited container may use is often less than the host reports."""
    if os.environ.get(OVERRIDE):
        return int(os.environ[OVERRIDE])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0  # unknown: the caller takes one turn


def host_turns(need: int, *, ranks: int, available: int, keep: int = 0) -> int:
    """In how many turns `ranks` ranks of a node, each holding `need` bytes while its turn lasts, fit the
    `available` bytes; `keep`: bytes one of them (rank 0, writing the base) holds on after its turn."""
    if need <= 0 or ranks <= 1 or available <= 0:
        return 1
    at_once = max(1, int((SHARE * available - keep) // need))
    return 1 if at_once >= ranks else math.ceil(ranks / at_once)


def in_turns(turns: int, *, local_rank: int, step: Callable[[], T], barrier: Callable[[], None]) -> T:
    """Run `step` on this rank in its turn (local ranks r, r + turns, ... share turn r): every rank of the world
    passes `turns` barriers, so `turns` must be the same on all of them."""
    if turns <= 1:
        return step()
    result = None
    for turn in range(turns):
        if local_rank % turns == turn:
            result = step()
        barrier()
    return result
