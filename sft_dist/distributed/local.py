"""The local launcher: N worker processes on this machine, a real rendezvous, failures propagated.

Each worker runs the same `sft-dist train` command line with the torch.distributed environment set,
exactly as torchrun would start it, so the two launchers run identical code. With SFT_DIST_WARM naming a
`sft-dist warm` socket, the workers are forked from that pre-imported template instead (distributed/warm.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sft_dist.config.schema import LauncherConfig
from sft_dist.distributed.env import default_threads
from sft_dist.distributed.warm import ENV_VAR as WARM_ENV
from sft_dist.distributed.warm import WarmUnavailable, WarmWorker

GRACE_S = 10.0
# After a worker failed: the others cannot finish a step or a checkpoint without it (every collective
# fails), and one that hangs or is frozen would hold back the error message for the whole GRACE_S.
FAILED_GRACE_S = 3.0


def free_port(addr: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


@dataclass
class WorkerFailure:
    rank: int
    returncode: int
    error: dict | None

    def describe(self) -> str:
        if self.rank < 0:  # the launcher itself was signalled: no worker failed
            name = signal.Signals(self.returncode - 128).name
            return f"interrupted by {name}: the workers were stopped" + (
                "" if name == "SIGINT" else " (they had not checkpointed within the grace period)")
        if self.returncode < 0:
            how = f"was killed by {signal.Signals(-self.returncode).name}"
        else:
            how = f"exited with code {self.returncode}"
        lines = [f"worker rank {self.rank} {how}"]
        if self.error:
            # Every rank read the same config and data: no rank to name.
            if self.error.get("type") in ("ConfigError", "DataError", "BadRow"):
                lines = [f"error: {self.error['message']}"]
            elif self.error.get("user_error"):
                lines = [f"worker rank {self.rank}: {self.error['message']}"]
            else:
                lines.append(self.error.get("traceback") or f"{self.error['type']}: {self.error['message']}")
        return "\n".join(lines)


def launch_local(launcher: LauncherConfig, worker_argv: list[str], *, stop_grace_s: float = 300.0
                 ) -> WorkerFailure | None:
    """Run `python -m sft_dist <worker_argv>` as `launcher.num_workers` ranks. Returns the first failure.

    SIGTERM is passed on to the workers, which finish their step, checkpoint and exit 0 (then so does the
    launcher); they get `stop_grace_s` (+30 s) before being killed. SIGINT stops them at once."""
    n = launcher.num_workers
    port = launcher.master_port or free_port(launcher.master_addr)
    threads = launcher.threads_per_worker or default_threads(n)
    errdir = Path(tempfile.mkdtemp(prefix="sft-dist-errors-"))
    procs: list = []  # subprocess.Popen, or WarmWorker with the same interface
    warm = os.environ.get(WARM_ENV)
    for rank in range(n):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(n),
            LOCAL_WORLD_SIZE=str(n),
            MASTER_ADDR=launcher.master_addr,
            MASTER_PORT=str(port),
            OMP_NUM_THREADS=str(threads),
            SFT_DIST_LAUNCHER="local",
            SFT_DIST_ERROR_FILE=str(errdir / f"rank{rank}.json"),
            PYTHONUNBUFFERED="1",
        )
        if warm:
            try:
                procs.append(WarmWorker(warm, worker_argv, env))
                continue
            except WarmUnavailable as e:
                print(f"sft-dist: warm start unavailable ({e}): starting the workers cold", file=sys.stderr)
                warm = None
        procs.append(subprocess.Popen([sys.executable, "-m", "sft_dist", *worker_argv], env=env))

    stop = {"signal": None}

    def forward(signum, _frame):
        stop["signal"] = signum

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    failure = None
    deadline: float | None = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                rank, code = bad[0]
                failure = WorkerFailure(rank, code, _read_error(errdir / f"rank{rank}.json"))
                break
            if all(c == 0 for c in codes):
                break
            if stop["signal"] == signal.SIGTERM and deadline is None:
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + stop_grace_s + 30.0
            elif stop["signal"] is not None and (stop["signal"] != signal.SIGTERM or time.monotonic() > deadline):
                failure = WorkerFailure(-1, 128 + stop["signal"], None)
                break
            time.sleep(0.2)
    finally:
        _stop_all(procs, grace_s=FAILED_GRACE_S if failure is not None and failure.rank >= 0 else GRACE_S)
        for s, h in old.items():
            signal.signal(s, h)
        for f in errdir.glob("*.json"):
            f.unlink()
        errdir.rmdir()
    return failure


def _read_error(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stop_all(procs: list, *, grace_s: float = GRACE_S) -> None:
    """SIGTERM the workers still running (peers of a failed rank would hang in a collective), then SIGKILL."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in alive:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
