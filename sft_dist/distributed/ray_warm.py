"""Warm Ray workers: on the driver's node, Ray's worker processes for a run (Ray Train's controller, its
synchronization actor and the training workers) are forked from one template that imported Ray, torch,
transformers, peft, TRL and DeepSpeed once, instead of each importing them again (`launcher.warm_workers`).

The driver starts the template (`distributed/warm.py`, serving Ray workers) as soon as its config is loaded, so its
imports run while the driver checks the run and `ray.init` starts the cluster. The run's runtime env names
`python -m sft_dist.distributed.ray_exec` as the workers' Python: a stand-in that has the template fork the worker
(`ray_exec`), or becomes the cold worker by exec where that cannot be done. A forked worker is the process Ray
would have started, with its environment, working directory and file descriptors; it only skips the imports. The
template ends with the driver.

Where `sft-dist warm` runs on the node and $SFT_DIST_WARM names it (exported before `ray start`, or in the job's
runtime env), the workers fork from that template instead: already imported, so even the first worker of a job
starts at once; each imports Ray itself, with its own job's settings (`warm.serve(ray="any")`).

Used where every worker that can get the runtime env runs on this node: the embedded cluster (the whole job's
runtime env, so the controller too), or a joined single-node cluster (the training workers' runtime env). Not
where the job gives workers another Python (`py_executable`, pip, uv, conda, a container), nor for a Ray client
(`ray://`) driver, whose machine is not a cluster node, nor for GPU workers until forked ones have run on a GPU. A
worker whose sft_dist is another copy than the template's, or whose environment differs in what a library reads at
import, starts cold and says why.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from sft_dist.distributed.ray_exec import SOCKET_ENV
from sft_dist.distributed.warm import ENV_VAR as NODE_TEMPLATE_ENV

log = logging.getLogger("sft_dist")

# Runtime-env fields that give Ray's workers a Python of their own: the template's imports are not theirs.
OTHER_PYTHON = ("py_executable", "pip", "uv", "conda", "container", "image_uri")
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # the job's config, where `ray job submit` started this driver
PATH_ENV = "SFT_DIST_RAY_WARM_SYS_PATH"
# The template's entry: this driver's import path first (launch/ray_train.py puts an uploaded working directory
# on it), then the template, which dies with this driver.
_BOOT = ("import json, os, sys; sys.path[:] = json.loads(os.environ.pop('" + PATH_ENV + "')); "
         "from sft_dist.distributed.ray_warm import _template_main; _template_main(sys.argv[1])")


def gpu_workers(launcher) -> bool:
    """The Ray run's workers hold GPUs. Decided from the config, not from this driver's devices: a CPU-only head
    drives GPU workers."""
    return launcher.device == "cuda" or (
        launcher.device == "auto" and (launcher.resources_per_worker or {}).get("GPU", 0) > 0)


def unusable(launcher) -> str | None:
    """Why this driver's Ray workers cannot be forked warm, or None."""
    if gpu_workers(launcher):
        # The template never initialises CUDA and checks that before each fork, but forked GPU workers have not
        # been run on a GPU yet: until they have, GPU runs keep Ray's cold workers
        return "GPU workers: forking them from a template is not yet verified on a GPU"
    address = launcher.address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith("ray://"):
        return "a Ray client driver does not run on a cluster node"
    other = [k for k in OTHER_PYTHON if _job_runtime_env().get(k)]
    if other:
        return f"the job's runtime_env sets {', '.join(other)}: its workers run another Python"
    return None


def _job_runtime_env() -> dict:
    """The runtime env of the Ray job this driver runs in (`ray job submit`), else {}."""
    try:
        return json.loads(os.environ.get(JOB_CONFIG_ENV) or "{}").get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


def start(launcher) -> WarmRayWorkers | None:
    """The template for the Ray run this driver launches (`launcher`: its LauncherConfig), started as early as the
    driver knows it: its ~6 s of imports overlap the driver's checks and the cluster's start-up. None where
    `launcher.warm_workers` is off or the workers cannot be forked warm (`unusable`; the launcher says why)."""
    if launcher.type != "ray" or not launcher.warm_workers:
        return None
    if unusable(launcher):
        return None
    node = node_template()
    return WarmRayWorkers(node=node) if node is not None else WarmRayWorkers()


def node_template() -> Path | None:
    """The `sft-dist warm` kept on this node ($SFT_DIST_WARM): it has imported everything already and serves any
    job's Ray workers. Not for a job that uploads its code: its workers run that copy of sft_dist, which the run's
    own template imports (launch/ray_train.py puts it first on the path)."""
    node = os.environ.get(NODE_TEMPLATE_ENV)
    job = _job_runtime_env()
    if not node or not Path(node).is_socket() or job.get("working_dir") or job.get("py_modules"):
        return None
    return Path(node)


class WarmRayWorkers:
    """The template of one run's Ray workers on this node; `runtime_env()` is what makes Ray use it."""

    def __init__(self, *, node: Path | None = None) -> None:
        self.proc: subprocess.Popen | None = None
        if node is not None:  # the node's template: used, neither started nor stopped here
            self.socket, self._dir = node, None
            return
        self._dir = Path(tempfile.mkdtemp(prefix="sft-dist-ray-"))  # 0700: only this user reaches the socket
        self.socket = self._dir / "warm.sock"
        env = {**os.environ, PATH_ENV: json.dumps(sys.path)}
        # A session of its own: a terminal's Ctrl-C goes to the driver (which stops the run through Ray), not here
        self.proc = subprocess.Popen([sys.executable, "-c", _BOOT, str(self.socket)], env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)

    def runtime_env(self) -> dict:
        pid = self.proc.pid if self.proc is not None else 0
        return {"py_executable": f"{sys.executable} -m sft_dist.distributed.ray_exec",
                "env_vars": {SOCKET_ENV: f"{socket.gethostname()} {pid} {self.socket}"}}

    def describe(self) -> str:
        if self.proc is None:
            return f"the `sft-dist warm` template at {self.socket} ({NODE_TEMPLATE_ENV})"
        return f"this run's pre-imported template (pid {self.proc.pid})"

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)


def _template_main(path: str) -> None:
    from sft_dist.quiet import before_imports

    before_imports()
    from sft_dist.distributed.lifecycle import die_with_parent
    from sft_dist.distributed.warm import serve

    die_with_parent(sig=signal.SIGTERM, watchdog=False)  # SIGTERM: it stops the workers it forked, then itself
    sys.exit(serve(Path(path), ray="job"))
