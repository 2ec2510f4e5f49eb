"""LoRA wrapping: a tied head in modules_to_save under FSDP2 (issue 16 item 3), and an embedding resized for a larger
tokenizer, whose new rows must train."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sft_dist.config.load import builtin_path
from sft_dist.config.schema import LoraConfig, ModelConfig, QuantizationConfig
from sft_dist.errors import ConfigError
from sft_dist.model.build import build_model
from sft_dist.model.lora import apply_lora, untie_saved_originals
from tests.conftest import BIN, QUICKSTART, backend, cli_env

TIED_QWEN2 = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
IDS = torch.tensor([[1, 5, 9, 12, 40, 7, 300]])


def tied_model():
    config = AutoConfig.for_model(**{**TIED_QWEN2, "vocab_size": 1024})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
@pytest.mark.parametrize("saved", [["lm_head"], ["embed_tokens"], ["embed_tokens", "lm_head"]])
def test_untying_the_frozen_originals_changes_no_number(saved):
    base = tied_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    model = apply_lora(tied_model(), LoraConfig(r=4, alpha=8, dropout=0.0, modules_to_save=saved))
    with torch.no_grad():
        before = model(IDS).logits
    untied = untie_saved_originals(model)
    assert untied == [f"base_model.model.{'lm_head' if s == 'lm_head' else 'model.embed_tokens'}.original_module.weight"
                      for s in sorted(saved, key=lambda s: s != "embed_tokens")]
    params = list(model.named_parameters(remove_duplicate=False))
    assert len({id(p) for _, p in params}) == len(params)  # no weight is shared any more: one FSDP group each
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)
    for name in untied:  # the frozen copies hold the embedding's values
        assert torch.equal(model.get_parameter(name), base.model.embed_tokens.weight)
        assert not model.get_parameter(name).requires_grad
    assert untie_saved_originals(model) == []


def train(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    tied = [f"model.init_config.{k}={v}" for k, v in TIED_QWEN2.items()]
    r = subprocess.run([str(BIN / "sft-dist"), "train", str(QUICKSTART), f"output_dir={out}", *tied,
                        "training.max_steps=6", "training.eval_strategy=no", *overrides],
                       capture_output=True, text=True, env=cli_env(), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


@pytest.mark.slow
def test_tied_embeddings_with_a_trained_head_train_under_fsdp2_as_under_ddp(tmp_path):
    """Was: "Parameter 'base_model.model.lm_head.original_module.weight' is shared with a parameter already
    managed by another FSDP group" at the first forward, while `plan` said compatible."""
    ddp = tmp_path / "ddp"
    train(ddp)
    fsdp = tmp_path / "fsdp"
    r = train(fsdp, *backend("full_shard"))
    assert "fsdp: base_model.model.lm_head.original_module.weight shared a tied weight" in r.stderr
    summary = json.loads((fsdp / "run_summary.json").read_text())
    assert summary["backend_applied"]["wrapper"] == "FSDP2 (fully_shard)"
    assert summary["trainable_params"] == json.loads((ddp / "run_summary.json").read_text())["trainable_params"]
    a, b = losses(ddp), losses(fsdp)
    assert len(a) == 6 and max(abs(x - y) / abs(x) for x, y in zip(a, b)) <= 1e-5
    wa, wb = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (ddp, fsdp))
    assert wa.keys() == wb.keys() and "base_model.model.lm_head.weight" in wa
    for k in wa:
        assert (wa[k] - wb[k]).norm() <= 1e-5 * max(wa[k].norm(), 1e-3), k


# ---- an embedding smaller than the tokenizer --------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory) -> Path:
    """A saved Qwen2 with 1000 embedding rows: 24 fewer than the builtin tokenizer's 1024 tokens."""
    tok = AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))
    config = AutoConfig.for_model(**{**TIED_QWEN2, "tie_word_embeddings": False, "vocab_size": 1000,
                                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("small_vocab") / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def load(path: Path, tok):
    return build_model(ModelConfig(name_or_path=str(path)), quant=QuantizationConfig(), tokenizer=tok,
                       dtype=torch.float32, seed=0, device="cpu")


def test_a_larger_tokenizer_resizes_the_embedding_with_a_log_line(small_vocab_model, caplog):
    import logging

    tok = AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))
    with caplog.at_level(logging.INFO, logger="sft_dist"):
        model = load(small_vocab_model, tok)
    assert model.get_input_embeddings().weight.shape == (1024, 64) and model.lm_head.weight.shape == (1024, 64)
    assert model.config.vocab_size == 1024 and model.sft_dist_resized == (1000, 1024)
    assert ("model: the tokenizer has 1024 tokens and the embedding had 1000 rows: resized the embedding and the "
            "output head to 1024 rows; the 24 new rows start at the mean of the old ones") in caplog.messages
    old = AutoModelForCausalLM.from_pretrained(small_vocab_model).get_input_embeddings().weight
    new = model.get_input_embeddings().weight
    assert torch.equal(new[:1000], old)  # the old rows are kept
    assert (new[1000:].mean(0) - old.mean(0)).abs().max() < 0.05  # the new ones near the mean of the old ones


def test_lora_refuses_new_rows_it_would_leave_frozen(small_vocab_model):
    tok = AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))
    with pytest.raises(ConfigError) as e:
        apply_lora(load(small_vocab_model, tok), LoraConfig(modules_to_save=["lm_head"]))
    assert e.value.problems == [
        "lora.modules_to_save: the tokenizer has 1024 tokens and the model's embedding had 1000 rows; the embedding "
        "was resized, but under LoRA its 24 new rows would stay frozen at their initial values (model.embed_tokens "
        "not trained). Set lora.modules_to_save: [embed_tokens, lm_head] to train them, or use the model's own "
        "tokenizer"]
    model = apply_lora(load(small_vocab_model, tok), LoraConfig(modules_to_save=["embed_tokens", "lm_head"]))
    trainable = {n: p.shape for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n}
    assert trainable == {"base_model.model.model.embed_tokens.modules_to_save.default.weight": (1024, 64),
                         "base_model.model.lm_head.modules_to_save.default.weight": (1024, 64)}


def quantized_llama(tmp_path: Path, dtype: torch.dtype):
    """A tiny random Llama saved in `dtype` and reloaded 4-bit (bitsandbytes, on the CPU)."""
    from tests.conftest import load_quantized

    config = AutoConfig.for_model(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(dtype).save_pretrained(tmp_path)
    return load_quantized(tmp_path, dtype=dtype, compute_dtype=dtype)


def layer_input_dtype(model) -> torch.dtype:
    """The dtype of the residual stream a decoder layer reads, in a forward under bf16 autocast."""
    seen = []
    layer = model.get_base_model().model.layers[1]
    handle = layer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0].dtype if args else
                                                                                   kwargs["hidden_states"].dtype),
                                             with_kwargs=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(IDS).logits.float().sum().backward()
    handle.remove()
    return seen[0]


@pytest.mark.parametrize(("dtype", "upcast", "want"), [
    (torch.bfloat16, None, torch.bfloat16),  # the default: kept in the model's dtype, as TRL 1.16 leaves them
    (torch.bfloat16, True, torch.float32),  # peft's prepare_model_for_kbit_training
    (torch.float16, None, torch.float32),  # float16's range: upcast unless told otherwise
    (torch.float16, False, torch.float16),
])
def test_a_quantized_base_keeps_its_unquantized_weights_16_bit_unless_upcast(tmp_path, dtype, upcast, want):
    model = apply_lora(quantized_llama(tmp_path, dtype), LoraConfig(r=4, alpha=8, dropout=0.0, modules_to_save=["lm_head"]),
                       quantized=True, upcast=QuantizationConfig(upcast_unquantized=upcast).upcasts(str(dtype).removeprefix("torch.")))
    base = model.get_base_model()
    assert type(base.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    frozen = [base.model.embed_tokens.weight, base.model.norm.weight, base.model.layers[0].input_layernorm.weight,
              base.lm_head.original_module.weight]
    assert [p.dtype for p in frozen] == [want] * 4 and not any(p.requires_grad for p in frozen)
    # trained tensors are fp32 masters either way: the LoRA matrices and the head's modules_to_save copy
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert base.lm_head.modules_to_save["default"].weight.requires_grad
    if dtype == torch.bfloat16:  # an fp32 embedding makes the whole residual stream fp32
        assert layer_input_dtype(model) == want


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_a_trained_head_copy_of_a_bf16_model_is_an_fp32_master():
    """peft copies modules_to_save in the base's dtype; AdamW would then update a bf16 head (and accelerate's FSDP2
    upcasts it, so DDP and FSDP2 would train different heads)."""
    model = tied_model().to(torch.bfloat16)
    model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, modules_to_save=["lm_head"]))
    head = model.get_base_model().lm_head
    assert head.modules_to_save["default"].weight.dtype == torch.float32
    assert head.original_module.weight.dtype == torch.bfloat16  # the frozen base stays as loaded
    assert torch.equal(head.modules_to_save["default"].weight.bfloat16(), head.original_module.weight)
