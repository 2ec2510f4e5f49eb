"""torchrun end to end: two "nodes" on one host (c10d rendezvous), a killed worker under --max-restarts, a bad config.

Every training run here uses the overrides of the shared `checkpointed_run` (tests/conftest.py: the quickstart,
2 local workers, 20 steps, checkpoints at 10 and 20) and must end with its per-step losses and final adapter
within 1e-6 (`sft-dist compare`). Single-node `torchrun --nproc-per-node 2` against local: test_train_local.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest

from sft_dist.distributed.local import free_port
from tests.conftest import BIN, QUICKSTART, ROOT, cli_env

pytestmark = pytest.mark.slow

STEPS = ["training.max_steps=20", "training.save_strategy=steps", "training.save_steps=10",
         "training.eval_steps=10"]
TOL = 1e-6
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def torchrun_env() -> dict[str, str]:
    # 1 thread per worker: two 1-process "nodes" share 2 cores (torchrun sets it only for nproc > 1).
    # gloo listens on lo whatever this host's name resolves to.
    return {**cli_env(), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


class Job:
    """One torchrun in a session of its own, output to a file. torchrun puts each worker in a session of its
    own too, so every process of the tree seen is remembered (pid, start time) and stop() kills those."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        with open(log, "w") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([str(BIN / "torchrun"), *args], stdout=out, stderr=subprocess.STDOUT,
                                         env=torchrun_env(), start_new_session=True)
        self._seen: dict[int, float] = {}

    def workers(self) -> list[psutil.Process]:
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            try:
                self._seen.setdefault(p.pid, p.create_time())
            except psutil.Error:
                pass
        return procs

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        self.workers()
        for pid, created in self._seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created:
                    p.kill()
            except psutil.Error:
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def wait_all(jobs: list[Job], timeout: float, every=None) -> None:
    deadline = time.monotonic() + timeout
    while any(j.proc.poll() is None for j in jobs):
        for j in jobs:
            procs = j.workers()
            if every:
                every(procs)
        assert time.monotonic() < deadline, "torchrun did not finish:\n" + "\n".join(j.output()[-3000:] for j in jobs)
        time.sleep(0.2)


def train_args(out: Path) -> list[str]:
    return ["train", str(QUICKSTART), "launcher.type=torchrun", f"output_dir={out}", *STEPS]


def compare_with(reference: Path, run: Path) -> dict:
    r = subprocess.run([str(BIN / "sft-dist"), "compare", str(reference), str(run), "--tol", str(TOL), "--json"],
                       check=False, capture_output=True, text=True, timeout=120, env=cli_env())
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    (dev,) = json.loads(r.stdout)
    assert dev["steps"] == 20 and dev["loss_max_rel"] <= TOL and dev["weights_rel_l2"] <= TOL, dev
    return dev


def summary(run: Path) -> dict:
    return json.loads((run / "run_summary.json").read_text())


def test_two_nodes_on_one_host_give_the_local_loss_curve(checkpointed_run, tmp_path):
    """Two torchrun invocations, 1 process each, joined by a c10d rendezvous on 127.0.0.1, one shared output_dir."""
    out = tmp_path / "run"
    node = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{free_port('127.0.0.1')}", "--rdzv-id", f"sft-dist-{uuid.uuid4().hex[:8]}",
            "--local-addr", "127.0.0.1"]
    jobs = []
    listening = set()

    def record_listeners(procs):
        for p in procs:
            try:
                if "RANK" not in p.environ():  # torchrun's own helpers (pt_elastic: its store, on all interfaces)
                    continue
                listening.update(c.laddr.ip for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN)
            except psutil.Error:
                pass

    try:
        jobs.append(Job([*node, "--no-python", str(BIN / "sft-dist"), *train_args(out)], tmp_path / "node0.log"))
        # the other node through the launch script (torchrun runs it with this venv's python)
        jobs.append(Job([*node, str(ROOT / "launch" / "torchrun_train.py"), *train_args(out)[1:]],
                        tmp_path / "node1.log"))
        wait_all(jobs, timeout=400, every=record_listeners)
    finally:
        for j in jobs:
            j.stop()
    for j in jobs:
        assert j.proc.returncode == 0, j.output()[-3000:]
    s = summary(out)
    assert (s["world_size"], s["launched_by"], s["global_step"]) == (2, "torchrun", 20)
    assert len(set(s["rank_weight_digests"])) == 1
    assert listening <= LOOPBACK, listening  # the workers' sockets (gloo) stay on loopback
    compare_with(checkpointed_run, out)


def test_killed_worker_is_restarted_and_resumes_from_the_checkpoint(checkpointed_run, tmp_path):
    """SIGKILL rank 1 after checkpoint-10 is complete: torchrun --max-restarts 1 starts the group again, the run
    resumes from checkpoint-10 by itself and ends where the uninterrupted run ends."""
    out = tmp_path / "run"
    manifest = out / "checkpoints" / "checkpoint-10" / "manifest.json"  # a checkpoint is complete with its manifest
    job = Job(["--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--local-addr", "127.0.0.1",
               "--no-python", str(BIN / "sft-dist"), *train_args(out)], tmp_path / "torchrun.log")
    try:
        deadline = time.monotonic() + 300
        while not manifest.is_file():
            assert job.proc.poll() is None, job.output()[-3000:]
            assert time.monotonic() < deadline, "checkpoint-10 never completed:\n" + job.output()[-3000:]
            job.workers()
            time.sleep(0.02)
        workers = {int(p.environ()["RANK"]): p for p in psutil.Process(job.proc.pid).children()
                   if "RANK" in p.environ()}
        assert sorted(workers) == [0, 1]
        workers[1].send_signal(signal.SIGKILL)
        logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert max(logged) < 20, "the run finished before the kill"
        wait_all([job], timeout=400)
    finally:
        job.stop()
    log = job.output()
    assert job.proc.returncode == 0, log[-3000:]
    assert "(exitcode: -9) local_rank: 1" in log  # torchrun saw the kill and restarted the group
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-10'} (step 10)" in log
    # the restarted group built the same seeded base: the one written at the first start is kept
    assert log.count("random base written to") == 1 and f"the random base in {out / 'base_model'} is this run's" in log
    s = summary(out)
    assert (s["resumed_step"], s["resumed_from"]) == (10, str(out / "checkpoints" / "checkpoint-10"))
    assert (s["world_size"], s["launched_by"], s["global_step"]) == (2, "torchrun", 20)
    compare_with(checkpointed_run, out)


@pytest.mark.parametrize("override, said", [
    ("training.learning_rate=abc", "training.learning_rate: got 'abc'; expected a number"),
    # a plan rule: under torchrun no launcher checks first, so every rank runs the rules before the data or model
    ("training.fp16=true", "[fp16-on-cpu] training.fp16, launcher.device: fp16 mixed precision needs a CUDA GPU"),
], ids=["field", "plan-rule"])
def test_config_error_under_torchrun_is_one_message(tmp_path, override, said):
    t0 = time.monotonic()
    job = Job(["--standalone", "--nproc-per-node", "2", "--local-addr", "127.0.0.1", "--no-python",
               str(BIN / "sft-dist"), *train_args(tmp_path / "run"), override],
              tmp_path / "torchrun.log")
    try:
        wait_all([job], timeout=120)
    finally:
        job.stop()
    log = job.output()
    assert job.proc.returncode == 1, log[-3000:]
    assert time.monotonic() - t0 < 60
    assert log.count("sft-dist: error: invalid config") == 1
    assert said in log
    # torchrun's failure summary quotes it (TORCHELASTIC_ERROR_FILE); its own ChildFailedError is the only traceback
    assert f"traceback : invalid config: - {said[:40]}" in log
    assert log.count("Traceback (most recent call last)") <= 1 and str(ROOT / "sft_dist") not in log
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
