"""backend.sequence_parallel_size end to end (model/ulysses.py): workers holding slices of every row train what the
same rows unsplit train.

- DDP, 2 workers in one group of 2, 16 rows per device: the shared 2-worker run's 20 steps (`checkpointed_run`: 8
  rows on each of 2 workers, the same 16 rows per step), the same losses, eval losses, loss tokens and adapter up
  to the order of sums; killed during a save and run again, it ends bitwise where the uninterrupted run ends.
- FSDP2, 4 workers in 2 groups of 2, packed rows: the 2-worker DDP run of the same packed rows.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from sft_dist.compare import compare
from tests.conftest import BIN, QUICKSTART, backend, cli_env

pytestmark = pytest.mark.slow

STEPS = ["training.max_steps=20", "training.save_strategy=steps", "training.save_steps=10", "training.eval_steps=10"]
SPLIT = ["backend.sequence_parallel_size=2", "training.per_device_train_batch_size=16"]


def train(out: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "sft-dist"), "train", str(QUICKSTART), f"output_dir={out}", *overrides],
                          capture_output=True, text=True, timeout=600, env=env or cli_env())


def summary(run: Path) -> dict:
    return json.loads((run / "run_summary.json").read_text())


def evals(run: Path) -> list[float]:
    return [json.loads(x)["eval_loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval_loss"' in x]


def test_one_group_trains_the_unsplit_rows_and_resumes_exactly(checkpointed_run, tmp_path):
    out = tmp_path / "split"
    r = train(out, *STEPS, *SPLIT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sequence parallel: 1 groups of 2 workers" in r.stderr
    assert "1 data-parallel groups of 2 workers = 16 sequences per optimizer step" in r.stderr
    dev = compare(checkpointed_run, out)
    assert dev.steps == 20 and dev.loss_max_rel < 1e-5 and dev.weights_max_rel < 1e-4, dev
    s, ref = summary(out), summary(checkpointed_run)
    assert s["sequence_parallel"] == 2 and s["global_batch"] == ref["global_batch"] == 16
    assert s["loss_tokens"] == ref["loss_tokens"]  # each token counted once per group
    assert evals(out) == pytest.approx(evals(checkpointed_run), rel=1e-6)

    resumed = tmp_path / "resumed"
    r = train(resumed, *STEPS, *SPLIT, env={**cli_env(), "SFT_DIST_KILL_DURING_SAVE": "20:1"})
    assert r.returncode == 1 and "worker rank 1 was killed by SIGKILL" in r.stderr, r.stderr[-3000:]
    r = train(resumed, *STEPS, *SPLIT)
    assert r.returncode == 0 and "(step 10)" in r.stderr, r.stderr[-3000:]
    dev = compare(out, resumed)
    assert dev.steps == 20 and dev.bitwise, dev


def test_fsdp2_two_groups_of_two_train_the_packed_rows_of_two_workers(tmp_path):
    steps = ["training.max_steps=8", "training.eval_steps=4", "data.packing=true"]
    ref, out = tmp_path / "ddp", tmp_path / "split"
    r = train(ref, *steps)
    assert r.returncode == 0, r.stderr[-3000:]
    r = train(out, *steps, *backend("full_shard"), "launcher.num_workers=4", "backend.sequence_parallel_size=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 data-parallel groups of 2 workers = 16 sequences per optimizer step" in r.stderr
    # the packing check, on whole rows through the sharded model with the attention inside (train/packing_check.py)
    assert "packing: checked at start on the sharded model, LlamaForCausalLM keeps a packed row's" in r.stderr
    s = summary(out)
    assert s["backend_applied"]["wrapper"] == "FSDP2 (fully_shard)" and s["world_size"] == 4
    dev = compare(ref, out)
    assert dev.steps == 8 and dev.loss_max_rel < 1e-5 and dev.weights_max_rel < 1e-4, dev
    assert s["loss_tokens"] == summary(ref)["loss_tokens"]
    assert s["padding_fraction"] == pytest.approx(summary(ref)["padding_fraction"])
    assert evals(out) == pytest.approx(evals(ref), rel=1e-6)
