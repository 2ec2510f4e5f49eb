"""training.train_sampling_strategy: batch_rebalance end to end, 2 workers: the quickstart's 20 steps train the same
samples per step as the shared random-order run (`checkpointed_run`), so the same losses up to the order of sums,
with less padding; killed during a save and run again, it ends bitwise where the uninterrupted run ends."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from sft_dist.compare import compare
from tests.conftest import BIN, QUICKSTART, cli_env

pytestmark = pytest.mark.slow

STEPS = ["training.max_steps=20", "training.save_strategy=steps", "training.save_steps=10", "training.eval_steps=10",
         "training.train_sampling_strategy=batch_rebalance"]


def train(out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "sft-dist"), "train", str(QUICKSTART), f"output_dir={out}", *STEPS],
                          capture_output=True, text=True, timeout=300, env=env or cli_env())


def summary(run: Path) -> dict:
    return json.loads((run / "run_summary.json").read_text())


def test_the_same_losses_as_the_random_order_with_less_padding_and_an_exact_resume(checkpointed_run, tmp_path):
    out = tmp_path / "balanced"
    r = train(out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "divided among ranks and micro-batches by cost (batch_rebalance)" in r.stderr
    dev = compare(checkpointed_run, out)
    assert dev.steps == 20 and dev.loss_max_rel < 1e-5, dev
    assert summary(out)["loss_tokens"] == summary(checkpointed_run)["loss_tokens"]  # the same samples
    assert summary(out)["padding_fraction"] < 0.75 * summary(checkpointed_run)["padding_fraction"]
    evals = [[json.loads(x)["eval_loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
              if '"eval_loss"' in x] for run in (checkpointed_run, out)]
    assert evals[1] == pytest.approx(evals[0], rel=1e-5)

    resumed = tmp_path / "resumed"
    r = train(resumed, env={**cli_env(), "SFT_DIST_KILL_DURING_SAVE": "20:1"})
    assert r.returncode == 1 and "worker rank 1 was killed by SIGKILL" in r.stderr, r.stderr[-3000:]
    r = train(resumed)
    assert r.returncode == 0 and "(step 10)" in r.stderr, r.stderr[-3000:]
    dev = compare(out, resumed)
    assert dev.steps == 20 and dev.bitwise, dev
