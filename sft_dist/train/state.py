"""`TrainState`: what a run carries across a resume besides the weights, the optimizer, the LR scheduler and the
RNG streams (those are the backend's shards and `checkpoint/state.py`'s files).

One object with `state_dict()` / `load_state_dict()`, read from the trainer when a checkpoint is saved and put
back into it when one is loaded. Its dict is the manifest's train-state part, so the keys are the manifest's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The manifest keys this state owns.
KEYS = ("batch", "data_cursor", "tokens_seen", "tokens_processed", "trl_num_tokens", "early_stopping_counter")


@dataclass
class TrainState:
    step: int = 0
    loss_tokens: int = 0  # tokens that carried loss, summed over ranks
    tokens_processed: list[int] = field(default_factory=lambda: [0, 0])  # [real, padding included] over ranks
    trl_num_tokens: int = 0  # TRL's `num_tokens` metric (its private counter)
    data_cursor: dict[str, Any] = field(default_factory=dict)  # where the global sample order stands
    batch: dict[str, int] = field(default_factory=dict)  # per_device, accumulation, world_size, global
    early_stopping_counter: int = 0  # evaluations in a row without improvement (train/early_stop.py)

    @classmethod
    def of(cls, trainer) -> TrainState:
        """The state of `trainer` after its current optimizer step."""
        args, sampler, step = trainer.args, trainer.train_sampler, trainer.state.global_step
        return cls(
            step=step,
            loss_tokens=int(trainer.total_loss_tokens),
            tokens_processed=[int(x) for x in trainer._total_seen],
            trl_num_tokens=int(getattr(trainer, "_total_train_tokens", 0)),
            data_cursor=sampler.cursor(step),
            batch={"per_device": args.per_device_train_batch_size, "accumulation": args.gradient_accumulation_steps,
                   "world_size": args.world_size, "global": sampler.global_batch},
            early_stopping_counter=trainer.early_stopping.counter if trainer.early_stopping is not None else 0,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"batch": dict(self.batch), "data_cursor": dict(self.data_cursor), "tokens_seen": self.loss_tokens,
                "tokens_processed": list(self.tokens_processed), "trl_num_tokens": self.trl_num_tokens,
                "early_stopping_counter": self.early_stopping_counter}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """From a manifest (older ones lack the counters added later: they start at 0)."""
        self.step = int(d.get("step", self.step))
        self.batch = dict(d.get("batch") or {})
        self.data_cursor = dict(d.get("data_cursor") or {})
        self.loss_tokens = int(d.get("tokens_seen", 0))
        self.tokens_processed = [int(x) for x in d.get("tokens_processed", [0, 0])]
        self.trl_num_tokens = int(d.get("trl_num_tokens", 0))
        self.early_stopping_counter = int(d.get("early_stopping_counter", 0))

    def apply(self, trainer) -> None:
        """Put the counters back into `trainer`: the run's padding fraction and TRL's num_tokens go on from the
        checkpoint, not from 0. (The data cursor reaches the loader through `GlobalBatchSampler.starting_at`.)"""
        trainer.total_loss_tokens = self.loss_tokens
        trainer._total_seen = list(self.tokens_processed)
        if hasattr(trainer, "_total_train_tokens"):
            trainer._total_train_tokens = self.trl_num_tokens
        if trainer.early_stopping is not None:
            trainer.early_stopping.counter = self.early_stopping_counter

    def describe(self) -> str:
        c = self.data_cursor
        where = "stream position" if c.get("streaming") else (
            f"epoch {c['epoch']}, {c['samples_in_epoch']} samples into it,")
        return f"{where} {c['samples_total']} samples in all, {self.loss_tokens} loss tokens seen"
