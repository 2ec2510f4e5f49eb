"""MetricsFile (train/callbacks.py): one line per logged step and per evaluation in metrics.jsonl; HF's last log of a
run (its summary) kept aside, also when every step's log carries timing keys of its own."""

from __future__ import annotations

import json
from types import SimpleNamespace

from sft_dist.train.callbacks import MetricsFile


def test_step_lines_stay_lines_and_the_run_summary_goes_aside(tmp_path):
    m = MetricsFile(tmp_path / "metrics.jsonl")
    state = SimpleNamespace(is_world_process_zero=True, global_step=1)
    # include_num_input_tokens_seen: HF adds train_runtime and train_tokens_per_second to every step's log
    m.on_log(None, state, None, logs={"loss": 2.5, "learning_rate": 1e-3, "num_input_tokens_seen": 64,
                                      "train_runtime": 0.5, "train_tokens_per_second": 128.0})
    state.global_step = 2
    m.on_log(None, state, None, logs={"eval_loss": 2.0})
    m.on_log(None, state, None, logs={"train_runtime": 1.0, "train_samples_per_second": 32.0, "train_loss": 2.4,
                                      "total_flos": 1.0})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], "loss" in x, "eval_loss" in x) for x in lines] == [(1, True, False), (2, False, True)]
    assert (m.first["loss"], m.last["eval_loss"]) == (2.5, 2.0)
    assert m.summary == {"train_runtime": 1.0, "train_samples_per_second": 32.0, "train_loss": 2.4, "total_flos": 1.0}
