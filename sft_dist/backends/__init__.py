"""Sharding backends: DDP, DeepSpeed ZeRO, FSDP2.

Each backend contributes (1) checks run with the config, before any model loads, (2) the
`TrainingArguments` fields that select it, and (3) a check after the model is wrapped that the
requested strategy really applied — a backend that silently falls back is an error here.
"""

from __future__ import annotations

from typing import Any

from sft_dist.config.schema import Config


def check_backend(cfg: Config) -> list[str]:
    """Problems with the backend section (file, stage, options vs the rest of the config)."""
    b = cfg.backend
    if b.type == "ddp":
        return ["backend.config: DDP takes no config file; remove it or set `backend.type`"] if b.config else []
    if b.config is None:
        shipped = "configs/deepspeed/zero2.json" if b.type == "deepspeed" else "configs/fsdp/full_shard.yaml"
        return [f"backend.config: required with backend.type={b.type} (e.g. {shipped})"]
    if b.type == "deepspeed":
        from sft_dist.backends.deepspeed import check_deepspeed, read_json

        try:
            return check_deepspeed(cfg, read_json(b.config), b.config)
        except Exception as e:  # ConfigError from reading
            return list(getattr(e, "problems", [str(e)]))
    from sft_dist.backends.fsdp import check_fsdp

    return check_fsdp(cfg)


def backend_training_args(cfg: Config, *, world_size: int = 1, local_world_size: int = 1) -> dict[str, Any]:
    """The SFTConfig fields that select the backend."""
    if cfg.backend.type == "deepspeed":
        from sft_dist.backends.deepspeed import read_json

        return {"deepspeed": read_json(cfg.backend.config)}
    if cfg.backend.type == "fsdp":
        from sft_dist.backends.fsdp import fsdp_training_args

        return fsdp_training_args(cfg, world_size=world_size, local_world_size=local_world_size)
    return {}
