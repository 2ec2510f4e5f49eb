"""A random base that trains quantized (`init_config` + `quantization.bits`): rank 0 builds it in 16 bit,
writes it, and frees it before the quantized copy loads, so the two are never in memory together."""

from __future__ import annotations

import gc
import weakref

import torch
from transformers import AutoModelForCausalLM

from sft_dist.model import init_base
from sft_dist.model.tokenizer import build_tokenizer
from sft_dist.train import run
from sft_dist.validate import load_config
from tests.conftest import QUICKSTART


def test_the_16_bit_random_base_is_written_then_freed(tmp_path, monkeypatch):
    cfg = load_config(QUICKSTART, [f"output_dir={tmp_path}", "quantization.bits=4"])
    tokenizer = build_tokenizer(cfg.model)
    built = []
    write = init_base.write_base

    def spy(model, *args, **kwargs):
        built.append(weakref.ref(model))
        return write(model, *args, **kwargs)

    monkeypatch.setattr(init_base, "write_base", spy)
    build = dict(quant=cfg.quantization, tokenizer=tokenizer, dtype=torch.float32, seed=7, device="cpu",
                 compute_dtype=None)
    run._write_random_base(cfg, build, tmp_path / "base_model")
    gc.collect()
    assert len(built) == 1 and built[0]() is None  # nothing holds the 16-bit weights once they are written
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base_model", dtype=torch.float32)
    from sft_dist.model.build import build_model

    again = build_model(cfg.model, **build)  # the same seed: the same weights as were written
    written, rebuilt = loaded.state_dict(), again.state_dict()
    assert written.keys() == rebuilt.keys() and all(torch.equal(written[k], rebuilt[k]) for k in written)
