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


@pytest.mark.parametrize("family", FAMILIES)
def test_a_rank_that_receives_its_weights_builds_only_the_buffers(family):
    """`weights=False` (FSDP2 fills the rank's shards from rank 0): every parameter is an uninitialised host tensor
    of its shape and dtype (a distinct one: accelerate maps parameters by data pointer), ties kept, and the buffers
    (RoPE's frequencies: FSDP2 does not send them) are those of the whole build."""
    cpu = torch.device("cpu")
    whole = init_random(config(family), dtype=torch.bfloat16, seed=7, device=cpu)
    empty = init_random(config(family), dtype=torch.bfloat16, seed=7, device=cpu, host=cpu, weights=False)
    params = dict(empty.named_parameters(remove_duplicate=False))
    assert params and all(p.device == cpu for p in params.values())
    assert len({p.data_ptr() for p in params.values()}) == len({id(p) for p in params.values()})
    want = dict(whole.named_parameters(remove_duplicate=False))
    assert {k: (p.shape, p.dtype) for k, p in params.items()} == {k: (p.shape, p.dtype) for k, p in want.items()}
    buffers, ref = dict(empty.named_buffers()), dict(whole.named_buffers())
    assert buffers.keys() == ref.keys()
    assert all(not b.is_meta and torch.equal(b, ref[k]) for k, b in buffers.items())
    tied = whole.lm_head.weight is whole.get_input_embeddings().weight
    assert (empty.lm_head.weight is empty.get_input_embeddings().weight) == tied


def test_a_model_with_persistent_buffers_is_built_whole_even_when_weights_would_come_from_rank_0():
    """FSDP2's load from rank 0 takes sharded parameters only: a state dict holding buffers (DeepSeek V3's expert
    score correction bias) makes every rank build its weights."""
    from sft_dist.model.build import persistent_buffers

    cfg = AutoConfig.for_model("deepseek_v3", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                               num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4,
                               num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                               topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=16,
                               qk_rope_head_dim=8, v_head_dim=16, vocab_size=512)
    cpu = torch.device("cpu")
    model = init_random(cfg, dtype=torch.float32, seed=7, device=cpu, host=cpu, weights=False)
    assert persistent_buffers(model)
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(model.lm_head.weight, init_random(cfg, dtype=torch.float32, seed=7, device=cpu).lm_head.weight)
