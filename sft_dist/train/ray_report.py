"""Report to Ray Train from inside the HF training loop: metrics at every log, checkpoints by pointer.

`ray.train.report` is a barrier across the worker group, so every rank calls it at the same points (HF
calls `on_log` and `on_save` on every rank). The checkpoint Ray records is a small pointer to the sharded
checkpoint sft_dist already wrote (each rank its own shard): the weights never pass through one node.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from transformers import TrainerCallback

POINTER = "sft_dist_checkpoint.json"


class RayReport(TrainerCallback):
    def __init__(self):
        self.checkpointing = None  # set by attach(): the run's Checkpointing (store + saved names)
        self.last: dict = {}

    def attach(self, trainer) -> None:
        self.checkpointing = trainer.checkpointing

    def on_log(self, args, state, control, logs=None, **kwargs):
        import ray.train

        self.last = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        ray.train.report({"step": state.global_step, **self.last})

    def on_save(self, args, state, control, **kwargs):
        import ray.train

        ck = self.checkpointing
        metrics = {"step": state.global_step, **self.last}
        if ck is None or not ck.saved or not state.is_world_process_zero:
            ray.train.report(metrics)
            return
        name = ck.saved[-1]
        with tempfile.TemporaryDirectory(prefix="sft-dist-ray-pointer-") as tmp:
            Path(tmp, POINTER).write_text(json.dumps({
                "checkpoint": ck.store.display(name),
                "step": state.global_step,
                "world_size": ck.world_size,
            }, indent=2), encoding="utf-8")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def read_pointer(checkpoint_dir: str | Path) -> dict:
    """The sft_dist checkpoint a Ray checkpoint points to."""
    return json.loads(Path(checkpoint_dir, POINTER).read_text(encoding="utf-8"))
