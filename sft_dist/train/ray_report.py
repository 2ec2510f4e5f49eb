"""Report to Ray Train from inside the HF training loop: the latest metrics with every checkpoint and once at
the end, never per logged step.

Why not at every log (Ray 2.60, Train v2, read in `ray/train/v2/_internal`):
- `ray.train.report` is a barrier: each call first syncs a directory name through a Ray actor with every rank
  (`_sync_checkpoint_dir_name_across_ranks`), so every rank must call it the same number of times at the same
  points, and each call costs an actor round trip.
- The report then goes into a one-slot queue (`Queue(maxsize=1)` in `worker.py`) that the controller drains
  once per health check (`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`, 2 s): a second report within 2 s blocks the
  training thread. At `logging_steps=1` that stalled every step for up to 2 s (0.50 steps/s against 30.4).
- A report without a checkpoint reaches nothing a user can read: the checkpoint manager only counts it, and
  `Result.metrics` is the metrics of the latest *checkpoint* (`controller._build_result`). Ray's own
  `RayTrainReportCallback` for transformers reports in `on_save` only, for the same reason.

So the report points are HF's save steps (decided from `global_step`, identical on every rank, and HF calls
`on_save` on every rank) plus one report after `run()` returns on every rank: the same count at the same
points on all ranks, with no clock involved. Checkpoint reports use Ray's ASYNC mode: after the barrier the
queue wait happens on Ray's upload thread, not the training thread (Ray flushes it before the worker
finishes). The checkpoint Ray records is a small pointer to the sharded checkpoint sft_dist already wrote
(each rank its own shard): the weights never pass through one node. `metrics.jsonl` has every step.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

from transformers import TrainerCallback

POINTER = "sft_dist_checkpoint.json"


class RayReport(TrainerCallback):
    """Reports `{"step", **latest logged metrics}` to Ray at every save (with a pointer to that checkpoint,
    from rank 0) and in `finish()` (with a pointer to the final adapter/model).

    Args:
        send: `send(metrics, pointer_dir)` instead of `ray.train.report` (tests); `pointer_dir` is None on
            ranks that attach no checkpoint.
    """

    def __init__(self, *, send: Callable[[dict, str | None], None] | None = None):
        self.checkpointing = None  # set by attach(): the run's CheckpointManager (store + saved names)
        self.latest: dict = {}  # every numeric key ever logged, at its latest value (loss, eval_loss, ...)
        self.step = 0
        self.is_main = False  # rank 0 attaches the pointer; the other ranks report the metrics without one
        self._send = send or _ray_send

    def attach(self, trainer) -> None:
        self.checkpointing = trainer.checkpointing
        self.is_main = trainer.is_world_process_zero()

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Merged, not replaced: HF's last log (train_runtime, train_loss) must not hide the last loss.
        self.latest.update({k: v for k, v in (logs or {}).items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def on_save(self, args, state, control, **kwargs):
        self.step = state.global_step
        ck = self.checkpointing
        name = ck.saved[-1] if ck is not None and ck.saved else None
        self._report({"checkpoint": ck.store.display(name) if name else None})

    def finish(self, result) -> None:
        """The last report, on every rank once `run()` returned (`result`: its RunResult): Ray's
        `Result.metrics` / `Result.checkpoint` then show the last step and point to the final weights."""
        ck = self.checkpointing
        self.step = result.global_step
        self._report({
            "checkpoint": ck.store.display(ck.saved[-1]) if ck is not None and ck.saved else None,
            # a run stopped by SIGTERM ends at its checkpoint, with no final weights
            "final": None if result.stopped else str(result.final_dir),
        })

    def _report(self, pointer: dict) -> None:
        metrics = {**self.latest, "step": self.step}
        if not self.is_main:
            self._send(metrics, None)
            return
        pointer = {**pointer, "step": self.step,
                   "world_size": self.checkpointing.world_size if self.checkpointing else None}
        # Ray deletes this directory once it has copied the pointer (ASYNC upload mode).
        tmp = tempfile.mkdtemp(prefix="sft-dist-ray-pointer-")
        Path(tmp, POINTER).write_text(json.dumps(pointer, indent=2), encoding="utf-8")
        self._send(metrics, tmp)


def _ray_send(metrics: dict, pointer_dir: str | None) -> None:
    import ray.train
    from ray.train import CheckpointUploadMode

    checkpoint = ray.train.Checkpoint.from_directory(pointer_dir) if pointer_dir else None
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.ASYNC)


def read_pointer(checkpoint_dir: str | Path) -> dict:
    """The sft_dist checkpoint a Ray checkpoint points to: `checkpoint` (the newest sft_dist checkpoint, or
    None), `step`, `world_size`, and in the report made at the end `final` (the adapter/model directory)."""
    return json.loads(Path(checkpoint_dir, POINTER).read_text(encoding="utf-8"))
