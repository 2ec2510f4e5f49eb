"""Batch geometry: the sequences one optimizer step trains on, computed in one place.

A run's micro-batch and accumulation are `cfg.training.micro_batch` / `.accumulation` (config/training.py, with
SFTConfig's defaults when unset).
"""

from __future__ import annotations


def global_batch(micro: int, accum: int, world_size: int) -> int:
    """Sequences per optimizer step over all workers."""
    return micro * accum * world_size
