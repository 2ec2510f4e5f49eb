"""End to end: the quickstart trained in bf16 (as on a GPU) with sft_dist's 16-bit LoRA forward
(model/lora_forward.py) and with peft's own (`lora.fused_forward: false`). Under DDP (accelerate's autocast, 1
worker) the loss curves agree within bf16 noise and differ at all (the fused add rounds once where peft rounds
three times), so the fused forward runs in the real trainer. Under FSDP2 (2 workers; on CPU sft_dist gives the
plugin accelerate's MixedPrecisionPolicy, as on a GPU, so the adapter computes in bf16 without autocast) the
fused run trains the trained head copy too, and its gradient norms follow peft's forward's."""

from __future__ import annotations

import json

import pytest

from tests.conftest import QUICKSTART
from tests.e2e.test_train_local import sft_dist

pytestmark = pytest.mark.slow

BF16 = ["model.dtype=bfloat16", "training.bf16=true", "lora.dropout=0.0", "training.max_steps=4",
        "training.eval_strategy=no", "training.save_strategy=no"]
FSDP = ["backend.type=fsdp", "backend.config=configs/fsdp/full_shard.yaml", "launcher.num_workers=2"]


def metric(out, key: str) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_forward")
    out = {}
    for name, extra in {"ddp": ["launcher.num_workers=1"], "ddp_peft": ["launcher.num_workers=1",
                                                                        "lora.fused_forward=false"],
                        "fsdp": FSDP, "fsdp_peft": [*FSDP, "lora.fused_forward=false"]}.items():
        run = tmp / name
        r = sft_dist("train", QUICKSTART, f"output_dir={run}", *BF16, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = run
    return out


def test_bf16_autocast_run_with_the_fused_lora_forward_follows_peft(runs):
    fused, peft = metric(runs["ddp"], "loss"), metric(runs["ddp_peft"], "loss")
    assert len(fused) == len(peft) == 4
    assert fused != peft
    assert max(abs(a - b) for a, b in zip(fused, peft)) < 2e-3
    assert fused[-1] < fused[0] - 0.05  # it trains


def test_fsdp2_bf16_trains_the_head_copy_with_the_fused_forward(runs):
    """modules_to_save [lm_head] under FSDP2 in bf16 on CPU failed before (fp32 head against bf16 activations)."""
    fused, peft = metric(runs["fsdp"], "grad_norm"), metric(runs["fsdp_peft"], "grad_norm")
    assert len(fused) == len(peft) == 4
    assert fused != peft
    assert max(abs(a / b - 1) for a, b in zip(fused, peft)) < 0.01
    loss = metric(runs["fsdp"], "loss")
    assert loss[-1] < loss[0] - 0.05
