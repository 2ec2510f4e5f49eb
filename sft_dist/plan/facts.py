"""What the compatibility rules look at: the config resolved the way training will resolve it.

Facts are plain values, so a rule is a predicate over them and a test can set any combination (a GPU
without bf16, a bitsandbytes build without kernels for the device) without that hardware.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from sft_dist.config import batch
from sft_dist.backends import Backend, get_backend
from sft_dist.config.schema import Config
from sft_dist.config.training import SFT_DEFAULTS
from sft_dist.errors import ConfigError

# Optimizers whose state lives in bitsandbytes kernels (TrainingArguments.optim values).
BNB_OPTIMIZERS = ("8bit", "bnb", "paged_")


@dataclass
class Facts:
    device: str = "cpu"  # cpu | cuda: where the workers train
    device_here: bool = True  # the device is visible to this process (its hardware can be checked)
    bf16_hardware: bool | None = None  # the GPU computes bf16 (None: not checked)
    bnb_optimizer_kernels: bool | None = None  # bitsandbytes has optimizer kernels for the device (None: not checked)
    backend: str = "ddp"
    zero_stage: int | None = None
    zero_gather_on_save: bool = False
    ds_train_batch_size: Any = "auto"
    fsdp_sharding: str | None = None
    fsdp_shard_size: int | None = None
    world_size: int = 1
    sequence_parallel: int = 1  # backend.sequence_parallel_size: a group's workers train the same rows
    micro_batch: int = SFT_DEFAULTS["per_device_train_batch_size"]
    grad_accum: int = 1
    max_length: int = 512
    packing: bool = False
    max_positions: int | None = None
    packing_problem: str | None = None  # why this model's packed documents cannot stay apart (model/packed_positions)
    model_dtype: str = "float32"  # the dtype the (unquantized parts of the) base is loaded in
    bits: int | None = None
    quant_storage: str = "uint8"
    unquantized_dtype: str = "float32"  # a quantized base's embeddings, norms and head (quantization.upcast_unquantized)
    compute_dtype: str = "float32"
    lora: bool = True
    dora: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    bf16: bool = False
    fp16: bool = False
    activation_offloading: bool = False  # training.activation_offloading (TRL's)
    save_only_model: bool = False  # training.save_only_model (ignored: sft_dist's checkpoints always resume)
    per_device_loss: bool = False  # training.average_tokens_across_devices: false
    sampling: str = "random"  # training.train_sampling_strategy
    optim: str = "adamw_torch"
    activation_checkpointing: bool = False
    checkpoint_every: int = 1  # training.activation_checkpointing_kwargs.every_n_layers
    checkpoint_offload: bool = False  # training.activation_checkpointing_kwargs.offload
    use_reentrant: bool | None = None
    ddp_find_unused: bool = False
    eval_strategy: str = "no"
    load_best: bool = False
    has_eval_data: bool = False
    eval_only: bool = False  # training.do_train: false (sft-dist evaluate)
    best_metric: str | None = None  # training.metric_for_best_model as given (None: unset)
    greater_is_better: bool | None = None  # training.greater_is_better as given
    generate_eval_rows: int = 0  # metrics.generate_eval_rows
    eval_sets: tuple[str, ...] = ()  # the names of data.eval_files: {name: files}
    early_stopping_patience: int | None = None  # training.early_stopping_patience
    push_to_hub: bool = False
    hub_strategy: str = "every_save"

    @property
    def global_batch(self) -> int:
        return batch.global_batch(self.micro_batch, self.grad_accum, self.data_world)

    @property
    def data_world(self) -> int:
        return batch.data_world(self.world_size, self.sequence_parallel)

    @property
    def bnb_optimizer(self) -> bool:
        return any(tag in self.optim for tag in BNB_OPTIMIZERS)

    def replace(self, **changes) -> Facts:
        return dataclasses.replace(self, **changes)


def gather_facts(cfg: Config, *, device: str | None = None, world_size: int | None = None,
                 classes: bool = False) -> Facts:
    """The facts of `cfg` as this process sees them. `device`/`world_size` default to what the workers
    would use: the launcher's device (auto: CUDA if visible here) and the launcher's (or torchrun's) size.
    `classes`: also the facts that import the model's transformers class (seconds of torch and transformers
    imports, which the launcher does without: the workers' plan and `sft-dist plan` ask, before any weight loads)."""
    from sft_dist.model.build import resolve_dtype, resolve_precision
    from sft_dist.model.config import max_positions, model_type

    device, here = _device(cfg, device)
    t = cfg.training
    backend = get_backend(cfg)
    f = Facts(device=device, device_here=here, backend=backend.name, world_size=world_size or _world_size(cfg))
    f.bf16_hardware = _bf16_hardware() if device == "cuda" and here else None
    f.micro_batch, f.grad_accum = t.micro_batch, t.accumulation
    f.sequence_parallel = cfg.backend.sequence_parallel_size
    f.max_length, f.packing = cfg.data.max_length, cfg.data.packing
    try:
        f.max_positions = max_positions(cfg.model)
    except ConfigError:  # an unreadable model config is reported where the model loads, with its context
        f.max_positions = None
    kind = model_type(cfg.model) if f.packing and classes else None
    if kind:  # checked again where the model loads (a hub id, remote code)
        from sft_dist.model.packed_positions import model_type_problem

        f.packing_problem = model_type_problem(kind)
    precision = resolve_precision(cfg.training, device=device) if here else {
        "bf16": bool(cfg.training.get("bf16", device == "cuda")), "fp16": bool(cfg.training.get("fp16", False))}
    f.bf16, f.fp16 = precision["bf16"], precision["fp16"]
    f.activation_offloading = bool(cfg.training.get("activation_offloading"))
    f.save_only_model = bool(cfg.training.get("save_only_model"))
    f.per_device_loss = cfg.training.get("average_tokens_across_devices") is False
    f.sampling = str(cfg.training.train_sampling_strategy)
    dtype = resolve_dtype(cfg.model.dtype, device=device, lora=cfg.lora.enabled) if here else None
    f.model_dtype = _dtype_name(dtype) if dtype is not None else (
        cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if device == "cuda" and cfg.lora.enabled
                                                           else "float32"))
    q = cfg.quantization
    f.bits = q.bits
    f.quant_storage = q.quant_storage if q.quant_storage != "auto" else backend.quant_storage(f.model_dtype)
    f.compute_dtype = f.model_dtype if q.compute_dtype == "auto" else q.compute_dtype
    f.unquantized_dtype = "float32" if q.upcasts(f.model_dtype) else f.model_dtype
    f.lora, f.dora = cfg.lora.enabled, cfg.lora.enabled and cfg.lora.use_dora
    f.modules_to_save = list(cfg.lora.modules_to_save or []) if cfg.lora.enabled else []
    f.optim = t.optim
    f.bnb_optimizer_kernels = _bnb_optimizer_kernels(device) if f.bnb_optimizer and here else None
    f.activation_checkpointing = activation_checkpointing(cfg, backend)
    ac = t.activation_checkpointing_kwargs
    reentrant = ac.get("use_reentrant")
    f.use_reentrant = None if reentrant is None else bool(reentrant)
    f.checkpoint_every, f.checkpoint_offload = checkpoint_policy(cfg)
    f.ddp_find_unused = bool(t.get("ddp_find_unused_parameters"))
    f.eval_strategy = t.eval_strategy
    f.eval_only = t.eval_only
    f.load_best = bool(t.value("load_best_model_at_end"))
    best = t.get("metric_for_best_model")
    f.best_metric = str(best) if best is not None else None
    given = t.get("greater_is_better")
    f.greater_is_better = None if given is None else bool(given)
    f.generate_eval_rows = cfg.metrics.generate_eval_rows
    f.eval_sets = cfg.data.eval_sets
    f.early_stopping_patience = t.early_stopping_patience
    f.push_to_hub = bool(t.get("push_to_hub"))
    f.hub_strategy = str(t.get("hub_strategy") or "every_save")
    d = cfg.data
    f.has_eval_data = (d.eval_files is not None or d.eval_split is not None or d.eval_split_ratio > 0
                       or bool(d.mixture_holdouts))
    for name, value in backend.plan_facts().items():
        setattr(f, name, value)
    return f


def checkpoint_policy(cfg: Config) -> tuple[int, bool]:
    """(every_n_layers, offload) of `training.activation_checkpointing_kwargs` when the Trainer checkpoints
    (`training.activation_checkpointing`); (1, False) otherwise (the FSDP file's switch checkpoints every layer)."""
    if not cfg.training.activation_checkpointing:
        return 1, False
    ac = cfg.training.activation_checkpointing_kwargs
    return max(1, int(ac.get("every_n_layers", 1) or 1)), bool(ac.get("offload", False))


def activation_checkpointing(cfg: Config, backend: Backend | None = None) -> bool:
    """On through `training.activation_checkpointing` or the backend's own switch (the FSDP file's)."""
    if cfg.training.activation_checkpointing:
        return True
    return (backend or get_backend(cfg)).own_activation_checkpointing


def _device(cfg: Config, device: str | None) -> tuple[str, bool]:
    import torch

    requested = device or cfg.launcher.device
    visible = torch.cuda.is_available()
    if requested == "auto":
        return ("cuda" if visible else "cpu"), True
    return requested, requested == "cpu" or visible


def _world_size(cfg: Config) -> int:
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return cfg.launcher.num_workers


def _bf16_hardware() -> bool:
    import torch

    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def _bnb_optimizer_kernels(device: str) -> bool:
    """Whether the installed bitsandbytes registers its 8-bit optimizer kernel for `device` (it registers one
    op per backend it was built with; the optimizers fail at the first step where there is none)."""
    try:
        import bitsandbytes  # noqa: F401 - importing registers the kernels
        import torch
    except ImportError:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device, device.upper())
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(
            "bitsandbytes::optimizer_update_8bit_blockwise", key))
    except RuntimeError:  # the op itself is not defined by this bitsandbytes
        return False


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")
