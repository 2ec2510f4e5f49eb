"""FSDP2 (`torch.distributed.fsdp.fully_shard`) through accelerate's FSDP plugin.

The config names what to shard and how; the wrap unit is always the model's own decoder-layer class
(`_no_split_modules`), never a hard-coded Llama layer. On CPU, accelerate applies its FSDP plugin only to
GPU-style distributed types and silently trains plain DDP; sft_dist turns the plugin on there too
(`train/trainer.py`) and checks after wrapping that the model really is sharded (`backends/verify.py`).
"""

from __future__ import annotations

from typing import Any

from sft_dist.backends.base import Backend, Sharding
from sft_dist.config.backend_file import FsdpConfig, fsdp_settings
from sft_dist.config.schema import Config
from sft_dist.errors import ConfigError


def decoder_layer_classes(cfg: Config) -> list[str]:
    """The model's own decoder-layer class names (its `_no_split_modules`), from the config alone.

    Reading them imports the model's class, and with it torch and transformers' modeling code (~6 s on 2 cores, in a
    launcher that only checks the config): a model_type the installed transformers builds is looked up once and
    cached (config/fields_cache.py). Remote code is not: its class is the model repository's, not the library's."""
    from sft_dist.config import fields_cache
    from sft_dist.model.config import model_config, model_type

    kind = None if cfg.model.trust_remote_code else model_type(cfg.model)
    if kind is not None and (known := fields_cache.decoder_layers(kind)) is not None:
        return known
    from transformers import AutoModelForCausalLM

    config = model_config(cfg.model)
    model_cls = AutoModelForCausalLM._model_mapping[type(config)]
    classes = list(getattr(model_cls, "_no_split_modules", None) or [])
    if kind is not None and getattr(config, "model_type", None) == kind:
        fields_cache.record_decoder_layers(kind, classes)
    return classes


def check_fsdp(cfg: Config, fc: FsdpConfig) -> list[str]:
    if cfg.launcher.num_workers < 2 and cfg.launcher.type == "local":
        return ["backend.type: fsdp shards across workers; with launcher.num_workers=1 nothing would be sharded. "
                "Set launcher.num_workers >= 2 (or use backend.type=ddp)"]
    where = f"backend.config ({cfg.backend.config})"
    p = []
    if fc.shard_size is not None and fc.sharding != "hybrid_shard":
        p.append(f"{where}: shard_size applies to sharding: hybrid_shard only")
    if fc.shard_size is not None and fc.shard_size < 2:
        p.append(f"{where}: shard_size must be >= 2 (with 1 nothing is sharded: use backend.type=ddp)")
    if fc.activation_checkpointing and cfg.training.activation_checkpointing:
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


def fsdp_training_args(cfg: Config, fc: FsdpConfig | None = None) -> dict[str, Any]:
    fc = fc or fsdp_settings(cfg)
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


def hybrid_mesh(fc: FsdpConfig, *, world_size: int, local_world_size: int) -> tuple[int, int] | None:
    """(replicate, shard) sizes of the 2-D mesh for hybrid sharding, or None for full sharding."""
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
        if state.mixed_precision != "no":
            # as accelerate does for a GPU's plugin: bf16/fp16 compute through FSDP2's MixedPrecisionPolicy (a
            # trained fp32 head copy would otherwise meet 16-bit activations: "expected m1 and m2 to have the
            # same dtype")
            state.fsdp_plugin.set_mixed_precision(state.mixed_precision)
        trainer.is_fsdp_enabled = True
    if mesh is not None:
        from accelerate.parallelism_config import ParallelismConfig

        pc = ParallelismConfig(dp_replicate_size=mesh[0], dp_shard_size=mesh[1])
        state.parallelism_config = pc
        state.device_mesh = pc.get_device_mesh(trainer.accelerator.device.type)


class FSDP2(Backend):
    """FSDP2 (`fully_shard`) per decoder layer through accelerate's plugin; its YAML read and checked once."""

    name = "fsdp"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self._settings: FsdpConfig | None = None

    @property
    def settings(self) -> FsdpConfig:
        """The FSDP file with `backend.options` merged over it, type-checked (raises ConfigError)."""
        if self._settings is None:
            self._settings = fsdp_settings(self.cfg)
        return self._settings

    def check(self) -> list[str]:
        if self.cfg.backend.config is None:
            return ["backend.config: required with backend.type=fsdp (e.g. configs/fsdp/full_shard.yaml)"]
        try:
            return check_fsdp(self.cfg, self.settings)
        except ConfigError as e:
            return e.problems

    def training_args(self) -> dict[str, Any]:
        return fsdp_training_args(self.cfg, self.settings)

    @property
    def own_activation_checkpointing(self) -> bool:
        return self.settings.activation_checkpointing

    @property
    def label(self) -> str:
        return f"fsdp2 {self.settings.sharding}"

    def plan_facts(self) -> dict[str, Any]:
        return {"fsdp_sharding": self.settings.sharding, "fsdp_shard_size": self.settings.shard_size}

    def quant_storage(self, model_dtype: str) -> str:
        # FSDP2 shards floating tensors only: 4-bit weights packed in uint8 would stay whole on every rank
        return model_dtype

    def sharding(self, world_size: int) -> Sharding:
        fc = self.settings
        size = (fc.shard_size or world_size) if fc.sharding == "hybrid_shard" else world_size
        size = min(size, world_size)
        return Sharding(weights=size, gradients=size, optimizer=size, offload_optimizer=fc.cpu_offload,
                        offload_param=fc.cpu_offload, gathers_layers=size > 1, label=f"fsdp2 {fc.sharding}")

    def casts_parameters(self) -> bool:
        return True

    def plain_loss(self) -> bool:
        # a trainable output head is its own FSDP2 unit, whose hooks TRL's fused head would skip (train/trainer.py)
        lora = self.cfg.lora
        return not lora.enabled or any(m in ("lm_head", "embed_out", "output") for m in lora.modules_to_save or [])

    def gathers_head_for_loss(self) -> bool:
        return not self.plain_loss()

    @property
    def separates_tied_weights(self) -> bool:
        return True

    def random_base_from_rank0(self, sharding: Sharding, *, quantized: bool) -> bool:
        # rank 0's weights, sent shard by shard as FSDP2 wraps (a 4-bit base is quantized on every rank instead).
        # Not with a tied embedding and a trained copy of it or of the head (peft modules_to_save): that load ties
        # the weights again (tie_weights), which fails on peft's wrapper ("attribute 'weight' already exists").
        return sharding.weights > 1 and not quantized and not self._saves_tied_weight()

    def _saves_tied_weight(self) -> bool:
        from sft_dist.model.config import model_config

        lora = self.cfg.lora
        if not (lora.enabled and lora.modules_to_save):
            return False
        config = model_config(self.cfg.model)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return bool(getattr(text, "tie_word_embeddings", False))

    def after_accelerator(self, trainer, *, world_size: int, local_world_size: int) -> None:
        enable_fsdp(trainer, mesh=hybrid_mesh(self.settings, world_size=world_size, local_world_size=local_world_size))
        if getattr(trainer.model, "sft_dist_random_base", None) in ("send", "receive"):
            # accelerate's load from rank 0: every rank's model goes to the meta device, is sharded there, and
            # receives its shards of rank 0's weights (fsdp2_prepare_model); the other ranks built none
            trainer.accelerator.state.fsdp_plugin.cpu_ram_efficient_loading = True

    def shards_weights(self, trainer) -> bool:
        return True
