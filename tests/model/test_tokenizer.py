"""Model/tokenizer mismatches: no pad token (eos pads, and the eos a completion ends with keeps its label), special
token ids outside the embedding (one line naming the token and id). The embedding smaller than the tokenizer is in
test_lora.py (resize, and the new rows LoRA must train)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sft_dist.config.load import builtin_path
from sft_dist.config.schema import ModelConfig, QuantizationConfig
from sft_dist.errors import ConfigError, SftDistError
from sft_dist.model.build import build_model
from sft_dist.model.tokenizer import build_tokenizer

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}


def tokenizer_dir(tmp_path: Path, **changes) -> Path:
    """The builtin tokenizer with tokenizer_config.json entries changed (None removes one)."""
    path = tmp_path / "tok"
    shutil.copytree(builtin_path("tokenizer"), path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_no_pad_token_pads_with_eos_and_keeps_the_eos_label(tmp_path, caplog):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    path = tokenizer_dir(tmp_path, pad_token=None)
    assert AutoTokenizer.from_pretrained(path).pad_token is None
    with caplog.at_level(logging.INFO, logger="sft_dist"):
        tok = build_tokenizer(ModelConfig(name_or_path=str(path)))
    assert (tok.pad_token, tok.pad_token_id) == ("</s>", 2) == (tok.eos_token, tok.eos_token_id)
    assert "tokenizer has no pad token; using eos '</s>' for padding" in caplog.messages
    # what training collates: padding is masked out of the loss, the completion's own eos is not
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(
        [{"input_ids": [5, 6, 7, 2]}, {"input_ids": [8, 2]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2], [8, 2, 2, 2]]
    assert batch["labels"].tolist() == [[5, 6, 7, 2], [8, 2, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_neither_pad_nor_eos_is_an_error(tmp_path):
    path = tokenizer_dir(tmp_path, pad_token=None, eos_token=None)
    with pytest.raises(SftDistError, match="has neither a pad nor an eos token; add a pad token"):
        build_tokenizer(ModelConfig(name_or_path=str(path)))


def test_a_config_token_id_outside_the_embedding_names_it(tmp_path):
    tok = AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))
    cfg = ModelConfig(init_config={**TINY, "eos_token_id": 5000}, tokenizer=str(builtin_path("tokenizer")))
    with pytest.raises(SftDistError) as e:
        build_model(cfg, quant=QuantizationConfig(), tokenizer=tok, dtype=torch.float32, seed=0, device="cpu")
    assert str(e.value) == ("model.init_config: eos_token_id=5000 is outside the model's embedding of 1024 rows (ids "
                            "0..1023); set it to a token id below 1024 (the tokenizer's eos_token_id is 2)")
    # a pretrained model whose generation_config.json lists an end token it has no row for
    config = AutoConfig.for_model(vocab_size=1024, **TINY)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = [2, 4000]
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(SftDistError, match=r"^model.name_or_path \(generation_config.json\): eos_token_id=4000 is "
                                           r"outside the model's embedding of 1024 rows"):
        build_model(ModelConfig(name_or_path=str(tmp_path / "m")), quant=QuantizationConfig(), tokenizer=tok,
                    dtype=torch.float32, seed=0, device="cpu")


def test_init_config_vocab_smaller_than_the_tokenizer_is_still_a_config_error():
    tok = AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))
    cfg = ModelConfig(init_config={**TINY, "vocab_size": 1000}, tokenizer=str(builtin_path("tokenizer")))
    with pytest.raises(ConfigError, match="vocab_size: got 1000, but the tokenizer has 1024 tokens"):
        build_model(cfg, quant=QuantizationConfig(), tokenizer=tok, dtype=torch.float32, seed=0, device="cpu")
