"""FSDP2 (`fully_shard`) — placeholder until the FSDP2 backend lands; refuses rather than falls back."""

from __future__ import annotations

from typing import Any

from sft_dist.config.schema import Config


def check_fsdp(cfg: Config) -> list[str]:
    return [
        "backend.type: 'fsdp' is not available in this version yet; use `ddp` or `deepspeed` "
        "(FSDP2 is being added with a check that it really shards)"
    ]


def fsdp_training_args(cfg: Config) -> dict[str, Any]:
    raise NotImplementedError
