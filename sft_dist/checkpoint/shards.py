"""Model (trainable parameters only) and optimizer shards, written by every rank in parallel, in the format the
backend chose (`Backend.shard_format`):

- "dcp", DDP and FSDP2: `torch.distributed.checkpoint`. Each rank writes its own file; replicated DDP tensors
  are written once (DCP spreads them over the ranks); FSDP2's DTensors are written as the shards each rank
  holds. DCP re-shards on load, so these checkpoints resume on any number of workers.
- "deepspeed": the engine's ZeRO checkpoint (`exclude_frozen_parameters`), each rank its optimizer partition.
  ZeRO partitions are tied to the world size that wrote them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("sft_dist")

DCP_DIR = "shards"


def ds_tag(step: int) -> str:
    return f"global_step{step}"


class DcpShards:
    """torch.distributed.checkpoint, the trainable state only."""

    def save(self, trainer, local_dir: Path, step: int) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(_dcp_state(trainer, optim=True), storage_writer=dcp.FileSystemWriter(str(local_dir / DCP_DIR)),
                 no_dist=trainer.args.world_size == 1)

    def load(self, trainer, local_dir: Path, step: int, *, model_only: bool = False) -> None:
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from sft_dist.checkpoint import dcp_safe

        state = _dcp_state(trainer, optim=not model_only)
        dcp_safe.load(state, local_dir / DCP_DIR, no_dist=trainer.args.world_size == 1)
        if trainer.is_fsdp_enabled:
            # The frozen keys are absent on purpose; dcp.load above already failed on any missing trainable key.
            set_model_state_dict(trainer.model_wrapped, state["model"], options=_options(strict=False))
        # (DDP: dcp.load wrote straight into the parameters, which `state` holds as detached views.)
        if not model_only:
            set_optimizer_state_dict(trainer.model_wrapped, _torch_optimizer(trainer.optimizer), state["optim"],
                                     options=_options())

    def load_best(self, trainer, local_dir: Path, step: int) -> None:
        self.load(trainer, local_dir, step, model_only=True)  # training is over: the weights only


class DeepSpeedShards:
    """The DeepSpeed engine's own checkpoint, read with a weights-only loader."""

    def save(self, trainer, local_dir: Path, step: int) -> None:
        trainer.model_wrapped.save_checkpoint(str(local_dir), tag=ds_tag(step), exclude_frozen_parameters=True)

    def load(self, trainer, local_dir: Path, step: int, *, model_only: bool = False) -> None:
        from sft_dist.checkpoint.deepspeed_io import use_weights_only_loading

        engine = trainer.model_wrapped
        use_weights_only_loading(engine)
        path, _ = engine.load_checkpoint(
            str(local_dir), tag=ds_tag(step), load_module_strict=not _is_peft(trainer.model),
            load_optimizer_states=not model_only, load_lr_scheduler_states=not model_only,
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint {ds_tag(step)} in {local_dir}")

    def load_best(self, trainer, local_dir: Path, step: int) -> None:
        # The engine's whole state: its partitioned fp32 master weights are what the module is rebuilt from.
        self.load(trainer, local_dir, step)


FORMATS = {"dcp": DcpShards, "deepspeed": DeepSpeedShards}


def shard_io(fmt: str) -> DcpShards | DeepSpeedShards:
    """The reader/writer of shard format `fmt` (a backend's `shard_format`, a manifest's `shard_format`)."""
    return FORMATS[fmt]()
def _dcp_state(trainer, *, optim: bool) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    if trainer.is_fsdp_enabled:
        model = get_model_state_dict(trainer.model_wrapped, options=_options())
    else:
        # Replicated (DDP) parameters, by name, without going through model.state_dict(): a quantized base's
        # state_dict (bitsandbytes 8-bit: SCB) is neither needed here nor reachable by DCP's name lookup.
        model = {name: p.detach() for name, p in _trainable(trainer.model)}
    state = {"model": model}
    if optim:
        state["optim"] = get_optimizer_state_dict(trainer.model_wrapped, _torch_optimizer(trainer.optimizer),
                                                  options=_options())
    return state


def _trainable(model):
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen base weights never go into a resumable checkpoint: they come from the base model.
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def _torch_optimizer(opt) -> torch.optim.Optimizer:
    return getattr(opt, "optimizer", opt)  # accelerate wraps the torch optimizer


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)
