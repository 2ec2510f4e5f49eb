"""Heartbeats, and the diagnosis of a failed collective from them.

A daemon thread per rank writes `beat/<rank>` into the rendezvous store every second: a sequence
number, the training step, the time, host and pid, and where the training thread is (its innermost
frame, sampled from `sys._current_frames`). The beat keeps going while the training thread is blocked,
so when a collective times out or loses a peer, `diagnose(exc)` can tell the peers apart:

- stopped beating (the process exited, was killed, or is frozen),
- alive but elsewhere (behind by steps, or in another call: the rank that never arrived),
- also failed, or waiting in the same call (bystanders).

gloo raises a plain RuntimeError ("Timed out waiting 600000ms for recv operation to complete",
"Connection closed by peer [addr]:port") that names no rank; this message does.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass

from sft_dist.distributed.rendezvous import (
    Member,
    Rendezvous,
    bounded,
    by_host,
    first_line,
    ranks_phrase,
)

# Substrings of the RuntimeErrors that gloo / NCCL / c10d raise when a peer is gone or late (gloo's carry
# their source path, ".../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer").
# Not a bare "timed out": an object store's read timeout is no collective's.
_COLLECTIVE_MARKERS = (
    "gloo", "nccl", "c10d", "processgroup", "monitoredbarrier", "timed out waiting", "connection closed by peer",
)
_LIBRARY_DIRS = tuple({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")})
_SHOW = 8  # ranks described one by one; the rest are counted

_monitor: Monitor | None = None


def interval_for(timeout_s: float, world_size: int = 1) -> float:
    """Seconds between heartbeats: 1 (a tenth of a shorter timeout, at least 0.5); past 500 ranks, slower, so
    that the one store takes at most ~500 beats a second. A dead peer is told apart in about two intervals."""
    return max(min(1.0, timeout_s / 10), 0.5, world_size / 500)


def start_heartbeat(rdzv: Rendezvous, *, interval_s: float | None = None) -> Monitor:
    """Start this rank's heartbeat thread (it samples the calling thread, the one that trains)."""
    global _monitor
    stop_heartbeat()
    _monitor = Monitor(rdzv, interval_s=interval_s or interval_for(rdzv.timeout_s, rdzv.world_size))
    _monitor.start()
    return _monitor


def stop_heartbeat() -> None:
    global _monitor
    if _monitor is not None:
        _monitor.stop()
        _monitor = None


def set_step(step: int) -> None:
    """The training step this rank has completed (shown in a diagnosis; behind = suspect)."""
    if _monitor is not None:
        _monitor.step = int(step)


def diagnose(exc: BaseException) -> str | None:
    """If `exc` is a failed collective and heartbeats run, a message naming the ranks that did not take part.

    None when it is not a collective failure or there are no heartbeats (one worker; a group made by Ray).
    Blocks up to two heartbeat intervals and a half (to see which peers still beat)."""
    if _monitor is None:
        return None
    cause = collective_failure(exc)
    if cause is None:
        return None
    return _monitor.diagnose(cause)


def collective_failure(exc: BaseException) -> BaseException | None:
    """The exception in `exc`'s cause/context chain that a collective or the store raised, if any."""
    import torch.distributed as dist

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, dist.DistError):
            return e
        if isinstance(e, RuntimeError) and any(m in str(e).lower() for m in _COLLECTIVE_MARKERS):
            return e
        e = e.__cause__ or e.__context__
    return None


def _frame_where(frame) -> tuple[str, list[str]]:
    """('func (file.py:12) <- caller (run.py:40)', [file, func]): the innermost frame, and the innermost
    one outside the standard library and site-packages when that is another frame; [file, func] identifies
    the call for comparing ranks."""
    inner = frame
    mine = None
    f = frame
    while f is not None:
        if not f.f_code.co_filename.startswith(_LIBRARY_DIRS):
            mine = f
            break
        f = f.f_back

    def show(fr) -> str:
        return f"{fr.f_code.co_name} ({os.path.basename(fr.f_code.co_filename)}:{fr.f_lineno})"

    text = show(inner) if mine is None or mine is inner else f"{show(inner)} <- {show(mine)}"
    return text, [inner.f_code.co_filename, inner.f_code.co_name]


def _traceback_where(exc: BaseException) -> tuple[str, list[str]] | None:
    tb = exc.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return _frame_where(tb.tb_frame)


class Monitor:
    """One rank's heartbeat thread and its view of the others."""

    def __init__(self, rdzv: Rendezvous, *, interval_s: float):
        self.rdzv = rdzv
        self.interval_s = interval_s
        self.step = 0
        self.failure: dict | None = None
        self.errors = 0  # a beat could not be written (the store's host is gone): the thread stopped
        self._seq = 0
        self._target = threading.get_ident()  # the thread that trains (not always the main one: Ray)
        # Own connections: the heartbeat thread never shares a socket with the training thread.
        self._beat_store = rdzv.client(rdzv.timeout_s)
        self._probe_store = rdzv.client(rdzv.timeout_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sft_dist-heartbeat", daemon=True)

    @property
    def member(self) -> Member:
        return self.rdzv.members[self.rdzv.rank]

    def start(self) -> None:
        self._beat(self._beat_store)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)  # a beat stuck on a frozen store is left behind (daemon)

    def record(self) -> dict:
        frame = sys._current_frames().get(self._target)
        while frame is not None and frame.f_code.co_filename == __file__:
            frame = frame.f_back  # a beat written by the training thread itself: show its caller
        where, loc = _frame_where(frame) if frame is not None else ("(thread ended)", ["", ""])
        m = self.member
        self._seq += 1
        return {"seq": self._seq, "step": self.step, "time": time.time(), "host": m.host, "pid": m.pid,
                "where": where, "loc": loc, "failed": self.failure}

    def _beat(self, store) -> None:
        store.set(self.rdzv.key(f"beat/{self.rdzv.rank}"), json.dumps(self.record()))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._beat(self._beat_store)
            except Exception:  # noqa: BLE001
                # The store's host is gone (the run is ending, or failed and is being diagnosed): stop, as
                # every further try would only log c10d's errors.
                self.errors += 1
                return

    def read_beats(self) -> dict[int, dict | None]:
        store = self._probe_store
        keys = [self.rdzv.key(f"beat/{r}") for r in range(self.rdzv.world_size)]
        if store.check(keys):
            return {r: json.loads(v) for r, v in enumerate(store.multi_get(keys))}
        return {r: json.loads(store.get(k)) if store.check([k]) else None for r, k in enumerate(keys)}

    def _watch(self, first: dict[int, dict | None]) -> dict[int, dict | None]:
        """Read the beats again until every peer that has not failed beat anew, or 2.5 intervals passed
        (a live but busy process may miss one beat; a dead one never beats again)."""
        deadline = time.monotonic() + 2 * self.interval_s + 0.5
        while True:
            time.sleep(min(0.25, self.interval_s / 2))
            now = self.read_beats()
            pending = [r for r, b in now.items() if r != self.rdzv.rank and not (b and b.get("failed"))
                       and (b is None or first.get(r) is None or b["seq"] == first[r]["seq"])]
            if not pending or time.monotonic() > deadline:
                return now

    def diagnose(self, exc: BaseException) -> str:
        error = first_line(exc)
        where = _traceback_where(exc)
        self.failure = {"error": error, "where": where[0] if where else None}

        def read() -> tuple[dict, dict]:
            self._beat(self._probe_store)  # peers diagnosing now see this rank as failed, not elsewhere
            first = self.read_beats()
            return first, self._watch(first)

        try:
            first, second = bounded(read, 2.5 * self.interval_s + 3)
        except Exception as e:  # noqa: BLE001 - the store is gone or frozen: its host is the suspect
            return store_lost_message(self.rdzv, me=self.member, step=self.step, error=error, where=where,
                                      store_error=first_line(e))
        return peers_message(
            me=self.member, step=self.step, error=error, where=where, first=first, second=second,
            members=self.rdzv.members, timeout_s=self.rdzv.timeout_s, now=time.time(),
        )


@dataclass
class _Peer:
    member: Member
    beat: dict | None
    state: str  # never | stopped | failed | behind | elsewhere | with_me | ahead

    @property
    def suspect(self) -> bool:
        return self.state in ("never", "stopped", "behind", "elsewhere")


def classify(*, me: Member, step: int, loc: list[str] | None, first: dict[int, dict | None],
             second: dict[int, dict | None], members: dict[int, Member]) -> list[_Peer]:
    """Sort the peers by what their two heartbeat readings say."""
    peers = []
    for r in sorted(members):
        if r == me.rank:
            continue
        b1, b2 = first.get(r), second.get(r)
        if b2 is None:
            state = "never"
        elif b2.get("failed"):
            state = "failed"
        elif b1 is not None and b1["seq"] == b2["seq"]:
            state = "stopped"
        elif b2["step"] < step:
            state = "behind"
        elif b2["step"] > step:
            state = "ahead"
        elif loc is not None and list(b2["loc"]) != list(loc):
            state = "elsewhere"
        else:
            state = "with_me"
        peers.append(_Peer(members[r], b2, state))
    return peers


def _age(beat: dict, now: float) -> str:
    return f"{max(0.0, now - beat['time']):.1f} s"


def _describe(p: _Peer, *, step: int, now: float) -> str:
    b, who = p.beat, p.member.describe()
    if p.state == "never":
        return f"{who}: never sent a heartbeat"
    if p.state == "stopped":
        return (f"{who}: no heartbeat for {_age(b, now)} (last at step {b['step']}, in {b['where']}): it exited, "
                f"was killed (out of memory? see its log, dmesg, the pod's events) or is frozen")
    if p.state == "behind":
        return f"{who}: alive but behind at step {b['step']} (this rank is at {step}), in {b['where']}"
    if p.state == "elsewhere":
        return f"{who}: alive at step {b['step']} but not in this call, in {b['where']}"
    if p.state == "failed":
        return f"{who}: also failed ({b['failed']['error']})"
    if p.state == "ahead":
        return f"{who}: at step {b['step']}, ahead of this rank, in {b['where']}"
    return f"{who}: in the same call at step {b['step']}"


def peers_message(*, me: Member, step: int, error: str, where: tuple[str, list[str]] | None,
                  first: dict[int, dict | None], second: dict[int, dict | None], members: dict[int, Member],
                  timeout_s: float, now: float) -> str:
    """The diagnosis: which peers did not take part in the collective this rank gave up on, and why."""
    peers = classify(me=me, step=step, loc=where[1] if where else None, first=first, second=second,
                     members=members)
    call = f" in {where[0]}" if where else ""
    lines = [f"collective failed on {me.describe()} at step {step}{call}: {error}"]
    suspects = [p for p in peers if p.suspect]
    if suspects:
        lines.append(f"{ranks_phrase(p.member.rank for p in suspects)} did not take part:")
        lines += [f"  {_describe(p, step=step, now=now)}" for p in suspects[:_SHOW]]
        if len(suspects) > _SHOW:
            rest = suspects[_SHOW:]
            lines.append(f"  and {ranks_phrase(p.member.rank for p in rest)} on {by_host(p.member for p in rest)}")
    others = [p for p in peers if not p.suspect]
    for state, label in (("failed", "also failed"), ("with_me", "in the same call"), ("ahead", "ahead")):
        group = [p for p in others if p.state == state]
        if group:
            lines.append(f"{label}: {ranks_phrase(p.member.rank for p in group)}")
    if suspects:
        alive = [p for p in suspects if p.state in ("behind", "elsewhere")]
        hint = f"Look at the log of {ranks_phrase(p.member.rank for p in suspects)}"
        if alive:
            a = alive[0].member
            hint += f"; `py-spy dump --pid {a.pid}` on {a.host} shows where rank {a.rank} is stuck"
        lines.append(hint + ". If a rank is only slow (a long save, eval or data load on one rank), raise "
                     f"launcher.timeout_s (now {timeout_s:g} s).")
    elif peers:
        lines.append(f"No peer looks stuck. If one step can take longer than launcher.timeout_s (now {timeout_s:g} s), "
                     "raise it.")
    return "\n".join(lines)


def store_lost_message(rdzv: Rendezvous, *, me: Member, step: int, error: str, where, store_error: str) -> str:
    """The diagnosis when the heartbeats cannot be read: the store's host is the suspect."""
    call = f" in {where[0]}" if where else ""
    head = f"collective failed on {me.describe()} at step {step}{call}: {error}"
    if rdzv.agent_store:
        return (f"{head}\nthe heartbeats cannot be read: {rdzv.host_description} does not answer ({store_error}). "
                f"The torchrun agent on {rdzv.addr} exited or its node is down: check that node.")
    host = rdzv.members.get(0)
    who = host.describe() if host else "rank 0"
    return (f"{head}\n{who} did not take part: it serves the rendezvous store at {rdzv.addr}:{rdzv.port}, which "
            f"does not answer ({store_error}): it exited, was killed or is frozen. Look at rank 0's log.")
