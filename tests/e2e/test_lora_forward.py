"""End to end: the quickstart trained in bf16 under accelerate's autocast (as on a GPU with DDP), with sft_dist's
16-bit LoRA forward (model/lora_forward.py) and with peft's own (`lora.fused_forward: false`), 1 worker: the loss
curves agree within bf16 noise, and differ at all (the fused scaled add rounds once where peft rounds three
times), so the fused forward runs in the real trainer."""

from __future__ import annotations

import json

import pytest

from tests.conftest import QUICKSTART
from tests.e2e.test_train_local import sft_dist

pytestmark = pytest.mark.slow


def losses(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_bf16_autocast_run_with_the_fused_lora_forward_follows_peft(tmp_path):
    curves = {}
    for fused in (True, False):
        out = tmp_path / f"fused_{fused}"
        r = sft_dist("train", QUICKSTART, f"output_dir={out}", "model.dtype=bfloat16", "training.bf16=true",
                     "lora.dropout=0.0", f"lora.fused_forward={str(fused).lower()}", "launcher.num_workers=1",
                     "training.max_steps=8", "training.eval_strategy=no", "training.save_strategy=no")
        assert r.returncode == 0, r.stderr[-3000:]
        curves[fused] = losses(out)
    fused, peft = curves[True], curves[False]
    assert len(fused) == len(peft) == 8
    assert fused != peft
    assert max(abs(a - b) for a, b in zip(fused, peft)) < 2e-3
    assert fused[-1] < fused[0] - 0.5  # it trains
