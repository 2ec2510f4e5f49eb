"""Pick the checkpoint to resume from, check it fits this run, and bring it to local disk.

`training.resume_from_checkpoint`: `auto` (default) takes the newest complete checkpoint under the
checkpoint root and says which (incomplete or corrupt ones are reported and skipped, never loaded);
`never` starts fresh; a path or URL resumes from exactly that checkpoint (and fails if it is not complete).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sft_dist.checkpoint.manifest import (
    NAME,
    checkpoint_names,
    config_identity,
    identity_diff,
    verify,
)
from sft_dist.checkpoint.store import Store
from sft_dist.config.batch import data_world, global_batch
from sft_dist.config.training import SFT_DEFAULTS
from sft_dist.errors import ConfigError

log = logging.getLogger("sft_dist")
OFF = ("never", "no", "false", "none", "")


@dataclass
class ResumePoint:
    store_url: str
    name: str
    display: str
    manifest: dict
    storage_options: dict | None = None

    def store(self) -> Store:
        return Store(self.store_url, self.storage_options)

    @property
    def step(self) -> int:
        return int(self.manifest["step"])


def resume_request(training: Mapping[str, Any]) -> str | None:
    value = training.get("resume_from_checkpoint", "auto")
    if value is None or value is False or str(value).strip().lower() in OFF:
        return None
    return "auto" if value is True else str(value)


def select(store: Store, request: str, storage_options: dict | None = None) -> ResumePoint | None:
    """Rank 0: the checkpoint to resume from (None: start fresh). Raises for an explicit bad checkpoint."""
    if request == "auto":
        stale = [n for n in store.listdir() if n.startswith(".tmp-checkpoint-")]
        for n in stale:
            log.warning("ignoring %s: a save that did not finish (removed at the next save)", store.display(n))
        for name in checkpoint_names(store):
            v = verify(store, name)
            if v.ok:
                return ResumePoint(store.url, name, store.display(name), v.manifest, storage_options)
            log.warning("skipping checkpoint %s: %s", store.display(name), v.reason)
        return None
    parent, _, name = request.rstrip("/").rpartition("/")
    if not NAME.match(name):
        raise ConfigError(f"training.resume_from_checkpoint: {request!r} is not a checkpoint directory "
                          "(expected .../checkpoint-<step>); use `auto` to pick the newest in the run")
    explicit = Store(parent or ".", storage_options)
    v = verify(explicit, name)
    if not v.ok:
        raise ConfigError(f"training.resume_from_checkpoint: {request} cannot be resumed from: {v.reason}. "
                          "Pick a complete checkpoint, or `auto` for the newest complete one.")
    return ResumePoint(explicit.url, name, explicit.display(name), v.manifest, storage_options)


def check_fit(point: ResumePoint, cfg, *, world_size: int, shard_format: str,
              zero_stage: int | None) -> int | None:
    """Raise if this run cannot continue `point`; return the gradient accumulation that keeps the
    checkpoint's global batch when the world size changed (None: keep the configured one)."""
    m = point.manifest
    where = f"checkpoint {point.display}"
    from sft_dist.config.load import config_to_dict

    ckpt_cfg = yaml.safe_load(store_text(point, "config.yaml"))
    diff = identity_diff(config_identity(ckpt_cfg), config_identity(config_to_dict(cfg)))
    if diff:
        raise ConfigError(
            f"{where} was written with a different model/data config ({'; '.join(diff)}). Resuming would mix "
            "two runs: use a new output_dir (or checkpoint.dir), or set training.resume_from_checkpoint: never.")
    _check_schedule(ckpt_cfg.get("training") or {}, cfg, where, point.step)
    if m["shard_format"] != shard_format:
        raise ConfigError(f"{where} holds {m['shard_format']} shards ({m['backend']} backend); this run uses "
                          f"backend {cfg.backend.type}. Resume with backend.type={m['backend']}.")
    if shard_format == "deepspeed":
        if m.get("zero_stage") != zero_stage:
            raise ConfigError(f"{where} was written by ZeRO stage {m.get('zero_stage')}; this run uses stage "
                              f"{zero_stage}. Resume with the same DeepSpeed config.")
        if m["world_size"] != world_size:
            raise ConfigError(
                f"{where} was written by {m['world_size']} workers and DeepSpeed ZeRO partitions its optimizer "
                f"state per worker: it cannot be loaded by {world_size}. Resume with "
                f"launcher.num_workers={m['world_size']}, or use backend ddp/fsdp (their checkpoints re-shard).")
    micro, accum = cfg.training.micro_batch, cfg.training.accumulation
    # the data-parallel ranks: workers / backend.sequence_parallel_size (each group trains the same rows)
    ranks = data_world(world_size, cfg.backend.sequence_parallel_size)
    what = "workers" if ranks == world_size else f"data-parallel groups of {world_size // ranks} workers"
    want, have = m["batch"]["global"], global_batch(micro, accum, ranks)
    if have == want:
        return None
    if want == global_batch(m["batch"]["per_device"], m["batch"]["accumulation"], ranks):
        raise ConfigError(
            f"{where} trained with a global batch of {want} ({m['batch']['per_device']} per device x "
            f"{m['batch']['accumulation']} accumulation x {ranks} {what}); this run has "
            f"{have}. The data position is counted in global batches: keep the batch "
            "settings, or start a new run.")
    if want % (micro * ranks):
        raise ConfigError(
            f"{where} trained with a global batch of {want}; with {ranks} {what} and "
            f"per_device_train_batch_size={micro} no gradient accumulation gives that. Set "
            f"training.per_device_train_batch_size to a divisor of {want // ranks if want % ranks == 0 else want}"
            " or resume with the original worker count.")
    new_accum = want // (micro * ranks)
    log.info("resuming on %d %s (checkpoint: %d workers): gradient_accumulation_steps %d -> %d keeps the global "
             "batch of %d", ranks, what, m["world_size"], accum, new_accum, want)
    return new_accum


# The fields the learning-rate schedule is computed from (HF rebuilds the schedule from the arguments on resume
# and only restores its step count: a change bends the curve at the checkpoint's step).
SCHEDULE = ("learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio")
LENGTH = ("max_steps", "num_train_epochs")
FLAT = ("constant", "constant_with_warmup")  # schedules whose value after warmup does not depend on the length
# Unset: SFTConfig's default (a checkpoint's manifest lists only the fields its config set); warmup_ratio only in
# manifests written before transformers 5 folded it into warmup_steps.
DEFAULTS = {**{k: SFT_DEFAULTS[k] for k in SCHEDULE + LENGTH if k in SFT_DEFAULTS}, "warmup_ratio": 0.0}


def _check_schedule(before: dict, cfg, where: str, step: int) -> None:
    now = cfg.training

    def value(d: dict, k: str):
        v = d.get(k, DEFAULTS[k])
        return {} if k == "lr_scheduler_kwargs" and not v else v

    changed = [k for k in SCHEDULE if value(before, k) != value(now, k)]
    if str(value(now, "lr_scheduler_type")) not in FLAT:
        changed += [k for k in LENGTH if value(before, k) != value(now, k)]
    if not changed:
        return
    what = ", ".join(f"training.{k} {value(before, k)!r} -> {value(now, k)!r}" for k in changed)
    if cfg.checkpoint.allow_schedule_change:
        log.warning("%s: resuming with a changed learning-rate schedule (%s): the new schedule applies from "
                    "step %d on", where, what, step)
        return
    raise ConfigError(
        f"{where} was trained with another learning-rate schedule ({what}). The schedule is recomputed from "
        "these on resume, so the learning rate would jump at the checkpoint's step. Keep the checkpoint's values, "
        "set checkpoint.allow_schedule_change=true to continue with the new schedule, or use a new output_dir.")


def store_text(point: ResumePoint, rel: str) -> str:
    return point.store().read_text(point.name, rel)


def fetch(point: ResumePoint, *, rank: int, staging: Path) -> Path:
    """A local directory with the checkpoint's files (downloaded per rank for remote stores)."""
    store = point.store()
    if store.local:
        return Path(store.path(point.name))
    return store.download(staging / f"resume-{point.name}-rank{rank}", point.name)
