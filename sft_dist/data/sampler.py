"""The global sample order: one permutation per epoch, the same for any number of workers.

Optimizer step `s` of an epoch trains on positions [s*G, (s+1)*G) of that epoch's permutation (G = the
global batch). Rank r's micro-batch m of the step takes the `micro` positions starting at
s*G + (m*world + r)*micro. The data position is therefore one number, the samples consumed, which does
not depend on the world size: a resume starts the sampler there directly (no batches are replayed), and
a resume on another number of workers trains on the same samples in every step.

With `lengths` (train_sampling_strategy: batch_rebalance), each step's samples are the same, re-divided among the
ranks and micro-batches by cost (data/rebalance.py).

Every sample is trained on exactly once per epoch. When G does not divide the dataset, the epoch ends
with a smaller step holding the remaining samples, spread evenly over the step's accum x world
micro-batches; a micro-batch left without a sample gets PLACEHOLDER, a row whose labels carry no loss
(every rank must run forward/backward for the gradient all-reduce). The loss is normalised by the
loss-carrying tokens of the whole step, so that step is an ordinary, smaller batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset, Sampler

from sft_dist.config.batch import global_batch
from sft_dist.data.rebalance import assign

PLACEHOLDER = -1


class GlobalBatchSampler(Sampler[list[int]]):
    def __init__(self, num_samples: int, *, micro: int, accum: int, world: int, rank: int, seed: int,
                 shuffle: bool = True, start: int = 0, lengths: Sequence[int] | None = None, q: float = 0.0):
        self.num_samples = num_samples
        # batch_rebalance: each sample's tokens, and attention's quadratic weight in a micro-batch's cost
        self.lengths, self.q = lengths, q
        self.max_tokens = micro * max(lengths) if lengths else 0  # a random micro-batch's padded tokens at most
        self._step: tuple[int, int, list[list[int]]] | None = None  # (epoch, step, its micro-batches by slot)
        self.micro, self.accum, self.world, self.rank = micro, accum, world, rank
        self.global_batch = global_batch(micro, accum, world)
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = start  # micro-batches of this rank already consumed in the current epoch

    @property
    def full_steps(self) -> int:
        return self.num_samples // self.global_batch

    @property
    def tail(self) -> int:
        """Samples in the epoch's last, smaller step (0 when the global batch divides the dataset)."""
        return self.num_samples - self.full_steps * self.global_batch

    @property
    def steps_per_epoch(self) -> int:
        return self.full_steps + (1 if self.tail else 0)

    @property
    def empty_tail_slots(self) -> int:
        """Micro-batches of the last step (over all ranks) that get only a placeholder."""
        return max(0, self.accum * self.world - self.tail) if self.tail else 0

    def samples_before(self, step_in_epoch: int) -> int:
        """Samples of an epoch consumed by its first `step_in_epoch` steps."""
        return min(step_in_epoch * self.global_batch, self.num_samples)

    def __len__(self) -> int:
        return self.steps_per_epoch * self.accum

    def cursor(self, step: int) -> dict:
        """The data position after `step` optimizer steps, as checkpoints record it (world-size independent)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        return {"samples_total": epoch * self.num_samples + self.samples_before(within), "epoch": epoch,
                "samples_in_epoch": self.samples_before(within), "num_samples": self.num_samples,
                "seed": self.seed, "shuffle": self.shuffle}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __iter__(self):
        order = self.order(self.epoch)
        start, self.start = self.start, 0  # a resume offset applies to the first epoch iterated only
        for b in range(start, len(self)):
            step, m = divmod(b, self.accum)
            slot = m * self.world + self.rank
            balanced = self._balanced(order, step) if self.lengths else None
            if balanced is not None:
                yield balanced[slot] or [PLACEHOLDER]
            elif step < self.full_steps:
                base = step * self.global_batch + slot * self.micro
                yield order[base:base + self.micro]
            else:
                yield self._tail_slot(order, slot)

    def _balanced(self, order: list[int], step: int) -> list[list[int]] | None:
        """The step's micro-batches by slot under batch_rebalance (None: the random order's), once per step."""
        if self._step is None or self._step[:2] != (self.epoch, step):
            begin = step * self.global_batch
            samples = order[begin:min(begin + self.global_batch, self.num_samples)]
            self._step = (self.epoch, step, assign(samples, self.lengths, world=self.world, accum=self.accum,
                                                   q=self.q, max_tokens=self.max_tokens))
        return self._step[2]

    def _tail_slot(self, order: list[int], slot: int) -> list[int]:
        q, extra = divmod(self.tail, self.accum * self.world)
        begin = self.full_steps * self.global_batch + slot * q + min(slot, extra)
        return order[begin:begin + q + (slot < extra)] or [PLACEHOLDER]

    def starting_at(self, batches: int) -> GlobalBatchSampler:
        """The same sampler, positioned after `batches` micro-batches of this rank in the current epoch."""
        s = GlobalBatchSampler(self.num_samples, micro=self.micro, accum=self.accum, world=self.world,
                               rank=self.rank, seed=self.seed, shuffle=self.shuffle, start=batches,
                               lengths=self.lengths, q=self.q)
        s.epoch = self.epoch
        return s

    def describe(self) -> str:
        rebalanced = ("; each step's samples divided among ranks and micro-batches by cost (batch_rebalance)"
                      if self.lengths else "")
        return self._describe() + rebalanced

    def _describe(self) -> str:
        if not self.tail:
            return (f"data: {self.num_samples} samples per epoch = {self.full_steps} steps of {self.global_batch}; "
                    "each sample once per epoch")
        empty = (f"; {self.empty_tail_slots} of its {self.accum * self.world} micro-batches hold a placeholder "
                 "that carries no loss" if self.empty_tail_slots else "")
        return (f"data: {self.num_samples} samples per epoch = {self.full_steps} steps of {self.global_batch} "
                f"+ a last step of {self.tail}; each sample once per epoch{empty}")


class WithPlaceholder(Dataset):
    """The train dataset, where index PLACEHOLDER is a copy of row 0 with no loss-carrying label."""

    def __init__(self, dataset):
        self.dataset = dataset
        self._placeholder: dict | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return self.placeholder() if i == PLACEHOLDER else self.dataset[i]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        real = [i for i in indices if i != PLACEHOLDER]
        rows = iter(self.dataset.__getitems__(real) if real else [])
        return [self.placeholder() if i == PLACEHOLDER else next(rows) for i in indices]

    def placeholder(self) -> dict:
        if self._placeholder is None:
            row = dict(self.dataset[0])
            row["labels"] = [-100] * len(row["labels"])
            if "sample_ids" in row:  # a packed row (data/packing.py)
                row["sample_ids"] = []
            else:
                row["sample_id"] = PLACEHOLDER
            self._placeholder = row
        return dict(self._placeholder)


class CursorDataLoader(torch.utils.data.DataLoader):
    """A DataLoader over a GlobalBatchSampler that can be repositioned in O(1) (no batches replayed)."""

    def __init__(self, dataset, batch_sampler: GlobalBatchSampler, **kwargs):
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self._kwargs = kwargs

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

    def starting_at(self, batches: int) -> CursorDataLoader:
        return CursorDataLoader(self.dataset, self.batch_sampler.starting_at(batches), **self._kwargs)
