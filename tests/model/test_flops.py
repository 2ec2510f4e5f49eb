"""Model FLOPs per token from the model's matmuls: 6N full fine-tuning, 4N + 6N_lora with LoRA, the same
count for a 4-bit base, attention by layers x hidden x sequence length."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig

from sft_dist.metrics.flops import device_peak_tflops, model_flops

CFG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=512, max_position_embeddings=128, tie_word_embeddings=False)


def expected_matmul() -> int:
    d, i, kv = 64, 128, 2 * 16  # 2 kv heads of head_dim 16
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * i
    return 2 * per_layer + d * 512  # + the output head; the embedding is a lookup


@pytest.fixture
def model():
    return AutoModelForCausalLM.from_config(LlamaConfig(**CFG))


def test_full_fine_tuning_is_6n_plus_attention(model):
    f = model_flops(model)
    assert (f.trainable_matmul, f.frozen_matmul, f.layers, f.hidden) == (expected_matmul(), 0, 2, 64)
    assert f.per_token(100) == 6 * expected_matmul() + 12 * 2 * 64 * 100


def test_lora_is_4n_frozen_plus_6n_adapter_and_trainable_head(model):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", modules_to_save=["lm_head"]))
    f = model_flops(peft)
    lora = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
    head = 64 * 512
    assert f.trainable_matmul == lora + head  # the head's trainable copy; its frozen original computes nothing
    assert f.frozen_matmul == expected_matmul() - head
    assert f.per_token(0) == 4 * (expected_matmul() - head) + 6 * (lora + head)


def test_device_peak():
    assert device_peak_tflops("cpu", given=None, half_precision=True)[0] is None
    assert device_peak_tflops("cpu", given=50.0, half_precision=False) == (50.0, "metrics.peak_tflops")


@pytest.mark.parametrize("name, peak", [("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.0),
                                        ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 NVL", 835.0),
                                        ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0)])
def test_device_peak_by_cuda_name(monkeypatch, name, peak):
    """The longest matching name wins: an H200 NVL is not an H200 SXM, an L40 not an L4."""
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert device_peak_tflops("cuda", given=None, half_precision=True)[0] == peak
