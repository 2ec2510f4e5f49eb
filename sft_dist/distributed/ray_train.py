"""The Ray launcher: a Ray Train `TorchTrainer` whose workers each call the same `run(config)`.

Ray owns placement, the process group (gloo/nccl, `launcher.timeout_s`) and restarts
(`launcher.max_failures`); sft_dist owns everything else. A restarted worker group resumes from the newest
complete checkpoint in `checkpoint.dir` (the same auto-resume every launcher gets), so the data cursor,
RNG and optimizer continue exactly. Ray only records pointers to those checkpoints: nothing is copied.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from sft_dist.config.load import build_config, config_to_dict
from sft_dist.config.schema import Config

log = logging.getLogger("sft_dist")


def launch_ray(cfg: Config) -> int:
    """Train `cfg` on `launcher.num_workers` Ray workers; the exit status for the CLI."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    from sft_dist.distributed.env import pick_backend

    la = cfg.launcher
    # Decided from the config, not from this driver's devices: a CPU-only head drives GPU workers.
    use_gpu = la.device == "cuda" or (la.device == "auto" and (la.resources_per_worker or {}).get("GPU", 0) > 0)
    resources = dict(la.resources_per_worker or {"CPU": 1})
    if use_gpu:
        resources.setdefault("GPU", 1)
    threads = la.threads_per_worker or max(1, int(resources.get("CPU", 1)))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _init_ray(la.address or os.environ.get("RAY_ADDRESS"), cpus_needed=la.num_workers * resources.get("CPU", 1))

    out = Path(cfg.output_dir)
    name = la.run_name or out.name
    storage = la.storage_path or str(out / "ray")
    # Ray Train routes print() to the root logger, where sft_dist's handler would show library chatter
    # (dill prints disassembly it means to capture); sft_dist logs through logging already.
    env_vars = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if not use_gpu:
        env_vars["DS_ACCELERATOR"] = "cpu"
    from sft_dist.rundir.lock import TOKEN_ENV

    if os.environ.get(TOKEN_ENV):  # the output_dir lock this driver holds: its workers belong to this run
        env_vars[TOKEN_ENV] = os.environ[TOKEN_ENV]
    trainer = TorchTrainer(
        _worker_main,
        # The resolved config, secrets included: it travels to the workers inside Ray, never to a file.
        train_loop_config={"config": config_to_dict(cfg, redact=False)},
        torch_config=TorchConfig(backend=pick_backend("cuda" if use_gpu else "cpu"), timeout_s=la.timeout_s),
        scaling_config=ScalingConfig(num_workers=la.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=la.max_failures),
            worker_runtime_env={"env_vars": env_vars},
        ),
    )
    log.info("sft_dist: Ray Train run %r, %d worker(s) x %s, max_failures %d, Ray state in %s/%s",
             name, la.num_workers, resources, la.max_failures, storage, name)
    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        print(f"sft-dist: {describe_failure(e)}", file=sys.stderr)
        return 1
    m = result.metrics or {}
    log.info("Ray Train run %r finished: Result.metrics at step %s (loss %s), Result.checkpoint %s", name,
             m.get("step"), m.get("loss"), result.checkpoint.path if result.checkpoint else "(none)")
    return 0


def _init_ray(address: str | None, *, cpus_needed: float) -> None:
    import ray

    from sft_dist.distributed.local import free_port

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # A laptop user gets a private single-node Ray that lives as long as this process. Ray advertises the
    # node's outward address even when given 127.0.0.1, and its GCS/raylet listen on every interface
    # (Ray 2.60 has no loopback-only option); token authentication, on by default, guards them.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report to the internet
    # Nothing on a private single-node cluster can be preempted: no watcher actor (one more process, ~1.5 CPU s,
    # and an error-looking line in every log). The controller polls its local workers every 0.5 s instead of 2 s:
    # it drains one report per poll and sees the end of training on a poll (a poll that takes longer is kept).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # Ray's processes that look the cluster up by themselves (the state API, which Ray Train's placement-group
    # cleaner asks whether the controller is alive) take RAY_ADDRESS, else /tmp/ray/ray_current_cluster: the
    # last `ray start` on this machine, maybe another cluster or a dead one (then each lookup waits 40 s, and
    # the run's end waits 12 s for the cleaner). The cluster's processes inherit the environment ray.init starts
    # them with: pin it there, then give this process its own back.
    gcs_port = free_port("127.0.0.1")
    pinned = {"RAY_GCS_SERVER_PORT": str(gcs_port), "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"}
    os.environ.update(pinned)
    log.info("sft_dist: starting an embedded Ray on 127.0.0.1 for this run "
             "(launcher.address or RAY_ADDRESS joins a running one)")
    # Workers beyond the core count share cores, as local processes would, instead of waiting forever.
    try:
        ray.init(
            address="local",
            num_cpus=max(os.cpu_count() or 1, int(cpus_needed + 0.999)),
            # Ray Train's controller watchdog queries the state API, which lives in the dashboard.
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=free_port("127.0.0.1"),
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
        )
    finally:
        for key in pinned:
            os.environ.pop(key, None)


def describe_failure(e: Exception) -> str:
    """One line per failed worker: the user error's message, or the exception's last line."""
    from ray.train import WorkerGroupError

    if isinstance(e, WorkerGroupError) and e.worker_failures:
        lines = []
        for rank, err in sorted(e.worker_failures.items()):
            cause = _user_error(err)
            lines.append(f"worker rank {rank}: {cause}" if cause else f"worker rank {rank} failed:\n{err}")
        return "\n".join(lines)
    return str(e)


def _user_error(err: BaseException) -> str | None:
    from sft_dist.errors import SftDistError

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, SftDistError):
            return str(err)
        err = getattr(err, "cause", None) or err.__cause__
    return None


def _worker_main(loop_config: dict) -> None:
    """Each Ray worker: the torch.distributed environment from Ray's context, then the one main."""
    import ray.train

    from sft_dist.train.ray_report import RayReport
    from sft_dist.train.run import run

    ctx = ray.train.get_context()
    os.environ.update(
        RANK=str(ctx.get_world_rank()),
        WORLD_SIZE=str(ctx.get_world_size()),
        LOCAL_RANK=str(ctx.get_local_rank()),
        LOCAL_WORLD_SIZE=str(ctx.get_local_world_size()),
        NODE_RANK=str(ctx.get_node_rank()),
        SFT_DIST_LAUNCHER="ray",
    )
    cfg = build_config(loop_config["config"])
    report = RayReport()
    report.finish(run(cfg, callbacks=[report]))
