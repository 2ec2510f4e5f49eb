"""A random base initialised one decoder layer at a time (model/layerwise.py): the same bits as the model built
whole, for every architecture family sft_dist ships presets for, and only one layer allocated at a time."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from sft_dist.model.build import init_random

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=512)
FAMILIES = {
    "llama": dict(model_type="llama"),
    "llama_tied": dict(model_type="llama", tie_word_embeddings=True),
    "qwen2_tied": dict(model_type="qwen2", tie_word_embeddings=True),
    "gemma2": dict(model_type="gemma2", head_dim=16),
    "phi3": dict(model_type="phi3", pad_token_id=0, eos_token_id=1, bos_token_id=1),
    "qwen3_moe": dict(model_type="qwen3_moe", moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(model_type="gpt_oss", intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                    head_dim=16),
}


def config(name: str):
    init = {**SMALL, **FAMILIES[name]}
    return AutoConfig.for_model(init.pop("model_type"), **init)


def tensors(model) -> dict[str, torch.Tensor]:
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))  # RoPE's inv_freq and other non-persistent buffers
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_init_gives_the_weights_of_the_whole_build_bit_for_bit(family, dtype):
    cpu = torch.device("cpu")
    whole = init_random(config(family), dtype=dtype, seed=7, device=cpu)
    layered = init_random(config(family), dtype=dtype, seed=7, device=cpu, host=cpu)
    a, b = tensors(whole), tensors(layered)
    assert a.keys() == b.keys()
    assert not [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert all(t.device == cpu for t in b.values())
    tied = whole.lm_head.weight is whole.get_input_embeddings().weight
    assert (layered.lm_head.weight is layered.get_input_embeddings().weight) == tied
    other = init_random(config(family), dtype=dtype, seed=8, device=cpu, host=cpu)
    assert not torch.equal(other.lm_head.weight, layered.lm_head.weight)  # the seed is what decides


@pytest.mark.parametrize("family", FAMILIES)
def test_only_one_decoder_layer_is_allocated_before_it_moves_to_the_host(family, monkeypatch):
    """When a layer moves to the host, the layers after it are still on the meta device (not yet allocated)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from sft_dist.model.layerwise import init_layerwise

    with torch.device("meta"), no_init_weights():
        model = AutoModelForCausalLM.from_config(config(family))
    layers = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
    seen = []
    move = torch.nn.Module.to

    def to(module, *args, **kwargs):
        if module in layers:
            seen.append((layers.index(module), [next(m.parameters()).is_meta for m in layers]))
        return move(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    init_layerwise(model, device=torch.device("cpu"), host=torch.device("cpu"))
    assert [i for i, _ in seen] == [0, 1, 2]  # each layer moved once, in order, as soon as it was initialised
    for i, meta in seen:
        assert meta == [False] * (i + 1) + [True] * (2 - i)
    assert not any(t.is_meta for t in tensors(model).values())
