"""Write a checkpoint: every rank its shards, then the manifest (last), then the rename and `latest`.

A save that dies part-way leaves a `.tmp-checkpoint-N` directory (or, on object stores, a directory
without a manifest): never loaded, removed by the next save. Older checkpoints are deleted only after
the new manifest is written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from sft_dist.checkpoint.manifest import (
    FORMAT,
    MANIFEST,
    NAME,
    checkpoint_name,
    checkpoint_names,
    hash_files,
    list_files,
    verify,
)
from sft_dist.checkpoint.shards import shard_io
from sft_dist.checkpoint.state import rng_file, rng_state, save_pt
from sft_dist.sizes import format_bytes

if TYPE_CHECKING:
    from sft_dist.checkpoint.manager import CheckpointManager

log = logging.getLogger("sft_dist")
LATEST = "latest"


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _all_gather(world_size: int, value) -> list:
    if world_size == 1:
        return [value]
    import torch.distributed as dist

    out: list = [None] * world_size
    dist.all_gather_object(out, value)
    return out


def save_checkpoint(trainer, ck: CheckpointManager, *, train_state: dict) -> str:
    """Save the trainer's shards, RNG and scheduler, with `train_state` (`train/state.py` TrainState.state_dict():
    data cursor, batch geometry, token counters) in the manifest. Collective: every rank calls it."""
    t0 = time.perf_counter()
    step = trainer.state.global_step
    name = checkpoint_name(step)
    store = ck.store
    work = f".tmp-{name}" if store.local else name
    if ck.rank == 0:
        store.remove(work)  # what an interrupted save of this step left behind
    _barrier(ck.world_size)
    local_dir = ck.local_dir_for(work)
    if not store.local:
        shutil.rmtree(local_dir, ignore_errors=True)
    local_dir.mkdir(parents=True, exist_ok=True)

    shard_io(ck.shard_format).save(trainer, local_dir, step)
    _fault_point(step, ck.rank)
    save_pt(rng_state(), local_dir / rng_file(ck.rank))
    if ck.rank == 0:
        _save_rank0_state(trainer, local_dir, ck)
    _barrier(ck.world_size)

    # Each rank hashes (and, for remote stores, uploads) the files it is responsible for, in parallel.
    if store.local:
        mine = list_files(local_dir)[ck.rank::ck.world_size]
    else:
        mine = list_files(local_dir)
        store.upload(local_dir, mine, name)
    files: dict[str, dict] = {}
    for part in _all_gather(ck.world_size, hash_files(local_dir, mine)):
        files.update(part)

    ck.last_bytes = sum(f["size"] for f in files.values())
    if ck.rank == 0:
        manifest = _manifest(trainer, ck, step, files, train_state)
        store.write_text(json.dumps(manifest, indent=1), work, MANIFEST)  # the commit point
        if store.local:
            store.remove(name)
            store.rename(work, name)
        store.write_text(name + "\n", LATEST)
        removed = _retain(trainer, ck, current=name)
        total = sum(f["size"] for f in files.values())
        trainable = manifest["trainable_param_bytes"]
        log.info("checkpoint %s: %d files, %s (%.1fx the trainable weights), %.1f s%s", store.display(name),
                 len(files), format_bytes(total), total / max(1, trainable), time.perf_counter() - t0,
                 f"; removed {', '.join(removed)}" if removed else "")
    _barrier(ck.world_size)
    set_best(trainer, ck)  # on every rank: loading the best model at the end is collective
    if not store.local:
        shutil.rmtree(local_dir, ignore_errors=True)
    ck.saved.append(name)
    ck.last_save_s = time.perf_counter() - t0
    return name


def _fault_point(step: int, rank: int) -> None:
    """Fault injection for the crash tests: SFT_DIST_KILL_DURING_SAVE=<step>:<rank> SIGKILLs that rank
    right after its shards are written, before the checkpoint is complete (what a preemption does)."""
    spec = os.environ.get("SFT_DIST_KILL_DURING_SAVE")
    if spec and spec == f"{step}:{rank}":
        os.kill(os.getpid(), signal.SIGKILL)


def _save_rank0_state(trainer, local_dir: Path, ck: CheckpointManager) -> None:
    from transformers.trainer_callback import ExportableState

    scaler = getattr(trainer.accelerator, "scaler", None)
    save_pt({"scheduler": trainer.lr_scheduler.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None}, local_dir / "train_state.pt")
    # As HF does: stateful callbacks (early stopping, ...) travel in trainer_state.json.
    for cb in [c for c in trainer.callback_handler.callbacks + [trainer.control] if isinstance(c, ExportableState)]:
        name = cb.__class__.__name__
        if isinstance(trainer.state.stateful_callbacks.get(name), list):
            trainer.state.stateful_callbacks[name].append(cb.state())
        else:
            trainer.state.stateful_callbacks[name] = cb.state()
    trainer.state.save_to_json(str(local_dir / "trainer_state.json"))
    (local_dir / "config.yaml").write_text(ck.config_yaml, encoding="utf-8")


def _manifest(trainer, ck: CheckpointManager, step: int, files: dict, train_state: dict) -> dict:
    # ds_numel: a ZeRO-3 parameter is an empty placeholder outside forward; FSDP2 DTensors report the full size.
    trainable = sum(getattr(p, "ds_numel", p.numel()) * p.element_size()
                    for p in trainer.model.parameters() if p.requires_grad)
    return {
        "format": FORMAT,
        "step": step,
        "epoch": trainer.state.epoch,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "world_size": ck.world_size,
        **train_state,
        "backend": ck.backend,
        "zero_stage": ck.zero_stage,
        "shard_format": ck.shard_format,
        "config_hash": ck.config_hash,
        "best_global_step": trainer.state.best_global_step,
        "best_metric": trainer.state.best_metric,
        "trainable_param_bytes": trainable,
        "files": dict(sorted(files.items())),
    }


def set_best(trainer, ck: CheckpointManager) -> None:
    """`state.best_model_checkpoint`: the complete checkpoint of `state.best_global_step` in this run's store. Also
    on resume: a checkpoint's trainer_state.json is written before the checkpoint is complete, so it names the best
    before it even where it is the best itself (and a copied run's names the original's directory). None where this
    store has no such checkpoint: never another run's."""
    best = trainer.state.best_global_step
    name = checkpoint_name(best) if best else None
    trainer.state.best_model_checkpoint = (ck.store.display(name) if name and ck.store.exists(name, MANIFEST)
                                           else None)


def _retain(trainer, ck: CheckpointManager, *, current: str) -> list[str]:
    """Keep the newest `keep_last` complete checkpoints and the best one; delete the rest (older only)."""
    if ck.keep_last is None:
        return []
    names = checkpoint_names(ck.store)
    current_step = int(NAME.match(current).group(1))
    keep, complete = {current}, 0
    for name in names:
        if int(NAME.match(name).group(1)) > current_step:
            keep.add(name)  # newer than this save (a resume from an older checkpoint): not ours to judge
        elif verify(ck.store, name, checksums=False).ok and complete < ck.keep_last:
            keep.add(name)
            complete += 1
    if ck.keep_best and trainer.state.best_global_step:
        keep.add(checkpoint_name(trainer.state.best_global_step))
    removed = [n for n in names if n not in keep]
    for name in removed:
        ck.store.remove(name)
    return removed

