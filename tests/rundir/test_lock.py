"""output_dir's lock: one live run per directory, stale locks taken over, attempts of one run adopt it."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from sft_dist.rundir import lock as lockmod
from sft_dist.rundir.lock import LOCK, RunDirBusy, RunLock

HOLD = """
import sys, time
from sft_dist.rundir.lock import RunLock
lock = RunLock(sys.argv[1], command="holder").acquire()
print("held", flush=True)
time.sleep(60)
"""


def _holder(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_acquire_release(tmp_path):
    lock = RunLock(tmp_path / "run").acquire()
    data = json.loads((tmp_path / "run" / LOCK).read_text())
    assert data["pid"] == os.getpid() and data["host"] == socket.gethostname() and data["token"] == lock.token
    lock.release()
    assert not (tmp_path / "run" / LOCK).exists()


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    p = _holder(tmp_path)
    try:
        t0 = time.monotonic()
        with pytest.raises(RunDirBusy) as e:
            RunLock(tmp_path).acquire()
        assert time.monotonic() - t0 < 2.0
        assert f"pid {p.pid} on {socket.gethostname()}" in str(e.value) and "holder" in str(e.value)
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == p.pid  # untouched
    finally:
        p.kill()
        p.wait()


def test_a_dead_holder_is_taken_over_with_a_line(tmp_path, caplog):
    p = _holder(tmp_path)
    p.kill()
    p.wait()
    with caplog.at_level(logging.WARNING, logger="sft_dist"):
        lock = RunLock(tmp_path).acquire()
    assert f"pid {p.pid} is not running" in caplog.text
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert [f.name for f in tmp_path.iterdir()] == []  # no stale file left behind


def _foreign(tmp_path, *, age_s: float, token: str = "other"):
    path = tmp_path / LOCK
    path.write_text(json.dumps({"host": "another-node", "pid": 4242, "started": "then", "token": token}))
    t = time.time() - age_s
    os.utime(path, (t, t))


def test_another_hosts_lock_is_live_while_it_beats(tmp_path):
    _foreign(tmp_path, age_s=5)
    with pytest.raises(RunDirBusy, match="pid 4242 on another-node"):
        RunLock(tmp_path).acquire()


def test_another_hosts_lock_without_heartbeat_is_stale(tmp_path, caplog):
    _foreign(tmp_path, age_s=lockmod.STALE_S + 5)
    with caplog.at_level(logging.WARNING, logger="sft_dist"):
        RunLock(tmp_path).acquire().release()
    assert "no heartbeat for" in caplog.text


def test_the_same_runs_earlier_attempt_is_adopted(tmp_path):
    """A Ray retry / torchrun restart on another node: same token, holder gone -> ours, no refusal."""
    _foreign(tmp_path, age_s=1, token="run-1")
    lock = RunLock(tmp_path, token="run-1").acquire()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_workers_of_a_live_launcher_leave_its_lock_alone(tmp_path):
    p = _holder(tmp_path)
    try:
        token = json.loads((tmp_path / LOCK).read_text())["token"]
        worker = RunLock(tmp_path, token=token).acquire()
        worker.release()
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == p.pid
    finally:
        p.kill()
        p.wait()


def test_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(lockmod, "HEARTBEAT_S", 0.1)
    lock = RunLock(tmp_path).acquire()
    t = time.time() - 100
    os.utime(tmp_path / LOCK, (t, t))
    time.sleep(0.5)
    assert time.time() - (tmp_path / LOCK).stat().st_mtime < 5
    lock.release()
