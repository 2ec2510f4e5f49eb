"""The Ray launcher: a Ray Train `TorchTrainer` whose workers each call the same `run(config)`.

Ray owns placement, the process group (gloo/nccl, `launcher.timeout_s`) and restarts
(`launcher.max_failures`); sft_dist owns everything else. A restarted worker group resumes from the newest
complete checkpoint in `checkpoint.dir` (the same auto-resume every launcher gets), so the data cursor,
RNG and optimizer continue exactly. Ray only records pointers to those checkpoints: nothing is copied. A
ConfigError or DataError on a worker ends the run at once (`ray_trainer`): every retry would raise it again.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
import threading
from pathlib import Path

from sft_dist.config.load import build_config, config_to_dict
from sft_dist.config.schema import Config
from sft_dist.distributed.ray_warm import WarmRayWorkers, gpu_workers, unusable

log = logging.getLogger("sft_dist")


def launch_ray(cfg: Config, warm: WarmRayWorkers | None) -> int:
    """Train `cfg` on `launcher.num_workers` Ray workers; the exit status for the CLI. `warm`: the template this
    run's Ray workers fork from (`ray_warm.start`), or None: they start cold. The caller stops it."""
    import ray  # imported once, here, not by the thread below and ray.init at the same time

    # Ray Train's modules (~1 CPU s) load while ray.init waits for the cluster's processes to come up.
    loading = threading.Thread(target=_import_train_modules, daemon=True)
    loading.start()
    la = cfg.launcher
    use_gpu = gpu_workers(la)
    resources = dict(la.resources_per_worker or {"CPU": 1})
    if use_gpu:
        resources.setdefault("GPU", 1)
    threads = la.threads_per_worker or max(1, int(resources.get("CPU", 1)))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    address = la.address or os.environ.get("RAY_ADDRESS")
    if warm is None and la.warm_workers and (why := unusable(la)):
        log.info("sft_dist: Ray workers start cold (%s)", why)
    private = _init_ray(address, cpus_needed=la.num_workers * resources.get("CPU", 1),
                        runtime_env=warm.runtime_env() if warm is not None and not address else None)
    loading.join()
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    from sft_dist.distributed.env import pick_backend

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
    worker_runtime_env: dict = {"env_vars": env_vars}
    if warm is not None and not private:  # a joined cluster: the training workers, where they run on this node
        if _single_node():
            extra = warm.runtime_env()
            worker_runtime_env = {**extra, "env_vars": {**env_vars, **extra["env_vars"]}}
        else:
            log.info("sft_dist: Ray workers start cold (a cluster of several nodes; the warm template runs on "
                     "the driver's only)")
            warm = None  # the caller stops it
    if warm is not None:
        log.info("sft_dist: Ray workers on this node start forked from %s (launcher.warm_workers)",
                 warm.describe())
    trainer = _trainer_class(TorchTrainer, private=private)(
        _worker_main,
        # The resolved config, secrets included: it travels to the workers inside Ray, never to a file.
        train_loop_config={"config": config_to_dict(cfg, redact=False)},
        torch_config=TorchConfig(backend=pick_backend("cuda" if use_gpu else "cpu"), timeout_s=la.timeout_s),
        scaling_config=ScalingConfig(num_workers=la.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=la.max_failures),
            worker_runtime_env=worker_runtime_env,
        ),
    )
    log.info("sft_dist: Ray Train run %r, %d worker(s) x %s, max_failures %d, Ray state in %s/%s",
             name, la.num_workers, resources, la.max_failures, storage, name)
    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        print(f"sft-dist: {describe_failure(e)}", file=sys.stderr)
        return 1
    finally:
        if warm is not None:  # Ray ends the run's workers, not the caller stopping the template they forked from
            ray.shutdown()
    m = result.metrics or {}
    loss = f"loss {m.get('loss')}" if "loss" in m or "eval_loss" not in m else f"eval_loss {m['eval_loss']}"
    log.info("Ray Train run %r finished: Result.metrics at step %s (%s), Result.checkpoint %s", name,
             m.get("step"), loss, result.checkpoint.path if result.checkpoint else "(none)")
    return 0


def _single_node() -> bool:
    """The cluster this driver joined is its own node alone (a single-node `ray start --head`)."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    return len(alive) == 1 and alive[0].get("NodeID") == ray.get_runtime_context().get_node_id()


def _import_train_modules() -> None:
    try:
        import ray.train.torch  # noqa: F401
        import sft_dist.distributed.ray_trainer  # noqa: F401
    except Exception:  # noqa: BLE001 - imported again where they are used, which reports what failed
        pass


def _init_ray(address: str | None, *, cpus_needed: float, runtime_env: dict | None = None) -> bool:
    """Join the cluster at `address`, else start a private one (the job's `runtime_env`); True when this process
    started it."""
    import ray

    from sft_dist.distributed.local import free_port

    if ray.is_initialized():
        return False
    # This run's controller (the setting goes with it, not to the cluster) polls its workers every 0.5 s
    # instead of 2 s: it drains one report per poll and sees the end of training on a poll, which made the end
    # of every run wait up to 4 s (a poll that takes longer is kept).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    # A laptop user gets a private single-node Ray that lives as long as this process. Ray advertises the
    # node's outward address even when given 127.0.0.1, and its GCS/raylet listen on every interface
    # (Ray 2.60 has no loopback-only option); token authentication, on by default, guards them.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report to the internet
    # Nothing on a private single-node cluster can be preempted: no watcher actor (one more process, ~1.5 CPU s,
    # and an error-looking line in every log).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ray's processes that look the cluster up by themselves (the state API) take RAY_ADDRESS, else
    # /tmp/ray/ray_current_cluster: the last `ray start` on this machine, maybe another cluster or a dead one
    # (then each lookup waits 40 s). The cluster's processes inherit the environment ray.init starts them with:
    # pin it there, then give this process its own back. No idle workers prestarted for this driver: Ray Train
    # starts only actors with a runtime env of their own, which never take them (~0.4 CPU s each, for nothing).
    gcs_port = free_port("127.0.0.1")
    pinned = {"RAY_GCS_SERVER_PORT": str(gcs_port), "RAY_ADDRESS": f"127.0.0.1:{gcs_port}",
              "RAY_prestart_worker_first_driver": "0"}
    # Ray Train's metrics go to Prometheus through a dashboard; nothing reads them here.
    os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
    os.environ.update(pinned)
    log.info("sft_dist: starting an embedded Ray on 127.0.0.1 for this run "
             "(launcher.address or RAY_ADDRESS joins a running one)")
    # Workers beyond the core count share cores, as local processes would, instead of waiting forever.
    try:
        with _agent_on_any_port():
            ray.init(
                address="local",
                num_cpus=max(os.cpu_count() or 1, int(cpus_needed + 0.999)),
                # The dashboard's modules (~2 CPU s to start) serve the state API, which only Ray Train's
                # placement-group cleaner asks, and sft_dist's trainer starts none (`ray_trainer`). Ray still
                # starts its API server, bare: on loopback, on a free port.
                include_dashboard=False,
                dashboard_host="127.0.0.1",
                dashboard_port=free_port("127.0.0.1"),
                _node_ip_address="127.0.0.1",
                log_to_driver=True,
                runtime_env=runtime_env,
            )
    finally:
        for key in pinned:
            os.environ.pop(key, None)
    return True


@contextlib.contextmanager
def _agent_on_any_port():
    """Let the embedded node's dashboard agent take any free HTTP port. Ray 2.60's ray.init has no option for
    it and uses 52365: with another Ray node on this machine (a `ray start` head, another embedded run) the
    agent retries that port for ~3.5 s, holding up ray.init, then runs without it. Port 0 is Ray's own "any
    port" value for it. Scoped: Ray's class is put back once ray.init has built its parameters."""
    import ray._private.parameter as parameter

    stock = parameter.RayParams
    if "dashboard_agent_listen_port" not in inspect.signature(stock).parameters:
        yield
        return

    class RayParams(stock):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("dashboard_agent_listen_port", 0)
            super().__init__(*args, **kwargs)

    parameter.RayParams = RayParams
    try:
        yield
    finally:
        parameter.RayParams = stock


def _trainer_class(stock: type, *, private: bool) -> type:
    """Ray's TorchTrainer without the helper actors sft_dist has no use for (see `ray_trainer`), or `stock`
    where this Ray's internals are not the ones read."""
    try:
        from sft_dist.distributed.ray_trainer import trainer_class
    except ImportError as e:
        log.info("sft_dist: Ray Train's stock trainer (its internals moved: %s)", e)
        return stock
    return trainer_class(private=private)


def describe_failure(e: Exception) -> str:
    """What failed, for `sft-dist: ...`: a user error every rank raised alike once, as `error: <message>` (what
    the other launchers print); else one line per failed worker, its user error or the exception."""
    from ray.train import WorkerGroupError

    if isinstance(e, WorkerGroupError) and e.worker_failures:
        failures = sorted(e.worker_failures.items())
        causes = [user_error(err) for _, err in failures]
        messages = {str(c) for c in causes if c is not None}
        if len(messages) == 1 and None not in causes:
            return f"error: {messages.pop()}"
        return "\n".join(f"worker rank {rank}: {cause}" if cause else f"worker rank {rank} failed:\n{err}"
                         for (rank, err), cause in zip(failures, causes))
    return str(e)


def user_error(err: BaseException, *, final_only: bool = False):
    """The SftDistError behind a worker's failure (Ray wraps it), or None. `final_only`: only a ConfigError or
    DataError, which every retry would raise again."""
    from sft_dist.errors import ConfigError, DataError, SftDistError

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, SftDistError):
            return err if not final_only or isinstance(err, (ConfigError, DataError)) else None
        err = getattr(err, "cause", None) or err.__cause__
    return None


def _worker_main(loop_config: dict) -> None:
    """Each Ray worker: the torch.distributed environment from Ray's context, then the one main."""
    from sft_dist.quiet import before_imports

    before_imports()
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
