"""`training.early_stopping_patience`: stop training once `metric_for_best_model` has not improved for that many
evaluations in a row, as HF's EarlyStoppingCallback decides it (an improvement beats the best so far, HF's
`state.best_metric`, by more than `early_stopping_threshold`), with what HF's callback leaves out:

- its count of evaluations without improvement is a resume's (`TrainState`, the checkpoint's manifest): a run
  killed and resumed stops at the step the uninterrupted run stops at. HF restores callbacks only with
  `restore_callback_states_from_checkpoint`, and then with the checkpoint's arguments and its `should_training_stop`.
- every rank takes rank 0's decision (one broadcast per evaluation): the metrics are reduced over ranks and equal,
  but a rank that stopped alone would leave the others waiting in their next collective.
- a run resumed from a checkpoint written after it stopped trains no further step (`SFTDistTrainer._run_epoch`).
- the stop is logged with its reason and kept in run_summary.json (`stopped_early`).
"""

from __future__ import annotations

import logging
import operator

import torch
from transformers import TrainerCallback

log = logging.getLogger("sft_dist")


class EarlyStopping(TrainerCallback):
    def __init__(self, *, patience: int, threshold: float, world_size: int, device):
        self.patience, self.threshold, self.world_size, self.device = patience, threshold, world_size, device
        self.counter = 0  # evaluations in a row without an improvement (carried by a resume: TrainState)
        self.best_step: int | None = None  # HF keeps the best's step only where checkpoints are saved
        self.stopped: dict | None = None  # what run_summary.json says about the stop

    @staticmethod
    def metric_key(args) -> str:
        name = args.metric_for_best_model
        return name if name.startswith("eval_") else f"eval_{name}"

    def on_train_begin(self, args, state, control, **kwargs):
        if self.counter >= self.patience:  # resumed from a checkpoint written at (or after) the stop
            control.should_training_stop = True
            self.stopped = {"step": state.global_step, "max_steps": state.max_steps, "metric": self.metric_key(args),
                            "best": state.best_metric, "best_step": state.best_global_step, "patience": self.patience,
                            "threshold": self.threshold, "resumed_stopped": True}
            log.info("early stopping: the checkpoint of step %d had already stopped (%s not improved for %d "
                     "evaluations, training.early_stopping_patience=%d): no step to train", state.global_step,
                     self.metric_key(args), self.counter, self.patience)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        key = self.metric_key(args)
        value = (metrics or {}).get(key)
        if value is None:
            return  # an evaluation outside training (sft-dist evaluate), or of other data
        better = operator.gt if args.greater_is_better else operator.lt
        best = state.best_metric  # before this evaluation: HF updates it after its callbacks ran
        best_step = state.best_global_step if state.best_global_step is not None else self.best_step
        if best is None or better(value, best):
            self.best_step = state.global_step  # HF's new best (any improvement), as it will record it
        improved = best is None or (better(value, best) and abs(value - best) > self.threshold)
        self.counter = self._from_rank0(0 if improved else self.counter + 1)
        if self.counter == 0:
            return
        by = f" by more than {self.threshold:g}" if self.threshold else ""
        if self.counter < self.patience:
            log.info("early stopping: %s %.6g at step %d is not better than %.6g (step %s)%s: %d of %d evaluations "
                     "without improvement", key, value, state.global_step, best, best_step, by, self.counter,
                     self.patience)
            return
        control.should_training_stop = True
        self.stopped = {"step": state.global_step, "max_steps": state.max_steps, "metric": key, "best": best,
                        "best_step": best_step, "last": value, "patience": self.patience, "threshold": self.threshold}
        log.info("early stopping at step %d of %d: %s has not improved on %.6g (step %s)%s for %d evaluations "
                 "(training.early_stopping_patience=%d)", state.global_step, state.max_steps, key, best, best_step,
                 by, self.counter, self.patience)

    def _from_rank0(self, counter: int) -> int:
        if self.world_size == 1:
            return counter
        t = torch.tensor([counter], dtype=torch.long, device=self.device)
        torch.distributed.broadcast(t, src=0)
        return int(t)
