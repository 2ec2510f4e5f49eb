"""Build the causal LM: from a checkpoint (`from_pretrained`) or from a config dict (random, seeded)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from sft_dist.config.schema import ModelConfig, QuantizationConfig
from sft_dist.errors import ConfigError, SftDistError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, *, device: str, lora: bool) -> torch.dtype:
    """`auto`: fp32 on CPU and for full fine-tuning (the optimizer needs fp32 master weights);
    bf16 for a frozen LoRA base on GPUs that support it."""
    if name != "auto":
        return DTYPES[name]
    if device == "cuda" and lora and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def build_model(
    cfg: ModelConfig,
    *,
    quant: QuantizationConfig,
    tokenizer,
    dtype: torch.dtype,
    seed: int,
    device: str,
):
    from transformers import AutoModelForCausalLM

    if cfg.init_config is not None:
        return _from_config(cfg, tokenizer=tokenizer, dtype=dtype, seed=seed)
    kwargs: dict[str, Any] = dict(
        dtype=dtype,
        trust_remote_code=cfg.trust_remote_code,
        revision=cfg.revision,
    )
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if quant.bits is not None:
        kwargs["quantization_config"] = bnb_config(quant, dtype=dtype)
        if device == "cuda":
            import os

            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        raise SftDistError(f"model.name_or_path: cannot load {cfg.name_or_path!r}: {e}") from None
    _check_vocab(model, tokenizer)
    return model


def load_pretrained(path: str, *, quant: QuantizationConfig, dtype: torch.dtype, device: str, attn: str | None):
    """Reload a saved base (e.g. a seeded random init written by rank 0) with quantization applied."""
    cfg = ModelConfig(name_or_path=path, attn_implementation=attn)
    return build_model(cfg, quant=quant, tokenizer=None, dtype=dtype, seed=0, device=device)


def _from_config(cfg: ModelConfig, *, tokenizer, dtype: torch.dtype, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    init = dict(cfg.init_config)
    model_type = init.pop("model_type")
    init.setdefault("vocab_size", len(tokenizer))
    if init["vocab_size"] < len(tokenizer):
        raise ConfigError(
            f"model.init_config.vocab_size: got {init['vocab_size']}, but the tokenizer has {len(tokenizer)} tokens; "
            f"set it to at least {len(tokenizer)} (or leave it out)"
        )
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        init.setdefault(name, getattr(tokenizer, name))
    try:
        config = AutoConfig.for_model(model_type, **init)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.init_config: {e}") from None
    if cfg.attn_implementation:
        config._attn_implementation = cfg.attn_implementation
    # Same seed on every rank: identical initial weights without a broadcast.
    with torch.random.fork_rng(devices=[]), without_zero3_init():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


@contextlib.contextmanager
def without_zero3_init():
    """Build a random-init model whole, even when a ZeRO-3 config is active (transformers would build it
    under `deepspeed.zero.Init`, with a different init and partitioned weights). The seeded weights are then
    the same as under DDP, rank 0 can save them as the base, and DeepSpeed partitions them at engine start."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _check_vocab(model, tokenizer) -> None:
    if tokenizer is None:
        return
    weight = model.get_input_embeddings().weight
    n = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 loads partitioned: a 0-row placeholder here
    if n < len(tokenizer):
        raise SftDistError(
            f"model.tokenizer has {len(tokenizer)} tokens but the model's embedding has only {n} rows; "
            "use the model's own tokenizer"
        )


def bnb_config(quant: QuantizationConfig, *, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    compute = dtype if quant.compute_dtype == "auto" else DTYPES[quant.compute_dtype]
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    storage = {"uint8": torch.uint8, **DTYPES}[quant.quant_storage] if quant.quant_storage != "auto" else torch.uint8
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=storage,
    )


def for_backend(quant: QuantizationConfig, *, backend: str, dtype: torch.dtype) -> QuantizationConfig:
    """`quant_storage: auto` resolved: FSDP2 shards floating tensors only (4-bit weights packed in uint8 would
    stay whole on every rank), so under FSDP the 4-bit weights are packed in the model's own dtype."""
    import dataclasses

    if quant.quant_storage != "auto":
        return quant
    storage = str(dtype).removeprefix("torch.") if backend == "fsdp" else "uint8"
    return dataclasses.replace(quant, quant_storage=storage)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts: full sizes, also of weights ZeRO-3 loaded partitioned (a 0-element
    placeholder on each rank, the real size in `ds_numel`)."""

    def numel(p) -> int:
        return getattr(p, "ds_numel", None) or p.numel()

    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    return trainable, total
