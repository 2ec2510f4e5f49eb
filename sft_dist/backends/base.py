"""What a sharding strategy is to sft_dist: one object, built once from the config, that the run, the plan and
the checkpoints ask instead of testing `backend.type`. Its settings file is read and type-checked once, here.

DDP is the base (nothing sharded, nothing to initialise); `backends/deepspeed.py` and `backends/fsdp.py`
override what their strategy changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from sft_dist.config.schema import Config


@dataclass(frozen=True)
class Sharding:
    """How the strategy divides a rank's memory (the divisor of each part), and what it keeps besides."""

    weights: int = 1
    gradients: int = 1
    optimizer: int = 1
    master_copy: bool = False  # DeepSpeed keeps an fp32 copy of its trainable partition
    ddp_buckets: bool = False  # DDP's reducer holds a flat copy of all gradients
    offload_optimizer: bool = False
    offload_param: bool = False
    gathers_layers: bool = False  # ZeRO-3 / FSDP2 gather one decoder layer's full weights at a time
    label: str = "ddp"


class Backend:
    """Plain DDP (or one process): the model whole on every rank, gradients all-reduced."""

    name: ClassVar[str] = "ddp"
    # how this strategy's checkpoint shards are written: torch.distributed.checkpoint (DDP, FSDP2) or DeepSpeed's
    shard_format: ClassVar[str] = "dcp"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    # --- with the config, before any model loads -----------------------------------------------------------

    def check(self) -> list[str]:
        """Every reason the backend section cannot train this config, each with the fix."""
        b = self.cfg.backend
        if b.config or b.options:
            return ["backend.config/options: DDP takes no config file or options; remove them or set `backend.type`"]
        return []

    def training_args(self) -> dict[str, Any]:
        """The SFTConfig fields that select the strategy."""
        return {}

    @property
    def zero_stage(self) -> int | None:
        return None

    @property
    def label(self) -> str:
        """The strategy as `plan` and the logs name it."""
        return "ddp"

    @property
    def own_activation_checkpointing(self) -> bool:
        """Whether the strategy's own file turns activation checkpointing on (FSDP's switch)."""
        return False

    def plan_facts(self) -> dict[str, Any]:
        """The strategy's settings the plan's rules read (`plan/facts.py` Facts fields)."""
        return {}

    def quant_storage(self, model_dtype: str) -> str:
        """The dtype 4-bit weights are packed in when `quantization.quant_storage: auto`."""
        return "uint8"

    # --- the memory model of `sft-dist plan` ---------------------------------------------------------------

    def sharding(self, world_size: int) -> Sharding:
        return Sharding(ddp_buckets=True)

    def casts_parameters(self) -> bool:
        """Whether 16-bit training casts every parameter (DeepSpeed's engine, FSDP2's MixedPrecisionPolicy)
        instead of torch.autocast."""
        return False

    def plain_loss(self) -> bool:
        """Whether the step uses the model's own loss (full logits) instead of TRL's fused LM head."""
        return False

    def gathers_head_for_loss(self) -> bool:
        """Whether TRL's chunked loss gathers a sharded output head whole on every rank (FSDP2's full_tensor)."""
        return False

    def gathered_bytes(self, layer_bytes: int, *, weights_bytes: int, numel: int) -> int:
        """Bytes of full weights gathered at once while a step runs (for strategies that gather layers)."""
        return layer_bytes * 2  # the layer in use and the one prefetched

    def optimizer_section(self) -> dict[str, Any] | None:
        """An optimizer the strategy builds itself instead of `training.optim` (DeepSpeed's), or None."""
        return None

    def loads_partitioned(self) -> bool:
        """Whether a host-side load already partitions the weights (DeepSpeed's zero.Init)."""
        return False

    def random_base_on_host(self, sharding: Sharding, *, quantized: bool) -> bool:
        """Whether a GPU run builds an `init_config` base layer by layer into host memory (model/layerwise.py)
        instead of whole on the GPU: for a base loaded again quantized from the host, and for one the strategy
        shards from the host layer by layer, as it does a checkpoint (FSDP2)."""
        return quantized or sharding.weights > 1 or sharding.offload_param

    def random_base(self, sharding: Sharding, *, quantized: bool, is_main: bool) -> str:
        """Where this rank builds an `init_config` base (model/build.py: RANDOM_BASE), from the predicates below."""
        if self.random_base_partitioned(sharding, quantized=quantized):
            return "partitioned"
        if self.random_base_from_rank0(sharding, quantized=quantized):
            return "send" if is_main else "receive"
        return "host" if self.random_base_on_host(sharding, quantized=quantized) else "device"

    def random_base_partitioned(self, sharding: Sharding, *, quantized: bool) -> bool:
        """Whether every rank builds only its partition of an `init_config` base (ZeRO-3's zero.Init)."""
        return False

    def random_base_from_rank0(self, sharding: Sharding, *, quantized: bool) -> bool:
        """Whether the strategy fills every rank's shards of an `init_config` base from rank 0's weights, so that
        only rank 0 builds them (the others build only the buffers: model/build.py, RANDOM_BASE)."""
        return False

    # --- at run time ---------------------------------------------------------------------------------------

    def join_process_group(self, env, *, device: str) -> None:
        """After sft_dist formed the process group: let the strategy's own runtime join it."""

    def model_quantization(self, quant, *, dtype):
        """`quantization` with `quant_storage: auto` resolved for this strategy."""
        import dataclasses

        if quant.quant_storage != "auto":
            return quant
        return dataclasses.replace(quant, quant_storage=self.quant_storage(str(dtype).removeprefix("torch.")))

    @property
    def separates_tied_weights(self) -> bool:
        """Whether a frozen tied weight inside peft's modules_to_save wrapper needs its own tensor (FSDP2 puts
        each parameter in one shard group)."""
        return False

    def after_accelerator(self, trainer, *, world_size: int, local_world_size: int) -> None:
        """Called once the Trainer has built its Accelerator, before the model is wrapped."""

    def verify(self, trainer, *, world_size: int) -> dict[str, Any]:
        """What wraps the model after the Trainer prepared it; raises when it is not this strategy."""
        from sft_dist.backends.verify import wrapper_info

        return wrapper_info(trainer, requested=self.name, world_size=world_size)

    def shards_weights(self, trainer) -> bool:
        """Whether each rank holds only part of the weights once wrapped (generation then runs on every rank)."""
        return False
