"""A named join: every rank says who it is (host, pid) in a TCPStore before the process group is made.

torch's own env:// rendezvous waits for the world and, on timeout, says only that it timed out. Here
each rank writes `join/<rank>` first, so a rank that gives up can say which ranks never came and where
the ones that did are running. The process group is then built on the same store (under `pg/`), and
the heartbeats (health.py) live there too.

Who hosts the store follows torch's `_create_c10d_store`: under torchrun the agent already serves one
at MASTER_ADDR:MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE=True) and every rank is a client; otherwise
(the local launcher, Kubernetes operators, torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) rank 0
serves it there.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

from sft_dist.distributed.lifecycle import check_startup_stop
from sft_dist.errors import ConfigError, SftDistError


@dataclass(frozen=True)
class Member:
    rank: int
    host: str
    pid: int
    world_size: int

    def describe(self) -> str:
        return f"rank {self.rank} ({self.host}, pid {self.pid})"


@dataclass
class Rendezvous:
    """A completed join: the store, this job's key prefix in it and who every rank is."""

    store: object  # torch.distributed.TCPStore
    prefix: str
    addr: str
    port: int
    rank: int
    world_size: int
    agent_store: bool  # served by torchrun's agent (outlives rank 0) rather than by rank 0
    timeout_s: float
    members: dict[int, Member] = field(default_factory=dict)

    def key(self, name: str) -> str:
        return self.prefix + name

    @property
    def host_description(self) -> str:
        if self.agent_store:
            return f"the torchrun agent's store at {self.addr}:{self.port}"
        who = self.members.get(0)
        return f"the store at {self.addr}:{self.port} hosted by {who.describe() if who else 'rank 0'}"

    def client(self, timeout_s: float):
        """A new connection to the store (its own socket: safe to use from another thread), short timeout."""
        from torch.distributed import TCPStore

        return TCPStore(self.addr, self.port, None, is_master=False, timeout=timedelta(seconds=timeout_s),
                        wait_for_workers=False)


def bounded(fn, timeout_s: float):
    """`fn()`, or TimeoutError if it has not returned within `timeout_s` (it is left running in a daemon thread).

    A TCPStore client op (get, set, add, check) waits forever on a server that is frozen (SIGSTOP, a hung or
    partitioned host): its own timeout covers only connecting and `wait`."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=target, name="sft_dist-store-op", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TimeoutError(f"no answer within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def agent_hosts_store(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # what torch.distributed.rendezvous checks


def key_prefix(environ: dict[str, str] | None = None) -> str:
    """Keys of this job and attempt: torchrun's agent store outlives a worker-group restart."""
    env = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" not in env:
        return "sft_dist/"
    if agent_hosts_store(env):
        return f"sft_dist/{env['TORCHELASTIC_RUN_ID']}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    # Rank 0 serves a new store each attempt, and the restart count can differ between nodes (an agent that
    # restarts its workers because another node failed does not count it): it must not be in the keys.
    return f"sft_dist/{env['TORCHELASTIC_RUN_ID']}/"


def format_ranks(ranks) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    ranks = sorted(set(ranks))
    parts: list[str] = []
    i = 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        parts.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ", ".join(parts)


def ranks_phrase(ranks) -> str:
    ranks = sorted(set(ranks))
    return ("rank " if len(ranks) == 1 else "ranks ") + format_ranks(ranks)


def by_host(members) -> str:
    """'host-a (ranks 0-3), host-b (rank 4, pid 77)': who arrived, grouped by host; pids for lone ranks."""
    hosts: dict[str, list[Member]] = {}
    for m in sorted(members, key=lambda m: m.rank):
        hosts.setdefault(m.host, []).append(m)
    out = []
    for host, ms in hosts.items():
        if len(ms) == 1:
            out.append(f"{host} (rank {ms[0].rank}, pid {ms[0].pid})")
        else:
            out.append(f"{host} ({ranks_phrase(m.rank for m in ms)})")
    return ", ".join(out)


def missing_message(*, rank: int, world_size: int, arrived: list[Member], timeout_s: float, addr: str, port: int
                    ) -> str:
    missing = sorted(set(range(world_size)) - {m.rank for m in arrived})
    there = by_host(arrived) if arrived else "none"
    return (
        f"rendezvous timed out after {timeout_s:g} s on rank {rank}: {len(missing)} of {world_size} ranks never "
        f"joined at {addr}:{port}: {ranks_phrase(missing)}. Arrived: {there}. Check that the missing "
        f"worker(s) started (their pod/node logs: a crash before joining, a pending pod, an image pull), "
        f"that every worker has the same MASTER_ADDR/MASTER_PORT ({addr}:{port}) and WORLD_SIZE={world_size}, "
        f"and that their hosts can reach {addr}:{port} (firewall, network policy). "
        f"launcher.timeout_s sets how long to wait."
    )


def join(*, rank: int, world_size: int, addr: str, port: int, timeout_s: float, agent_store: bool | None = None,
         prefix: str | None = None, host: str | None = None) -> Rendezvous:
    """Connect to (or, on rank 0, serve) the store and wait until every rank has said who it is.

    Raises:
        SftDistError: the store cannot be reached, ranks are missing after `timeout_s`, a rank joined
            twice, or the ranks disagree on the world size. The message names the ranks and hosts.
    """
    from torch.distributed import TCPStore

    agent_store = agent_hosts_store() if agent_store is None else agent_store
    if agent_store and int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1 and int(
            os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0:
        raise ConfigError(
            "torchrun --max-restarts with several nodes needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's "
            "environment on every node: torch's shared store outlives a restart and the nodes count restarts "
            "differently, so a restarted group could not find itself")
    prefix = key_prefix() if prefix is None else prefix
    me = Member(rank, host or socket.gethostname(), os.getpid(), world_size)
    serve = rank == 0 and not agent_store
    server = "the torchrun agent" if agent_store else "rank 0"
    t0 = time.monotonic()
    try:
        # multi_tenant: another TCPStore(is_master=True) on this port in this process shares the server.
        store = TCPStore(addr, port, None, is_master=serve, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False, multi_tenant=serve)
    except Exception as e:  # DistNetworkError: connect timed out; or the port is taken (rank 0)
        if serve:
            raise SftDistError(f"rank 0 could not serve the rendezvous store on {addr}:{port}: {first_line(e)}. "
                               f"Is the port in use (another job)? Pick another launcher.master_port / "
                               f"MASTER_PORT.") from e
        raise SftDistError(
            f"rank {rank} ({me.host}) could not reach the rendezvous store at {addr}:{port} (served by {server}) "
            f"within {timeout_s:g} s: {server} has not started, failed before listening, or {addr}:{port} is not "
            f"reachable from {me.host} (firewall, wrong MASTER_ADDR/MASTER_PORT). Check {server}'s log."
        ) from e

    rdzv = Rendezvous(store, prefix, addr, port, rank, world_size, agent_store, timeout_s)
    try:
        bounded(lambda: _announce_and_wait(rdzv, me, deadline=t0 + timeout_s), timeout_s + 10)
    except SftDistError:
        raise
    except Exception as e:  # the store's host went away, or froze (TimeoutError from bounded)
        raise SftDistError(
            f"rank {rank} ({me.host}) lost the rendezvous store at {addr}:{port} while waiting for the other ranks "
            f"({first_line(e)}): {server}, which served it, exited or is frozen; see its log."
        ) from e
    odd = {r: m.world_size for r, m in rdzv.members.items() if m.world_size != world_size}
    if odd:
        raise SftDistError(
            f"the ranks disagree on WORLD_SIZE: rank {rank} has {world_size}, "
            + ", ".join(f"{rdzv.members[r].describe()} has {w}" for r, w in sorted(odd.items()))
            + ". Start every worker with the same WORLD_SIZE."
        )
    return rdzv


def group_failed_message(rdzv: Rendezvous, backend: str, exc: BaseException, *, wait_s: float = 1.0) -> str:
    """Every rank joined, then building the process group failed: say so, with what the other ranks reported.

    The backend's own connections go rank to rank (not through the store), so this is where a host that
    announces an unreachable interface, or a firewall between hosts, shows up."""
    me = rdzv.members[rdzv.rank]
    error = first_line(exc)
    others: dict[int, str] = {}

    def exchange():
        rdzv.store.set(rdzv.key(f"group_failed/{rdzv.rank}"), error)
        keys = {r: rdzv.key(f"group_failed/{r}") for r in rdzv.members if r != rdzv.rank}
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and len(others) < len(keys):
            for r, k in keys.items():
                if r not in others and rdzv.store.check([k]):
                    others[r] = rdzv.store.get(k).decode()
            time.sleep(0.1)

    with contextlib.suppress(Exception):  # what the others said is a bonus; the store may be gone
        bounded(exchange, wait_s + 2)
    head = (f"{me.describe()} could not build the {backend} process group after all {rdzv.world_size} ranks joined "
            f"at {rdzv.addr}:{rdzv.port} ({by_host(rdzv.members.values())}): {error}")
    lines = [head]
    lines += [f"  {rdzv.members[r].describe()} failed too: {msg}" for r, msg in sorted(others.items())]
    lines.append("The ranks connect to each other directly, not only to the store: check that every host can reach "
                 "the others on any port (firewall, network policy) and, on hosts with several interfaces, "
                 f"{'NCCL' if backend == 'nccl' else 'GLOO'}_SOCKET_IFNAME.")
    return "\n".join(lines)


def _announce_and_wait(rdzv: Rendezvous, me: Member, *, deadline: float) -> None:
    """Write `join/<rank>` and wait until every rank has; fills `rdzv.members`."""
    store, rank, world_size = rdzv.store, rdzv.rank, rdzv.world_size
    if store.add(rdzv.key(f"join/{rank}/count"), 1) > 1:
        other = _read_member(store, rdzv.key(f"join/{rank}"))
        raise SftDistError(
            f"rank {rank} joined twice at {rdzv.addr}:{rdzv.port}: by {me.host} pid {me.pid} and before by "
            f"{other.host + ' pid ' + str(other.pid) if other else 'another process'}. Two workers were given "
            f"the same RANK, or two jobs share MASTER_PORT {rdzv.port}."
        )
    store.set(rdzv.key(f"join/{rank}"), json.dumps({"host": me.host, "pid": me.pid, "world_size": world_size}))
    store.add(rdzv.key("joined"), 1)
    keys = [rdzv.key(f"join/{r}") for r in range(world_size)]
    # A rank with another WORLD_SIZE can make up the count: all of ours must be there.
    while not (store.add(rdzv.key("joined"), 0) >= world_size and store.check(keys)):
        if time.monotonic() > deadline:
            arrived = [m for k in keys if (m := _read_member(store, k)) is not None]
            raise SftDistError(missing_message(rank=rank, world_size=world_size, arrived=arrived,
                                               timeout_s=rdzv.timeout_s, addr=rdzv.addr, port=rdzv.port))
        check_startup_stop()  # this worker was asked to stop (a swallowed SIGTERM: lifecycle.py): no more waiting
        time.sleep(0.1 if world_size <= 64 else 0.5)  # every rank polls the one store
    rdzv.members = {r: Member(r, **json.loads(v)) for r, v in enumerate(store.multi_get(keys))}


def _read_member(store, key: str) -> Member | None:
    try:
        if not store.check([key]):
            return None
        d = json.loads(store.get(key))
        return Member(int(key.rsplit("/", 1)[1]), d["host"], d["pid"], d["world_size"])
    except Exception:  # noqa: BLE001 - best effort inside an error message
        return None


def first_line(e: BaseException) -> str:
    """The first line of a c10d error, without the C++ source location prefix."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if line.startswith("[") and "] " in line:
        line = line.split("] ", 1)[1]
    return line
