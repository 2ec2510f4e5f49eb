"""The named join: in-process ranks (threads) on a real TCPStore on 127.0.0.1."""

from __future__ import annotations

import os
import threading
import time

import pytest

from sft_dist.distributed.local import free_port
from sft_dist.distributed.rendezvous import (
    Member,
    agent_hosts_store,
    bounded,
    by_host,
    format_ranks,
    join,
    key_prefix,
    missing_message,
)
from sft_dist.errors import SftDistError


def join_all(specs: list[dict], **common) -> dict[int, object]:
    """Run join(**common, **spec) for each spec in its own thread: the Rendezvous or the exception, by index."""
    results: dict[int, object] = {}

    def one(i, spec):
        try:
            results[i] = join(**common, **spec)
        except Exception as e:  # noqa: BLE001 - returned to the test
            results[i] = e

    threads = [threading.Thread(target=one, args=(i, s)) for i, s in enumerate(specs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


@pytest.fixture
def port():
    return free_port("127.0.0.1")


@pytest.fixture
def agent_store(port):
    """A store served by someone else, as torchrun's agent serves one at MASTER_PORT."""
    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", port, None, is_master=True, wait_for_workers=False)


def test_join_names_every_rank(port):
    res = join_all([{"rank": 0, "host": "node-a"}, {"rank": 1, "host": "node-b"}], world_size=2, addr="127.0.0.1",
                   port=port, timeout_s=10, agent_store=False, prefix="t/")
    assert [type(r).__name__ for r in res.values()] == ["Rendezvous", "Rendezvous"]
    for r in res.values():
        assert r.members == {0: Member(0, "node-a", os.getpid(), 2), 1: Member(1, "node-b", os.getpid(), 2)}


def test_missing_rank_is_named_with_who_arrived(port):
    t0 = time.monotonic()
    res = join_all([{"rank": 0, "host": "node-a"}, {"rank": 2, "host": "node-c"}], world_size=3, addr="127.0.0.1",
                   port=port, timeout_s=1.5, agent_store=False, prefix="t/")
    assert time.monotonic() - t0 < 5
    for e in res.values():
        assert isinstance(e, SftDistError), e
    msg = str(res[0])
    assert msg.startswith("rendezvous timed out after 1.5 s on rank 0: 1 of 3 ranks never joined at "
                          f"127.0.0.1:{port}: rank 1. Arrived: node-a (rank 0, pid {os.getpid()}), "
                          f"node-c (rank 2, pid {os.getpid()}).")
    assert "same MASTER_ADDR/MASTER_PORT" in msg and "WORLD_SIZE=3" in msg and "firewall" in msg


def test_store_not_reachable(port):
    t0 = time.monotonic()
    with pytest.raises(SftDistError) as e:
        join(rank=1, world_size=2, addr="127.0.0.1", port=port, timeout_s=1, agent_store=False)
    assert time.monotonic() - t0 < 6
    assert (f"rank 1 ({__import__('socket').gethostname()}) could not reach the rendezvous store at 127.0.0.1:{port} "
            "(served by rank 0) within 1 s") in str(e.value)


def test_port_taken(port, agent_store):
    with pytest.raises(SftDistError, match=f"rank 0 could not serve the rendezvous store on 127.0.0.1:{port}"):
        join(rank=0, world_size=1, addr="127.0.0.1", port=port, timeout_s=2, agent_store=False)


def test_agent_store_duplicate_rank_and_world_size_mismatch(port, agent_store):
    # Under torchrun every rank is a client of the agent's store, rank 0 included.
    res = join_all([{"rank": 0, "world_size": 2, "host": "a"}, {"rank": 1, "world_size": 3, "host": "b"}], addr="127.0.0.1",
                   port=port, timeout_s=2, agent_store=True, prefix="run/0/")
    assert str(res[0]).startswith("the ranks disagree on WORLD_SIZE: rank 0 has 2, rank 1 (b, pid")
    assert str(res[0]).endswith("has 3. Start every worker with the same WORLD_SIZE.")
    assert "never joined" in str(res[1]) and "rank 2." in str(res[1])

    with pytest.raises(SftDistError, match=r"rank 1 joined twice .* and before by b pid \d+. Two workers were given"):
        join(rank=1, world_size=2, addr="127.0.0.1", port=port, timeout_s=2, agent_store=True, prefix="run/0/")
    # A torchrun restart is another attempt: a prefix of its own, no clash with the first one's keys.
    res = join_all([{"rank": 0}, {"rank": 1}], world_size=2, addr="127.0.0.1", port=port, timeout_s=5,
                   agent_store=True, prefix="run/1/")
    assert all(type(r).__name__ == "Rendezvous" for r in res.values()), res


def test_torchrun_environment():
    env = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "job7", "TORCHELASTIC_RESTART_COUNT": "2"}
    assert agent_hosts_store(env) and key_prefix(env) == "sft_dist/job7/2/"
    assert not agent_hosts_store({"TORCHELASTIC_USE_AGENT_STORE": "False"}) and key_prefix({}) == "sft_dist/"


def test_format_helpers():
    assert format_ranks([7, 0, 1, 2, 5, 8]) == "0-2, 5, 7-8"
    assert format_ranks([]) == ""
    members = [Member(r, "a" if r < 3 else "b", 10 + r, 4) for r in range(4)]
    assert by_host(members) == "a (ranks 0-2), b (rank 3, pid 13)"
    msg = missing_message(rank=5, world_size=8, arrived=members, timeout_s=600, addr="10.0.0.1", port=29500)
    assert msg.startswith("rendezvous timed out after 600 s on rank 5: 4 of 8 ranks never joined at 10.0.0.1:29500: "
                          "ranks 4-7. Arrived: a (ranks 0-2), b (rank 3, pid 13).")


def test_bounded_gives_up_on_a_call_that_never_returns():
    assert bounded(lambda: 3, 1) == 3
    with pytest.raises(ZeroDivisionError):
        bounded(lambda: 1 / 0, 1)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="no answer within 0.2 s"):
        bounded(lambda: time.sleep(5), 0.2)
    assert time.monotonic() - t0 < 1


def test_restart_count_stays_out_of_the_keys_when_rank_0_serves_the_store():
    """Each attempt gets a fresh store from rank 0, and nodes count restarts differently (an agent restarting
    its workers because another node failed does not count it): the keys must agree across nodes."""
    env = {"TORCHELASTIC_RUN_ID": "job7", "TORCHELASTIC_RESTART_COUNT": "1"}
    assert key_prefix(env) == "sft_dist/job7/"


def test_multi_node_restarts_on_the_shared_agent_store_are_refused(monkeypatch):
    from sft_dist.errors import ConfigError

    for k, v in {"TORCHELASTIC_USE_AGENT_STORE": "True", "GROUP_WORLD_SIZE": "2",
                 "TORCHELASTIC_MAX_RESTARTS": "1"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        join(rank=0, world_size=2, addr="127.0.0.1", port=free_port("127.0.0.1"), timeout_s=5)
