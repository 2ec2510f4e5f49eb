"""Batch geometry: the sequences one optimizer step trains on, computed in one place.

A run's micro-batch and accumulation are `cfg.training.micro_batch` / `.accumulation` (config/training.py, with
SFTConfig's defaults when unset).
"""

from __future__ import annotations


def global_batch(micro: int, accum: int, world_size: int) -> int:
    """Sequences per optimizer step over all workers."""
    return micro * accum * world_size


def data_world(world_size: int, sequence_parallel: int = 1) -> int:
    """The data-parallel ranks among `world_size`: each group of `sequence_parallel` ranks (backend.sequence_
    parallel_size) trains the same samples, each rank a slice of their tokens (model/ulysses.py)."""
    return world_size // max(1, sequence_parallel)
