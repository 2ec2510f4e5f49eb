"""After the Trainer wraps the model: prove the requested backend applied, and measure what each rank holds."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import torch

from sft_dist.errors import SftDistError


def wrapper_info(trainer, *, requested: str, world_size: int) -> dict[str, Any]:
    """What actually wraps the model. Raises when it is not what the config asked for."""
    wrapped = trainer.model_wrapped
    compiled = False
    while isinstance(getattr(wrapped, "_orig_mod", None), torch.nn.Module):  # training.torch_compile: accelerate
        wrapped, compiled = wrapped._orig_mod, True  # compiles the wrapped model (torch.compile(DDP(model)))
    info: dict[str, Any] = {"requested": requested, "wrapper": type(wrapped).__name__}
    if compiled:
        info["compiled"] = True
    if requested == "deepspeed":
        from deepspeed import DeepSpeedEngine

        if not isinstance(wrapped, DeepSpeedEngine):
            raise SftDistError(f"backend.type=deepspeed was requested but the model is wrapped in {info['wrapper']}")
        info["zero_stage"] = wrapped.zero_optimization_stage()
    elif requested == "fsdp":
        from torch.distributed.fsdp import FSDPModule

        n = sum(isinstance(m, FSDPModule) for m in trainer.model.modules())
        if n == 0:
            raise SftDistError(
                f"backend.type=fsdp was requested but no module is FSDP-sharded (model wrapped in {info['wrapper']}); "
                "refusing to train unsharded"
            )
        info["fsdp_modules"] = n
        info["wrapper"] = "FSDP2 (fully_shard)"
        mesh = trainer.accelerator.torch_device_mesh
        info["mesh"] = dict(zip(mesh.mesh_dim_names, mesh.shape)) if mesh is not None else {"dp_shard": world_size}
    elif world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(wrapped, DistributedDataParallel):
            raise SftDistError(f"{world_size} workers but the model is wrapped in {info['wrapper']}, not DDP")
    return info


def _local(t: torch.Tensor) -> torch.Tensor:
    """The part of a parameter / state tensor that lives on this rank (ZeRO-3 partition, FSDP2 shard)."""
    if hasattr(t, "ds_tensor"):
        return t.ds_tensor
    return t.to_local() if hasattr(t, "to_local") else t


def _inner_optimizer(opt):
    while getattr(opt, "optimizer", None) is not None:
        opt = opt.optimizer
    return opt


def local_bytes(t: torch.Tensor) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


def grad_bytes(model) -> int:
    """Bytes of gradients this rank holds in `param.grad` (DDP: all; FSDP2: its shard). DeepSpeed ZeRO keeps
    gradients in buffers of its own, so callers do not ask there."""
    return sum(local_bytes(p.grad) for p in model.parameters() if p.requires_grad and p.grad is not None)


def deepspeed_grad_bytes(zero_optimizer) -> int:
    """Bytes of the gradient partition a DeepSpeed ZeRO optimizer holds, read just before its step."""
    flat = getattr(zero_optimizer, "grad_partitions_flat_buffer", None)  # ZeRO-3
    if torch.is_tensor(flat):
        return flat.numel() * flat.element_size()
    total = 0
    for grads in (getattr(zero_optimizer, "averaged_gradients", None) or {}).values():  # ZeRO-1/2
        for g in grads if isinstance(grads, (list, tuple)) else [grads]:
            if torch.is_tensor(g):
                total += g.numel() * g.element_size()
    return total


def watch_deepspeed_grads(trainer) -> None:
    """Record the ZeRO optimizer's gradient bytes before each step into `trainer.grad_bytes_seen`."""
    opt = trainer.model_wrapped.optimizer
    step = opt.step

    def measured_step(*args, **kwargs):
        trainer.grad_bytes_seen = max(trainer.grad_bytes_seen or 0, deepspeed_grad_bytes(opt))
        return step(*args, **kwargs)

    opt.step = measured_step


def shard_report(trainer) -> dict[str, int | None]:
    """What this rank holds: parameters (all / trainable), optimizer state (elements and bytes), the
    gradient bytes seen before the optimizer step, and the process's peak resident memory."""
    import resource

    params = list(trainer.model.parameters())
    opt = _inner_optimizer(trainer.optimizer) if trainer.optimizer is not None else None
    states = [_local(v) for state in (opt.state.values() if opt is not None else [])
              for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
    return {
        "param_numel_local": sum(_local(p).numel() for p in params),
        "trainable_numel_local": sum(_local(p).numel() for p in params if p.requires_grad),
        "optimizer_state_numel_local": sum(t.numel() for t in states),
        "param_bytes_local": sum(local_bytes(p) for p in params),
        "grad_bytes_local": getattr(trainer, "grad_bytes_seen", None),
        "optimizer_state_bytes_local": sum(t.numel() * t.element_size() for t in states),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def trainable_digest(model) -> str:
    """sha256 of the full trainable weights (gathered from shards), to prove every rank holds the same model.
    Collective under ZeRO-3 / FSDP2: every rank must call it."""
    named = sorted(((n, p) for n, p in model.named_parameters() if p.requires_grad), key=lambda kv: kv[0])
    params = [p for _, p in named]
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_tensor") for p in params):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    h = hashlib.sha256()
    with gather:
        for name, p in named:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
