"""End to end: 2 workers, 2 epochs over a dataset the global batch does not divide: every sample is
trained on exactly once per epoch, the short last step included (one micro-batch there is a placeholder)."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import QUICKSTART, ROOT
from tests.e2e.test_train_local import sft_dist

pytestmark = pytest.mark.slow

ROWS, GLOBAL = 35, 16  # 2 full steps + a last step of 3 samples over 4 micro-batches (one placeholder)


def test_two_workers_see_every_sample_once_per_epoch(tmp_path):
    lines = (ROOT / "sft_dist/assets/data/alpaca_demo_train.jsonl").read_text(encoding="utf-8").splitlines()
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines[:ROWS]) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    r = sft_dist("train", QUICKSTART, f"output_dir={out}", f"data.train_files={data}", "training.max_steps=-1",
                 "training.num_train_epochs=2", "training.per_device_train_batch_size=4",
                 "training.gradient_accumulation_steps=2", "training.eval_strategy=no", "data.trace_samples=true")
    assert r.returncode == 0, r.stderr[-3000:]
    steps_per_epoch = math.ceil(ROWS / GLOBAL)
    assert ("data: 35 samples per epoch = 2 steps of 16 + a last step of 3; each sample once per epoch; "
            "1 of its 4 micro-batches hold a placeholder that carries no loss") in r.stderr
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["global_step"] == 2 * steps_per_epoch
    seen: dict[int, list[int]] = {0: [], 1: []}
    for rank in (0, 1):
        for line in (out / "trace" / f"samples.rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            seen[(rec["step"] - 1) // steps_per_epoch] += rec["sample_ids"]
    for epoch, ids in seen.items():
        assert sorted(ids) == list(range(ROWS)), epoch  # the union is the dataset, no id twice
    assert seen[0] != seen[1]  # reshuffled
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(losses) == 2 * steps_per_epoch and all(math.isfinite(v) and v > 0 for v in losses)
    assert summary["loss_tokens"] == sum(json.loads(x)["tokens"] for x in
                                         (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x)
    assert summary["loss_tokens"] == 2 * summary["data"]["train"]["loss_tokens"]  # every token of every sample
