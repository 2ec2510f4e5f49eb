"""Build the causal LM: from a checkpoint (`from_pretrained`) or from a config dict (random, seeded)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
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


def resolve_precision(training: Mapping[str, Any], *, device: str) -> dict:
    """bf16/fp16 only when asked, or bf16 on GPUs that support it. TRL's SFTConfig defaults bf16=True,
    which on CPU would silently train under bf16 autocast; never let that default through."""
    if "bf16" in training or "fp16" in training:
        return {"bf16": bool(training.get("bf16", False)), "fp16": bool(training.get("fp16", False))}
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    return {"bf16": bf16, "fp16": False}


def build_model(
    cfg: ModelConfig,
    *,
    quant: QuantizationConfig,
    tokenizer,
    dtype: torch.dtype,
    seed: int,
    device: str,
    to_device: bool = False,
    compute_dtype: torch.dtype | None = None,
    random_base: str = "device",
):
    """The model to train: seeded random weights from `init_config`, or `from_pretrained`, with the attention
    implementation chosen (`attention.choose`) and the embedding fitted to the tokenizer (`fit_vocab`).
    `to_device`: load a checkpoint's weights straight onto this rank's GPU (where every rank holds the whole
    model anyway) instead of into host memory first. `compute_dtype`: the training's 16-bit dtype (bf16/fp16)
    when fp32 weights compute in it, which lets `auto` pick a 16-bit attention kernel for them. `random_base`:
    where an `init_config` base is built (RANDOM_BASE)."""
    from transformers import AutoModelForCausalLM

    from sft_dist.model import attention

    if cfg.init_config is not None:
        model = _from_config(cfg, tokenizer=tokenizer, dtype=dtype, seed=seed, device=device,
                             attn_dtype=attention_dtype(dtype, compute_dtype), random_base=random_base)
        fit_vocab(model, tokenizer, where="model.init_config")
        return model
    kwargs: dict[str, Any] = dict(
        dtype=dtype,
        trust_remote_code=cfg.trust_remote_code,
        revision=cfg.revision,
    )
    config = _pretrained_config(cfg)
    cls = attention.causal_lm_class(config)
    choice = attention.choose(cfg.attn_implementation, cls, model_type=getattr(config, "model_type", None),
                              device=device, dtype=attention_dtype(dtype, compute_dtype), config=config)
    if cls is not None or cfg.attn_implementation not in (None, "auto"):
        kwargs["attn_implementation"] = choice.name
    if quant.bits is not None:
        kwargs["quantization_config"] = bnb_config(quant, dtype=dtype)
    if device == "cuda" and (quant.bits is not None or to_device):
        kwargs["device_map"] = {"": target_device(device).index}
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        if "attn_implementation" in str(e):
            raise ConfigError(f"{attention.KEY}: {cfg.attn_implementation!r}: {str(e).splitlines()[0]}") from None
        raise SftDistError(f"model.name_or_path: cannot load {cfg.name_or_path!r}: {e}") from None
    if "attn_implementation" not in kwargs:
        choice = attention.Choice(model.config._attn_implementation, "auto: remote-code model, transformers' default")
    log.info(choice.describe())
    fit_vocab(model, tokenizer, where="model.name_or_path")
    if quant.bits == 4 and device == "cpu":
        keep_4bit_layout(model)
    return model


def keep_4bit_layout(model) -> None:
    """bitsandbytes 0.50 repacks a 4-bit weight into a CPU-specific layout at the first no-grad forward (an
    evaluation, a generation) on CPUs with AVX512-BF16, and converts it back in `state_dict()`: the conversion
    fails on ZeRO-3's partitioned weights ("packed_weight should be [N, K/2]") and makes results depend on the
    CPU model. Keep the layout the weights were loaded in (the same numbers on every CPU)."""
    for m in model.modules():
        if getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False


def _pretrained_config(cfg: ModelConfig):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code,
                                          revision=cfg.revision)
    except (OSError, ValueError) as e:
        raise SftDistError(f"model.name_or_path: cannot load {cfg.name_or_path!r}: {e}") from None


def quantize_in_memory(model, *, quant: QuantizationConfig, dtype: torch.dtype, device: str):
    """`model` (random weights in the load dtype) loaded again through transformers' bitsandbytes quantizer from
    memory: the weights a `from_pretrained` of its saved copy would give, without writing and reading the file
    (16 GB for an 8B shape in bf16). Returns (quantized, host): the unquantized model is on the host (built there
    layer by layer: build_model's `random_base="host"`; else moved there first), 2 bytes a parameter in bf16, so the GPU
    never holds it whole next to the quantized one, and it stays there for the base to be written from."""
    host = model.to("cpu")
    kwargs: dict[str, Any] = dict(config=host.config, state_dict=dict(host.state_dict()), dtype=dtype,
                                  quantization_config=bnb_config(quant, dtype=dtype),
                                  attn_implementation=host.config._attn_implementation)
    if device == "cuda":
        kwargs["device_map"] = {"": target_device(device).index}
    # The concrete class: the Auto class needs a path; state_dict stands for the file.
    quantized = type(host).from_pretrained(None, **kwargs)
    if quant.bits == 4 and device == "cpu":
        keep_4bit_layout(quantized)
    return quantized, host


def attention_dtype(dtype: torch.dtype, compute_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype attention computes in: the weights', or the 16-bit training dtype fp32 weights are cast to
    (autocast, FSDP2's param_dtype, DeepSpeed's bf16)."""
    return compute_dtype if compute_dtype in (torch.bfloat16, torch.float16) else dtype


# Where a rank builds an `init_config` base (train/run.py: the strategy decides):
RANDOM_BASE = {
    "device": "whole on the device, where it trains (DDP, ZeRO-1/2, one rank)",
    "host": "initialised on the device one decoder layer at a time into host memory (model/layerwise.py): to be "
            "quantized from there, or sharded from there by FSDP2",
    "send": "as `host`, on the rank FSDP2 sends every rank's shards from (rank 0)",
    "receive": "only the buffers: FSDP2 fills the parameters from rank 0's (left uninitialised on the host)",
    "partitioned": "under deepspeed.zero.Init, each rank holding its partition; each module gathered in turn while "
                   "transformers initialises it on rank 0 (ZeRO-3)",
}


def _from_config(cfg: ModelConfig, *, tokenizer, dtype: torch.dtype, seed: int, device: str,
                 attn_dtype: torch.dtype, random_base: str = "device"):
    from transformers import AutoConfig

    from sft_dist.model import attention

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
    choice = attention.choose(cfg.attn_implementation, attention.causal_lm_class(config), model_type=model_type,
                              device=device, dtype=attn_dtype, config=config)
    log.info(choice.describe())
    if random_base not in RANDOM_BASE:
        raise ValueError(f"random_base: {random_base!r} is not one of {sorted(RANDOM_BASE)}")
    if random_base == "partitioned":
        model = _init_partitioned(config, dtype=dtype, seed=seed, device=target_device(device), attn=choice.name)
        model.sft_dist_random_base = random_base
        return model
    # On a CPU the host is the device: the same code path, the same weights, nothing moves.
    host = None if random_base == "device" else torch.device("cpu")
    if random_base == "receive":
        log.info("model.init_config: the weights come from rank 0 as FSDP2 shards them: only the buffers are built here")
    elif host is not None and device == "cuda":
        log.info("model.init_config: initialised on the GPU one decoder layer at a time into host memory (the GPU "
                 "never holds the base whole)")
    with without_zero3_init():
        model = init_random(config, dtype=dtype, seed=seed, device=target_device(device), attn=choice.name, host=host,
                            weights=random_base != "receive")
    kept = persistent_buffers(model)
    if random_base == "send" and kept:
        log.info("model.init_config: %s has persistent buffers (%s, ...), which FSDP2's load from rank 0 does not take: "
                 "every rank built the random base", type(model).__name__, kept[0])
    # what this rank did: a model FSDP2 cannot fill from rank 0 was built here (`host`, as every rank)
    model.sft_dist_random_base = "host" if random_base in ("send", "receive") and kept else random_base
    return model


def _init_partitioned(config, *, dtype: torch.dtype, seed: int, device: torch.device, attn: str | None):
    """ZeRO-3: the seeded random base built by transformers under deepspeed.zero.Init (each rank keeps its
    partition from the start; no rank holds the model whole) and initialised module by module, each gathered while
    rank 0 draws into it (`initialize_weights_zero3`) and partitioned again: the same draws in the same order as the
    whole build, so the same weights as DDP's (tests/e2e/test_backends.py)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        raise RuntimeError("a partitioned random base needs the run's ZeRO-3 config to be active (TrainingArguments)")
    kwargs = {"attn_implementation": attn} if attn else {}
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    model.tie_weights()
    log.info("model.init_config: built under deepspeed.zero.Init, each rank holding its partition")
    return model


def persistent_buffers(model) -> list[str]:
    """The buffers a model's state dict holds. FSDP2's load from rank 0 (accelerate's cpu_ram_efficient_loading)
    takes only sharded parameters, so a model with any is built on every rank (the same answer on every rank:
    it depends on the architecture only)."""
    names = set(model.state_dict())
    return [n for n, _ in model.named_buffers() if n in names]


def target_device(device: str) -> torch.device:
    """This rank's device: its own GPU (set by init_distributed) or the CPU."""
    if device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_random(config, *, dtype: torch.dtype, seed: int, device: torch.device, attn: str | None = None,
                host: torch.device | None = None, weights: bool = True):
    """Seeded random weights, built where they are used: allocated on `device` in `dtype` with torch's default
    init switched off, then initialised once by the model's own `_init_weights` (normal(0, initializer_range)
    weights, unit norms, RoPE buffers). The same seed on the same device type gives the same weights, on every
    rank, without a broadcast; a CPU and a GPU draw different numbers from the same seed.

    transformers' `from_config` builds on the CPU and initialises every linear layer twice (torch's kaiming
    init, then `_init_weights`); seen on a GPU machine: 45 s for a 1.5B model, over 4 minutes for 8B (with the
    base saved). The draws differ from that path's, so a seed gives other (equally distributed) weights.

    `host`: initialise one decoder layer at a time on `device` and keep the model on `host` (model/layerwise.py):
    the same weights, while the device holds one layer at a time. `weights=False` (with `host`): only the buffers
    are made, the parameters left uninitialised on `host` (a rank FSDP2 fills from rank 0's; model/layerwise.py)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    kwargs = {"attn_implementation": attn} if attn else {}
    # The caller's RNG streams are left as they were; a model drawing in its constructor draws from `seed` too.
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device if host is None else "meta"), no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
        if not weights and persistent_buffers(model):
            weights = True  # see persistent_buffers: this rank builds its weights after all
        if host is None:
            model.initialize_weights()
        else:
            from sft_dist.model.layerwise import init_layerwise

            init_layerwise(model, device=device, host=host, weights=weights)
    model.tie_weights()
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


SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")


def fit_vocab(model, tokenizer, *, where: str) -> None:
    """Fit the model to the tokenizer before training: an embedding with fewer rows than the tokenizer has
    tokens is resized (its new rows start at the mean of the old ones; `model.sft_dist_resized` records it
    for `apply_lora`, which refuses new rows LoRA would leave frozen); a special token id or a config id
    outside the embedding is an error naming the token and the id."""
    if tokenizer is None:
        return
    weight = model.get_input_embeddings().weight
    rows = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 loads partitioned: a 0-row placeholder here
    n = len(tokenizer)
    if n > rows:
        if hasattr(weight, "ds_shape"):
            raise SftDistError(
                f"model.tokenizer has {n} tokens but the model's embedding has only {rows} rows, and under ZeRO-3 "
                "the loaded embedding is partitioned: use the model's own tokenizer, or resize the embedding "
                "(resize_token_embeddings) and save the model before training")
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is weight
        model.resize_token_embeddings(n, mean_resizing=True)
        model.sft_dist_resized = (rows, n)
        log.info("model: the tokenizer has %d tokens and the embedding had %d rows: resized the embedding%s to %d "
                 "rows; the %d new rows start at the mean of the old ones", n, rows,
                 "" if head is None else " (tied to the output head)" if tied else " and the output head", n, n - rows)
        rows = n
    for attr in SPECIAL:
        token = getattr(tokenizer, attr, None)
        if token is None:
            continue
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id >= rows:
            raise SftDistError(f"model.tokenizer: {attr} {token!r} has id {token_id}, outside the model's "
                               f"embedding of {rows} rows (ids 0..{rows - 1}); use the model's own tokenizer")
    for file, config in (("config.json", model.config), ("generation_config.json",
                                                         getattr(model, "generation_config", None))):
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(config, name, None) if config is not None else None
            for token_id in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(token_id, int) and token_id >= rows:  # (some configs mark "none" with -1)
                    origin = where if where == "model.init_config" else f"{where} ({file})"
                    raise SftDistError(f"{origin}: {name}={token_id} is outside the model's embedding of {rows} "
                                       f"rows (ids 0..{rows - 1}); set it to a token id below {rows} (the "
                                       f"tokenizer's {name} is {getattr(tokenizer, name, None)})")


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


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts: full sizes, also of weights ZeRO-3 loaded partitioned (a 0-element
    placeholder on each rank, the real size in `ds_numel`)."""

    def numel(p) -> int:
        return getattr(p, "ds_numel", None) or p.numel()

    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    return trainable, total
