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


def available_host_memory(root: str = "/") -> int:
    """Bytes of host memory this process may still take: Linux's MemAvailable, or less where a memory cgroup (a
    Kubernetes pod's limit, a container's) leaves less room under its limit; SFT_DIST_HOST_MEMORY_BYTES overrides
    both. 0 when unknown. `root`: where /proc and /sys are (tests)."""
    if os.environ.get(OVERRIDE):
        return int(os.environ[OVERRIDE])
    available = 0
    try:
        with open(os.path.join(root, "proc/meminfo"), encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    room = _cgroup_room(root)
    if room is not None:
        available = min(available, room) if available else room
    return available


# (limit, usage) files: cgroup v2, then v1. MemAvailable inside a container reports the host's memory.
CGROUP_FILES = (("sys/fs/cgroup/memory.max", "sys/fs/cgroup/memory.current"),
                ("sys/fs/cgroup/memory/memory.limit_in_bytes", "sys/fs/cgroup/memory/memory.usage_in_bytes"))
UNLIMITED = 2**60  # v1 writes "no limit" as a number near 2**63


def _cgroup_room(root: str) -> int | None:
    """Bytes left under this process's memory cgroup limit, or None where there is no limit (or no cgroup)."""
    for limit_file, usage_file in CGROUP_FILES:
        try:
            with open(os.path.join(root, limit_file), encoding="ascii") as f:
                limit = f.read().strip()
            with open(os.path.join(root, usage_file), encoding="ascii") as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= UNLIMITED:
            return None
        return max(0, int(limit) - usage)
    return None


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
