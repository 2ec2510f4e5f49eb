"""Sharding backends: DDP, DeepSpeed ZeRO, FSDP2, each a `Backend` (`backends/base.py`).

A backend contributes (1) checks run with the config, before any model loads, (2) the `TrainingArguments`
fields that select it, (3) its memory model for `plan`, (4) its initialisation and what it does once the
Trainer built its Accelerator, and (5) a check after the model is wrapped that the requested strategy really
applied: a backend that silently falls back is an error here. Nothing outside this package tests
`backend.type`; it asks the object `get_backend` builds.
"""

from __future__ import annotations

from sft_dist.backends.base import Backend, Sharding
from sft_dist.config.schema import Config

__all__ = ["Backend", "Sharding", "get_backend"]


def get_backend(cfg: Config) -> Backend:
    """The backend `cfg` names. Cheap: its settings file is read on first use, once per object."""
    if cfg.backend.type == "deepspeed":
        from sft_dist.backends.deepspeed import DeepSpeed

        return DeepSpeed(cfg)
    if cfg.backend.type == "fsdp":
        from sft_dist.backends.fsdp import FSDP2

        return FSDP2(cfg)
    return Backend(cfg)
