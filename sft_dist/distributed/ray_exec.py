"""The Python that Ray starts its worker processes with in a run with warm Ray workers (distributed/ray_warm.py).

The raylet runs `python -m sft_dist.distributed.ray_exec .../default_worker.py ARGS` where it would run `python
.../default_worker.py ARGS`. On the node whose warm template is named in $SFT_DIST_RAY_WARM, this process asks the
template to fork the worker, then only passes signals on and exits as the worker did: the worker skips importing
Ray, torch, transformers, peft and TRL. Anywhere else (another node), or when the template refuses (an environment
a library reads at import differs, code changed on disk, ...; the reason goes to the worker's log), it becomes the
cold worker Ray would have started, by exec. Nothing else is imported here: this runs once per worker process.
"""

from __future__ import annotations

import os
import socket
import sys
import time

SOCKET_ENV = "SFT_DIST_RAY_WARM"  # "<hostname> <template pid, 0 for a node's `sft-dist warm`> <socket path>"
# How long a worker waits for a template still importing before it starts cold. Below the raylet's 60 s
# registration timeout, and long enough for the imports on a busy node.
WAIT_S = 40.0


def template_on_this_node(value: str | None) -> tuple[int, str] | None:
    """(pid, socket path) of the template named by $SFT_DIST_RAY_WARM if it runs on this host, else None."""
    parts = (value or "").split(" ", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return None
    return int(parts[1]), parts[2]


def _wait_ready(pid: int, path: str, wait_s: float) -> bool:
    """The template binds its socket once it has imported everything: wait for that while it lives (pid 0: a
    node's `sft-dist warm`, ready or not)."""
    if pid == 0:
        return os.path.exists(path)
    deadline = time.monotonic() + wait_s
    while not os.path.exists(path):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process with that pid: not our template
            return False
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def main() -> int:
    args = sys.argv[1:]
    found = template_on_this_node(os.environ.get(SOCKET_ENV))
    if found and args and _wait_ready(*found, WAIT_S):
        from sft_dist.distributed.warm import WarmUnavailable, WarmWorker, relay

        try:
            child = WarmWorker(found[1], args, dict(os.environ), ray_worker=True)
        except WarmUnavailable as e:
            print(f"sft-dist: this Ray worker starts cold: {e}", file=sys.stderr, flush=True)
        else:
            return relay(child)
    elif found and args:
        what = f"the warm template (pid {found[0]}) is not ready" if found[0] else f"no `sft-dist warm` at {found[1]}"
        print(f"sft-dist: this Ray worker starts cold: {what}", file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, *args])
    return 1  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
