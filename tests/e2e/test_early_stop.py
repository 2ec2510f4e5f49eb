"""`training.early_stopping_patience` end to end, 2 workers: the run stops at the evaluation that used up its
patience; killed during a save and resumed, it stops at the same step with the same losses and weights (the count
of evaluations without improvement is the checkpoint's); run again once stopped, it trains no step."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from sft_dist.compare import compare
from tests.conftest import BIN, QUICKSTART, cli_env

pytestmark = pytest.mark.slow

# No evaluation after the first improves on the best by more than 10: the second after it (step 30) stops the run.
STEPS = ["training.max_steps=100", "training.eval_steps=10", "training.save_strategy=steps", "training.save_steps=10",
         "training.early_stopping_patience=2", "training.early_stopping_threshold=10",
         "training.load_best_model_at_end=true"]


def train(out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "sft-dist"), "train", str(QUICKSTART), f"output_dir={out}", *STEPS],
                          capture_output=True, text=True, timeout=300, env=env or cli_env())


def adapter_digest(run: Path) -> str:
    return hashlib.sha256((run / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    out = tmp_path_factory.mktemp("early") / "run"
    r = train(out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stderr


def test_the_run_stops_when_its_patience_is_used_up(stopped):
    out, log = stopped
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [e["step"] for e in evals] == [10, 20, 30]
    assert max(r["step"] for r in rows if "loss" in r) == 30
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["global_step"] == 30
    assert summary["stopped_early"] == {"step": 30, "max_steps": 100, "metric": "eval_loss",
                                        "best": evals[1]["eval_loss"], "best_step": 20, "last": evals[2]["eval_loss"],
                                        "patience": 2, "threshold": 10.0}
    assert evals[2]["eval_loss"] < evals[1]["eval_loss"] < evals[0]["eval_loss"]  # better, by less than 10
    assert "1 of 2 evaluations without improvement" in log
    assert ("early stopping at step 30 of 100: eval_loss has not improved on "
            f"{evals[1]['eval_loss']:.6g} (step 20) by more than 10 for 2 evaluations") in log
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-10", "checkpoint-20", "checkpoint-30"]


def test_killed_and_resumed_it_stops_at_the_same_step(stopped, tmp_path):
    reference, _ = stopped
    out = tmp_path / "run"
    r = train(out, env={**cli_env(), "SFT_DIST_KILL_DURING_SAVE": "30:1"})  # rank 1 killed saving step 30
    assert r.returncode == 1 and "worker rank 1 was killed by SIGKILL" in r.stderr, r.stderr[-3000:]
    r = train(out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(step 20)" in r.stderr and "early stopping at step 30 of 100" in r.stderr
    dev = compare(reference, out)
    assert dev.steps == 30 and dev.bitwise, dev
    assert adapter_digest(out) == adapter_digest(reference)
    assert json.loads((out / "run_summary.json").read_text())["stopped_early"]["step"] == 30


def test_run_again_once_stopped_it_trains_no_step(stopped, tmp_path):
    reference, _ = stopped
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    r = train(out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the checkpoint of step 30 had already stopped" in r.stderr and "no step to train" in r.stderr
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["global_step"] == 30 and summary["stopped_early"]["resumed_stopped"] is True
    assert adapter_digest(out) == adapter_digest(reference)
