"""Faults and abuse, end to end: a crafted checkpoint, two runs in one output_dir, a launcher killed with -9,
SIGTERM and SIGINT during start-up. Each uses real launches of the quickstart (2 workers, gloo)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sft_dist.compare import compare
from sft_dist.rundir.lock import LOCK
from tests.conftest import BIN, QUICKSTART, cli_env, cold_env

pytestmark = pytest.mark.slow

STEPS = ["training.max_steps=20", "training.save_strategy=steps", "training.save_steps=10",
         "training.eval_steps=10"]


class RunsCode:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


def sft_dist(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "sft-dist"), *args], capture_output=True, text=True, timeout=timeout,
                          env=cli_env())


def start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "sft-dist"), "train", str(QUICKSTART), f"output_dir={out}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cold_env())


def wait_for(cond, *, timeout: float = 240, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        assert proc is None or proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def kill_9_and_expect_no_worker_left(launcher: subprocess.Popen, out: Path) -> None:
    """Once training logs, SIGKILL the launcher: none of the workers its roster names may live 10 s later."""
    wait_for(lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip(), proc=launcher)
    workers = [json.loads(f.read_text())["pid"] for f in sorted((out / "workers").glob("rank*.json"))]
    assert len(workers) == 2 and all(alive(w) for w in workers)
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 10
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(w) for w in workers), "workers outlived their launcher by 10 s"


def craft_metadata(ckpt: Path, marker: Path) -> None:
    """Replace a checkpoint's DCP metadata with one that runs code, and make its manifest agree."""
    meta = ckpt / "shards" / ".metadata"
    meta.write_bytes(pickle.dumps(RunsCode(f"touch {marker}")))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["shards/.metadata"] = {"size": meta.stat().st_size,
                                             "sha256": hashlib.sha256(meta.read_bytes()).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def crafted_run(checkpointed_run, tmp_path):
    """A copy of the shared finished run whose newest checkpoint (20) carries code in its metadata."""
    run = tmp_path / "run"
    shutil.copytree(checkpointed_run, run)
    # the copy's config.yaml names the original output_dir: point it here, as if it had been trained here
    cfg = (run / "config.yaml").read_text().replace(str(checkpointed_run), str(run))
    (run / "config.yaml").write_text(cfg)
    marker = tmp_path / "pwned"
    craft_metadata(run / "checkpoints" / "checkpoint-20", marker)
    return run, marker


def test_crafted_metadata_is_not_run_by_export(crafted_run, tmp_path):
    run, marker = crafted_run
    # named explicitly: refused in one line
    r = sft_dist("export", str(run / "checkpoints" / "checkpoint-20"), "--output", str(tmp_path / "exported"))
    assert not marker.exists(), "the checkpoint ran code"
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "checkpoint-20 is not a complete checkpoint: untrusted, not loaded" in r.stderr
    # the run directory: the untrusted checkpoint is skipped with a line, the run's final adapter exported
    r = sft_dist("export", str(run), "--output", str(tmp_path / "exported"))
    assert not marker.exists(), "the checkpoint ran code"
    assert r.returncode == 0, r.stderr[-3000:]
    skipped = [line for line in r.stderr.splitlines() if "skipping" in line]
    assert len(skipped) == 1 and "checkpoint-20: untrusted" in skipped[0] and "Traceback" not in r.stderr


def test_crafted_metadata_is_not_run_by_auto_resume(crafted_run):
    run, marker = crafted_run
    r = sft_dist("train", str(QUICKSTART), f"output_dir={run}", *STEPS)
    assert not marker.exists(), "the checkpoint ran code"
    assert r.returncode == 0, r.stderr[-3000:]
    skipped = [line for line in r.stderr.splitlines() if "skipping checkpoint" in line]
    assert len(skipped) == 1 and "checkpoint-20" in skipped[0] and "untrusted" in skipped[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert f"resuming from {run / 'checkpoints' / 'checkpoint-10'} (step 10)" in r.stderr


def test_a_second_run_into_a_busy_output_dir_is_refused(checkpointed_run, tmp_path):
    out = tmp_path / "run"
    first = start(out, *STEPS)
    try:
        wait_for(lambda: (out / LOCK).exists(), proc=first)
        t0 = time.monotonic()
        r = sft_dist("train", str(QUICKSTART), f"output_dir={out}", *STEPS, "training.seed=7")
        took = time.monotonic() - t0
        assert r.returncode != 0 and "is in use by another run" in r.stderr, r.stderr[-2000:]
        assert f"pid {first.pid}" in r.stderr
        assert took < 15, took  # interpreter + config: no worker, no torch import in the refused run
        log, _ = first.communicate(timeout=300)
        assert first.returncode == 0, log[-3000:]
    finally:
        first.kill()
    # the first run's outputs are those of a lone run: same losses at every step, bitwise the same adapter
    dev = compare(checkpointed_run, out)
    assert dev.steps == 20 and dev.bitwise, dev
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == list(range(1, 21))
    assert not (out / LOCK).exists()


def test_kill_9_of_the_launcher_takes_its_workers_with_it(tmp_path):
    out = tmp_path / "run"
    p = start(out, "training.max_steps=100000", "training.eval_strategy=no")
    try:
        kill_9_and_expect_no_worker_left(p, out)
    finally:
        p.kill()
    # the dead run's lock is stale: the next run takes it over and says so
    r = sft_dist("train", str(QUICKSTART), f"output_dir={out}", "training.max_steps=2", "training.eval_strategy=no")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"taking over the lock of a run that is gone (pid {p.pid}" in r.stderr


@pytest.mark.parametrize("sig,code,says", [(signal.SIGTERM, 0, "before training started"),
                                           (signal.SIGINT, 130, "interrupted by SIGINT")])
def test_a_signal_during_start_up(tmp_path, sig, code, says):
    out = tmp_path / "run"
    p = start(out, *STEPS)
    try:
        wait_for(lambda: len(children(p.pid)) == 2, proc=p)
        time.sleep(1.0)  # the workers are importing torch / starting the process group
        p.send_signal(sig)
        log, _ = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == code, log[-3000:]
    assert says in log and "rank -1" not in log
    assert not (out / "config.yaml").exists()  # it never got to describe itself
    assert not (out / LOCK).exists()


def test_kill_9_of_torchrun_takes_its_workers_with_it(tmp_path):
    out = tmp_path / "run"
    env = {**cli_env(), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    p = subprocess.Popen([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python",
                          str(BIN / "sft-dist"), "train", str(QUICKSTART), f"output_dir={out}",
                          "training.max_steps=100000", "training.eval_strategy=no"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        kill_9_and_expect_no_worker_left(p, out)
    finally:
        p.kill()


def _digest(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


BAD_DATA = {
    "broken_json.jsonl": (b'{"instruction": "a", "output": "b"}\n' * 500 + b'{"instruction": "x", "output": \n'
                          + b'{"instruction": "a", "output": "b"}\n' * 500, ":501: invalid JSON"),
    "bad_utf8.jsonl": (b'{"instruction": "a", "output": "b"}\n' * 20 + b'{"instruction": "\xff\xfe", "output": "b"}\n',
                       ":21:"),
    "no_output.jsonl": (b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "answer": "b"}\n', "output"),
    "wrong_type.jsonl": (b'{"instruction": "a", "output": "b"}\n{"instruction": ["a"], "output": "b"}\n', ":2"),
    "empty.jsonl": (b"", "empty.jsonl"),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_data_is_refused_in_seconds_and_changes_nothing(checkpointed_run, tmp_path, name):
    import resource

    content, says = BAD_DATA[name]
    (tmp_path / name).write_bytes(content)
    run = tmp_path / "run"
    shutil.copytree(checkpointed_run, run)
    before = _digest(run)
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    r = sft_dist("train", str(QUICKSTART), f"output_dir={run}", f"data.train_files={tmp_path / name}", *STEPS)
    wall = time.monotonic() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    assert r.returncode == 1, r.stderr[-2000:]
    assert name in r.stderr and says in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "rank" not in r.stderr  # refused by the launcher: no worker started
    assert cpu < 5.0 and wall < 20.0, (cpu, wall)  # ~1.5 s on a quiet 2-core machine; workers would cost 10+
    assert _digest(run) == before  # the finished run is bitwise as it was
