"""Sharding backends: DDP, DeepSpeed ZeRO, FSDP2.

Each backend contributes (1) checks run with the config, before any model loads, (2) the
`TrainingArguments` fields that select it, and (3) a check after the model is wrapped that the
requested strategy really applied — a backend that silently falls back is an error here.
"""

from __future__ import annotations

from typing import Any

from sft_dist.config.backend_file import backend_file
from sft_dist.config.schema import Config
from sft_dist.errors import ConfigError


def check_backend(cfg: Config) -> list[str]:
    """Problems with the backend section (file, stage, options vs the rest of the config)."""
    b = cfg.backend
    if b.type == "ddp":
        if b.config or b.options:
            return ["backend.config/options: DDP takes no config file or options; remove them or set `backend.type`"]
        return []
    if b.config is None:
        shipped = "configs/deepspeed/zero2.json" if b.type == "deepspeed" else "configs/fsdp/full_shard.yaml"
        return [f"backend.config: required with backend.type={b.type} (e.g. {shipped})"]
    if b.type == "deepspeed":
        from sft_dist.backends.deepspeed import check_deepspeed

        try:
            return check_deepspeed(cfg, backend_file(cfg), b.config)
        except ConfigError as e:
            return e.problems
    from sft_dist.backends.fsdp import check_fsdp

    return check_fsdp(cfg)


def backend_training_args(cfg: Config) -> dict[str, Any]:
    """The SFTConfig fields that select the backend."""
    if cfg.backend.type == "deepspeed":
        return {"deepspeed": backend_file(cfg)}
    if cfg.backend.type == "fsdp":
        from sft_dist.backends.fsdp import fsdp_training_args

        return fsdp_training_args(cfg)
    return {}
