"""Batch geometry: the sequences one optimizer step trains on, computed in one place.

`training.per_device_train_batch_size` defaults to HF TrainingArguments' 8 when unset (tests/config check that
this still is SFTConfig's default); gradient accumulation to 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

HF_MICRO_BATCH = 8  # TrainingArguments.per_device_train_batch_size's default


def micro_batch(training: Mapping[str, Any]) -> int:
    """Sequences per device per forward: `training.per_device_train_batch_size`, or HF's default."""
    return int(training.get("per_device_train_batch_size") or HF_MICRO_BATCH)


def accumulation(training: Mapping[str, Any]) -> int:
    """Micro-batches per optimizer step: `training.gradient_accumulation_steps`, or 1."""
    return int(training.get("gradient_accumulation_steps") or 1)


def global_batch(micro: int, accum: int, world_size: int) -> int:
    """Sequences per optimizer step over all workers."""
    return micro * accum * world_size
