"""The train loader: this rank's micro-batches of the run's one global sample order, starting at a cursor.

A map-style dataset goes through `GlobalBatchSampler` (the order is the same for every world size, so a resume
on another number of workers continues it); a stream through `StreamingTrain`. Either is the loader's
`position`: what a checkpoint takes the data cursor from (`cursor(step)`), and `loader.starting_at(batches)`
is the loader a resumed run iterates, without replaying what came before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from sft_dist.data.sampler import CursorDataLoader, GlobalBatchSampler, WithPlaceholder
from sft_dist.data.stream import StreamingTrain, StreamLoader, StreamSource
from sft_dist.errors import SftDistError

log = logging.getLogger("sft_dist")


def token_lengths(dataset) -> list[int]:
    """Each row's tokens, from the Arrow column (not row by row; through the dataset's indices, where a selection
    left it some: its `.data` is the whole table)."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_pylist()


@dataclass(frozen=True)
class Geometry:
    """Who this rank is in the batch: sequences per forward, micro-batches per step, ranks."""

    micro: int
    accum: int
    world: int
    rank: int


@dataclass(frozen=True)
class LoaderOptions:
    """torch DataLoader settings (TrainingArguments.dataloader_*)."""

    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    prefetch_factor: int | None = None
    worker_init_fn: Callable | None = None


def train_loader(dataset, *, collate: Callable, geometry: Geometry, seed: int, shuffle: bool,
                 options: LoaderOptions = LoaderOptions(), rebalance_q: float | None = None
                 ) -> tuple[Any, GlobalBatchSampler | StreamingTrain]:
    """(the loader, its position) for `dataset`: a datasets.Dataset or a `StreamSource`. `rebalance_q`: divide each
    step's samples among ranks and micro-batches by cost, with that quadratic weight (data/rebalance.py)."""
    g = geometry
    if isinstance(dataset, StreamSource):
        data = StreamingTrain(dataset, micro=g.micro, accum=g.accum, world=g.world, rank=g.rank)
        log.info("%s", dataset.describe())
        return StreamLoader(data, collate_fn=collate, num_workers=options.num_workers,
                            pin_memory=options.pin_memory), data
    sampler = GlobalBatchSampler(len(dataset), micro=g.micro, accum=g.accum, world=g.world, rank=g.rank, seed=seed,
                                 shuffle=shuffle, lengths=token_lengths(dataset) if rebalance_q is not None else None,
                                 q=rebalance_q or 0.0)
    if sampler.num_samples == 0:
        raise SftDistError("the training set has no samples")
    log.info("%s", sampler.describe())
    loader = CursorDataLoader(
        WithPlaceholder(dataset), sampler,
        collate_fn=collate,
        num_workers=options.num_workers,
        pin_memory=options.pin_memory,
        persistent_workers=options.persistent_workers if options.num_workers else False,
        prefetch_factor=options.prefetch_factor,
        worker_init_fn=options.worker_init_fn,
    )
    return loader, sampler
