"""The Trainer methods sft_dist's checkpoints replace (a mixin in front of TRL's SFTTrainer).

HF's loop keeps deciding *when* to save and how far a resumed run has got; *what* is written and read is
ours: sharded trainable-only state with a manifest, per-rank RNG, and a data cursor the sampler starts
from directly instead of HF replaying the sampler up to the resume point.
"""

from __future__ import annotations

import contextlib
import logging
import time
from functools import partial
from pathlib import Path

import transformers.trainer as hf_trainer
from transformers.trainer_utils import seed_worker

from sft_dist.checkpoint.manager import CheckpointManager
from sft_dist.checkpoint.save import set_best
from sft_dist.data.loader import Geometry, LoaderOptions, train_loader
from sft_dist.data.sampler import CursorDataLoader, GlobalBatchSampler
from sft_dist.data.stream import StreamingTrain, StreamLoader
from sft_dist.train.state import TrainState

log = logging.getLogger("sft_dist")


@contextlib.contextmanager
def _patched(module, **names):
    old = {k: getattr(module, k) for k in names}
    for k, v in names.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def attention_weight(model) -> float:
    """batch_rebalance's q (data/rebalance.py): by the FLOP count MFU uses (metrics/flops.py), attention's FLOPs per
    token pair over the matmuls' FLOPs per token."""
    from sft_dist.metrics.flops import model_flops

    flops = model_flops(model)
    matmul = flops.per_token(0)
    return (flops.per_token(1) - matmul) / matmul if matmul else 0.0


class CheckpointHooks:
    checkpointing: CheckpointManager | None = None
    resume_manifest: dict | None = None
    train_sampler: GlobalBatchSampler | StreamingTrain | None = None  # the loader's position (data/loader.py)
    resume_s: float | None = None  # seconds this rank spent loading the checkpoint's weights and train state

    # --- data: the global sample order with a world-size-independent cursor ---
    def get_train_dataloader(self):
        args = self.args
        strategy = str(getattr(args, "train_sampling_strategy", "random"))
        world, rank = self.data_parallel  # under sequence parallelism a group's ranks get the same rows
        loader, self.train_sampler = train_loader(
            self.train_dataset, collate=self.data_collator,
            geometry=Geometry(micro=self._train_batch_size, accum=args.gradient_accumulation_steps,
                              world=world, rank=rank),
            seed=args.data_seed if args.data_seed is not None else args.seed, shuffle=strategy != "sequential",
            rebalance_q=attention_weight(self.model) if strategy == "batch_rebalance" else None,
            options=LoaderOptions(
                num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
                persistent_workers=args.dataloader_persistent_workers, prefetch_factor=args.dataloader_prefetch_factor,
                worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index)),
        )
        return loader

    def _skip_batches(self, dataloader, num_batches: int):
        if isinstance(dataloader, (CursorDataLoader, StreamLoader)):
            return dataloader.starting_at(num_batches)
        return self._hf_skip_first_batches(dataloader, num_batches)

    def train(self, resume_from_checkpoint=None, **kwargs):
        if self.checkpointing is None:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        self._hf_skip_first_batches = hf_trainer.skip_first_batches
        # DeepSpeed's load is done in _load_optimizer_and_scheduler, with a weights-only reader.
        with _patched(hf_trainer, skip_first_batches=self._skip_batches,
                      deepspeed_load_checkpoint=lambda *a, **k: None):
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    # --- save ---
    def _save_checkpoint(self, model, trial):
        if self.checkpointing is None:
            return super()._save_checkpoint(model, trial)
        self.store_flos()
        self.checkpointing.save(self, train_state=TrainState.of(self).state_dict())

    # --- resume (HF calls these with the local checkpoint directory) ---
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.checkpointing is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # Weights are loaded with the optimizer, after wrapping (_load_optimizer_and_scheduler).

    def _load_optimizer_and_scheduler(self, checkpoint):
        if self.checkpointing is None or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        t0 = time.perf_counter()
        m = self.resume_manifest
        self.checkpointing.restore(self, Path(checkpoint), m)
        set_best(self, self.checkpointing)
        train_state = TrainState()
        train_state.load_state_dict(m)
        train_state.apply(self)
        self.resume_s = time.perf_counter() - t0
        log.info("resumed from step %d: %s; state loaded in %.2f s", m["step"], train_state.describe(), self.resume_s)

    def _load_scaler(self, checkpoint):
        if self.checkpointing is None:
            return super()._load_scaler(checkpoint)

    def _load_rng_state(self, checkpoint):
        if self.checkpointing is None or checkpoint is None:
            return super()._load_rng_state(checkpoint)
        if not self.checkpointing.restore_rng(Path(checkpoint)):
            log.warning("no RNG state for rank %d in the checkpoint (it had %d workers): this rank's random "
                        "streams (dropout) start fresh", self.args.process_index, self.resume_manifest["world_size"])

    def _load_best_model(self):
        if self.checkpointing is None:
            return super()._load_best_model()
        self.checkpointing.load_best(self, str(self.state.best_model_checkpoint),
                                     metric=self.args.metric_for_best_model, value=self.state.best_metric)

