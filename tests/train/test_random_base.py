"""A random base that trains quantized (`init_config` + `quantization.bits`): built in its load dtype (bf16 on a
GPU, fp32 here), moved to the host and loaded again through transformers' quantizer from memory. The quantized
weights are those a reload of the saved base gives; no file is written unless `model.save_init_base` keeps the
base, and the unquantized copy is freed once it is no longer needed."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM

from sft_dist.backends import get_backend
from sft_dist.config.schema import QuantizationConfig
from sft_dist.distributed.env import DistEnv
from sft_dist.model import build as build_module
from sft_dist.model.build import build_model, quantize_in_memory
from sft_dist.model.tokenizer import build_tokenizer
from sft_dist.train import run
from sft_dist.train.args import build_sft_config
from sft_dist.validate import load_config
from tests.conftest import QUICKSTART, load_quantized


def _random(cfg, tokenizer):
    return build_model(cfg.model, quant=cfg.quantization, tokenizer=tokenizer, dtype=torch.float32, seed=7,
                       device="cpu")


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_from_memory_equals_the_reload_of_the_saved_base(tmp_path, bits):
    cfg = load_config(QUICKSTART, [f"output_dir={tmp_path}"])
    tokenizer = build_tokenizer(cfg.model)
    random = _random(cfg, tokenizer)
    random.save_pretrained(tmp_path / "saved")
    before = {k: v.clone() for k, v in random.state_dict().items()}
    quant = QuantizationConfig(bits=bits)
    quantized, host = quantize_in_memory(random, quant=quant, dtype=torch.float32, device="cpu")
    reloaded = load_quantized(tmp_path / "saved", bits=bits, dtype=torch.float32)
    got, want = quantized.state_dict(), reloaded.state_dict()
    assert got.keys() == want.keys() and any(k.endswith(".absmax") or k.endswith(".SCB") for k in got)
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    ids = torch.tensor([[1, 5, 9, 12, 40, 7]])
    with torch.no_grad():
        torch.testing.assert_close(quantized(ids).logits, reloaded(ids).logits, rtol=0, atol=0)
    assert quantized.hf_quantizer is not None and quantized.config.quantization_config.load_in_4bit == (bits == 4)
    # the unquantized copy is untouched and stays plain: a base written from it loads unquantized
    assert all(torch.equal(host.state_dict()[k], v) for k, v in before.items())
    assert getattr(host.config, "quantization_config", None) is None


def _build(tmp_path, overrides):
    cfg = load_config(QUICKSTART, [f"output_dir={tmp_path}", "quantization.bits=4", "training.seed=7", *overrides])
    tokenizer = build_tokenizer(cfg.model)
    args = build_sft_config(cfg, device="cpu", world_size=1)
    return cfg, tokenizer, lambda: run._build_model(cfg, get_backend(cfg), env=DistEnv(), device="cpu",
                                                    tokenizer=tokenizer, args=args, out=tmp_path)


def _spy_on_the_host_copy(monkeypatch) -> list:
    hosts = []
    real = build_module.quantize_in_memory

    def spy(model, **kwargs):
        quantized, host = real(model, **kwargs)
        hosts.append(weakref.ref(host))
        return quantized, host

    monkeypatch.setattr(build_module, "quantize_in_memory", spy)
    return hosts


def test_no_file_is_written_when_the_base_is_not_kept_and_the_unquantized_copy_is_freed(tmp_path, monkeypatch):
    hosts = _spy_on_the_host_copy(monkeypatch)
    cfg, _, build = _build(tmp_path, ["model.save_init_base=false"])
    model, base_dir, base_write = build()
    gc.collect()
    assert base_dir is None and base_write is None and list(tmp_path.iterdir()) == []
    assert len(hosts) == 1 and hosts[0]() is None
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())


def test_a_kept_base_is_the_random_weights_written_behind_the_start(tmp_path, monkeypatch):
    hosts = _spy_on_the_host_copy(monkeypatch)
    cfg, tokenizer, build = _build(tmp_path, [])
    model, base_dir, base_write = build()
    assert base_dir == tmp_path / "base_model" and base_write is not None
    assert model.peft_config["default"].base_model_name_or_path == str(base_dir)
    base_write.wait()
    gc.collect()
    assert hosts[0]() is None  # the writer let the unquantized copy go once it was written
    written = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).state_dict()
    random = _random(cfg, tokenizer).state_dict()  # the same seed: the weights that were quantized
    assert written.keys() == random.keys() and all(torch.equal(written[k], random[k]) for k in written)
