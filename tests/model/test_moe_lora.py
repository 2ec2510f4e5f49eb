"""LoRA on MoE models: the projections named (the Qwen3-MoE preset's choice) adapt attention and the fused experts
and leave the routers frozen; `lora.exclude_modules` is peft's. Checked on Qwen3-MoE (the preset's published
config, shrunk) and Mixtral (built from its defaults)."""

from __future__ import annotations

import pytest
import torch

from sft_dist.config.schema import LoraConfig
from sft_dist.model.lora import apply_lora, moe_routers
from tests.presets.presets import FIXTURES, tiny_config


def tiny(kind: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    if kind == "qwen3_moe":
        raw = tiny_config(FIXTURES / "qwen3-30b-a3b", vocab_size=256,
                          special_ids={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
        raw.pop("torch_dtype", None)
        config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    else:
        config = AutoConfig.for_model("mixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                      num_experts_per_tok=2, vocab_size=256)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def adapted(model) -> set[str]:
    """Module paths (layer 0) that got a LoRA A matrix, e.g. {'self_attn.q_proj', 'mlp.experts', ...}."""
    names = set()
    for n, _ in model.named_parameters():
        if ".lora_A" in n and ".layers.0." in n:
            names.add(n.split(".layers.0.")[1].split(".lora_A")[0].removesuffix(".base_layer"))
    return names


PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIXTRAL = ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]  # Mixtral's experts' pre-fusion names


@pytest.mark.parametrize("kind, names", [("qwen3_moe", PROJECTIONS), ("mixtral", MIXTRAL)])
def test_the_projections_by_name_adapt_attention_and_experts_but_not_the_router(kind, names):
    """peft maps "all-linear" on transformers 5 MoE models to what it matched on v4, the routers included (the
    log line says so); naming the projections (the experts' pre-fusion names) keeps routing frozen."""
    model = tiny(kind)
    routers = moe_routers(model)
    assert len(routers) == 2 and all(r.endswith(".gate") for r in routers), routers  # one per layer
    got = adapted(apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=names)))
    assert {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"} <= got
    assert any("experts" in n for n in got), got
    assert not any(n.endswith("gate") for n in got), got
    assert "mlp.gate" in adapted(apply_lora(tiny(kind), LoraConfig(r=4, alpha=8, dropout=0.0)))  # all-linear


def test_exclude_modules_is_honoured():
    got = adapted(apply_lora(tiny("qwen3_moe"), LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=PROJECTIONS,
                                                            exclude_modules=["o_proj"])))
    assert "self_attn.o_proj" not in got and "self_attn.q_proj" in got


def test_dense_models_have_no_routers():
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64))
    assert moe_routers(model) == []
