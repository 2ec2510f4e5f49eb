"""Per-rank memory of a training config, predicted from the model config alone (no weights are loaded).

Parameters, gradients and optimizer state are counted exactly on a meta-device copy of the model with the
LoRA adapter applied. Activations are measured, not guessed: one forward and backward of that meta model
runs under a dispatch mode that follows every tensor storage alive at each op (meta tensors have sizes but
no data, so this takes seconds). That covers TRL's chunked (fused) LM-head loss, the model's own loss,
activation checkpointing and whatever transients the kernels make, as the installed libraries run them.

The step runs the way the run's precision runs it on the device: under DDP with bf16/fp16, accelerate's
`torch.autocast` (emulated here: torch has no autocast for meta tensors), so matmuls save 16-bit copies of fp32
inputs (peft casts each LoRA input to the adapter's fp32); under DeepSpeed and FSDP2 every parameter computes in
the 16-bit dtype (the engine casts the module; FSDP2's MixedPrecisionPolicy all-gathers 16-bit parameters).
Attention saves what the implementation the run picks saves (a fused kernel: q, k, v, output, log-sum-exp; with
a packed block mask, sdpa also keeps its additive bias per layer; eager: the attention matrices), and
`training.use_liger_kernel` swaps in what Liger's RMSNorm and SwiGLU/GeGLU kernels save. Calibrated against a GPU
run: tests/plan/test_memory.py (`H200_REFERENCE`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from itertools import compress
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from sft_dist.backends import Backend, Sharding, get_backend
from sft_dist.config.schema import Config
from sft_dist.model.build import persistent_buffers
from sft_dist.model.layers import decoder_layers
from sft_dist.model.unwrap import base_model
from sft_dist.plan.facts import Facts, activation_checkpointing, checkpoint_policy
from sft_dist.sizes import format_bytes

# bitsandbytes: 4-bit weights are quantized in blocks of 64 with one absmax per block; double quantization
# stores that absmax in 8 bits plus one fp32 per 256 absmax values (and a 256-entry fp32 code book).
BNB4_BLOCK, BNB4_NESTED_BLOCK = 64, 256
# A hint is given when activations are more than this share of the estimated peak.
ACTIVATION_SHARE_HINT = 0.5
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
    hints: list[str] = field(default_factory=list)  # what would lower the peak, when activations dominate it


def estimate_memory(cfg: Config, *, world_size: int, device: str, facts: Facts | None = None) -> MemoryEstimate:
    """Bytes each rank holds while training `cfg` with `world_size` workers on `device` (cpu or cuda).

    The weight and compute dtypes are the plan's facts (`facts`, gathered here when not given), so the estimate
    counts what the setup line says, also when planning for GPUs on a host without one."""
    from sft_dist.model.build import DTYPES, attention_dtype
    from sft_dist.plan.facts import gather_facts

    facts = facts or gather_facts(cfg, device=device, world_size=world_size)
    dtype = DTYPES[facts.model_dtype]
    compute = torch.bfloat16 if facts.bf16 else torch.float16 if facts.fp16 else dtype
    backend = get_backend(cfg)
    shard = backend.sharding(world_size)
    notes: list[str] = []

    config = _model_config(cfg)
    attention = _attention_kind(cfg, config, device=device, dtype=attention_dtype(dtype, compute))
    model = _meta_model(cfg, config, dtype=dtype, attention=attention)
    counts = _count(model, cfg, dtype=dtype)
    trainable_bytes = counts["trainable_bytes"]
    weights_full = counts["param_bytes"] + counts["buffer_bytes"] + counts["quant_state_bytes"]
    weights = _div(weights_full, shard.weights)
    lora = _div(trainable_bytes, shard.weights)
    evaluating = facts.eval_only  # training.do_train: false: no gradients, optimizer state or backward
    gradients = 0 if evaluating else _div(trainable_bytes, shard.gradients)
    optimizer_full, opt_note = (0, None) if evaluating else _optimizer_bytes(cfg, model, backend)
    optimizer = _div(optimizer_full, shard.optimizer)
    master = _div(counts["trainable_numel"] * 4, shard.optimizer) if shard.master_copy and not evaluating else 0
    optimizer += master
    if evaluating:
        notes.append("training.do_train=false: an evaluation holds the weights and runs one forward at a time under "
                     "no_grad (training.per_device_eval_batch_size rows): no gradients, optimizer state or "
                     "activations kept for a backward")
    if opt_note:
        notes.append(opt_note)

    batch = int(cfg.training.get("per_device_eval_batch_size") or 8) if evaluating else cfg.training.micro_batch
    sequence = cfg.backend.sequence_parallel_size
    length = -(-cfg.data.max_length // sequence)  # a rank's slice of each row (model/ulysses.py)
    checkpointing = activation_checkpointing(cfg, backend) and not evaluating
    step = _profile_step(model, cfg, batch=batch, length=length, compute=compute, checkpointing=checkpointing,
                         plain_loss=backend.plain_loss(), attention=attention,
                         mixed=_mixed_precision(backend, compute), quantized=set(counts["quantized_ids"]), device=device,
                         train=not evaluating)
    activations = step["activations"]
    # Under sharded gradients a rank keeps only its shard; the full gradients of the step exist one bucket or
    # layer at a time. Under DDP / ZeRO-1 they pile up in backward, as the profile saw them.
    backward_peak = step["peak_with_grads"] if shard.gradients == 1 else step["peak_without_grads"] + gradients
    extra = 0
    if shard.ddp_buckets and world_size > 1 and not evaluating:
        extra += trainable_bytes
        notes.append(f"DDP: the reducer's gradient buckets hold another copy of the gradients "
                     f"({format_bytes(trainable_bytes)})")
    if shard.gathers_layers:
        gathered = backend.gathered_bytes(counts["largest_layer_bytes"], weights_bytes=weights_full,
                                          numel=counts["total_numel"])
        extra += gathered
        notes.append(f"{shard.label}: full weights of a decoder layer are gathered while it runs "
                     f"(~{format_bytes(gathered)} with prefetch)")
    if backend.gathers_head_for_loss() and shard.weights > 1:
        head = counts["head_bytes"]  # TRL's fused head gathers the sharded output head whole (full_tensor)
        extra += head
        notes.append(f"fsdp2: the chunked loss gathers the whole output head on every rank ({format_bytes(head)})")
    if sequence > 1:
        from sft_dist.model.ulysses import model_heads

        heads = model_heads(model.config, sequence)
        share = (f"{heads.padded // sequence} of the {heads.heads} query heads" if heads else f"1/{sequence} of the heads")
        padding = _padded_heads_bytes(cfg, model.config, heads, batch=batch, rows=cfg.data.max_length, compute=compute,
                                      checkpointing=checkpointing, train=not evaluating) if heads else 0
        extra += padding
        notes.append(f"sequence parallel {sequence}: activations of one slice of {length} tokens per row; attention "
                     f"runs on the whole rows ({cfg.data.max_length} tokens) for {share}: its q, k, v and output "
                     "as large as the slice's" + (f"; {'; '.join(heads.extras())}: {format_bytes(padding)} more "
                                                  "of them kept" if padding else ""))
        if attention in ("sdpa", "eager"):  # the whole rows' document mask, built once per micro-batch
            mask = batch * cfg.data.max_length ** 2 * (1 if attention == "sdpa" else _bytes(compute))
            extra += mask
            notes.append(f"sequence parallel on {attention}: the whole rows' mask, {format_bytes(mask)} "
                         "(varlen or flash attention reads boundaries instead)")
    if counts["largest_quantized_numel"]:
        dequant = counts["largest_quantized_numel"] * _bytes(compute)
        extra += dequant
        notes.append(f"quantized layers dequantize their weight for each matmul (up to {format_bytes(dequant)} at "
                     "a time)")
    peak_phase = max(backward_peak, gradients)  # backward, or the optimizer step (all gradients + states)
    transient = max(0, peak_phase - activations - gradients) + extra
    # Offloaded parts live in host memory: not on the device (the same memory on a CPU device; see notes).
    total = (0 if shard.offload_param else weights) + gradients + (0 if shard.offload_optimizer else optimizer)
    total += activations + transient

    part_dtype = partition_dtype(backend, dtype=dtype, compute=compute)
    load = _load_peak(cfg, counts, backend=backend, shard=shard, dtype=dtype, world_size=world_size, device=device,
                      part_dtype=part_dtype)
    notes += _notes(cfg, backend=backend, shard=shard, counts=counts, batch=batch, length=length, checkpointing=checkpointing,
                    compute=compute, load=load, load_dtype=dtype, part_dtype=part_dtype, optimizer=optimizer,
                    world_size=world_size,
                    attention=attention, mixed=_mixed_precision(backend, compute),
                    liger=_liger(cfg, model, device=device) is not None, device=device)
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
        "attention": attention,
        "mixed_precision": _mixed_precision(backend, compute),
        "liger_kernel": _liger(cfg, model, device=device) is not None,
        "activation_checkpointing": checkpointing,
        "forward_peak": step["forward_peak"],
        "transient": transient,
        "backend_extra": extra,
        "load_peak": load,
        "host_load_peak": _host_load_peak(cfg, counts, backend=backend, shard=shard, dtype=dtype,
                                          part_dtype=part_dtype),
        "peak": max(total, load),
        "activation_share": round(activations / max(1, total), 3),
        "evaluation": evaluating,
    }
    hints = _hints(cfg, facts, activations=activations, total=total, checkpointing=checkpointing, batch=batch,
                   length=length, model=model, compute=compute, autocast=detail["mixed_precision"] == "autocast")
    return MemoryEstimate(weights=weights, lora=lora, gradients=gradients, optimizer=optimizer,
                          activations=activations, total=total, detail=detail, notes=notes, hints=hints)


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


def _meta_model(cfg: Config, config, *, dtype: torch.dtype, attention: str):
    """The model on the meta device as training sees it (LoRA applied, trainable params as peft makes them)."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    # eager runs the model's own attention (the attention matrices are real tensors on meta too); the fused
    # kernels are stood in for by what they save (_FusedAttention), registered with transformers' public
    # AttentionInterface when an estimate needs one, not at import
    packed = bool(cfg.data.packing)
    if attention == "eager":
        config._attn_implementation = "eager"
    else:
        kind = "flash" if attention == "flex" else attention  # flex keeps what flash keeps (and a block mask)
        name = _META_ATTENTION[kind, packed]
        AttentionInterface.register(name, _fused_attention(kind, packed))
        config._attn_implementation = name
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.lora.enabled:
        from peft import get_peft_model
        from trl.trainer.utils import add_fused_lm_head

        from sft_dist.model import lora_forward
        from sft_dist.model.lora import fp32_masters, peft_config

        # TRL patches the base model before peft wraps it (SFTTrainer does so on the unwrapped model).
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        with torch.device("meta"):  # the adapter too (peft would initialise it on the host, then move it)
            model = get_peft_model(model, peft_config(cfg.lora))
        if cfg.lora.fused_forward:
            lora_forward.skip_input_casts(model)  # as apply_lora
            if get_backend(cfg).zero_stage != 3:  # ZeRO-3's partitioned lora_B: peft's forward (lora_forward.py)
                lora_forward.fuse_scaled_add(model)
        fp32_masters(model)  # as apply_lora: modules_to_save copies train in fp32
    else:
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    return model


def _quantized_linears(model, cfg: Config) -> dict[str, torch.nn.Module]:
    """The Linear layers bitsandbytes would replace: all but transformers' default skips (output embedding,
    tied and last modules) and the model's `_keep_in_fp32_modules`."""
    if cfg.quantization.bits is None:
        return {}
    from transformers.quantizers.base import get_keys_to_not_convert

    base = base_model(model)
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


def _count(model, cfg: Config, *, dtype: torch.dtype) -> dict[str, int]:
    """Parameter counts and bytes as the run stores them (quantized base layers packed, LoRA in fp32)."""
    quantized = {id(m.weight) for m in _quantized_linears(model, cfg).values()}
    bits = cfg.quantization.bits
    upcast = _upcasts(cfg, model)
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
        # peft's kbit preparation (quantization.upcast_unquantized) casts every other 16-bit weight to fp32
        size = 4 if upcast and p.dtype in (torch.float16, torch.bfloat16) else p.element_size()
        c["param_bytes"] += n * size
        if p.requires_grad:
            c["trainable_numel"] += n
            c["trainable_bytes"] += n * size
    c["buffer_bytes"] = sum(b.numel() * b.element_size() for b in model.buffers())
    c["largest_layer_bytes"] = _largest_layer_bytes(model, quantized, bits)
    c["base_numel"] = sum(p.numel() for n, p in model.named_parameters() if _in_base(n))
    c["layers_numel"], c["largest_layer_numel"] = _layer_numels(model)
    # ZeRO-3's partitioned init gathers a module's parameters with its children's: at most a decoder layer, or one
    # tensor outside them (the embedding, the head)
    c["largest_gather_numel"] = max([c["largest_layer_numel"]] + [p.numel() for n, p in model.named_parameters()
                                                                   if _in_base(n)])
    c["persistent_buffers"] = bool(persistent_buffers(model))  # FSDP2 then builds a random base on every rank
    c["quantized_ids"] = sorted(quantized)
    head = model.get_output_embeddings()
    c["head_bytes"] = head.weight.numel() * (4 if upcast else head.weight.element_size())
    c["unquantized_dtype"] = "float32" if upcast else str(dtype).removeprefix("torch.")
    return c


def _upcasts(cfg: Config, model) -> bool:
    """Whether the run casts a quantized model's unquantized weights to fp32 (model/lora.py)."""
    dtype = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    return cfg.quantization.bits is not None and cfg.quantization.upcasts(dtype)


def _bnb4_state_bytes(numel: int, *, double: bool) -> int:
    blocks = math.ceil(numel / BNB4_BLOCK)
    if not double:
        return blocks * 4
    return blocks + math.ceil(blocks / BNB4_NESTED_BLOCK) * 4 + BNB4_NESTED_BLOCK * 4 + 4


def _in_base(name: str) -> bool:
    """Whether a parameter is the base model's, as it loads: not a LoRA weight or a modules_to_save copy, which
    peft adds after the load."""
    return "lora_" not in name and ".modules_to_save." not in name


def _layer_numels(model) -> tuple[int, int]:
    """Base parameters in all decoder layers, and in the biggest one (a layer-wise random init holds one)."""
    sizes = [sum(p.numel() for n, p in m.named_parameters() if _in_base(n)) for m in decoder_layers(model)]
    return sum(sizes), max(sizes, default=0)


def _largest_layer_bytes(model, quantized: set, bits: int | None) -> int:
    """Bytes of the biggest decoder layer, as gathered by ZeRO-3 / FSDP2."""
    best = 0
    for m in decoder_layers(model):
        size = sum(p.numel() // (8 // bits) if id(p) in quantized and bits else p.numel() * p.element_size()
                   for p in m.parameters())
        best = max(best, size)
    return best


# --- optimizer ------------------------------------------------------------------------------------------------

def _optimizer_bytes(cfg: Config, model, backend: Backend) -> tuple[int, str | None]:
    """Optimizer-state bytes of all trainable parameters (unsharded) by `training.optim`, and a note if unknown."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    ds_optimizer = backend.optimizer_section()
    if ds_optimizer:
        kind = str(ds_optimizer.get("type", "adamw")).lower()
        per = 4 if kind in ("sgd", "lion") else 8
        return sum(p.numel() for p in trainable) * per, f"optimizer: DeepSpeed {kind}, fp32 states"
    optim, args = cfg.training.optim, cfg.training.optim_args
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

# --- activations: one step on the meta device -----------------------------------------------------------------

def _attention_kind(cfg: Config, config, *, device: str, dtype: torch.dtype) -> str:
    """What the run's attention keeps for backward, by kind: `flash` (flash attention, torch varlen: q, k, v with
    their own heads, output, log-sum-exp; packed rows as one flattened row, no mask), `flex` (the same, packed
    rows as rows with a block mask of a few bytes per 128 x 128 tokens), `sdpa` (torch's fused kernels; a
    packed block mask makes transformers repeat the k/v heads and torch keep an additive bias), or `eager`."""
    from sft_dist.model import attention

    requested = cfg.model.attn_implementation
    if requested in (None, "auto"):
        cls = attention.causal_lm_class(config)
        try:  # what model/build.py will pick
            requested = attention.choose(requested, cls, model_type=getattr(config, "model_type", None),
                                         device=device, dtype=dtype, config=config, probe=False).name
        except Exception:  # noqa: BLE001 - e.g. planning for a GPU on a host without one: sdpa, else eager
            requested = "sdpa" if cls is None or getattr(cls, "_supports_sdpa", False) else "eager"
    if requested == "eager":
        return "eager"
    if requested in ("sdpa", "flex_attention"):
        return requested.removesuffix("_attention")
    return "flash"


class _FusedAttention(torch.autograd.Function):
    """A fused attention kernel as memory sees it: the output, and for backward q, k, v (as given), the output,
    the fp32 log-sum-exp per query and the additive mask bias when there is one."""

    @staticmethod
    def forward(ctx, query, key, value, bias):
        out = torch.empty_like(query)
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse, bias)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), None


def _fused_attention(kind: str, packed: bool):
    def attend(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        from transformers.integrations.sdpa_attention import repeat_kv

        bias = None
        if kind == "sdpa" and packed:
            # transformers' sdpa gets the packed rows' block-diagonal mask: it repeats the k/v heads for the kernel
            # (torch's fused kernels take GQA only without a mask), and torch turns the boolean mask into an additive
            # bias in the query dtype at each call, which the memory-efficient kernel keeps for backward
            n_rep = query.shape[1] // key.shape[1]
            key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
            b, _, t, _ = query.shape
            bias = query.new_empty((b, 1, t, key.shape[2]))
        out = _FusedAttention.apply(query, key, value, bias)
        return out.transpose(1, 2).contiguous(), None

    return attend


# (transformers treats any implementation name containing "flash" as a flash-attn kernel to look up)
_META_ATTENTION = {(kind, packed): f"sft_dist_meta_{'unmasked' if kind == 'flash' else kind}{'_packed' if packed else ''}"
                   for kind in ("sdpa", "flash") for packed in (False, True)}


def _mixed_precision(backend: Backend, compute: torch.dtype) -> str:
    """How the run computes in 16 bit: `autocast` (accelerate's torch.autocast: DDP, one process), `cast` (every
    parameter in the 16-bit dtype: DeepSpeed's engine, FSDP2's MixedPrecisionPolicy), or `none`."""
    if compute not in (torch.bfloat16, torch.float16):
        return "none"
    return "cast" if backend.casts_parameters() else "autocast"


# torch.autocast's op lists (CUDA), as far as a decoder's forward uses them: matmul-like ops run in the 16-bit
# dtype, these others in fp32.
_AUTOCAST_16 = {torch.nn.functional.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm,
                torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.addmm, torch.baddbmm, torch.addbmm, torch.einsum,
                torch.nn.functional.scaled_dot_product_attention, torch.nn.functional.conv1d}
_AUTOCAST_32 = {torch.nn.functional.softmax, torch.nn.functional.log_softmax, torch.softmax, torch.log_softmax,
                torch.Tensor.softmax, torch.Tensor.log_softmax, torch.nn.functional.cross_entropy,
                torch.nn.functional.nll_loss, torch.nn.functional.layer_norm, torch.nn.functional.group_norm,
                torch.pow, torch.Tensor.pow, torch.rsqrt, torch.Tensor.rsqrt, torch.exp, torch.Tensor.exp,
                torch.log, torch.Tensor.log, torch.logsumexp, torch.Tensor.logsumexp}


class _DeviceOps(TorchFunctionMode):
    """The step's ops as the run's device and precision run them, for meta tensors (which have neither autocast nor
    CUDA's fused kernels).

    `autocast`: torch.autocast: fp32 inputs of matmul-like ops are cast to that dtype, 16-bit inputs of the fp32 ops
    to fp32; like autocast, the casts of leaf tensors that require grad (fp32 weights) are cached while the forward
    runs, so each weight is cast once per forward. `fused_dropout` (CUDA): dropout keeps a 1-byte mask for backward
    (`native_dropout`), where the unfused path the meta and CPU runs take keeps a noise tensor in the input's dtype
    (peft's LoRA dropout runs on the fp32 copy of each adapted layer's input: 4 bytes per element)."""

    def __init__(self, autocast: torch.dtype | None, fused_dropout: bool):
        super().__init__()
        self.dtype = autocast
        self.fused_dropout = fused_dropout
        # id -> (the tensor cast, its cast): the tensor is held, so its id cannot come back for another one (under
        # no_grad a view of a weight is a leaf that requires grad too, and a short-lived one)
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.fused_dropout and func is torch.nn.functional.dropout:
            return self._dropout(*args, **kwargs)
        if self.dtype is not None:
            if func in _AUTOCAST_16:
                args, kwargs = tree_map(lambda t: self._cast(t, self.dtype), (args, kwargs))
            elif func in _AUTOCAST_32 and kwargs.get("dtype") is None:
                args, kwargs = tree_map(lambda t: self._cast(t, torch.float32), (args, kwargs))
        return func(*args, **kwargs)

    @staticmethod
    def _dropout(input, p=0.5, training=True, inplace=False):
        if not training or p == 0.0 or inplace:
            return torch.nn.functional.dropout(input, p, training, inplace)
        return torch.native_dropout(input, p, True)[0]

    def _cast(self, t, dtype: torch.dtype):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == dtype:
            return t
        if dtype != torch.float32 and t.dtype != torch.float32:
            return t  # autocast lowers fp32 only
        cacheable = self.cache is not None and t.is_leaf and t.requires_grad
        if cacheable and id(t) in self.cache and self.cache[id(t)][0] is t:
            return self.cache[id(t)][1]
        out = t.to(dtype)
        if cacheable:
            self.cache[id(t)] = (t, out)
        return out

    def end_forward(self) -> None:
        """Autocast drops its cast cache when the forward's autocast region exits."""
        self.cache = None

    def recompute(self) -> _DeviceOps:
        """The same ops for an activation-checkpointed layer's recomputation (with a cast cache of its own)."""
        return _DeviceOps(self.dtype, self.fused_dropout)


# --- Liger kernels (`training.use_liger_kernel`): what they keep for backward ---------------------------------

# model types whose RMSNorm and gated MLP Liger patches (liger_kernel.transformers.monkey_patch)
_LIGER_MODEL_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
                      "phi3", "granite", "olmo2", "glm4"}


class _LigerRMSNorm(torch.autograd.Function):
    """Liger's RMSNorm keeps its input (in its own dtype) and the fp32 inverse RMS per row, not an fp32 copy."""

    @staticmethod
    def forward(ctx, x, weight):
        rstd = x.new_empty(x.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(x, weight, rstd)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad):
        x, weight, _ = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(weight) if ctx.needs_input_grad[1] else None


class _LigerGLU(torch.autograd.Function):
    """Liger's SwiGLU / GeGLU keeps the two projections and recomputes the activation in backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.empty_like(gate)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return torch.empty_like(gate), torch.empty_like(up)


def _liger(cfg: Config, model, *, device: str):
    """The base model when Liger's layer kernels apply to it, else None. `training.use_liger_kernel`: true on,
    false off, unset on where they can run (train/args.py): CUDA with liger-kernel and triton installed, as far
    as this host can tell (planning a GPU run elsewhere counts without them: the larger estimate)."""
    import importlib.util

    asked = cfg.training.use_liger_kernel
    if asked is False or (asked is None and not (
            device == "cuda" and all(importlib.util.find_spec(m) for m in ("liger_kernel", "triton")))):
        return None
    base = base_model(model)
    if getattr(base.config, "model_type", None) not in _LIGER_MODEL_TYPES:
        return None
    return base


def _apply_liger(cfg: Config, model, *, device: str) -> None:
    """Swap the RMSNorm and gated-MLP forwards for what Liger's kernels save (its fused cross-entropy stays off:
    the loss is TRL's fused LM head)."""
    base = _liger(cfg, model, device=device)
    if base is None:
        return
    kernels = {"rms_norm": True, "swiglu": True, "geglu": True, **cfg.training.liger_kernel_config}
    for module in base.modules():
        name = type(module).__name__
        if kernels["rms_norm"] and name.endswith("RMSNorm") and getattr(module, "weight", None) is not None:
            module.forward = lambda x, m=module: _LigerRMSNorm.apply(x, m.weight)
        elif (kernels["swiglu"] or kernels["geglu"]) and name.endswith("MLP") and hasattr(module, "down_proj"):
            if hasattr(module, "gate_up_proj"):  # Phi-3: one fused projection, split in two
                module.forward = lambda x, m=module: m.down_proj(_LigerGLU.apply(*m.gate_up_proj(x).chunk(2, dim=-1)))
            elif hasattr(module, "gate_proj") and hasattr(module, "up_proj"):
                module.forward = lambda x, m=module: m.down_proj(_LigerGLU.apply(m.gate_proj(x), m.up_proj(x)))


_expired = torch.UntypedStorage._expired  # StorageWeakRef.expired without its Python frames (a C function)


def _meta_op(func, args, kwargs):
    """`func` on the profile's meta tensors. torch's meta kernel of grouped_mm (transformers' MoE experts) accepts
    bf16 only, where its CPU and CUDA kernels take fp32 too: shapes are what the profile needs, so an fp32 call is
    run in bf16 and its result given the caller's dtype."""
    if func is torch.ops.aten._grouped_mm.default and args[0].is_meta and args[0].dtype != torch.bfloat16:
        out = func(*(a.to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in args), **kwargs)
        return out.to(args[0].dtype)
    if func is torch.ops.aten.native_dropout.default and args[0].is_meta and (args[2] if len(args) > 2 else True):
        # What the fused kernel returns (the output and a 1-byte mask), without torch's Python decomposition for
        # meta (~2 ms a call: a 70B model's adapter dropouts were a sixth of its profile)
        return torch.empty_like(args[0]), torch.empty_like(args[0], dtype=torch.bool)
    return func(*args, **kwargs)


class _LiveStorages(TorchDispatchMode):
    """Follows every storage an op creates until it is freed: spans of (bytes, born, died) on an op clock.
    Storages are keyed by address while alive only; a freed address may come back for a new storage."""

    def __init__(self, skip: set):
        super().__init__()
        self.skip = skip
        # address -> (weak ref, bytes, born, serial); the weak ref is held so that its handle stays valid
        self.live: dict[int, tuple[StorageWeakRef, int, int, int]] = {}
        # address -> the weak ref's handle, in `live`'s order: the sweep checks the handles directly, in C (thousands
        # of ops times hundreds of live storages: per-entry Python was a third of a large model's profile)
        self.handles: dict[int, int] = {}
        self.spans: list[tuple[int, int, int, int]] = []  # (serial, bytes, born, died)
        self.clock = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = _meta_op(func, args, kwargs or {})
        new = {}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                key = s._cdata
                if key not in self.skip and (key not in self.live or _expired(self.handles[key])):
                    new[key] = s
        if new:
            # Only an op that makes a storage can raise the total: what Python freed since the last such op is
            # closed first (it died before these were born; a reused address included). Views and in-place ops
            # need no sweep, which halves the profile's time.
            self.sweep()
            self.clock += 1
            for key, s in new.items():
                ref = StorageWeakRef(s)
                self.live[key] = (ref, s.nbytes(), self.clock, len(self.spans) + len(self.live))
                self.handles[key] = ref.cdata
        return out

    def _close(self, key: int) -> None:
        _, size, born, serial = self.live.pop(key)
        del self.handles[key]
        self.spans.append((serial, size, born, self.clock))

    def sweep(self) -> None:
        for key in list(compress(self.handles, map(_expired, self.handles.values()))):
            self._close(key)

    def live_bytes(self) -> int:
        return sum(entry[1] for entry in self.live.values())

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
def _meta_autocast(dtype: torch.dtype | None, device: str):
    """What meta tensors cannot do. torch knows no autocast for meta, but the step's code asks about it: TRL's
    chunked log-prob kernel picks its matmul dtype by it, peft's bitsandbytes layers (which ask CUDA's, the call
    without a device) and sft_dist's LoRA layers (model/lora_forward.py) cast their input for the adapter only outside
    it. They see the run's autocast (`dtype`, or off), as the run's device would have it. peft's MoE parameter
    wrapper opens `torch.autocast(device_type=...)`: for meta it opens the CPU's."""
    original, original_autocast, original_dtype = torch.is_autocast_enabled, torch.autocast, torch.get_autocast_dtype

    def is_enabled(*args):
        if args and str(args[0]) == "meta":
            return dtype is not None
        if not args and device == "cuda":  # the device-less call asks about CUDA's
            return dtype is not None
        return original(*args)

    def get_dtype(device_type):
        return dtype if str(device_type) == "meta" and dtype is not None else original_dtype(device_type)

    class autocast(original_autocast):  # noqa: N801 - stands in for torch.autocast
        def __init__(self, device_type, *args, **kwargs):
            super().__init__("cpu" if str(device_type) == "meta" else device_type, *args, **kwargs)

    # transformers looks for packed rows in the position ids before it builds an eager mask: a data-dependent
    # check (meta tensors have no values); the profile's rows are one document each
    from transformers import masking_utils

    original_find = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: (
        None if position_ids.device.type == "meta" else original_find(position_ids))
    torch.is_autocast_enabled, torch.autocast, torch.get_autocast_dtype = is_enabled, autocast, get_dtype
    try:
        yield
    finally:
        torch.is_autocast_enabled, torch.autocast, torch.get_autocast_dtype = original, original_autocast, original_dtype
        masking_utils.find_packed_sequence_indices = original_find


@contextlib.contextmanager
def _device_loss_kernels(device: str):
    """TRL's chunked LM-head loss as it runs on `device`. On a GPU, Triton kernels fold each logits tile in place and
    the fp32 accumulations are cuBLAS matmuls with an fp32 output: nothing is allocated beyond the tile buffer and
    the accumulators. The torch fallback the meta (and CPU) run takes materializes fp32 copies of every tile
    (~3 GiB at the backward peak for 4096 x 32768 tiles), which a GPU never holds."""
    if device != "cuda":
        yield
        return
    from trl.kernels import chunked_logprob

    def in_place(*args, **kwargs) -> None:
        return None

    saved = chunked_logprob._forward_tile, chunked_logprob._backward_tile, chunked_logprob._addmm_fp32
    chunked_logprob._forward_tile = chunked_logprob._backward_tile = chunked_logprob._addmm_fp32 = in_place
    try:
        yield
    finally:
        chunked_logprob._forward_tile, chunked_logprob._backward_tile, chunked_logprob._addmm_fp32 = saved


def _profile_step(model, cfg: Config, *, batch: int, length: int, compute: torch.dtype, checkpointing: bool,
                  plain_loss: bool, attention: str, mixed: str, quantized: set,
                  device: str, train: bool = True) -> dict[str, int]:
    """Run forward + backward of one micro-batch on the meta model; bytes of activations and step peaks.
    `train` false: one forward under no_grad in eval mode, as an evaluation runs it (nothing kept for backward)."""
    if quantized and _upcasts(cfg, model):
        # peft's kbit preparation: every weight bitsandbytes leaves unquantized (embeddings, norms, the head) is
        # fp32 (the 4/8-bit layers themselves run as 16-bit matmuls after dequantizing: see backend extras)
        for p in model.parameters():
            if id(p) not in quantized and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
    if mixed == "cast":
        model.to(compute)  # every parameter computes in the 16-bit dtype
    elif mixed == "none" and compute != next(model.parameters()).dtype:
        model.to(compute)
    # the weights as they are now (a cast gives them new storages; an old one's address may come back for an
    # activation, which must be counted)
    skip = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    _apply_liger(cfg, model, device=device)
    base = base_model(model)
    ops = _DeviceOps(compute if mixed == "autocast" else None, fused_dropout=device == "cuda")
    if checkpointing:
        # The recomputation runs in backward, where the forward's mode is not in effect: it enters its own (as
        # torch.utils.checkpoint re-enters the forward's autocast state)
        every, offload = checkpoint_policy(cfg)
        base.activation_checkpointing_enable({"use_reentrant": False,
                                              "context_fn": lambda: (contextlib.nullcontext(), ops.recompute())},
                                             every_n_layers=every)
        if offload:
            _offload_checkpointed_inputs(base)
        if cfg.lora.enabled:
            base.enable_input_require_grads()
    model.train(train)
    ids = torch.zeros(batch, length, dtype=torch.long, device="meta")
    inputs: dict[str, Any] = {"input_ids": ids, "labels": ids, "use_cache": False}
    if not plain_loss:
        inputs["fused_lm_head"] = True
    tracker = _LiveStorages(skip)
    if not train:
        with _meta_autocast(ops.dtype, device), _device_loss_kernels(device), tracker, ops, torch.no_grad():
            model(**inputs)
            peak = tracker.peak(set())
        return {"activations": 0, "forward_peak": peak, "peak_with_grads": peak, "peak_without_grads": peak}
    with _meta_autocast(ops.dtype, device), _device_loss_kernels(device), tracker, ops:
        loss = model(**inputs).loss
        ops.end_forward()
        tracker.sweep()
        activations = tracker.live_bytes()
        forward_peak = tracker.peak(set())
        loss.backward()
        del loss
        tracker.sweep()
    grads = tracker.serials({p.grad.untyped_storage()._cdata for p in model.parameters() if p.grad is not None})
    return {"activations": activations, "forward_peak": forward_peak,
            "peak_with_grads": tracker.peak(set()), "peak_without_grads": tracker.peak(grads)}


def _offload_checkpointed_inputs(base) -> None:
    """`activation_checkpointing_kwargs.offload`: transformers saves what each checkpointed layer keeps (its
    input) on the host (torch's save_on_cpu) and copies it back in backward. Meta tensors cannot be copied to the
    host: here the saved tensor is dropped in forward and a new one of its shape made when backward reads it, so
    the device holds neither while it is on the host."""
    import functools

    def offloaded(checkpoint, *args, **kwargs):
        def pack(t):
            return t.shape, t.dtype, t.device

        def unpack(packed):
            shape, dtype, device = packed
            return torch.empty(shape, dtype=dtype, device=device)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return checkpoint(*args, **kwargs)

    for module in base.modules():
        if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = functools.partial(offloaded, module._gradient_checkpointing_func)


# --- loading and notes ----------------------------------------------------------------------------------------

def partition_dtype(backend: Backend, *, dtype: torch.dtype, compute: torch.dtype) -> torch.dtype:
    """The dtype of a base loaded or built partitioned: deepspeed.zero.Init makes every parameter it creates in
    the dtype the engine trains in (bf16/fp16 in the DeepSpeed config), whatever the model's dtype; else `dtype`."""
    return compute if backend.loads_partitioned() and _mixed_precision(backend, compute) == "cast" else dtype


def _host_load_peak(cfg: Config, counts: dict, *, backend: Backend, shard: Sharding, dtype: torch.dtype,
                    part_dtype: torch.dtype) -> int:
    """Host memory a rank holds while a random base is built there: to be quantized from (train/run.py takes
    turns) or sharded from by FSDP2 (rank 0 alone, which sends the others their shards); or rank 0's gathered copy
    of a ZeRO-3 base built partitioned (in the partitions' dtype), to write it from."""
    if cfg.model.init_config is None:
        return 0
    quantized = cfg.quantization.bits is not None
    if backend.random_base_on_host(shard, quantized=quantized):
        return counts["base_numel"] * _bytes(dtype)
    if cfg.model.save_init_base and backend.random_base_partitioned(shard, quantized=quantized):
        return counts["base_numel"] * _bytes(part_dtype)
    return 0


def _load_peak(cfg: Config, counts: dict, *, backend: Backend, shard: Sharding, dtype: torch.dtype, world_size: int,
               device: str, part_dtype: torch.dtype) -> int:
    """Bytes a rank holds on its device while the model loads, before any backend shards it. `part_dtype`: the
    dtype of what zero.Init partitions (`partition_dtype`)."""
    full = counts["base_numel"] * _bytes(dtype)
    # partitioned under zero.Init: the rank's partition, and the module being initialised gathered whole
    partition = _div(counts["base_numel"] * _bytes(part_dtype), shard.weights) \
        + counts["largest_gather_numel"] * _bytes(part_dtype)
    quantized = counts["param_bytes"] + counts["quant_state_bytes"] + counts["buffer_bytes"]
    if device == "cuda":
        # from_pretrained reads the file into host memory; what reaches the GPU is the rank's part
        # the whole quantized base on every rank (device_map), each weight quantized from 16 bit on the GPU
        reload = quantized + counts["largest_quantized_numel"] * _bytes(dtype)
        if cfg.model.init_config is not None:
            if backend.random_base_partitioned(shard, quantized=cfg.quantization.bits is not None):
                return partition
            if not backend.random_base_on_host(shard, quantized=cfg.quantization.bits is not None):
                return full  # built whole on the GPU
            # initialised on the GPU one decoder layer at a time into host memory (model/layerwise.py): the GPU
            # holds the embeddings, head and norms and one layer; a quantized run then quantizes it onto the GPU
            layerwise = (counts["base_numel"] - counts["layers_numel"] + counts["largest_layer_numel"]) * _bytes(dtype)
            return max(layerwise, reload) if cfg.quantization.bits is not None else layerwise
        if cfg.quantization.bits is not None:
            return reload
        if shard.weights > 1 and backend.loads_partitioned():
            return _div(counts["base_numel"] * _bytes(part_dtype), shard.weights)  # loaded under zero.Init
        if shard.weights > 1:
            return _div(full, shard.weights)  # fully_shard moves only the rank's shard to the GPU
        return full
    # from_pretrained maps the safetensors file: its pages count as resident while the weights load.
    mapped = full
    if cfg.model.init_config is not None:
        if backend.random_base_partitioned(shard, quantized=cfg.quantization.bits is not None):
            # built under zero.Init (the partition, a module gathered at a time); rank 0 gathers a whole host copy
            # to write the base from (model.save_init_base)
            return partition + (counts["base_numel"] * _bytes(part_dtype) if cfg.model.save_init_base else 0)
        # The random base is built whole in the load dtype (model/build.py); a quantized run keeps it while its
        # quantized copy is loaded from it (model/build.py: quantize_in_memory).
        return full + quantized if cfg.quantization.bits is not None else full
    if cfg.quantization.bits is not None:
        return mapped + quantized  # every rank loads the whole quantized base, whatever the backend
    if shard.weights > 1 and backend.loads_partitioned():
        return _div(counts["base_numel"] * _bytes(part_dtype), shard.weights)  # transformers loads under zero.Init
    return mapped + full


_MIXED = {"autocast": "torch.autocast (fp32 inputs of matmuls cast to {dtype})",
          "cast": "every parameter computes in {dtype}", "none": "{dtype}"}
_ATTENTION = {"sdpa": "sdpa (fused)", "flash": "flash attention or torch varlen (fused, no mask)",
              "flex": "flex attention (fused, a block mask)",
              "eager": "eager (attention matrices kept)"}


def _checkpointing_note(cfg: Config) -> str:
    every, offload = checkpoint_policy(cfg)
    return (", activation checkpointing per decoder layer" if every == 1 else
            f", activation checkpointing on one decoder layer in {every} (the others keep their activations)") + (
        " with their inputs offloaded to the host" if offload else "")


def _notes(cfg: Config, *, backend: Backend, shard: Sharding, counts: dict, batch: int, length: int, checkpointing: bool,
           compute: torch.dtype, load: int, load_dtype: torch.dtype, part_dtype: torch.dtype, optimizer: int,
           world_size: int, attention: str,
           mixed: str, liger: bool, device: str) -> list[str]:
    dtype = str(compute).removeprefix("torch.")
    what = "forward under no_grad: one eval batch" if cfg.training.eval_only else "activations: one micro-batch"
    notes = [f"{what} of {batch} x {length} tokens (batches padded to data.max_length; "
             f"shorter batches need less), {_MIXED[mixed].format(dtype=dtype)}, attention {_ATTENTION[attention]}"
             + (" with the packed rows' block mask" if attention == "sdpa" and cfg.data.packing else "")
             + (", Liger kernels" if liger else "")
             + (_checkpointing_note(cfg) if checkpointing else "")]
    if backend.plain_loss():
        notes.append("loss: the model's own (full logits), as sft_dist uses under FSDP2 with a trainable head")
    else:
        notes.append("loss: TRL's chunked LM head (no full logits; it allocates a tile buffer of up to 4096 tokens "
                     "x 32768 vocab columns whatever the vocabulary: on CPU the columns a smaller vocabulary never "
                     "touches stay out of RSS, on a GPU they are allocated)")
    if shard.offload_optimizer:
        notes.append(f"optimizer state offloaded to host memory: {format_bytes(optimizer)} per rank there, not on "
                     "the device")
    if shard.offload_param:
        notes.append("parameters offloaded to host memory between uses")
    if cfg.training.get("activation_offloading") and not cfg.training.eval_only:
        notes.append("training.activation_offloading: TRL moves the saved activations of 1 KiB or more to pinned host "
                     "memory during forward (a few kept for overlap); counted here on the device, an upper bound")
    if cfg.quantization.bits is not None and shard.weights > 1:
        notes.append(f"{shard.label} with a quantized base: transformers loads the whole {cfg.quantization.bits}-bit "
                     f"base on every rank before it is sharded: {format_bytes(load)} per rank at load")
    quantized = cfg.quantization.bits is not None
    if (cfg.model.init_config is not None and (quantized or device == "cuda")
            and backend.random_base_on_host(shard, quantized=quantized)):
        host = counts["base_numel"] * _bytes(load_dtype)
        from_rank0 = backend.random_base_from_rank0(shard, quantized=quantized) and not counts["persistent_buffers"]
        then = ("quantized from there (no file unless model.save_init_base keeps the base; the ranks of a node take "
                "turns where their copies together would not fit its memory)" if quantized else
                f"sent from there to every rank's shards by {shard.label} (the other ranks build none)" if from_rank0
                else f"sharded from there by {shard.label}")
        gpu = ", initialised on the GPU one decoder layer at a time" if device == "cuda" else ""
        who, each = ("on rank 0", "") if from_rank0 else ("on every rank", " per rank")
        notes.append(f"init_config: the random base is built in host memory {who} ({format_bytes(host)}{each} there"
                     f"{gpu}) and {then}")
    if cfg.model.init_config is not None and backend.random_base_partitioned(shard, quantized=quantized):
        write = (f"; rank 0 gathers a host copy ({format_bytes(counts['base_numel'] * _bytes(part_dtype))}) to write "
                 "base_model from (model.save_init_base)" if cfg.model.save_init_base else "")
        in_dtype = f" in {str(part_dtype).removeprefix('torch.')}" if part_dtype != load_dtype else ""
        notes.append(f"init_config: the random base is built under deepspeed.zero.Init{in_dtype}, each rank holding "
                     f"its partition, each module gathered whole while it is initialised{write}")
    if counts["quantized_numel"]:
        notes.append(f"{counts['quantized_numel']:,} parameters quantized to {cfg.quantization.bits} bits "
                     f"(the embeddings, norms and lm_head stay unquantized, in {counts['unquantized_dtype']}: "
                     "quantization.upcast_unquantized)")
    if world_size > 1 and shard.weights == 1 and shard.gradients == 1 and shard.optimizer == 1:
        notes.append("nothing is sharded: every rank holds the whole model" + (
            "" if cfg.training.eval_only else ", gradients and optimizer state"))
    return notes


def _hints(cfg: Config, facts: Facts, *, activations: int, total: int, checkpointing: bool, batch: int, length: int,
           model, compute: torch.dtype, autocast: bool) -> list[str]:
    """What would lower the peak when activations are most of it, among the switches not already on. `length`: the
    tokens of a row a rank holds (a slice under sequence parallelism)."""
    share = activations / max(1, total)
    if share <= ACTIVATION_SHARE_HINT:
        return []
    out = [f"activations are {share:.0%} of the estimated peak ({format_bytes(activations)} of "
           f"{format_bytes(total)}); to lower them:"]
    base = base_model(model)
    text = base.config.get_text_config()
    layers = int(getattr(text, "num_hidden_layers", 1) or 1)
    if not checkpointing:
        # what stays saved: each decoder layer's input; in backward one layer's activations exist at a time
        kept = layers * batch * length * int(getattr(text, "hidden_size", 0) or 0) * _bytes(compute)
        full = kept + activations // layers
        out.append(f"training.activation_checkpointing: true keeps only each decoder layer's input for backward "
                   f"(about {format_bytes(full)} instead of {format_bytes(activations)}) and "
                   "recomputes the rest, for about a third more compute per step"
                   + (f"; with activation_checkpointing_kwargs: {{every_n_layers: 2}} on half the layers (about "
                      f"{format_bytes((full + activations) // 2)}, a sixth more compute)" if layers > 1 else ""))
    if batch > 1:
        smaller, accum = batch // 2, facts.grad_accum * 2
        out.append(f"training.per_device_train_batch_size: {smaller} with gradient_accumulation_steps: {accum} keeps "
                   f"the global batch of {facts.global_batch} sequences and about halves the activations"
                   + ("" if batch % 2 == 0 else " (a slightly smaller global batch: the micro-batch is odd)"))
    more = _more_sequence_parallel(facts)
    if more:
        out.append(f"backend.sequence_parallel_size: {more} splits every row over {more} workers (slices of "
                   f"{-(-facts.max_length // more)} tokens): about {format_bytes(activations * facts.sequence_parallel // more)} "
                   f"of activations, for {facts.world_size // more} data-parallel group(s) and two all-to-alls per "
                   "layer")
    masks = _dropout_mask_bytes(model, tokens=batch * length)
    if masks:
        out.append(f"lora.dropout: 0 (peft's own default) spares the dropout mask every adapted layer keeps for "
                   f"backward (about {format_bytes(masks)}) and a pass over each adapted layer's input"
                   + (", and under autocast the adapters read their 16-bit input as it is (a live dropout keeps "
                      "peft's fp32 copy, and autocast a 16-bit copy of that for backward)" if autocast and
                      cfg.lora.fused_forward and not cfg.lora.use_dora else ""))
    if not facts.packing:
        out.append("data.packing: true fills every row with whole documents, so a smaller micro-batch carries as "
                   "many tokens per step as padded rows do")
    if facts.device == "cuda" and _liger(cfg, model, device=facts.device) is None and \
            getattr(text, "model_type", None) in _LIGER_MODEL_TYPES:
        out.append("Liger's kernels (pip install liger-kernel where the GPUs are; training.use_liger_kernel unset "
                   "applies them where installed, true insists) keep 16-bit norm inputs and the two MLP projections "
                   "instead of fp32 copies and the activation (measured on an H200: 35.2 -> 29.1 GiB for a 1.5B "
                   "Llama shape)")
    return out if len(out) > 1 else []


def _padded_heads_bytes(cfg: Config, config, heads, *, batch: int, rows: int, compute, checkpointing, train: bool) -> int:
    """What a sequence-parallel head layout (model/ulysses.py Heads) adds to the profiled slice: the zero query
    heads' q and output and the added k/v heads' k and v, over the whole rows, kept for the backward by every layer
    (a recomputed layer's only while it is recomputed; one layer's at a time in an evaluation)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    q = (heads.padded - heads.heads) / heads.size  # per rank, beyond an even split of the model's heads
    kv = (heads.kv_padded * heads.repeat - heads.kv) / heads.size
    if not q and not kv:
        return 0
    dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    layer = int(batch * rows * dim * _bytes(compute) * 2 * (q + kv))
    if not train:
        return layer
    layers = int(text.num_hidden_layers)
    if checkpointing:  # every n-th layer recomputed (checkpoint_policy), the others keep theirs
        layers = layers - -(-layers // checkpoint_policy(cfg)[0]) + 1
    return layer * layers


def _more_sequence_parallel(facts: Facts) -> int | None:
    """The next sequence-parallel size (twice the current) that the workers allow; None on one worker or where
    none is left. Attention heads it does not divide are padded (model/ulysses.py Heads), so they do not limit it."""
    size = facts.sequence_parallel * 2
    if facts.eval_only or facts.world_size % size:
        return None
    return size


def _dropout_mask_bytes(model, *, tokens: int) -> int:
    """What LoRA dropout keeps for backward in one micro-batch: a 1-byte mask over each adapted layer's input
    (the dropped input itself replaces the input the adapter would keep anyway)."""
    total = 0
    for m in model.modules():
        drop = getattr(m, "lora_dropout", None)
        if drop is not None and hasattr(drop, "values"):
            total += sum(tokens * int(m.in_features) for d in drop.values() if getattr(d, "p", 0) > 0)
    return total


def _div(x: int, n: int) -> int:
    return -(-x // n)


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
