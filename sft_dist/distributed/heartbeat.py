"""`Heartbeat`: the TrainerCallback that puts the trainer's step into this rank's heartbeat (health.py).

Kept apart from health.py so that the heartbeat itself does not import transformers."""

from __future__ import annotations

from transformers import TrainerCallback

from sft_dist.distributed.health import set_step


class Heartbeat(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        set_step(state.global_step)  # a resumed run starts past 0

    def on_step_end(self, args, state, control, **kwargs):
        set_step(state.global_step)
