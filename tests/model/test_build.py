"""Model building: seeded random init, the real from_pretrained on a local directory, LoRA wrapping."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from sft_dist.config.load import builtin_path
from sft_dist.config.schema import LoraConfig, ModelConfig, QuantizationConfig
from sft_dist.errors import ConfigError
from sft_dist.model.build import build_model, count_parameters, resolve_dtype
from sft_dist.model.lora import apply_lora
from sft_dist.model.tokenizer import build_tokenizer

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))


def make(tok, seed=0, **init):
    cfg = ModelConfig(init_config={**TINY, **init}, tokenizer=str(builtin_path("tokenizer")))
    return build_model(cfg, quant=QuantizationConfig(), tokenizer=tok, dtype=torch.float32, seed=seed, device="cpu")


def test_init_config_is_seeded_and_sized_to_the_tokenizer(tok):
    a, b, c = make(tok, seed=1), make(tok, seed=1), make(tok, seed=2)
    assert a.config.vocab_size == len(tok) == 1024
    assert a.config.eos_token_id == tok.eos_token_id
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])


def test_vocab_smaller_than_tokenizer_is_an_error(tok):
    with pytest.raises(ConfigError, match="vocab_size: got 100, but the tokenizer has 1024 tokens"):
        make(tok, vocab_size=100)


def test_from_pretrained_local_dir_round_trip(tmp_path, tok):
    model = make(tok, seed=5)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg = ModelConfig(name_or_path=str(tmp_path / "m"))
    loaded = build_model(cfg, quant=QuantizationConfig(), tokenizer=build_tokenizer(cfg), dtype=torch.float32,
                         seed=0, device="cpu")
    x = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.allclose(model(x).logits, loaded(x).logits)


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_all_linear_wraps_every_projection(tok, use_dora):
    model = apply_lora(make(tok), LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=use_dora))
    wrapped = {n.split(".lora_A")[0].split(".")[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in n and p.requires_grad for n, p in model.named_parameters())
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters()) == use_dora


def test_lora_unknown_target_lists_module_names(tok):
    with pytest.raises(ConfigError, match=r"lora.target_modules=\['query'\].*q_proj"):
        apply_lora(make(tok), LoraConfig(target_modules=["query"]))


def test_dtype_auto():
    assert resolve_dtype("auto", device="cpu", lora=True) == torch.float32
    assert resolve_dtype("bfloat16", device="cpu", lora=True) == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_init_random_builds_once_in_the_run_dtype_with_the_models_own_init(dtype):
    """Allocated without torch's default init and initialised once by `_init_weights`: the weights are
    normal(0, initializer_range), norms are ones, RoPE buffers are computed, ties hold, all in `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sft_dist.model.build import init_random

    config = AutoConfig.for_model(**{**TINY, "hidden_size": 64, "vocab_size": 1024, "tie_word_embeddings": True})
    a = init_random(config, dtype=dtype, seed=3, device=torch.device("cpu"))
    b = init_random(config, dtype=dtype, seed=3, device=torch.device("cpu"))
    assert all(p.dtype == dtype and p.device.type == "cpu" for p in a.parameters())
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # same seed, same device: the same weights
    ref = AutoModelForCausalLM.from_config(config, dtype=dtype)  # transformers' own (slower) construction
    torch.testing.assert_close(a.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    assert torch.equal(a.model.norm.weight, torch.ones(64, dtype=dtype))
    assert a.lm_head.weight is a.model.embed_tokens.weight
    w = torch.cat([p.float().flatten() for n, p in a.named_parameters() if n.endswith("proj.weight")])
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - config.initializer_range) < 2e-4
    x = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.isfinite(a(x).logits).all()
