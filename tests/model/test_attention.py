"""`model.attn_implementation`: `auto` picks per architecture and device (tiny Llama, Qwen2, Mistral, and Gemma 2,
which has no sdpa in transformers 5.23); a value the model class rejects is refused from its config alone."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sft_dist.config.load import builtin_path
from sft_dist.config.schema import ModelConfig, QuantizationConfig
from sft_dist.errors import ConfigError
from sft_dist.model.attention import causal_lm_class, choose, supported
from sft_dist.model.build import build_model
from sft_dist.model.tokenizer import build_tokenizer
from sft_dist.validate import load_config
from tests.conftest import QUICKSTART

SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16}
ARCHS = {"llama": "sdpa", "qwen2": "sdpa", "mistral": "sdpa", "gemma2": "eager"}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))


def build(tok, model_type: str, attn: str | None = "auto", **extra):
    cfg = ModelConfig(init_config={"model_type": model_type, **SHAPE, **extra}, attn_implementation=attn,
                      tokenizer=str(builtin_path("tokenizer")))
    return build_model(cfg, quant=QuantizationConfig(), tokenizer=tok, dtype=torch.float32, seed=0, device="cpu")


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_auto_picks_sdpa_where_the_class_has_it_else_eager(tok, caplog, model_type):
    with caplog.at_level(logging.INFO, logger="sft_dist"):
        model = build(tok, model_type)
    want = ARCHS[model_type]
    assert model.config._attn_implementation == want
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention:")]
    assert len(lines) == 1 and lines[0].startswith(f"attention: {want} (auto: {type(model).__name__}")
    assert "the device is cpu" in lines[0]
    with torch.no_grad():  # it runs
        assert torch.isfinite(model(torch.tensor([[1, 5, 9, 12]])).logits).all()


def test_auto_on_a_gpu_without_flash_attn_installed_says_so():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    llama = causal_lm_class(AutoConfig.for_model("llama", **SHAPE))
    c = choose("auto", llama, model_type="llama", device="cuda", dtype=torch.bfloat16)
    assert (c.name, c.reason) == ("sdpa", "auto: LlamaForCausalLM supports sdpa; no flash attention: flash-attn is "
                                          "not installed; no varlen_attention: the model's config is not known")
    c = choose("auto", llama, model_type="llama", device="cuda", dtype=torch.float32)
    assert c.name == "sdpa" and "the weights are float32" in c.reason
    gemma = causal_lm_class(AutoConfig.for_model("gemma2", **SHAPE))
    assert supported(gemma) == ["eager", "flex_attention", "flash_attention_2", "flash_attention_3",
                                "flash_attention_4"]
    assert choose("auto", gemma, model_type="gemma2", device="cuda", dtype=torch.bfloat16).name == "eager"


def test_sdpa_on_gemma2_is_refused_by_the_config_check_before_any_model_loads():
    overrides = ["model.attn_implementation=sdpa", "model.init_config.model_type=gemma2"]
    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, overrides)
    assert e.value.problems == [
        "model.attn_implementation: 'sdpa' is not supported by Gemma2ForCausalLM (model_type gemma2) (its attention "
        "uses logit soft-capping, which sdpa cannot do); allowed: auto, eager, flex_attention, flash_attention_2, "
        "flash_attention_3, flash_attention_4"]
    # the same on Llama passes, and so do eager and auto on Gemma 2
    load_config(QUICKSTART, ["model.attn_implementation=sdpa"])
    load_config(QUICKSTART, ["model.attn_implementation=eager", "model.init_config.model_type=gemma2"])


def test_a_local_model_directory_is_checked_from_its_config_json(tmp_path, tok):
    build(tok, "gemma2").save_pretrained(tmp_path / "g")
    tok.save_pretrained(tmp_path / "g")
    with pytest.raises(ConfigError, match=r"'sdpa' is not supported by Gemma2ForCausalLM"):
        load_config(QUICKSTART, ["model.init_config=null", f"model.name_or_path={tmp_path / 'g'}",
                                 "model.tokenizer=null", "model.attn_implementation=sdpa"])
    # where the model loads (e.g. a hub id the config check could not read): the same one-line error
    cfg = ModelConfig(name_or_path=str(tmp_path / "g"), attn_implementation="sdpa")
    with pytest.raises(ConfigError) as e:
        build_model(cfg, quant=QuantizationConfig(), tokenizer=build_tokenizer(cfg), dtype=torch.float32, seed=0,
                    device="cpu")
    assert len(e.value.problems) == 1
    assert e.value.problems[0].startswith("model.attn_implementation: 'sdpa' is not supported by Gemma2ForCausalLM")
    auto = build_model(ModelConfig(name_or_path=str(tmp_path / "g")), quant=QuantizationConfig(), tokenizer=tok,
                       dtype=torch.float32, seed=0, device="cpu")
    assert auto.config._attn_implementation == "eager"


def test_unknown_values_and_flash_on_cpu_are_config_errors():
    with pytest.raises(ConfigError, match=r"model.attn_implementation: got 'spda'; expected one of auto, eager"):
        load_config(QUICKSTART, ["model.attn_implementation=spda"])
    with pytest.raises(ConfigError, match=r"flash_attention_2 needs a CUDA device, and launcher.device is cpu"):
        load_config(QUICKSTART, ["model.attn_implementation=flash_attention_2", "launcher.device=cpu"])


def test_explicit_eager_and_sdpa_give_the_same_logits(tok):
    x = torch.tensor([[1, 5, 9, 12, 40, 7]])
    with torch.no_grad():
        a, b = build(tok, "qwen2", "eager")(x).logits, build(tok, "qwen2", "sdpa")(x).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_gemma2_packed_documents_stay_apart_on_the_implementation_auto_picks(tok):
    """Packing's isolation (position_ids restart per document, no attention_mask, no cache) on eager Gemma 2."""
    model = build(tok, "gemma2").eval()
    assert model.config._attn_implementation == "eager"
    a, b = [3, 17, 29, 4, 8, 61, 5], [12, 90, 33, 2, 71]
    row = torch.tensor([a + b])
    positions = torch.tensor([list(range(len(a))) + list(range(len(b)))])
    with torch.no_grad():
        packed = model(input_ids=row, position_ids=positions, use_cache=False).logits[0]
        alone_a = model(torch.tensor([a]), use_cache=False).logits[0]
        alone_b = model(torch.tensor([b]), use_cache=False).logits[0]
    torch.testing.assert_close(packed[:len(a)], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[len(a):], alone_b, atol=1e-5, rtol=0)


def test_a_remote_model_class_is_not_known_from_its_config():
    assert causal_lm_class(object()) is None
    c = choose("auto", None, model_type=None, device="cpu", dtype=torch.float32)
    assert c.name == "sdpa" and "remote-code" in c.reason


def test_attn_choice_of_a_pretrained_gemma_model_matches_transformers_default(tmp_path, tok):
    """Plain transformers already falls back to eager for Gemma 2; auto agrees with it."""
    build(tok, "gemma2").save_pretrained(tmp_path / "g")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "g").config._attn_implementation == "eager"
