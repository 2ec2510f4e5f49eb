"""One rank for the health tests: joins as sft_dist's run() does, all-reduces a few steps, one rank misbehaves.

usage: python health_worker.py MODE BAD_RANK TIMEOUT_S   (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment)
MODE: ok | hang (sleeps instead of step 3's all_reduce) | exit (exits before it) | stop (SIGSTOPs itself)
The failing rank prints its diagnosis to stderr and one JSON line to stdout: seconds in the collective and
in diagnose().
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from sft_dist.distributed import health
from sft_dist.distributed.env import detect_env, init_distributed, shutdown_distributed
from sft_dist.distributed.health import diagnose, set_step
from sft_dist.errors import SftDistError


def misbehave(mode: str) -> None:
    print(json.dumps({"misbehaving": mode, "t": time.time(), "pid": os.getpid()}), flush=True)
    if mode == "hang":
        time.sleep(60)
    elif mode == "exit":
        os._exit(3)
    elif mode == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)


def main() -> int:
    mode, bad, timeout_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    env = detect_env()
    try:
        init_distributed(env, device="cpu", timeout_s=timeout_s)
    except SftDistError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    agent_store = health._monitor.rdzv.agent_store
    t = torch.ones(4)
    try:
        for step in range(1, 4):
            if step == 3 and env.rank == bad and mode != "ok":
                misbehave(mode)
            t0 = time.monotonic()
            dist.all_reduce(t)
            set_step(step)
    except Exception as e:  # noqa: BLE001 - what run.py does around training
        waited = time.monotonic() - t0
        msg = diagnose(e)
        print(json.dumps({"waited_s": waited, "diagnose_s": time.monotonic() - t0 - waited,
                          "agent_store": agent_store}), flush=True)
        print(f"error: {msg or e}", file=sys.stderr, flush=True)
        return 1
    finally:
        t1 = time.monotonic()
        shutdown_distributed()
        print(json.dumps({"shutdown_s": time.monotonic() - t1, "t": time.time()}), flush=True)
    print(json.dumps({"ok": t[0].item(), "agent_store": agent_store}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
