"""A run's checkpoints: where they go (the store), who writes what (rank, world size), and the named states they
hold, saved and loaded through the shard format the backend chose (`checkpoint/shards.py`). The manifest is the
commit point, as `checkpoint/manifest.py` describes.

HF's Trainer keeps deciding *when*: a save step, a resume, load_best_model_at_end. `train/hooks.py` hands each of
those moments to this object; the train state itself (step, cursor, counters) is `train/state.py`'s, which this
object stores in the manifest and gives back as the manifest's dict.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from sft_dist.checkpoint.shards import shard_io
from sft_dist.checkpoint.state import load_pt, rng_file, set_rng_state
from sft_dist.checkpoint.store import Store

log = logging.getLogger("sft_dist")


@dataclass
class CheckpointManager:
    store: Store
    rank: int
    world_size: int
    staging: Path  # local scratch for remote stores (per-rank subdirectories)
    config_yaml: str  # the run's resolved config, secrets redacted
    config_hash: str
    backend: str
    shard_format: str = "dcp"  # the backend's: torch.distributed.checkpoint or DeepSpeed's own
    zero_stage: int | None = None
    keep_last: int | None = None
    keep_best: bool = True
    storage_options: dict | None = None
    saved: list[str] = field(default_factory=list)
    last_bytes: int | None = None  # size of the newest checkpoint written
    last_save_s: float | None = None  # its wall seconds on this rank: what training waited

    def local_dir_for(self, work: str) -> Path:
        if self.store.local:
            return Path(self.store.path(work))
        return self.staging / f"{work}-rank{self.rank}"

    def save(self, trainer, *, train_state: dict) -> str:
        """Every rank its shards and RNG, rank 0 the scheduler, trainer state and config, then the manifest with
        `train_state` (TrainState.state_dict()). Collective. Returns the checkpoint's name."""
        from sft_dist.checkpoint.save import save_checkpoint

        return save_checkpoint(trainer, self, train_state=train_state)

    def restore(self, trainer, local_dir: Path, manifest: dict) -> None:
        """The trainable weights and optimizer state (this backend's shards), the LR scheduler and the gradient
        scaler of checkpoint `local_dir`. The train state is the manifest's (TrainState.load_state_dict)."""
        shard_io(self.shard_format).load(trainer, local_dir, manifest["step"])
        state = load_pt(local_dir / "train_state.pt")
        trainer.lr_scheduler.load_state_dict(state["scheduler"])
        scaler = getattr(trainer.accelerator, "scaler", None)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])

    def restore_rng(self, local_dir: Path) -> bool:
        """This rank's RNG streams; False when the checkpoint has none for it (written by fewer workers)."""
        path = local_dir / rng_file(self.rank)
        if not path.exists():
            return False
        set_rng_state(load_pt(path))
        return True

    def load_best(self, trainer, name: str, *, metric: str | None, value) -> None:
        """The weights of checkpoint `name` (the best by `metric`), fetched from the store. Collective."""
        from sft_dist.checkpoint.resume import fetch, select

        point = select(self.store, name, self.storage_options)
        local = fetch(point, rank=self.rank, staging=self.staging)
        log.info("loading the best checkpoint %s (%s %s)", point.display, metric, value)
        shard_io(self.shard_format).load_best(trainer, local, point.step)
