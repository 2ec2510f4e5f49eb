"""The random base of an init_config run (model/init_base.py): written whole, also in the background while
peft wraps the model, and equal to the weights the run trained on."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft_dist.config.load import builtin_path
from sft_dist.config.schema import LoraConfig
from sft_dist.errors import SftDistError
from sft_dist.model.build import init_random
from sft_dist.model.init_base import write_base
from sft_dist.model.lora import apply_lora


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))


def tiny(tok, **extra):
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok), **extra)
    return init_random(config, dtype=torch.float32, seed=3, device=torch.device("cpu"))


@pytest.mark.parametrize("background", [True, False])
@pytest.mark.parametrize("tied", [False, True])
def test_the_written_base_is_the_model_peft_then_wrapped(tok, tmp_path, background, tied):
    model = tiny(tok, tie_word_embeddings=tied)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    with torch.no_grad():
        logits = model(ids).logits
    (tmp_path / "base_model.tmp-999").mkdir()  # a write killed earlier
    job = write_base(model, tok, tmp_path / "base_model", background=background)
    wrapped = apply_lora(model, LoraConfig(r=4, target_modules="all-linear", modules_to_save=["lm_head"]),
                         quantized=False, gradient_checkpointing=False)  # meanwhile, as the run does
    job.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base_model"]  # in place, no temp left
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base_model", dtype=torch.float32)
    state = loaded.state_dict()
    assert state.keys() == before.keys()
    assert all(torch.equal(state[k], v) for k, v in before.items())
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits, rtol=0, atol=0)
    assert loaded.config.tie_word_embeddings == tied
    assert (tmp_path / "base_model" / "tokenizer.json").is_file()
    assert any("lora_A" in k for k in wrapped.state_dict())  # the run's model is wrapped, the base is not


def test_a_failed_write_is_raised_by_wait_and_leaves_nothing(tok, tmp_path):
    model = tiny(tok)
    (tmp_path / "base_model").write_text("a file where the directory goes")
    job = write_base(model, tok, tmp_path / "base_model", background=True)
    with pytest.raises(SftDistError, match="writing the random base to .*base_model failed"):
        job.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base_model"]
    assert (tmp_path / "base_model").read_text() == "a file where the directory goes"


def test_a_base_already_written_by_the_same_run_is_kept(tok, tmp_path, caplog):
    """A resumed or restarted init_config run builds the same seeded base: the one written before is kept (an 8B
    base is 16 GB), found by its config, tokenizer files and every tensor's checksum; any difference writes it anew."""
    import logging

    path = tmp_path / "base_model"
    write_base(tiny(tok), tok, path, background=False)
    files = {f.name: f.stat().st_mtime_ns for f in path.iterdir()}
    assert "sft_dist_base.json" in files
    with caplog.at_level(logging.INFO, logger="sft_dist.model.init_base"):
        write_base(tiny(tok), tok, path, background=True).wait()
    assert "is this run's already" in caplog.text
    assert {f.name: f.stat().st_mtime_ns for f in path.iterdir()} == files  # not one file written again
    assert not list(tmp_path.glob("base_model.tmp-*"))

    other = tiny(tok)
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight[3, 5] += 1e-3  # one weight of one layer
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sft_dist.model.init_base"):
        write_base(other, tok, path, background=False)
    assert "is this run's already" not in caplog.text
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert torch.equal(loaded.model.layers[1].mlp.up_proj.weight, other.model.layers[1].mlp.up_proj.weight)
    write_base(tiny(tok, max_position_embeddings=300), tok, path, background=False)  # the config alone differs
    assert AutoModelForCausalLM.from_pretrained(path).config.max_position_embeddings == 300
