"""FSDP2 (`torch.distributed.fsdp.fully_shard`) through accelerate's FSDP plugin.

The config names what to shard and how; the wrap unit is always the model's own decoder-layer class
(`_no_split_modules`), never a hard-coded Llama layer. On CPU, accelerate applies its FSDP plugin only to
GPU-style distributed types and silently trains plain DDP; sft_dist turns the plugin on there too
(`train/trainer.py`) and checks after wrapping that the model really is sharded (`backends/verify.py`).
"""

from __future__ import annotations

from typing import Any

from sft_dist.config.backend_file import fsdp_settings
from sft_dist.config.schema import Config
from sft_dist.errors import ConfigError


def decoder_layer_classes(cfg: Config) -> list[str]:
    """The model's own decoder-layer class names (its `_no_split_modules`), from the config alone."""
    from transformers import AutoModelForCausalLM

    from sft_dist.model.config import model_config

    config = model_config(cfg.model)
    model_cls = AutoModelForCausalLM._model_mapping[type(config)]
    return list(getattr(model_cls, "_no_split_modules", None) or [])


def check_fsdp(cfg: Config) -> list[str]:
    if cfg.launcher.num_workers < 2 and cfg.launcher.type == "local":
        return ["backend.type: fsdp shards across workers; with launcher.num_workers=1 nothing would be sharded. "
                "Set launcher.num_workers >= 2 (or use backend.type=ddp)"]
    try:
        fc = fsdp_settings(cfg)
    except ConfigError as e:
        return e.problems
    where = f"backend.config ({cfg.backend.config})"
    p = []
    if fc.shard_size is not None and fc.sharding != "hybrid_shard":
        p.append(f"{where}: shard_size applies to sharding: hybrid_shard only")
    if fc.shard_size is not None and fc.shard_size < 2:
        p.append(f"{where}: shard_size must be >= 2 (with 1 nothing is sharded: use backend.type=ddp)")
    if fc.activation_checkpointing and cfg.training.get("activation_checkpointing"):
        p.append(f"{where}: activation_checkpointing is on here and in training.*; keep FSDP's (this file) only")
    if fc.cpu_offload and _device(cfg) == "cpu":
        p.append(f"{where}: cpu_offload moves shards from GPU to CPU memory; CPU workers have nothing to offload "
                 "(and FSDP2 refuses it there): set cpu_offload: false")
    if not p:
        try:
            if not decoder_layer_classes(cfg):
                p.append(f"{where}: the model class declares no decoder-layer class (_no_split_modules) to wrap")
        except Exception as e:  # noqa: BLE001 - a config the model classes cannot read
            p.append(f"{where}: cannot find the model's decoder-layer class: {e}")
    return p


def _device(cfg: Config) -> str:
    from sft_dist.distributed.env import resolve_device

    try:
        return resolve_device(cfg.launcher.device)
    except Exception:  # noqa: BLE001 - an unavailable device is reported by the launcher itself
        return cfg.launcher.device


def fsdp_training_args(cfg: Config) -> dict[str, Any]:
    fc = fsdp_settings(cfg)
    out: dict[str, Any] = {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": decoder_layer_classes(cfg),
            "reshard_after_forward": fc.reshard_after_forward,
            "activation_checkpointing": fc.activation_checkpointing,
            "cpu_offload": fc.cpu_offload,
            # each rank writes its own shard of a checkpoint (torch.distributed.checkpoint)
            "state_dict_type": "SHARDED_STATE_DICT",
            "cpu_ram_efficient_loading": False,
        },
    }
    return out


def hybrid_mesh(cfg: Config, *, world_size: int, local_world_size: int) -> tuple[int, int] | None:
    """(replicate, shard) sizes of the 2-D mesh for hybrid sharding, or None for full sharding."""
    if cfg.backend.type != "fsdp":
        return None
    fc = fsdp_settings(cfg)
    if fc.sharding != "hybrid_shard" or world_size == 1:
        return None
    shard = fc.shard_size or local_world_size
    if world_size % shard:
        raise ConfigError(f"backend.config: shard_size {shard} does not divide the {world_size} workers")
    return world_size // shard, shard


def enable_fsdp(trainer, *, mesh: tuple[int, int] | None) -> None:
    """Called once the Trainer has built its Accelerator.

    On CPU workers (MULTI_CPU) accelerate ignores its FSDP2 plugin and would silently train DDP: turn the
    plugin on (FSDP2's all-gather / reduce-scatter run on gloo). For hybrid sharding, give accelerate the
    (replicate, shard) device mesh that `fully_shard` then uses. `verify.wrapper_info` checks the result."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU and trainer.args.fsdp_plugin_args is not None:
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
        trainer.is_fsdp_enabled = True
    if mesh is not None:
        from accelerate.parallelism_config import ParallelismConfig

        pc = ParallelismConfig(dp_replicate_size=mesh[0], dp_shard_size=mesh[1])
        state.parallelism_config = pc
        state.device_mesh = pc.get_device_mesh(trainer.accelerator.device.type)
