"""SIGTERM (Kubernetes preemption, `kill`, a launcher passing it on): finish the step, checkpoint, exit 0.

The signal handler only sets a flag. After every optimizer step the ranks agree on it (one tiny
all-reduce: a rank that got the signal a moment later must still stop at the same step), then the
Trainer saves and stops. A watchdog ends the process if that takes longer than `checkpoint.stop_grace_s`,
so the log says why instead of the container being killed mid-write; the previous complete checkpoint
is then the one a restart uses.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from transformers import TrainerCallback

log = logging.getLogger("sft_dist")


class StopOnSignal(TrainerCallback):
    def __init__(self, *, grace_s: float, world_size: int, device: str = "cpu"):
        self.grace_s = grace_s
        self.world_size = world_size
        self.device = device
        self.received: int | None = None
        self.stopped_at: int | None = None
        # Ray Train runs the training function in a worker thread and handles the worker's signals itself
        # (a preempted Ray worker is restarted and resumes from the last checkpoint): nothing to install.
        self.enabled = threading.current_thread() is threading.main_thread()
        self._old = signal.signal(signal.SIGTERM, self._on_signal) if self.enabled else None

    def _on_signal(self, signum, _frame) -> None:
        if self.received is not None:
            return
        self.received = signum
        log.warning("received %s: finishing the current step, then writing a checkpoint (grace %ss)",
                    signal.Signals(signum).name, self.grace_s)
        timer = threading.Timer(self.grace_s, self._expired)
        timer.daemon = True
        timer.start()

    def _expired(self) -> None:
        log.error("the %ss grace period after SIGTERM ran out before the checkpoint was written: exiting; the "
                  "previous complete checkpoint will be used to resume", self.grace_s)
        os._exit(143)

    def _any_rank_stopping(self) -> bool:
        flag = self.received is not None
        if self.world_size == 1:
            return flag
        import torch
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self.enabled and self._any_rank_stopping():
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def restore(self) -> None:
        if self.enabled:
            signal.signal(signal.SIGTERM, self._old)
