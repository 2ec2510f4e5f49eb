"""Where this process sits in the job (rank, world) and the one idempotent process-group init.

Every launcher (the local one, torchrun, Ray, a Kubernetes operator) hands a worker the same
torch.distributed environment variables; this module reads them and nothing else.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

from sft_dist.errors import SftDistError

log = logging.getLogger(__name__)

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# The last rendezvous, kept past shutdown_distributed: on rank 0 it is the store's server, and the other
# ranks may still write a last heartbeat into it while they shut down (a closed store makes c10d log).
_rendezvous = None


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launched_by: str = "none"  # local | torchrun | external | none

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_env(environ: dict[str, str] | None = None) -> DistEnv | None:
    """The rank environment an external launcher set, or None when this process was started by hand."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    missing = [k for k in ENV_KEYS if k not in env and k != "LOCAL_RANK"]
    if int(env["WORLD_SIZE"]) > 1 and missing:
        raise SftDistError(f"launcher environment is incomplete: {missing} not set (RANK and WORLD_SIZE are)")
    if "SFT_DIST_LAUNCHER" in env:
        by = env["SFT_DIST_LAUNCHER"]
    elif "TORCHELASTIC_RUN_ID" in env:
        by = "torchrun"
    else:
        by = "external"
    world = int(env["WORLD_SIZE"])
    return DistEnv(
        rank=int(env["RANK"]),
        world_size=world,
        local_rank=int(env.get("LOCAL_RANK", 0)),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
        launched_by=by,
    )


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SftDistError("launcher.device is 'cuda' but no CUDA device is visible; use `launcher.device=cpu`")
    return requested


def pick_backend(device: str) -> str:
    """nccl for GPUs, gloo for CPUs."""
    return "nccl" if device == "cuda" else "gloo"


def default_threads(local_world_size: int, cpu_count: int | None = None) -> int:
    """torch/OMP threads per worker: the cores split between the workers on this node, at least 1."""
    cores = cpu_count or os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size))


def init_distributed(env: DistEnv, *, device: str, timeout_s: int) -> None:
    """Join the process group (idempotent). A world of 1 needs none; a group made by someone else (Ray) is kept.

    With MASTER_ADDR/PORT set (the local launcher, torchrun, Kubernetes operators) the ranks first join by
    name in a TCPStore (rendezvous.py: a rank that gives up names the missing ones), the group is built on
    that store, and a heartbeat thread starts (health.py: `diagnose` names the rank a failed collective
    waited for)."""
    import torch
    import torch.distributed as dist

    global _rendezvous
    if device == "cuda":
        torch.cuda.set_device(env.local_rank)
    if env.world_size == 1 or dist.is_initialized():
        return
    backend = pick_backend(device)
    kwargs = {}
    if device == "cuda":
        kwargs["device_id"] = torch.device("cuda", env.local_rank)
    rdzv = None
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        from sft_dist.distributed.rendezvous import join

        # A named join first: a rank that gives up says which ranks never came (torch's env:// does not).
        rdzv = _rendezvous = join(rank=env.rank, world_size=env.world_size, addr=os.environ["MASTER_ADDR"],
                                  port=int(os.environ["MASTER_PORT"]), timeout_s=timeout_s)
        kwargs["store"] = dist.PrefixStore(rdzv.key("pg/"), rdzv.store)
    try:
        dist.init_process_group(
            backend=backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(seconds=timeout_s),
            **kwargs,
        )
    except Exception as e:
        if rdzv is None:
            raise
        from sft_dist.distributed.rendezvous import group_failed_message

        raise SftDistError(group_failed_message(rdzv, backend, e)) from e
    if rdzv is not None:
        from sft_dist.distributed.health import start_heartbeat

        start_heartbeat(rdzv)
    log.debug("rank %d joined a %s process group of %d", env.rank, backend, env.world_size)


def shutdown_distributed() -> None:
    import torch.distributed as dist

    from sft_dist.distributed.health import stop_heartbeat

    stop_heartbeat()
    if dist.is_initialized():
        dist.destroy_process_group()
