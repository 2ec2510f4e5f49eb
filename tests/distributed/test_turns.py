"""Ranks of a node taking turns at a host-memory-heavy step (distributed/turns.py): how many turns, and that no
more ranks than fit are ever inside the step at once (threads standing in for ranks, a real barrier between)."""

from __future__ import annotations

import threading
import time

import pytest

from sft_dist.distributed.turns import OVERRIDE, SHARE, available_host_memory, host_turns, in_turns

GiB = 2**30


@pytest.mark.parametrize("need, ranks, available, keep, turns", [
    (15 * GiB, 8, 1000 * GiB, 0, 1),  # a big node: all at once
    (15 * GiB, 8, 100 * GiB, 0, 2),  # 80 GiB for copies: 5 at once, 2 turns
    (15 * GiB, 8, 100 * GiB, 15 * GiB, 2),  # rank 0 keeps its copy for the writer: 4 at once
    (15 * GiB, 8, 60 * GiB, 15 * GiB, 4),  # 33 GiB: 2 at once
    (15 * GiB, 4, 10 * GiB, 0, 4),  # not even one fits: one at a time (the run warns)
    (15 * GiB, 1, 10 * GiB, 0, 1),  # one rank: nothing to take turns with
    (0, 8, 10 * GiB, 0, 1),  # nothing held (no quantized random base)
    (15 * GiB, 8, 0, 0, 1),  # available memory unknown
])
def test_turns_fit_the_copies_into_the_available_memory(need, ranks, available, keep, turns):
    got = host_turns(need, ranks=ranks, available=available, keep=keep)
    assert got == turns
    at_once = -(-ranks // got)
    if at_once > 1 and need and available:
        assert at_once * need + keep <= SHARE * available


def test_available_memory_is_the_os_figure_unless_overridden(monkeypatch):
    monkeypatch.delenv(OVERRIDE, raising=False)
    assert available_host_memory() > 0
    monkeypatch.setenv(OVERRIDE, str(3 * GiB))
    assert available_host_memory() == 3 * GiB


@pytest.mark.parametrize("ranks, turns", [(4, 2), (5, 2), (3, 3), (4, 1)])
def test_no_more_ranks_than_a_turn_holds_are_in_the_step_at_once(ranks, turns):
    """Threads stand in for a node's ranks, with a real barrier between them: every rank runs its step once, in
    its own turn (local rank % turns), and a turn starts only when the one before it has ended everywhere."""
    barrier = threading.Barrier(ranks, timeout=30)
    spans, done = {}, {}

    def rank(r: int):
        def step():
            start = time.monotonic()
            time.sleep(0.02)
            spans[r] = (start, time.monotonic())
            return r * 10

        done[r] = in_turns(turns, local_rank=r, step=step, barrier=barrier.wait)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert done == {r: r * 10 for r in range(ranks)}  # every rank ran its step once and got its own result
    for a in range(ranks):
        for b in range(ranks):
            if a % turns < b % turns:  # a's turn comes first: its step ended before b's began
                assert spans[a][1] <= spans[b][0], (a, b, spans)


def test_a_node_too_small_for_every_ranks_host_base_is_warned_of(monkeypatch, caplog):
    """FSDP2 from init_config on GPUs: rank 0 holds the random base in host memory (or every rank at once, for a
    model FSDP2 cannot fill from rank 0; no turns are possible); rank 0 warns before building when that would not
    fit."""
    import logging

    from sft_dist.distributed.env import DistEnv
    from sft_dist.train.run import _host_fits

    node = DistEnv(rank=0, world_size=8, local_rank=0, local_world_size=8)
    monkeypatch.setenv(OVERRIDE, str(1000 * GiB))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sft_dist"):
        _host_fits(node, 15 * GiB, ranks=8)  # 120 GiB of 1000: fits
        assert not [r for r in caplog.records if r.name == "sft_dist"]
        monkeypatch.setenv(OVERRIDE, str(100 * GiB))
        _host_fits(node, 15 * GiB, ranks=1)  # rank 0 alone: 15 GiB of 100 fits
        assert not [r for r in caplog.records if r.name == "sft_dist"]
        _host_fits(node, 15 * GiB, ranks=8)
        _host_fits(node, 90 * GiB, ranks=1)
    assert len([r for r in caplog.records if r.name == "sft_dist"]) == 2
    assert "each of the 8 ranks of a node builds the random base in host memory (15.00 GiB each)" in caplog.text
    assert "rank 0 builds the random base in host memory (90.00 GiB) before FSDP2" in caplog.text
    assert "more than 80% of the 100.00 GiB available" in caplog.text


@pytest.mark.parametrize("cgroup, available", [
    ({}, 60 * GiB),  # no cgroup: MemAvailable
    ({"sys/fs/cgroup/memory.max": "max", "sys/fs/cgroup/memory.current": str(GiB)}, 60 * GiB),  # v2, no limit
    ({"sys/fs/cgroup/memory.max": str(32 * GiB), "sys/fs/cgroup/memory.current": str(12 * GiB)}, 20 * GiB),  # a pod
    ({"sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712",
      "sys/fs/cgroup/memory/memory.usage_in_bytes": str(GiB)}, 60 * GiB),  # v1, no limit
    ({"sys/fs/cgroup/memory/memory.limit_in_bytes": str(100 * GiB),
      "sys/fs/cgroup/memory/memory.usage_in_bytes": str(90 * GiB)}, 10 * GiB),  # v1 limit
])
def test_a_containers_memory_limit_bounds_the_available_memory(tmp_path, monkeypatch, cgroup, available):
    """Inside a Kubernetes pod MemAvailable is the node's; the pod's cgroup limit minus its usage is what the ranks
    may take."""
    monkeypatch.delenv(OVERRIDE, raising=False)
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text(f"MemTotal: {64 * 2**20} kB\nMemAvailable: {60 * 2**20} kB\n")
    for name, text in cgroup.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    assert available_host_memory(str(tmp_path)) == available
