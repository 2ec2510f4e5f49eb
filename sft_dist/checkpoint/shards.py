"""Model (trainable parameters only) and optimizer shards, written by every rank in parallel.

DDP and FSDP2: `torch.distributed.checkpoint` (DCP). Each rank writes its own file; replicated DDP tensors
are written once (DCP spreads them over the ranks); FSDP2's DTensors are written as the shards each rank
holds. DCP re-shards on load, so these checkpoints resume on any number of workers.
DeepSpeed: the engine's ZeRO checkpoint (`exclude_frozen_parameters`), each rank its optimizer partition.
ZeRO partitions are tied to the world size that wrote them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("sft_dist")

DCP_DIR = "shards"


def shard_format(trainer) -> str:
    return "deepspeed" if trainer.is_deepspeed_enabled else "dcp"


def ds_tag(step: int) -> str:
    return f"global_step{step}"


def save_shards(trainer, local_dir: Path, step: int) -> None:
    if trainer.is_deepspeed_enabled:
        trainer.model_wrapped.save_checkpoint(str(local_dir), tag=ds_tag(step), exclude_frozen_parameters=True)
        return
    import torch.distributed.checkpoint as dcp

    dcp.save(_dcp_state(trainer, optim=True), storage_writer=dcp.FileSystemWriter(str(local_dir / DCP_DIR)),
             no_dist=trainer.args.world_size == 1)


def load_shards(trainer, local_dir: Path, step: int, *, model_only: bool = False) -> None:
    if trainer.is_deepspeed_enabled:
        from sft_dist.checkpoint.deepspeed_io import use_weights_only_loading

        engine = trainer.model_wrapped
        use_weights_only_loading(engine)
        path, _ = engine.load_checkpoint(
            str(local_dir), tag=ds_tag(step), load_module_strict=not _is_peft(trainer.model),
            load_optimizer_states=not model_only, load_lr_scheduler_states=not model_only,
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint {ds_tag(step)} in {local_dir}")
        return
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
