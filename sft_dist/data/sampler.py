"""The global sample order: one permutation per epoch, the same for any number of workers.

Optimizer step `s` of an epoch trains on positions [s*G, (s+1)*G) of that epoch's permutation (G = the
global batch). Rank r's micro-batch m of the step takes the `micro` positions starting at
s*G + (m*world + r)*micro. The data position is therefore one number, the samples consumed, which does
not depend on the world size: a resume starts the sampler there directly (no batches are replayed), and
a resume on another number of workers trains on the same samples in every step.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler[list[int]]):
    def __init__(self, num_samples: int, *, micro: int, accum: int, world: int, rank: int, seed: int,
                 shuffle: bool = True, start: int = 0):
        self.num_samples = num_samples
        self.micro, self.accum, self.world, self.rank = micro, accum, world, rank
        self.global_batch = micro * accum * world
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = start  # micro-batches of this rank already consumed in the current epoch

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    @property
    def dropped_per_epoch(self) -> int:
        """Samples past the last full global batch of an epoch (a different set each epoch when shuffled)."""
        return self.num_samples - self.steps_per_epoch * self.global_batch

    def __len__(self) -> int:
        return self.steps_per_epoch * self.accum

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
            base = step * self.global_batch + (m * self.world + self.rank) * self.micro
            yield order[base:base + self.micro]

    def starting_at(self, batches: int) -> GlobalBatchSampler:
        """The same sampler, positioned after `batches` micro-batches of this rank in the current epoch."""
        s = GlobalBatchSampler(self.num_samples, micro=self.micro, accum=self.accum, world=self.world,
                               rank=self.rank, seed=self.seed, shuffle=self.shuffle, start=batches)
        s.epoch = self.epoch
        return s


class CursorDataLoader(torch.utils.data.DataLoader):
    """A DataLoader over a GlobalBatchSampler that can be repositioned in O(1) (no batches replayed)."""

    def __init__(self, dataset, batch_sampler: GlobalBatchSampler, **kwargs):
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self._kwargs = kwargs

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

    def starting_at(self, batches: int) -> CursorDataLoader:
        return CursorDataLoader(self.dataset, self.batch_sampler.starting_at(batches), **self._kwargs)
