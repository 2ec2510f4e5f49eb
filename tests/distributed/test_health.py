"""Heartbeats and the diagnosis of a failed collective: real ranks over gloo on 127.0.0.1, one misbehaving."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from sft_dist.distributed.health import (
    classify,
    collective_failure,
    interval_for,
    peers_message,
)
from sft_dist.distributed.local import free_port
from sft_dist.distributed.rendezvous import Member
from tests.conftest import BIN, QUICKSTART, cli_env, cold_env

WORKER = Path(__file__).with_name("health_worker.py")
RUN_PY = Path(__file__).resolve().parents[2] / "sft_dist" / "train" / "run.py"


def run_world(mode: str, bad: int, timeout_s: float, *, world: int = 2, limit_s: float = 40,
              extra_env: dict[int, dict] | None = None) -> dict[int, dict]:
    """Start `world` health_worker ranks; once every rank but `bad` has ended, kill `bad` (as a launcher would).
    Per rank: rc, the JSON lines it printed, stderr, and seconds from the misbehaving to its exit."""
    port = free_port("127.0.0.1")
    procs = {}
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(extra_env or {}).get(r, {}))
        procs[r] = subprocess.Popen([sys.executable, str(WORKER), mode, str(bad), str(timeout_s)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ended: dict[int, float] = {}
    deadline = time.time() + limit_s
    while time.time() < deadline and not all(r in ended for r in procs if r != bad or mode == "ok"):
        for r, p in procs.items():
            if r not in ended and p.poll() is not None:
                ended[r] = time.time()
        time.sleep(0.05)
    out = {}
    for r, p in procs.items():
        if p.poll() is None:
            p.kill()
        stdout, stderr = p.communicate()
        lines = [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]
        out[r] = {"rc": p.returncode, "lines": lines, "err": stderr, "ended": ended.get(r)}
    started = next((x["t"] for o in out.values() for x in o["lines"] if "misbehaving" in x), None)
    for o in out.values():
        o["after_s"] = o["ended"] - started if started and o["ended"] else None
    return out


@pytest.mark.slow
def test_healthy_world_trains_and_exits_cleanly():
    out = run_world("ok", 1, 10)
    for r in (0, 1):
        assert out[r]["rc"] == 0, out[r]["err"][-2000:]
        assert {"ok": 8.0, "agent_store": False} in out[r]["lines"]  # rank 0 served the store
        assert "Broken pipe" not in out[r]["err"]  # no heartbeat written to a store that is gone


@pytest.mark.slow
def test_group_setup_failure_names_the_rank_that_failed():
    """Both ranks join the store, then rank 1 cannot set up gloo (an interface that does not exist): rank 0's
    message says so instead of gloo's "wait timeout ... keys: /sft_dist/pg//0//cpu//0/1"."""
    out = run_world("ok", 1, 2, extra_env={1: {"GLOO_SOCKET_IFNAME": "bogus0"}})
    assert out[0]["rc"] == out[1]["rc"] == 1
    err = out[0]["err"]
    assert "rank 0 (" in err and "could not build the gloo process group after all 2 ranks joined" in err
    assert "rank 1 (" in err and "failed too: " in err and "Unable to find address for: bogus0" in err
    assert "GLOO_SOCKET_IFNAME" in err


@pytest.mark.slow
def test_hung_rank_is_named_after_the_timeout():
    """Rank 1 is alive (its heartbeat goes on) but sleeps instead of all-reducing: rank 0 gives up after
    timeout_s and says rank 1 is elsewhere, with its host and pid."""
    out = run_world("hang", 1, 3)
    r0 = out[0]
    assert r0["rc"] == 1, r0["err"][-2000:]
    timing = next(x for x in r0["lines"] if "waited_s" in x)
    assert 2.9 < timing["waited_s"] < 5 and timing["diagnose_s"] < 2.5
    assert r0["after_s"] < 10, r0["after_s"]
    err = r0["err"]
    pid1 = next(x["pid"] for x in out[1]["lines"] if "misbehaving" in x)
    assert f"rank 1 ({socket.gethostname()}, pid {pid1}): alive at step 2 but not in this call" in err
    assert "collective failed on rank 0" in err and "Timed out waiting 3000ms" in err
    assert "rank 1 did not take part:" in err
    assert "alive at step 2 but not in this call, in misbehave (health_worker.py" in err
    assert "py-spy dump --pid" in err and "launcher.timeout_s (now 3 s)" in err


@pytest.mark.slow
def test_dead_rank_is_named():
    """Rank 1 exits: rank 0 sees the connection close at once and says rank 1 stopped beating. (A frozen rank
    reads the same after the timeout: test_frozen_rank_is_named_by_sft_dist_train.)"""
    out = run_world("exit", 1, 3)
    r0 = out[0]
    assert r0["rc"] == 1, r0["err"][-2000:]
    timing = next(x for x in r0["lines"] if "waited_s" in x)
    assert timing["waited_s"] < 1
    assert timing["diagnose_s"] < 2.5  # 2.5 heartbeat intervals of 0.5 s
    assert r0["after_s"] < 6, r0["after_s"]
    assert "rank 1 did not take part:" in r0["err"]
    assert "no heartbeat for" in r0["err"] and "it exited, was killed" in r0["err"]


@pytest.mark.slow
def test_frozen_store_host_is_named():
    """Rank 0 serves the store and freezes: rank 1's collective times out and the store does not answer;
    the diagnosis is bounded (a TCPStore op on a frozen server would wait forever) and names rank 0."""
    out = run_world("stop", 0, 3)
    r1 = out[1]
    assert r1["rc"] == 1, r1["err"][-2000:]
    timing = next(x for x in r1["lines"] if "waited_s" in x)
    assert 2.9 < timing["waited_s"] < 5 and timing["diagnose_s"] < 7
    assert "rank 0 (" in r1["err"] and "did not take part: it serves the rendezvous store" in r1["err"]
    assert r1["after_s"] < 16


@pytest.mark.slow
def test_hung_rank_is_named_under_torchrun():
    """Under torchrun every rank, rank 0 included, is a client of the agent's store (no port clash)."""
    cmd = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port("127.0.0.1")),
           str(WORKER), "hang", "1", "3"]
    t0 = time.monotonic()
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, env=cli_env())
    assert r.returncode == 1
    assert time.monotonic() - t0 < 40
    assert {"waited_s", "diagnose_s", "agent_store"} <= next(json.loads(x) for x in r.stdout.splitlines()
                                                               if "waited_s" in x).keys()
    assert '"agent_store": true' in r.stdout
    assert "rank 1 did not take part:" in r.stderr and "alive at step 2 but not in this call" in r.stderr


def start_training(out: Path, *overrides: str):
    """`sft-dist train` (quickstart, 2 local workers, a 10 s collective timeout) until the first step is logged:
    the launcher process and its workers by rank."""
    proc = subprocess.Popen([str(BIN / "sft-dist"), "train", str(QUICKSTART), f"output_dir={out}",
                             "training.max_steps=100000", "training.eval_strategy=no", "launcher.timeout_s=10",
                             *overrides], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cold_env())
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and metrics.stat().st_size > 0):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)
    return proc, {int(p.environ()["RANK"]): p for p in psutil.Process(proc.pid).children()}


def stop_everything(proc, workers) -> None:
    for p in workers.values():
        if p.is_running():
            p.kill()
    if proc.poll() is None:
        proc.kill()


@pytest.mark.slow
def test_killed_store_host_stops_the_job_promptly(tmp_path):
    """Rank 0 serves the store; killing it stops the whole command within seconds, naming it."""
    proc, workers = start_training(tmp_path / "run")
    try:
        workers[0].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - t0 < 10
        assert proc.returncode == 1 and "worker rank 0 was killed by SIGKILL" in err
    finally:
        stop_everything(proc, workers)


@pytest.mark.slow
@pytest.mark.skipif("diagnose(" not in RUN_PY.read_text(), reason="run.py does not call health.diagnose yet")
def test_frozen_rank_is_named_by_sft_dist_train(tmp_path):
    """Rank 1 freezes mid-training (SIGSTOP): rank 0's collective times out after launcher.timeout_s and the
    command fails naming rank 1, instead of hanging."""
    proc, workers = start_training(tmp_path / "run")
    try:
        time.sleep(2)  # a heartbeat after a few steps (the Heartbeat callback puts the step in it)
        workers[1].send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=90)
        took = time.monotonic() - t0
        assert proc.returncode == 1
        assert 10 < took < 30, took  # timeout 10 s + diagnosis (2.5 s) + the launcher stopping rank 1 (3 s)
        assert "worker rank 0: collective failed on rank 0" in err and "Timed out waiting 10000ms" in err
        assert f"rank 1 ({socket.gethostname()}, pid {workers[1].pid}): no heartbeat for" in err
        assert re.search(r"no heartbeat for [\d.]+ s \(last at step [1-9]", err), err[-3000:]
    finally:
        stop_everything(proc, workers)


# --- pure pieces -----------------------------------------------------------------------------------------

def _beat(seq, step=5, loc=("/x/distributed_c10d.py", "all_reduce"), where="all_reduce (distributed_c10d.py:1)",
          failed=None, t=100.0):
    return {"seq": seq, "step": step, "time": t, "host": "h", "pid": 1, "where": where, "loc": list(loc),
            "failed": failed}


def test_classify_peers():
    members = {r: Member(r, "node-a" if r < 4 else "node-b", 100 + r, 6) for r in range(6)}
    loc = ["/x/distributed_c10d.py", "all_reduce"]
    first = {0: _beat(1), 1: _beat(1), 2: _beat(1), 3: _beat(1, step=4), 4: _beat(1), 5: None}
    second = {0: _beat(2), 1: _beat(1), 2: _beat(2, failed={"error": "x", "where": None}), 3: _beat(2, step=4),
              4: _beat(2, loc=("/w/train.py", "main"), where="main (train.py:9)"), 5: None}
    states = {p.member.rank: p.state for p in classify(me=members[0], step=5, loc=loc, first=first, second=second,
                                                       members=members)}
    assert states == {1: "stopped", 2: "failed", 3: "behind", 4: "elsewhere", 5: "never"}

    msg = peers_message(me=members[0], step=5, error="Timed out waiting 600000ms for recv operation to complete",
                        where=("all_reduce (distributed_c10d.py:1)", loc), first=first, second=second,
                        members=members, timeout_s=600, now=112.5)
    assert msg.splitlines()[0] == ("collective failed on rank 0 (node-a, pid 100) at step 5 in all_reduce "
                                   "(distributed_c10d.py:1): Timed out waiting 600000ms for recv operation to complete")
    assert "ranks 1, 3-5 did not take part:" in msg
    assert "rank 1 (node-a, pid 101): no heartbeat for 12.5 s (last at step 5" in msg
    assert "rank 3 (node-a, pid 103): alive but behind at step 4 (this rank is at 5)" in msg
    assert "rank 4 (node-b, pid 104): alive at step 5 but not in this call, in main (train.py:9)" in msg
    assert "rank 5 (node-b, pid 105): never sent a heartbeat" in msg
    assert "also failed: rank 2" in msg
    assert "`py-spy dump --pid 103` on node-a" in msg


def test_message_when_no_peer_looks_stuck():
    members = {r: Member(r, "h", r, 3) for r in range(3)}
    loc = ["/x/graph.py", "_engine_run_backward"]
    beats1 = {r: _beat(1, loc=loc) for r in range(3)}
    beats2 = {r: _beat(2, loc=loc) for r in range(3)}
    msg = peers_message(me=members[0], step=5, error="Timed out", where=("x", loc), first=beats1, second=beats2,
                        members=members, timeout_s=30, now=100)
    assert "in the same call: ranks 1-2" in msg and "No peer looks stuck" in msg and "did not take part" not in msg


def test_collective_failure_recognises_gloo_errors_only():
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:4242")
    assert collective_failure(gloo) is gloo
    try:
        try:
            raise gloo
        except RuntimeError as inner:
            raise ValueError("the trainer wrapped it") from inner
    except ValueError as outer:
        assert collective_failure(outer) is gloo
    assert collective_failure(RuntimeError("Read timed out (s3)")) is None
    assert collective_failure(KeyError("loss")) is None


def test_heartbeat_interval():
    assert interval_for(600) == 1.0
    assert interval_for(3) == 0.5
    assert interval_for(600, world_size=2000) == 4.0
