"""`run(config)`: the one main every launcher calls, on every rank.

setup (process group, tokenizer, data, model, LoRA) -> train (TRL SFTTrainer) -> save (adapter, summary).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from sft_dist.backends import Backend, get_backend
from sft_dist.config.batch import data_world, global_batch
from sft_dist.config.load import config_to_dict, dump_config
from sft_dist.config.schema import Config
from sft_dist.distributed.env import (
    DistEnv,
    default_threads,
    detect_env,
    init_distributed,
    resolve_device,
    shutdown_distributed,
)
from sft_dist.distributed.health import diagnose
from sft_dist.distributed.lifecycle import check_startup_stop, default_sigterm
from sft_dist.distributed.turns import SHARE, available_host_memory, host_turns, in_turns
from sft_dist.errors import ConfigError, SftDistError
from sft_dist.hub import hub_push
from sft_dist.model.build import count_parameters
from sft_dist.model.unwrap import base_model
from sft_dist.quiet import quiet_libraries
from sft_dist.sizes import format_bytes
from sft_dist.train.callbacks import MetricsFile, Progress, SampleIdCollator
from sft_dist.train.stop import StopOnSignal

log = logging.getLogger("sft_dist")


@dataclass
class RunResult:
    output_dir: Path
    final_dir: Path
    global_step: int
    world_size: int
    summary: dict = field(default_factory=dict)
    stopped: bool = False  # by SIGTERM, after writing a checkpoint


def setup_logging(env: DistEnv) -> None:
    """Rank 0 logs at INFO; other ranks only warnings, prefixed with their rank."""
    level = logging.INFO if env.is_main else logging.WARNING
    prefix = "" if env.world_size == 1 else f"[rank {env.rank}] "
    logging.basicConfig(level=level, format=f"{prefix}%(message)s", force=True)
    quiet_libraries(main=env.is_main)


def run(cfg: Config, *, callbacks: list | None = None) -> RunResult:
    """Train `cfg` as this process's rank. `callbacks`: extra TrainerCallbacks from the launcher (Ray's
    reporting); one with an `attach(trainer)` method is handed the trainer before training starts."""
    env = detect_env() or DistEnv()
    device = resolve_device(cfg.launcher.device)
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns that it found no GPU
    setup_logging(env)
    threads = cfg.launcher.threads_per_worker or int(os.environ.get("OMP_NUM_THREADS", 0)) or default_threads(
        env.local_world_size
    )
    import torch

    torch.set_num_threads(threads)
    init_distributed(env, device=device, timeout_s=cfg.launcher.timeout_s)
    backend = get_backend(cfg)  # asked from here on; its settings file read once
    backend.join_process_group(env, device=device)
    lock = _lock_output_dir(cfg, env)
    try:
        return _run(cfg, backend, env=env, device=device, threads=threads, callbacks=callbacks or [])
    except Exception as e:
        # A collective that timed out or lost a peer names no rank: the heartbeats say which one it was.
        msg = None if isinstance(e, SftDistError) else diagnose(e)
        if msg:
            raise SftDistError(msg) from e
        raise
    finally:
        if lock is not None:
            lock.release()
        shutdown_distributed()


def _lock_output_dir(cfg: Config, env: DistEnv):
    """Rank 0 holds output_dir's lock for the run (or finds it held by the launcher that started this run).
    torchrun restarts of one job share its rendezvous id, so a restarted rank 0 takes its own lock back."""
    if not env.is_main:
        return None
    from sft_dist.rundir.lock import TOKEN_ENV, RunLock

    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    token = os.environ.get(TOKEN_ENV) or (f"torchrun:{run_id}" if run_id != "none" else None)
    return RunLock(cfg.output_dir, token=token, command=f"sft-dist train (rank 0 of {env.world_size})").acquire()


def _run(cfg: Config, backend: Backend, *, env: DistEnv, device: str, threads: int, callbacks: list) -> RunResult:
    from sft_dist.backends.save import save_final
    from sft_dist.backends.verify import shard_report, trainable_digest
    from sft_dist.distributed.heartbeat import Heartbeat
    from sft_dist.model.tokenizer import build_tokenizer
    from sft_dist.train.args import build_sft_config, one_gpu
    from sft_dist.train.trackers import set_local_dirs

    out = Path(cfg.output_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    eval_only = cfg.training.eval_only  # training.do_train: false (train/evaluate_only.py)
    if eval_only:
        _refuse_training_dir(env, out)
        # nothing trains, so nothing resumes, and a random base needs no copy on disk
        resume, cfg = None, dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, save_init_base=False))
    else:
        resume, cfg = _resume_point(cfg, backend, env=env)  # on another world size: the accumulation that keeps the batch
    args = build_sft_config(cfg, device=device, world_size=env.world_size)
    if device == "cuda" and env.world_size == 1:
        one_gpu(args)
    set_local_dirs(cfg.training, out)
    if cfg.training.logging_dir:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(cfg.training.logging_dir).expanduser().resolve())
    log.info(
        "sft_dist: %d worker(s) (%s), device %s, backend %s, %d thread(s) each, output %s",
        env.world_size, env.launched_by + (", forked warm" if os.environ.get("SFT_DIST_WARM_TEMPLATE") else ""),
        device, backend.label, threads, out,
    )
    if env.launched_by not in ("local", "none") and cfg.launcher.num_workers not in (1, env.world_size):
        log.info("launcher.num_workers=%d does not apply: %s started %d workers",
                 cfg.launcher.num_workers, env.launched_by, env.world_size)

    plan = _preflight(cfg, env=env, device=device)
    sequence = _sequence_layout(cfg, env)
    check_startup_stop()  # a SIGTERM so far whose exception a finalizer swallowed (distributed/lifecycle.py)
    tokenizer = build_tokenizer(cfg.model)
    data = _datasets(cfg, env=env, tokenizer=tokenizer, seed=args.seed)
    check_startup_stop()
    for name, stats in data.stats.items():
        log.info("data %s", stats.describe(name, cfg.data.max_length))
    rss_before_model = _current_rss()  # what the model, optimizer and activations add is measured from here
    host_need = ((plan.get("memory_per_rank") or {}).get("detail") or {}).get("host_load_peak", 0)
    model, base_dir, base_write = _build_model(cfg, backend, env=env, device=device, tokenizer=tokenizer, args=args,
                                               out=out, host_need=host_need)
    check_startup_stop()
    build_peak = _build_peak(device)
    rss_after_model = _current_rss()  # the host memory the model build left (a rank that built no base: little)
    # where this rank built its random base (model/build.py: RANDOM_BASE)
    random_base = getattr(model, "sft_dist_random_base", None) if cfg.model.init_config is not None else None
    # Every check has passed: only now does this run describe itself in output_dir (a refused re-run must
    # leave a finished run's config.yaml, plan.json and workers/ as they were).
    if env.is_main:
        (out / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        (out / "plan.json").write_text(json.dumps(plan, indent=2, default=str), encoding="utf-8")
    _write_roster(out, env)
    trainable, total = count_parameters(model)  # before ZeRO-3 / FSDP2 leave each rank only its shard
    quantized_layers = sum(type(m).__module__.startswith("bitsandbytes") and type(m).__name__.startswith("Linear")
                           for m in model.modules())
    world_batch = global_batch(args.per_device_train_batch_size, args.gradient_accumulation_steps,
                               data_world(env.world_size, cfg.backend.sequence_parallel_size))
    metrics = MetricsFile(out / "metrics.jsonl", resume_step=resume.step if resume else None, is_main=env.is_main)
    trainer = _build_trainer(cfg, backend, env=env, model=model, args=args, data=data, tokenizer=tokenizer, metrics=metrics,
                             sequence=sequence)
    trainer.peak_tflops = _mfu_peak(cfg, device=device, args=args)
    if cfg.metrics.generate_prompts:
        from sft_dist.train.evaluation import Samples

        sharded = backend.shards_weights(trainer)
        trainer.samples = Samples(cfg.metrics.generate_prompts, data_cfg=config_to_dict(cfg)["data"],
                                  tokenizer=tokenizer, max_new_tokens=cfg.metrics.generate_max_new_tokens,
                                  path=out / "samples.jsonl" if env.is_main else None,
                                  sync=sharded and env.world_size > 1, num_beams=cfg.metrics.generate_num_beams)
        if env.is_main and resume is None:
            (out / "samples.jsonl").unlink(missing_ok=True)
    if cfg.metrics.generate_eval_rows and trainer.eval_dataset is not None:
        from sft_dist.data.build import by_set
        from sft_dist.train.evaluation import EvalGenerations, continued_rows, eval_sets

        trainer.eval_generations = EvalGenerations(
            rows=cfg.metrics.generate_eval_rows, tokenizer=tokenizer, num_beams=cfg.metrics.generate_num_beams,
            path=out / "eval_generations.jsonl" if env.is_main else None,
            sync=backend.shards_weights(trainer) and env.world_size > 1,
            continued={prefix: continued_rows(ds) for prefix, ds in eval_sets(by_set(data.eval,
                                                                                    cfg.data.eval_sets)).items()})
        for prefix, dataset in eval_sets(trainer.eval_dataset).items():
            trainer.eval_generations.items(dataset, prefix)  # a run with nothing to answer stops here
        if env.is_main and resume is None:
            (out / "eval_generations.jsonl").unlink(missing_ok=True)
    if eval_only:
        return _evaluate_only(cfg, backend, trainer, env=env, out=out, device=device, callbacks=callbacks)
    trainer.checkpointing = _checkpointing(cfg, backend, env=env)
    check_startup_stop()  # last: from here on SIGTERM means "checkpoint and stop" (train/stop.py)
    stopper = StopOnSignal(grace_s=cfg.checkpoint.stop_grace_s, world_size=env.world_size, device=str(args.device))
    trainer.add_callback(stopper)
    trainer.add_callback(Heartbeat())
    if cfg.training.early_stopping_patience:
        from sft_dist.train.early_stop import EarlyStopping

        trainer.early_stopping = EarlyStopping(patience=cfg.training.early_stopping_patience,
                                               threshold=cfg.training.early_stopping_threshold,
                                               world_size=env.world_size, device=args.device)
        trainer.add_callback(trainer.early_stopping)
    for cb in callbacks:
        trainer.add_callback(cb)
        if hasattr(cb, "attach"):
            cb.attach(trainer)
    local_resume = None
    if resume is not None:
        from sft_dist.checkpoint.resume import fetch

        local_resume = str(fetch(resume, rank=env.rank, staging=trainer.checkpointing.staging))
        trainer.resume_manifest = resume.manifest
        log.info("resuming from %s (step %d)", resume.display, resume.step)

    t0 = time.perf_counter()
    try:
        train_result = trainer.train(resume_from_checkpoint=local_resume)
    finally:
        stopper.restore()
        default_sigterm()
        shutil.rmtree(trainer.checkpointing.staging, ignore_errors=True)
    train_s = time.perf_counter() - t0
    trainer.close_trace()
    if base_write is not None:  # the adapter's base is in place before the run says it is done
        base_write.wait()
    if stopper.stopped_at is not None:
        saved = trainer.checkpointing.saved[-1] if trainer.checkpointing.saved else None
        log.info("stopped by SIGTERM after step %d; checkpoint %s; run the same command to resume",
                 stopper.stopped_at, trainer.checkpointing.store.display(saved) if saved else "(none)")
        if env.is_main:
            _write_report(out)
        _barrier(env)
        return RunResult(out, out, trainer.state.global_step, env.world_size, stopped=True)

    final_dir = out / ("adapter" if cfg.lora.enabled else "model")
    save_final(trainer, final_dir)
    digests = _gather(env, trainable_digest(trainer.model))
    shards = _gather(env, {**shard_report(trainer), "rss_before_model_bytes": rss_before_model,
                           "rss_after_model_bytes": rss_after_model, "build_peak_mem_bytes": build_peak,
                           "random_base": random_base})
    if len(set(digests)) != 1:
        raise SftDistError(
            f"the ranks finished with different weights (digests {digests}): data parallel training diverged"
        )
    if env.is_main:
        tokenizer.save_pretrained(final_dir)
        summary = {
            "world_size": env.world_size,
            "launched_by": env.launched_by,
            "device": device,
            "backend": backend.name,
            "global_step": trainer.state.global_step,
            "global_batch": world_batch,
            "sequence_parallel": cfg.backend.sequence_parallel_size,
            "train_seconds": round(train_s, 3),
            "loss_tokens": trainer.total_loss_tokens,
            "padding_fraction": trainer.padding_fraction(),
            "train_loss": train_result.training_loss,
            "trainable_params": trainable,
            "total_params": total,
            "quantized_linear_layers": quantized_layers,
            "rank_weight_digests": digests,
            "backend_applied": trainer.backend_info,
            "ranks": shards,
            "final_dir": str(final_dir),
            "base_model_dir": str(base_dir) if base_dir else None,
            "data": {k: vars(v) for k, v in data.stats.items()},
            "resumed_from": resume.display if resume else None,
            "resumed_step": resume.step if resume else None,
            "checkpoints": trainer.checkpointing.saved,
            "checkpoint_bytes": trainer.checkpointing.last_bytes,
            "checkpoint_save_s": _round(trainer.checkpointing.last_save_s),
            "resume_s": _round(trainer.resume_s),
            "adapter_bytes": _dir_bytes(final_dir),
            "first_loss": metrics.first.get("loss"),
            "last_loss": metrics.last.get("loss"),
            "first_eval_loss": metrics.first.get("eval_loss"),
            "last_eval_loss": metrics.last.get("eval_loss"),
            "stopped_early": trainer.early_stopping.stopped if trainer.early_stopping is not None else None,
            "hf_summary": metrics.summary,
        }
        (out / "run_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        log.info("done: %d steps in %.1f s, %s", trainer.state.global_step, train_s, _loss_change(metrics))
        log.info("%s saved to %s (metrics: %s)", "adapter" if cfg.lora.enabled else "model", final_dir,
                 out / "metrics.jsonl")
        _write_report(out)
    _barrier(env)
    push = hub_push(cfg.training, cfg.output_dir) if env.is_main else None
    if push is not None:  # after everything is saved: a failed upload leaves the run whole
        push.upload(final_dir, message=f"sft_dist: {'adapter' if cfg.lora.enabled else 'model'} after step "
                                       f"{trainer.state.global_step}")
    return RunResult(out, final_dir, trainer.state.global_step, env.world_size)


def _refuse_training_dir(env: DistEnv, out: Path) -> None:
    """Rank 0 looks, every rank refuses alike: an evaluation does not write over a training run's output_dir."""
    from sft_dist.train.evaluate_only import refuse_training_dir

    why = None
    if env.is_main:
        try:
            refuse_training_dir(out)
        except SftDistError as e:
            why = str(e)
    why = _broadcast(env, why)
    if why:
        raise SftDistError(why)


def _evaluate_only(cfg: Config, backend: Backend, trainer, *, env: DistEnv, out: Path, device: str,
                   callbacks: list) -> RunResult:
    from sft_dist.train import evaluate_only

    for cb in callbacks:  # the launcher's (Ray's report): they see the evaluation's metrics logged
        trainer.add_callback(cb)
        if hasattr(cb, "attach"):
            cb.attach(trainer)
    weights = evaluate_only.weights(cfg)
    log.info("training.do_train=false: evaluating %s, training nothing", weights)
    summary = {"world_size": env.world_size, "launched_by": env.launched_by, "device": device,
               "backend": backend.name, "weights": weights}
    try:
        evaluate_only.evaluate(trainer, zero_stage=backend.zero_stage, out=out, is_main=env.is_main, summary=summary,
                               gather=lambda value: _gather(env, value))
    finally:
        default_sigterm()
    if env.is_main:
        _write_report(out)
    _barrier(env)
    return RunResult(out, out, 0, env.world_size)


def _mfu_peak(cfg: Config, *, device: str, args) -> float | None:
    from sft_dist.metrics.flops import device_peak_tflops

    peak, source = device_peak_tflops(device, given=cfg.metrics.peak_tflops, half_precision=bool(args.bf16 or args.fp16))
    log.info("MFU: %s", f"against {peak:g} TFLOP/s per device ({source})" if peak else f"n/a ({source})")
    return peak


def _write_report(out: Path) -> None:
    from sft_dist.metrics.report import write_report

    try:
        log.info("report: %s", write_report(out))
    except Exception as e:  # noqa: BLE001 - the run is done and saved; a chart failing must not fail it
        log.warning("report: not written (%s: %s); rebuild it with `sft-dist report %s`", type(e).__name__, e, out)


def _preflight(cfg: Config, *, env: DistEnv, device: str) -> dict:
    """`sft-dist plan` on this rank, before data or model: every rank refuses what the rules refuse (they all
    see the same facts); rank 0 logs the plan. Returns it (for output_dir/plan.json)."""
    from sft_dist.plan import make_plan
    from sft_dist.plan.report import render
    from sft_dist.train.trackers import check_installed

    check_installed(cfg.training)  # torchrun / Ray workers: before the data and model
    plan = make_plan(cfg, device=device, world_size=env.world_size, memory=env.is_main)
    if plan.errors:
        raise ConfigError([f.describe() for f in plan.errors])
    if env.is_main:
        for line in render(plan, diff=False).splitlines()[1:]:
            log.info("plan: %s", line)
    result = plan.as_dict()
    if env.is_main and device == "cuda" and plan.memory is not None:
        import torch

        from sft_dist.plan.fit import gpu_fit

        free, total = torch.cuda.mem_get_info()
        result["device_memory"] = {"free_bytes": free, "total_bytes": total}
        fit = gpu_fit(plan.memory.detail["peak"], free=free, total=total, hinted=bool(plan.memory.hints))
        if fit:
            log.log(logging.WARNING if fit[0] == "warning" else logging.INFO, "plan: %s", fit[1])
    return result


def _datasets(cfg: Config, *, env: DistEnv, tokenizer, seed: int):
    """The tokenized data: from the cache (built by all ranks, each tokenizing a slice), or built in memory on
    every rank with `data.cache: false` (and for a stream: only its eval split is tokenized up front)."""
    if not cfg.data.cache or cfg.data.streaming:
        from sft_dist.data.build import build_datasets

        return build_datasets(cfg.data, tokenizer, seed=seed)
    from sft_dist.data.cache import load_or_build

    # The one collective of the cache protocol: rank 0's key and build directory reach every rank.
    data, _ = load_or_build(cfg.data, tokenizer, seed=seed, rank=env.rank, world_size=env.world_size,
                            share=lambda plan: _broadcast(env, plan), timeout_s=cfg.launcher.timeout_s)
    return data


def _current_rss() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _write_roster(out: Path, env: DistEnv) -> None:
    """output_dir/workers/rank<N>.json: which host and process is each rank (for logs, kills, diagnosis).
    Written into a directory rank 0 may not have created yet: every rank creates it."""
    import socket

    d = out / "workers"
    d.mkdir(parents=True, exist_ok=True)
    info = {"rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank,
            "host": socket.gethostname(), "pid": os.getpid(), "launcher": env.launched_by,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = d / f".rank{env.rank}.json.tmp"
    tmp.write_text(json.dumps(info), encoding="utf-8")
    tmp.replace(d / f"rank{env.rank}.json")


def _checkpoint_store(cfg: Config):
    from sft_dist.checkpoint.store import Store

    return Store(cfg.checkpoint.dir or str(Path(cfg.output_dir) / "checkpoints"), cfg.checkpoint.storage_options)


def _resume_point(cfg: Config, backend: Backend, *, env: DistEnv):
    """The checkpoint this run continues (rank 0 picks, every rank checks it fits), or None; and the config to
    train with: `cfg` itself, or on another world size a copy whose gradient accumulation keeps the checkpoint's
    global batch (the caller's config is never edited)."""
    from sft_dist.checkpoint.resume import check_fit, resume_request, select

    request = resume_request(cfg.training)
    if request is None:
        return None, cfg
    choice: dict = {"point": None, "error": None}
    if env.is_main:
        try:
            choice["point"] = select(_checkpoint_store(cfg), request, cfg.checkpoint.storage_options)
        except SftDistError as e:
            choice["error"] = str(e)
    choice = _broadcast(env, choice)
    if choice["error"] is not None:
        raise ConfigError(choice["error"])
    point = choice["point"]
    if point is None:
        if request != "auto":
            raise SftDistError(f"training.resume_from_checkpoint: {request} not found")
        return None, cfg
    accum = check_fit(point, cfg, world_size=env.world_size, shard_format=backend.shard_format,
                      zero_stage=backend.zero_stage)
    if accum is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, training=cfg.training.replace(gradient_accumulation_steps=accum))
    max_steps = cfg.training.max_steps
    if 0 < max_steps <= point.step:
        log.info("%s is already at training.max_steps=%d: nothing left to train (raise max_steps to train on, or "
                 "set training.resume_from_checkpoint=never to start over)", point.display, max_steps)
    return point, cfg


def _checkpointing(cfg: Config, backend: Backend, *, env: DistEnv):
    import tempfile

    from sft_dist.checkpoint.manifest import config_hash
    from sft_dist.checkpoint.manager import CheckpointManager

    return CheckpointManager(
        store=_checkpoint_store(cfg),
        rank=env.rank,
        world_size=env.world_size,
        # Private to this rank's process: remote stores stage uploads and resume downloads here.
        staging=Path(tempfile.gettempdir()) / "sft_dist-staging" / f"{config_hash(cfg)}-{os.getpid()}",
        config_yaml=dump_config(cfg),
        config_hash=config_hash(cfg),
        backend=backend.name,
        shard_format=backend.shard_format,
        zero_stage=backend.zero_stage,
        keep_last=cfg.training.save_total_limit,
        keep_best=cfg.checkpoint.keep_best,
        storage_options=cfg.checkpoint.storage_options,
    )


def _broadcast(env: DistEnv, value):
    if env.world_size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _build_model(cfg: Config, backend: Backend, *, env: DistEnv, device: str, tokenizer, args, out: Path,
                 host_need: int = 0):
    """The model to train (with its LoRA adapter), and where its random base was saved (init_config runs).
    `host_need`: host bytes a rank holds while a random base is quantized (rank 0's plan; 0 when unknown)."""
    import torch
    from transformers import set_seed

    from sft_dist.model.build import build_model, quantize_in_memory, resolve_dtype
    from sft_dist.model.lora import apply_lora
    from sft_dist.train.args import apply_liger, liger_choice

    # Seed before the model and the adapter are initialised (the Trainer seeds only later): the same
    # config gives the same initial weights on every rank, every launcher and every run.
    set_seed(args.seed)
    dtype = resolve_dtype(cfg.model.dtype, device=device, lora=cfg.lora.enabled)
    quant = backend.model_quantization(cfg.quantization, dtype=dtype)
    sharding = backend.sharding(env.world_size)
    # A checkpoint loads straight onto the GPU where every rank holds the whole model anyway (DDP, ZeRO-1/2);
    # sharded strategies load on the host, so a model larger than one GPU can still be sharded.
    compute = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    build = dict(quant=quant, tokenizer=tokenizer, dtype=dtype, seed=args.seed, device=device, compute_dtype=compute)
    base_dir, base_write = None, None
    quantized_random = cfg.model.init_config is not None and cfg.quantization.bits is not None
    # Where this rank builds a random base (model/build.py: RANDOM_BASE): whole on the GPU, a decoder layer at a time
    # into host memory (to be quantized from, or sharded from by FSDP2), only on rank 0 (FSDP2 sends the shards), or
    # partitioned under zero.Init (ZeRO-3).
    build["random_base"] = random_base = backend.random_base(sharding, quantized=quantized_random, is_main=env.is_main)
    if quantized_random:
        # Random weights to quantize: built in 16 bit (the seed gives every rank the same), kept on the host and
        # loaded again quantized from memory; no file is written unless the base is kept. The ranks of a node
        # take turns where their host copies together would not fit the node's memory.
        keep = cfg.model.save_init_base and env.is_main

        def quantize():
            quantized, host = quantize_in_memory(build_model(cfg.model, **build), quant=quant, dtype=dtype,
                                                 device=device)
            return quantized, host if keep else None

        turns = _broadcast(env, _host_turns(env, host_need, keep=cfg.model.save_init_base) if env.is_main else None)
        model, base = in_turns(turns, local_rank=env.local_rank, step=quantize, barrier=lambda: _barrier(env))
    else:
        if random_base in ("host", "send") and env.is_main and device == "cuda":
            _host_fits(env, host_need, ranks=1 if random_base == "send" else env.local_world_size)
        model = base = build_model(cfg.model, **build, to_device=sharding.weights == 1 and not sharding.offload_param)
    if cfg.model.init_config is not None and cfg.model.save_init_base:
        # A random base exists only in memory: save it so the adapter can be loaded, exported and served later;
        # behind the first steps where nothing can change it (model/init_base.py: a frozen LoRA base held whole,
        # the 16-bit host copy a quantized base was made from, or rank 0's gathered copy of a partitioned one),
        # else before them.
        from sft_dist.model.init_base import gathered_state, write_base

        base_dir = out / "base_model"
        partitioned = random_base == "partitioned"  # every rank takes part in gathering it; rank 0 keeps a copy
        state = gathered_state(base, keep=env.is_main) if partitioned else None
        background = quantized_random or partitioned or (cfg.lora.enabled and sharding.weights == 1)
        if env.is_main:
            base_write = write_base(base, tokenizer, base_dir, background=background, state=state)
        if not background:
            _barrier(env)
    del base  # a quantized run's 16-bit host copy: freed here, or by the base's writer once written
    # Liger's layer kernels, patched into the base before LoRA wraps it (train/args.py: auto on CUDA when installed)
    log.info(apply_liger(model, liger_choice(cfg.training, device=device)))
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, quantized=cfg.quantization.bits is not None,
                           upcast=cfg.quantization.upcasts(str(dtype).removeprefix("torch.")),
                           gradient_checkpointing=bool(args.activation_checkpointing),
                           separate_tied=backend.separates_tied_weights)
        if cfg.lora.init_adapter:  # a trained adapter's tensors into the one just built from its shape
            from sft_dist.model.adapter_init import load_weights

            log.info(load_weights(model, cfg.lora.init_adapter))
        if base_dir is not None:
            model.peft_config["default"].base_model_name_or_path = str(base_dir)
    trainable, total = count_parameters(model)
    log.info("model: %s, %s params, %s trainable (%.3f%%), dtype %s",
             type(model).__name__, f"{total:,}", f"{trainable:,}", 100 * trainable / max(1, total), dtype)
    return model, base_dir, base_write


def _host_turns(env: DistEnv, need: int, *, keep: bool) -> int:
    """Rank 0: in how many turns the ranks of a node quantize a random base from host memory (distributed/turns.py),
    logged when more than one."""
    available = available_host_memory()
    turns = host_turns(need, ranks=env.local_world_size, available=available, keep=need if keep else 0)
    if turns > 1:
        log.info("model.init_config: the %d ranks of a node quantize the random base in %d turns: each holds %s of "
                 "host memory meanwhile, and %s is available", env.local_world_size, turns, format_bytes(need),
                 format_bytes(available))
    if need and available and need > SHARE * available:
        log.warning("model.init_config: quantizing the random base holds %s of host memory on a rank, more than "
                    "%.0f%% of the %s available: the OS may stop the worker; a checkpoint (model.name_or_path) loads "
                    "without it", format_bytes(need), 100 * SHARE, format_bytes(available))
    return turns


def _host_fits(env: DistEnv, need: int, *, ranks: int) -> None:
    """Rank 0, a random base built in host memory before FSDP2 shards it, by `ranks` ranks of a node at once (1:
    rank 0 alone, which sends the others their shards): a warning where they would hold more than it has
    available."""
    available = available_host_memory()
    if need and available and need * ranks > SHARE * available:
        who = "rank 0 builds" if ranks == 1 else f"each of the {ranks} ranks of a node builds"
        each = "" if ranks == 1 else " each"
        log.warning("model.init_config: %s the random base in host memory (%s%s) before FSDP2 shards it: more than "
                    "%.0f%% of the %s available, so the OS may stop a worker; a checkpoint (model.name_or_path: its "
                    "files are shared memory-mapped) needs less", who, format_bytes(need), each, 100 * SHARE,
                    format_bytes(available))


def _build_peak(device: str) -> int | None:
    """This GPU's peak memory while the model was built, then reset: the peaks logged per step are training's
    (a random base quantized on load held its 16-bit copy for a while). None on a CPU (its peak RSS cannot be
    reset)."""
    if device != "cuda":
        return None
    import torch

    peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    log.info("model: %.2f GiB of GPU memory at most while building it; per-step peaks count from here", peak / 2**30)
    return peak


def _sequence_layout(cfg: Config, env: DistEnv):
    """This rank's place in backend.sequence_parallel_size's groups (their process groups created), or None."""
    size = cfg.backend.sequence_parallel_size
    if size == 1:
        return None
    from sft_dist.model import ulysses

    layout = ulysses.Layout.of(env.rank, env.world_size, size)
    ulysses.new_groups(layout, env.world_size)
    log.info("sequence parallel: %d groups of %d workers, each worker 1/%d of every row's tokens (this one: group "
             "%d, slice %d)", layout.dp_world, size, size, layout.dp_rank, layout.rank)
    return layout


def _build_trainer(cfg: Config, backend: Backend, *, env: DistEnv, model, args, data, tokenizer, metrics,
                   sequence=None):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from sft_dist.data.build import by_set
    from sft_dist.train.trainer import SFTDistTrainer

    trace_path = Path(cfg.output_dir) / "trace" / f"samples.rank{env.rank}.jsonl" if cfg.data.trace_samples else None
    stream = data.train if cfg.data.streaming else None
    if stream is not None:  # TRL prepares a datasets.Dataset: give it a tokenized stand-in, then the stream
        from datasets import Dataset

        data.train = Dataset.from_dict({"input_ids": [[tokenizer.eos_token_id]], "labels": [[-100]], "sample_id": [-1]})
    trainer = SFTDistTrainer(
        trace_path=trace_path,
        backend=backend,
        local_world_size=env.local_world_size,
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=by_set(data.eval.remove_columns(["sample_id"]) if data.eval is not None else None,
                            cfg.data.eval_sets),
        processing_class=tokenizer,
        callbacks=[metrics, Progress(enabled=not cfg.training.disable_tqdm)],
    )
    # sft_dist's Progress and MetricsFile replace HF's printing of every log dict.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    collator = trainer.data_collator
    attn = model.config._attn_implementation
    if cfg.data.packing or _padding_free(model, attn, compiled=bool(args.torch_compile)):
        from sft_dist.data.packing import ROW_AWARE, PackedCollator
        from sft_dist.model import packed_positions
        from sft_dist.train.packing_check import DocumentsApartAtStart, check_documents_apart, on_the_wrapped_model

        why = packed_positions.problem(model)
        if why and cfg.data.packing:
            raise ConfigError(f"data.packing: {why}; set data.packing: false")
        if attn in ROW_AWARE:  # documents found from the position_ids, by every mask builder the model calls
            packed_positions.enable(model)
        collator = PackedCollator(collator, attn_implementation=attn,
                                  pad_to=fixed_width(cfg, attn, compiled=bool(args.torch_compile)))
        if cfg.data.packing:  # whole rows through the model unsplit (sequence parallelism is enabled below)
            if on_the_wrapped_model(model, backend.sharding(env.world_size)):
                trainer.add_callback(DocumentsApartAtStart(trainer, collator, device=args.device,
                                                           split=sequence is not None))
            else:
                check_documents_apart(model, collator, device=args.device)
        if not cfg.data.packing:
            log.info("data: rows collated padding-free (%s reads each row's boundaries: no padding computed)", attn)
    trainer.data_collator = SampleIdCollator(collator)
    if sequence is not None:  # after the collator, which is built for the attention inside (its boundaries, rows)
        from sft_dist.model import ulysses

        ulysses.enable(model, attn)
        heads = ulysses.model_heads(model.config, sequence.size)
        if heads is not None:
            log.info("sequence parallel: %s", heads.describe())
        trainer.sequence = sequence
    if stream is not None:
        trainer.train_dataset = data.train = stream
    return trainer


def fixed_width(cfg: Config, attn: str | None, *, compiled: bool) -> int | None:
    """The width every batch is padded to, or None. One batch shape under torch.compile (a narrower batch would
    compile the model again), and for packed rows on flex attention, which transformers compiles: each new width
    would compile the kernel again, for dynamic shapes (model/flex.py). Packed rows are near-full: little padding."""
    if compiled or (cfg.data.packing and attn == "flex_attention"):
        return cfg.data.max_length
    return None


def _padding_free(model, attn: str | None, *, compiled: bool) -> bool:
    """Unpacked rows flattened into one row per micro-batch, each row a document of its own, where the attention
    reads the boundaries (varlen/flash attention: the padding of a batch of uneven rows is never computed).
    Only for transformers' own model classes, whose flash path is known to read them, and not under
    torch.compile (each batch's total length would be a new shape to compile)."""
    from sft_dist.data.packing import ROW_AWARE

    base = base_model(model)
    return (not compiled and attn is not None and attn not in ROW_AWARE
            and type(base).__module__.startswith("transformers."))


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 4)


def _loss_change(metrics) -> str:
    parts = []
    for key, name in (("loss", "train loss"), ("eval_loss", "eval loss")):
        if key in metrics.first:
            parts.append(f"{name} {metrics.first[key]:.4f} -> {metrics.last[key]:.4f}")
    return ", ".join(parts) or "no loss logged"


def _gather(env: DistEnv, value):
    if env.world_size == 1:
        return [value]
    import torch.distributed as dist

    out: list = [None] * env.world_size
    dist.all_gather_object(out, value)
    return out


def _barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
