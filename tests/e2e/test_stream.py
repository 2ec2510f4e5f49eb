"""End to end: `data.streaming` with 2 workers: rows tokenized as trained on, the first pass covers every
row once, and a resume from a checkpoint continues the stream exactly (same samples, same losses)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import QUICKSTART, ROOT
from tests.e2e.test_train_local import sft_dist, train_losses

pytestmark = pytest.mark.slow

ROWS = 40


def trace(run) -> dict[int, list[int]]:
    steps: dict[int, list[int]] = {}
    for rank in (0, 1):
        for line in (run / "trace" / f"samples.rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            steps.setdefault(rec["step"], []).extend(rec["sample_ids"])
    return {k: sorted(v) for k, v in steps.items()}


def test_streaming_trains_each_row_once_per_pass_and_resumes_exactly(tmp_path):
    lines = (ROOT / "sft_dist/assets/data/alpaca_demo_train.jsonl").read_text(encoding="utf-8").splitlines()
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines[:ROWS]) + "\n", encoding="utf-8")
    args = [f"data.train_files={data}", "data.streaming=true", "data.shuffle_window=16", "training.max_steps=8",
            "training.save_strategy=steps", "training.save_steps=4", "training.eval_strategy=no",
            "data.trace_samples=true"]
    first = tmp_path / "first"
    r = sft_dist("train", QUICKSTART, f"output_dir={first}", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data train: streaming 1 file(s), windows of 16 rows shuffled" in r.stderr
    steps = trace(first)
    assert len(steps) == 8 and all(len(ids) == 16 for ids in steps.values())
    assert len({i for s in (1, 2) for i in steps[s]}) == 32  # no row twice within a pass
    assert {i for s in (1, 2, 3) for i in steps[s]} == set(range(ROWS))  # positions 0-47: the first pass + 8
    manifest = json.loads((first / "checkpoints" / "checkpoint-4" / "manifest.json").read_text())
    assert manifest["data_cursor"] == {"samples_total": 64, "streaming": True, "seed": 42, "shuffle_window": 16}

    resumed = tmp_path / "resumed"  # as if the first run had stopped after its step-4 checkpoint
    shutil.copytree(first, resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-8")
    shutil.rmtree(resumed / "adapter")
    (resumed / "run_summary.json").unlink()
    r = sft_dist("train", QUICKSTART, f"output_dir={resumed}", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step 4: stream position 64 samples in all" in r.stderr
    summary = json.loads((resumed / "run_summary.json").read_text())
    assert summary["resumed_step"] == 4 and summary["resume_s"] > 0 and summary["checkpoint_save_s"] > 0
    assert trace(resumed) == {s: steps[s] for s in range(5, 9)}
    assert train_losses(resumed)[-4:] == train_losses(first)[-4:]
