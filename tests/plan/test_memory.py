"""The memory estimate against real models built on CPU, and its sharding / checkpointing / optimizer rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sft_dist.config.load import load_config
from sft_dist.model.build import build_model, load_pretrained, resolve_dtype
from sft_dist.model.lora import apply_lora
from sft_dist.model.tokenizer import build_tokenizer
from sft_dist.plan.memory import estimate_memory
from tests.conftest import QUICKSTART, backend

# Big enough that every LoRA / linear tensor passes bitsandbytes' 4096-element minimum for 8-bit optimizer state.
WIDE = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256}


def config(*overrides: str):
    return load_config(QUICKSTART, list(overrides))


def real_model(cfg, tmp_path: Path | None = None):
    """The model the run would train (LoRA applied; quantized by reloading the saved random base)."""
    tok = build_tokenizer(cfg.model)
    dtype = resolve_dtype(cfg.model.dtype, device="cpu", lora=cfg.lora.enabled)
    model = build_model(cfg.model, quant=cfg.quantization, tokenizer=tok, dtype=dtype, seed=0, device="cpu")
    if cfg.quantization.bits is not None:
        model.save_pretrained(tmp_path)
        model = load_pretrained(str(tmp_path), quant=cfg.quantization, dtype=dtype, device="cpu", attn="sdpa")
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, quantized=cfg.quantization.bits is not None)
    return model


def held_bytes(model) -> int:
    """Parameters + buffers + bitsandbytes quantization state, as held in memory."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            parts = [qs.absmax, getattr(qs, "offset", None)]
            if getattr(qs, "state2", None) is not None:
                parts += [qs.state2.absmax, qs.state2.code]
            total += sum(t.numel() * t.element_size() for t in parts if torch.is_tensor(t))
    return total


def test_counts_match_the_real_lora_model():
    cfg = config()
    model = real_model(cfg)
    e = estimate_memory(cfg, world_size=1, device="cpu")
    assert e.detail["total_params"] == sum(p.numel() for p in model.parameters())
    assert e.detail["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert e.weights == held_bytes(model)
    assert e.lora == sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert e.gradients == e.lora
    assert e.optimizer == 2 * e.lora  # adamw: exp_avg and exp_avg_sq, fp32


def test_counts_match_the_real_4bit_model(tmp_path):
    cfg = config("quantization.bits=4", "lora.modules_to_save=null")
    model = real_model(cfg, tmp_path)
    e = estimate_memory(cfg, world_size=1, device="cpu")
    from bitsandbytes.nn import Linear4bit

    layers = [m for m in model.modules() if type(m) is Linear4bit]  # not peft's LoRA wrapper of the same name
    assert layers
    assert e.detail["quantized_params"] == sum(m.in_features * m.out_features for m in layers)
    assert e.detail["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert e.weights == pytest.approx(held_bytes(model), rel=0.02)
    # the LM head and embeddings stay fp32: the 4-bit model is far from 1/8 of the fp32 one
    assert e.detail["param_bytes"] == sum(p.numel() * p.element_size() for p in model.parameters())


def test_local_directory_gives_the_same_counts(tmp_path):
    cfg = config()
    tok = build_tokenizer(cfg.model)
    build_model(cfg.model, quant=cfg.quantization, tokenizer=tok, dtype=torch.float32, seed=0,
                device="cpu").save_pretrained(tmp_path)
    from_dir = estimate_memory(config("model.init_config=null", f"model.name_or_path={tmp_path}"),
                               world_size=1, device="cpu")
    from_init = estimate_memory(cfg, world_size=1, device="cpu")
    assert from_dir.detail["total_params"] == from_init.detail["total_params"]
    assert from_dir.weights == from_init.weights


@pytest.fixture(scope="module")
def full_ft():
    """Full fine-tuning estimates of one model under each backend, 4 workers."""
    base = ["lora.enabled=false", "lora.modules_to_save=null"]
    names = {"ddp": "ddp", "zero1": "zero1", "zero2": "zero2", "zero3": "zero3", "fsdp": "full_shard"}
    return {k: estimate_memory(config(*base, *backend(v)), world_size=4, device="cpu") for k, v in names.items()}


def test_sharding_divides_what_each_backend_shards(full_ft):
    ddp = full_ft["ddp"]
    params = ddp.detail["trainable_params"]
    master = -(-params * 4 // 4)  # DeepSpeed's fp32 copy of its trainable partition
    z1, z2, z3, fsdp = (full_ft[k] for k in ("zero1", "zero2", "zero3", "fsdp"))
    assert (z1.weights, z1.gradients) == (ddp.weights, ddp.gradients)
    assert z1.optimizer == -(-ddp.optimizer // 4) + master
    assert z2.weights == ddp.weights
    assert z2.gradients == -(-ddp.gradients // 4)
    assert z2.optimizer == z1.optimizer
    assert z3.weights == -(-ddp.weights // 4)
    assert (z3.gradients, z3.optimizer) == (z2.gradients, z2.optimizer)
    assert fsdp.weights == z3.weights and fsdp.gradients == z3.gradients
    assert fsdp.optimizer == -(-ddp.optimizer // 4)  # no master copy: FSDP2 steps the fp32 shards themselves
    assert ddp.total > z1.total > z2.total
    held = {k: e.weights + e.gradients + e.optimizer for k, e in full_ft.items()}
    assert held["zero3"] < held["zero2"]  # (z3's total adds a gathered layer, which a tiny model can outweigh)


def test_activation_checkpointing_lowers_activations():
    over = [f"model.init_config={json.dumps(WIDE)}", "training.per_device_train_batch_size=4"]
    plain = estimate_memory(config(*over), world_size=1, device="cpu")
    ckpt = estimate_memory(config(*over, "training.activation_checkpointing=true"), world_size=1, device="cpu")
    assert ckpt.activations < plain.activations / 2
    assert ckpt.total < plain.total
    assert ckpt.weights == plain.weights


def test_8bit_optimizer_holds_a_quarter_of_adamw():
    over = [f"model.init_config={json.dumps(WIDE)}", "lora.enabled=false", "lora.modules_to_save=null"]
    adamw = estimate_memory(config(*over), world_size=1, device="cpu")
    bnb8 = estimate_memory(config(*over, "training.optim=adamw_bnb_8bit"), world_size=1, device="cpu")
    assert adamw.optimizer == 8 * adamw.detail["trainable_params"]
    assert 3.5 < adamw.optimizer / bnb8.optimizer <= 4.0


def test_activations_scale_with_the_micro_batch():
    one = estimate_memory(config("training.per_device_train_batch_size=1"), world_size=1, device="cpu")
    four = estimate_memory(config("training.per_device_train_batch_size=4"), world_size=1, device="cpu")
    assert four.activations == pytest.approx(4 * one.activations, rel=0.1)
    assert four.weights == one.weights
