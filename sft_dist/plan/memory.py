"""Per-rank memory of a training config, predicted from the model config alone (no weights are loaded).

Parameters, gradients and optimizer state are counted exactly on a meta-device copy of the model with the
LoRA adapter applied. Activations are measured, not guessed: one forward and backward of that meta model
runs under a dispatch mode that follows every tensor storage alive at each op (meta tensors have sizes but
no data, so this takes seconds). That covers TRL's chunked (fused) LM-head loss, the model's own loss,
activation checkpointing and whatever transients the kernels make, as the installed libraries run them.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sft_dist.backends import backend_file
from sft_dist.config.schema import Config
from sft_dist.config.training_args import sft_defaults
from sft_dist.plan.facts import activation_checkpointing

# bitsandbytes: 4-bit weights are quantized in blocks of 64 with one absmax per block; double quantization
# stores that absmax in 8 bits plus one fp32 per 256 absmax values (and a 256-entry fp32 code book).
BNB4_BLOCK, BNB4_NESTED_BLOCK = 64, 256
# bitsandbytes 8-bit optimizers: blockwise states (one fp32 absmax per 256 values, a 256-entry fp32 quantile
# map per state), and 32-bit states for tensors under 4096 elements.
BNB_OPT_BLOCK, BNB_OPT_MIN_8BIT = 256, 4096


@dataclass
class MemoryEstimate:
    weights: int  # parameters and buffers held on the rank (quantized as stored, sharded where sharded)
    lora: int  # the trainable parameters' share of `weights`
    gradients: int
    optimizer: int  # optimizer state, plus DeepSpeed's fp32 master partition where it keeps one
    activations: int  # saved for backward by one micro-batch (at the end of the forward)
    total: int  # resident at the training peak: the parts above plus the step's transients
    detail: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Sharding:
    """Divisors of each part per rank, and what the backend keeps besides."""

    weights: int = 1
    gradients: int = 1
    optimizer: int = 1
    master_copy: bool = False  # DeepSpeed keeps an fp32 copy of its trainable partition
    ddp_buckets: bool = False  # DDP's reducer holds a flat copy of all gradients
    offload_optimizer: bool = False
    offload_param: bool = False
    gathers_layers: bool = False  # ZeRO-3 / FSDP2 gather one decoder layer's full weights at a time
    label: str = "ddp"


def estimate_memory(cfg: Config, *, world_size: int, device: str) -> MemoryEstimate:
    """Bytes each rank holds while training `cfg` with `world_size` workers on `device` (cpu or cuda)."""
    from sft_dist.model.build import resolve_dtype
    from sft_dist.train.args import resolve_precision

    precision = resolve_precision(cfg.training, device=device)
    dtype = resolve_dtype(cfg.model.dtype, device=device, lora=cfg.lora.enabled)
    compute = torch.bfloat16 if precision["bf16"] else torch.float16 if precision["fp16"] else dtype
    shard = _sharding(cfg, world_size)
    notes: list[str] = []

    model, skip = _meta_model(cfg, dtype=dtype)
    counts = _count(model, cfg, dtype=dtype, skip=skip)
    trainable_bytes = counts["trainable_bytes"]
    weights_full = counts["param_bytes"] + counts["buffer_bytes"] + counts["quant_state_bytes"]
    weights = _div(weights_full, shard.weights)
    lora = _div(trainable_bytes, shard.weights)
    gradients = _div(trainable_bytes, shard.gradients)
    optimizer_full, opt_note = _optimizer_bytes(cfg, model)
    optimizer = _div(optimizer_full, shard.optimizer)
    master = _div(counts["trainable_numel"] * 4, shard.optimizer) if shard.master_copy else 0
    optimizer += master
    if opt_note:
        notes.append(opt_note)

    batch = int(cfg.training.get("per_device_train_batch_size", 8))
    length = cfg.data.max_length
    checkpointing = activation_checkpointing(cfg)
    step = _profile_step(model, cfg, batch=batch, length=length, compute=compute, checkpointing=checkpointing,
                         plain_loss=_plain_loss(cfg), skip=skip)
    activations = step["activations"]
    # Under sharded gradients a rank keeps only its shard; the full gradients of the step exist one bucket or
    # layer at a time. Under DDP / ZeRO-1 they pile up in backward, as the profile saw them.
    backward_peak = step["peak_with_grads"] if shard.gradients == 1 else step["peak_without_grads"] + gradients
    extra = 0
    if shard.ddp_buckets and world_size > 1:
        extra += trainable_bytes
        notes.append(f"DDP: the reducer's gradient buckets hold another copy of the gradients "
                     f"({_gb(trainable_bytes)})")
    if shard.gathers_layers:
        gathered = counts["largest_layer_bytes"] * 2  # the layer in use and the one prefetched
        if cfg.backend.type == "deepspeed":
            # ZeRO-3 keeps gathered parameters until stage3_max_live_parameters (default 1e9) are live or
            # stage3_max_reuse_distance passes: measured, with the defaults it holds the whole model in the step.
            live = float(backend_file(cfg).get("zero_optimization", {}).get("stage3_max_live_parameters", 1e9))
            gathered = max(gathered, int(weights_full * min(1.0, live / max(1, counts["total_numel"]))))
        extra += gathered
        notes.append(f"{shard.label}: full weights of a decoder layer are gathered while it runs "
                     f"(~{_gb(gathered)} with prefetch)")
    if cfg.backend.type == "fsdp" and shard.weights > 1 and not _plain_loss(cfg):
        head = counts["head_bytes"]  # TRL's fused head gathers the sharded output head whole (full_tensor)
        extra += head
        notes.append(f"fsdp2: the chunked loss gathers the whole output head on every rank ({_gb(head)})")
    if counts["largest_quantized_numel"]:
        dequant = counts["largest_quantized_numel"] * _bytes(compute)
        extra += dequant
        notes.append(f"quantized layers dequantize their weight for each matmul (up to {_gb(dequant)} at a time)")
    peak_phase = max(backward_peak, gradients)  # backward, or the optimizer step (all gradients + states)
    transient = max(0, peak_phase - activations - gradients) + extra
    # Offloaded parts live in host memory: not on the device (the same memory on a CPU device; see notes).
    total = (0 if shard.offload_param else weights) + gradients + (0 if shard.offload_optimizer else optimizer)
    total += activations + transient

    load = _load_peak(cfg, counts, shard=shard, dtype=dtype, world_size=world_size)
    notes += _notes(cfg, shard=shard, counts=counts, batch=batch, length=length, checkpointing=checkpointing,
                    compute=compute, load=load, optimizer=optimizer, world_size=world_size)
    detail = {
        "world_size": world_size,
        "device": device,
        "backend": shard.label,
        "total_params": counts["total_numel"],
        "trainable_params": counts["trainable_numel"],
        "quantized_params": counts["quantized_numel"],
        "frozen_params": counts["total_numel"] - counts["trainable_numel"],
        "param_bytes": _div(counts["param_bytes"], shard.weights),
        "buffer_bytes": _div(counts["buffer_bytes"], shard.weights),
        "quant_state_bytes": _div(counts["quant_state_bytes"], shard.weights),
        "weights_unsharded": weights_full,
        "load_dtype": str(dtype).removeprefix("torch."),
        "compute_dtype": str(compute).removeprefix("torch."),
        "bytes_per_param": {"weights": round(weights_full / max(1, counts["total_numel"]), 3),
                            "optimizer": round(optimizer_full / max(1, counts["trainable_numel"]), 3)},
        "optimizer_master_copy": master,
        "sharded_by": {"weights": shard.weights, "gradients": shard.gradients, "optimizer": shard.optimizer},
        "offloaded": {"optimizer": shard.offload_optimizer, "params": shard.offload_param},
        "micro_batch": [batch, length],
        "activation_checkpointing": checkpointing,
        "forward_peak": step["forward_peak"],
        "transient": transient,
        "backend_extra": extra,
        "load_peak": load,
        "peak": max(total, load),
    }
    return MemoryEstimate(weights=weights, lora=lora, gradients=gradients, optimizer=optimizer,
                          activations=activations, total=total, detail=detail, notes=notes)


# --- the model, on the meta device ---------------------------------------------------------------------------

def _model_config(cfg: Config):
    import dataclasses

    from sft_dist.model.config import model_config

    m = cfg.model
    if m.init_config is not None and "vocab_size" not in m.init_config:
        # the run sizes the embedding to the tokenizer (model/build.py)
        from sft_dist.model.tokenizer import build_tokenizer

        m = dataclasses.replace(m, init_config={**m.init_config, "vocab_size": len(build_tokenizer(m))})
    return model_config(m)


def _meta_model(cfg: Config, *, dtype: torch.dtype):
    """The model on the meta device as training sees it (LoRA applied, trainable params as peft makes them),
    and the storages that are weights (not activations) for the step profile."""
    from transformers import AutoModelForCausalLM

    config = _model_config(cfg)
    config._attn_implementation = _META_ATTENTION
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.lora.enabled:
        from peft import get_peft_model
        from trl.trainer.utils import add_fused_lm_head

        from sft_dist.model.lora import peft_config

        # TRL patches the base model before peft wraps it (SFTTrainer does so on the unwrapped model).
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        model = get_peft_model(model, peft_config(cfg.lora))
    else:
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    skip = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    return model, skip


def _quantized_linears(model, cfg: Config) -> dict[str, torch.nn.Module]:
    """The Linear layers bitsandbytes would replace: all but transformers' default skips (output embedding,
    tied and last modules) and the model's `_keep_in_fp32_modules`."""
    if cfg.quantization.bits is None:
        return {}
    from transformers.quantizers.base import get_keys_to_not_convert

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    skip = set(get_keys_to_not_convert(base)) | set(getattr(base, "_keep_in_fp32_modules", None) or [])
    out = {}
    for name, module in base.named_modules():
        if type(module) is not torch.nn.Linear or any(name == s or name.endswith("." + s) or s in name.split(".")
                                                      for s in skip):
            continue
        if "lora_" in name or "modules_to_save" in name:
            continue
        out[name] = module
    return out


def _count(model, cfg: Config, *, dtype: torch.dtype, skip: set) -> dict[str, int]:
    """Parameter counts and bytes as the run stores them (quantized base layers packed, LoRA in fp32)."""
    quantized = {id(m.weight) for m in _quantized_linears(model, cfg).values()}
    bits = cfg.quantization.bits
    keys = ("total_numel", "trainable_numel", "trainable_bytes", "quantized_numel", "param_bytes",
            "quant_state_bytes", "largest_quantized_numel")
    c = dict.fromkeys(keys, 0)
    for p in model.parameters():
        n = p.numel()
        c["total_numel"] += n
        if id(p) in quantized:
            c["quantized_numel"] += n
            c["largest_quantized_numel"] = max(c["largest_quantized_numel"], n)
            if bits == 4:
                c["param_bytes"] += n // 2
                c["quant_state_bytes"] += _bnb4_state_bytes(n, double=cfg.quantization.double_quant)
            else:
                c["param_bytes"] += n
                c["quant_state_bytes"] += p.shape[0] * 4  # one fp32 scale per output row (SCB)
            continue
        # peft's kbit preparation upcasts every other half-precision weight of a quantized model to fp32
        size = 4 if bits is not None and p.dtype in (torch.float16, torch.bfloat16) else p.element_size()
        c["param_bytes"] += n * size
        if p.requires_grad:
            c["trainable_numel"] += n
            c["trainable_bytes"] += n * size
    c["buffer_bytes"] = sum(b.numel() * b.element_size() for b in model.buffers())
    c["largest_layer_bytes"] = _largest_layer_bytes(model, quantized, bits)
    head = model.get_output_embeddings()
    c["head_bytes"] = head.weight.numel() * 4 if bits is not None else head.weight.numel() * head.weight.element_size()
    return c


def _bnb4_state_bytes(numel: int, *, double: bool) -> int:
    blocks = math.ceil(numel / BNB4_BLOCK)
    if not double:
        return blocks * 4
    return blocks + math.ceil(blocks / BNB4_NESTED_BLOCK) * 4 + BNB4_NESTED_BLOCK * 4 + 4


def _largest_layer_bytes(model, quantized: set, bits: int | None) -> int:
    """Bytes of the biggest decoder layer, as gathered by ZeRO-3 / FSDP2."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names |= set(getattr(base, "_no_split_modules", None) or [])
    best = 0
    for m in base.modules():
        if type(m).__name__ in names:
            size = sum(p.numel() // (8 // bits) if id(p) in quantized and bits else p.numel() * p.element_size()
                       for p in m.parameters())
            best = max(best, size)
    return best


# --- optimizer ------------------------------------------------------------------------------------------------

def _optimizer_bytes(cfg: Config, model) -> tuple[int, str | None]:
    """Optimizer-state bytes of all trainable parameters (unsharded) by `training.optim`, and a note if unknown."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    ds_optimizer = cfg.backend.type == "deepspeed" and backend_file(cfg).get("optimizer")
    if ds_optimizer:
        kind = str(ds_optimizer.get("type", "adamw")).lower()
        per = 4 if kind in ("sgd", "lion") else 8
        return sum(p.numel() for p in trainable) * per, f"optimizer: DeepSpeed {kind}, fp32 states"
    optim = str(cfg.training.get("optim", sft_defaults()["optim"]))
    optim = getattr(optim, "value", optim)
    args = str(cfg.training.get("optim_args") or "")
    note = None
    total = 0
    for p in trainable:
        # torch keeps states in the parameter's dtype (a quantized model's trainable params are fp32)
        n, size = p.numel(), (p.element_size() if cfg.quantization.bits is None else 4)
        if optim.endswith("8bit"):
            states = 1 if "lion" in optim else 3 if "ademamix" in optim else 2
            if n < BNB_OPT_MIN_8BIT:
                total += states * n * 4
            else:
                total += states * (n + math.ceil(n / BNB_OPT_BLOCK) * 4 + 256 * 4)
        elif "adafactor" in optim:
            total += (p.shape[0] + p.shape[1]) * 4 if p.dim() == 2 else n * 4
        elif optim.startswith("sgd"):
            total += n * size if "momentum" in args else 0
        elif "lion" in optim or optim == "adagrad" or optim == "rmsprop":
            total += n * (4 if optim.endswith("32bit") else size)
        else:  # the AdamW family (torch, fused, bnb 32-bit, apex, anyprecision, ...): exp_avg and exp_avg_sq
            total += 2 * n * (4 if optim.endswith("32bit") else size)
    known = ("adamw", "adam", "_8bit", "8bit", "adafactor", "sgd", "lion", "adagrad", "rmsprop")
    if not any(k in optim for k in known):
        note = f"optimizer {optim!r}: not modelled, counted as AdamW (8 B per fp32 parameter)"
    return total, note


# --- backend --------------------------------------------------------------------------------------------------

def _sharding(cfg: Config, world_size: int) -> _Sharding:
    n = world_size
    if cfg.backend.type == "ddp":
        return _Sharding(ddp_buckets=True)
    if cfg.backend.type == "fsdp":
        from sft_dist.backends.fsdp import fsdp_settings

        fc = fsdp_settings(cfg)
        size = (fc.shard_size or n) if fc.sharding == "hybrid_shard" else n
        size = min(size, n)
        return _Sharding(weights=size, gradients=size, optimizer=size, offload_optimizer=fc.cpu_offload,
                         offload_param=fc.cpu_offload, gathers_layers=size > 1, label=f"fsdp2 {fc.sharding}")
    zero = backend_file(cfg).get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    return _Sharding(
        weights=n if stage >= 3 else 1,
        gradients=n if stage >= 2 else 1,
        optimizer=n if stage >= 1 else 1,
        master_copy=stage >= 1,
        offload_optimizer=bool(zero.get("offload_optimizer")),
        offload_param=bool(zero.get("offload_param")),
        gathers_layers=stage >= 3 and n > 1,
        label=f"zero{stage}",
    )


def _plain_loss(cfg: Config) -> bool:
    """Whether the step uses the model's own loss (full logits) instead of TRL's fused LM head: under FSDP2
    with a trainable output head (train/trainer.py `_plain_lm_head_loss`)."""
    if cfg.backend.type != "fsdp":
        return False
    return not cfg.lora.enabled or any(m in ("lm_head", "embed_out", "output") for m in cfg.lora.modules_to_save or [])


# --- activations: one step on the meta device -----------------------------------------------------------------

_META_ATTENTION = "sft_dist_meta_sdpa"


def _meta_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """SDPA as a fused kernel runs it (saves q, k, v, out and the log-sum-exp; no L x L matrix). On meta
    tensors torch would pick the math fallback, which materializes the attention weights."""
    from transformers.integrations.sdpa_attention import repeat_kv

    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, is_causal=True,
                                                                      scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_META_ATTENTION, _meta_sdpa)


_register_attention()


class _LiveStorages(TorchDispatchMode):
    """Follows every storage an op creates until it is freed: spans of (bytes, born, died) on an op clock.
    Storages are keyed by address while alive only; a freed address may come back for a new storage."""

    def __init__(self, skip: set):
        super().__init__()
        self.skip = skip
        self.live: dict[int, tuple[StorageWeakRef, int, int, int]] = {}  # address -> (ref, bytes, born, serial)
        self.spans: list[tuple[int, int, int, int]] = []  # (serial, bytes, born, died)
        self.clock = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.sweep()
        out = func(*args, **(kwargs or {}))
        self.clock += 1
        self.sweep()  # before registering: an output may reuse the address of a storage the op freed
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                key = s._cdata
                if key not in self.live and key not in self.skip:
                    self.live[key] = (StorageWeakRef(s), s.nbytes(), self.clock, len(self.spans) + len(self.live))
        return out

    def sweep(self) -> None:
        for key, (ref, size, born, serial) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.spans.append((serial, size, born, self.clock))

    def live_bytes(self) -> int:
        return sum(size for _, size, _, _ in self.live.values())

    def serials(self, storages: set) -> set:
        """Serials of the live storages at these addresses."""
        return {self.live[k][3] for k in storages if k in self.live}

    def peak(self, exclude: set) -> int:
        """Highest live bytes over the timeline, leaving out the spans whose serial is in `exclude`."""
        events: list[tuple[int, int]] = []
        spans = self.spans + [(serial, size, born, self.clock + 1) for _, size, born, serial in self.live.values()]
        for serial, size, born, died in spans:
            if serial not in exclude:
                events += [(born, size), (died, -size)]
        cur = best = 0
        for _, delta in sorted(events, key=lambda e: (e[0], e[1] < 0)):
            cur += delta
            best = max(best, cur)
        return best


@contextlib.contextmanager
def _meta_autocast_off():
    """TRL's chunked log-prob kernel asks autocast about the tensors' device; torch knows no autocast for meta."""
    original = torch.is_autocast_enabled

    def is_enabled(*args):
        return False if args and str(args[0]) == "meta" else original(*args)

    torch.is_autocast_enabled = is_enabled
    try:
        yield
    finally:
        torch.is_autocast_enabled = original


def _profile_step(model, cfg: Config, *, batch: int, length: int, compute: torch.dtype, checkpointing: bool,
                  plain_loss: bool, skip: set) -> dict[str, int]:
    """Run forward + backward of one micro-batch on the meta model; bytes of activations and step peaks."""
    if compute != next(model.parameters()).dtype:
        model.to(compute)  # mixed precision: the matmuls and what they save run in the autocast dtype
        skip = skip | {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if checkpointing:
        base.activation_checkpointing_enable({"use_reentrant": False})
        if cfg.lora.enabled:
            base.enable_input_require_grads()
    model.train()
    ids = torch.zeros(batch, length, dtype=torch.long, device="meta")
    inputs: dict[str, Any] = {"input_ids": ids, "labels": ids, "use_cache": False}
    if not plain_loss:
        inputs["fused_lm_head"] = True
    tracker = _LiveStorages(skip)
    with _meta_autocast_off(), tracker:
        loss = model(**inputs).loss
        tracker.sweep()
        activations = tracker.live_bytes()
        forward_peak = tracker.peak(set())
        loss.backward()
        del loss
        tracker.sweep()
    grads = tracker.serials({p.grad.untyped_storage()._cdata for p in model.parameters() if p.grad is not None})
    return {"activations": activations, "forward_peak": forward_peak,
            "peak_with_grads": tracker.peak(set()), "peak_without_grads": tracker.peak(grads)}


# --- loading and notes ----------------------------------------------------------------------------------------

def _load_peak(cfg: Config, counts: dict, *, shard: _Sharding, dtype: torch.dtype, world_size: int) -> int:
    """Bytes a rank holds while the model loads, before any backend shards it."""
    full = counts["total_numel"] * _bytes(dtype)
    quantized = counts["param_bytes"] + counts["quant_state_bytes"] + counts["buffer_bytes"]
    # from_pretrained maps the safetensors file: its pages count as resident while the weights load.
    mapped = full
    if cfg.model.init_config is not None:
        # The random base is built whole in the load dtype on every rank (model/build.py); a quantized run
        # then reloads it quantized from disk while the full-precision one is still referenced.
        return full + (mapped + quantized if cfg.quantization.bits is not None else 0)
    if cfg.quantization.bits is not None:
        return mapped + quantized  # every rank loads the whole quantized base, whatever the backend
    if shard.weights > 1 and cfg.backend.type == "deepspeed":
        return _div(full, shard.weights)  # transformers loads under deepspeed.zero.Init
    return mapped + full


def _notes(cfg: Config, *, shard: _Sharding, counts: dict, batch: int, length: int, checkpointing: bool,
           compute: torch.dtype, load: int, optimizer: int, world_size: int) -> list[str]:
    notes = [f"activations: one micro-batch of {batch} x {length} tokens (batches padded to data.max_length; "
             f"shorter batches need less), {str(compute).removeprefix('torch.')}, fused attention"
             + (", activation checkpointing per decoder layer" if checkpointing else "")]
    if _plain_loss(cfg):
        notes.append("loss: the model's own (full logits), as sft_dist uses under FSDP2 with a trainable head")
    else:
        notes.append("loss: TRL's chunked LM head (no full logits; it allocates a tile buffer of up to 4096 tokens "
                     "x 32768 vocab columns whatever the vocabulary: on CPU the columns a smaller vocabulary never "
                     "touches stay out of RSS, on a GPU they are allocated)")
    if shard.offload_optimizer:
        notes.append(f"optimizer state offloaded to host memory: {_gb(optimizer)} per rank there, not on the device")
    if shard.offload_param:
        notes.append("parameters offloaded to host memory between uses")
    if cfg.quantization.bits is not None and shard.weights > 1:
        notes.append(f"{shard.label} with a quantized base: transformers loads the whole {cfg.quantization.bits}-bit "
                     f"base on every rank before it is sharded: {_gb(load)} per rank at load")
    elif cfg.model.init_config is not None and cfg.quantization.bits is not None:
        notes.append(f"init_config with quantization: the random base is built in full precision, saved, and "
                     f"reloaded quantized: {_gb(load)} per rank at load")
    if counts["quantized_numel"]:
        notes.append(f"{counts['quantized_numel']:,} parameters quantized to {cfg.quantization.bits} bits "
                     "(lm_head and other skipped modules stay in full precision)")
    if world_size > 1 and shard.weights == 1 and shard.gradients == 1 and shard.optimizer == 1:
        notes.append("nothing is sharded: every rank holds the whole model, gradients and optimizer state")
    return notes


def _div(x: int, n: int) -> int:
    return -(-x // n)


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _gb(x: int) -> str:
    from sft_dist.plan.report import human_bytes

    return human_bytes(x)
