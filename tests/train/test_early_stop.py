"""training.early_stopping_patience: the callback's decision (HF's rule: better than the best so far by more than the
threshold), what a resume carries, and the config checks (the plan's: tests/plan/test_rules.py). End to end:
tests/e2e/test_early_stop.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sft_dist.config.load import load_config
from sft_dist.errors import ConfigError
from sft_dist.train.early_stop import EarlyStopping
from sft_dist.train.state import TrainState
from tests.conftest import QUICKSTART


def run(values, *, patience=2, threshold=0.0, greater=False, metric="loss"):
    """Evaluations of `values` in turn, HF's best kept as its Trainer does after the callbacks; the counter and
    whether training stopped after each."""
    cb = EarlyStopping(patience=patience, threshold=threshold, world_size=1, device="cpu")
    args = SimpleNamespace(metric_for_best_model=metric, greater_is_better=greater)
    state = SimpleNamespace(best_metric=None, best_global_step=None, global_step=0, max_steps=100)
    out = []
    for value in values:
        state.global_step += 10
        control = SimpleNamespace(should_training_stop=False)
        cb.on_evaluate(args, state, control, metrics={"eval_loss": 9.0, f"eval_{metric}": value})
        if state.best_metric is None or (value > state.best_metric if greater else value < state.best_metric):
            state.best_metric, state.best_global_step = value, state.global_step
        out.append((cb.counter, control.should_training_stop))
    return out, cb


def test_patience_counts_evaluations_in_a_row_without_improvement():
    out, cb = run([3.0, 2.0, 2.5, 2.2, 1.9, 2.0, 2.0])
    assert out == [(0, False), (0, False), (1, False), (2, True), (0, False), (1, False), (2, True)]
    assert cb.stopped == {"step": 70, "max_steps": 100, "metric": "eval_loss", "best": 1.9, "best_step": 50,
                          "last": 2.0, "patience": 2, "threshold": 0.0}


def test_an_improvement_smaller_than_the_threshold_is_none_and_the_best_still_moves():
    out, _ = run([3.0, 2.95, 2.91, 2.5], threshold=0.1, patience=3)
    # 2.95 and 2.91 beat the best by less than 0.1; HF's best still becomes 2.91, so 2.5 beats it by 0.41
    assert out == [(0, False), (1, False), (2, False), (0, False)]


def test_greater_is_better_and_a_named_sets_metric():
    out, _ = run([0.1, 0.3, 0.2, 0.3], greater=True, metric="pt_rouge_l", patience=2)
    assert out == [(0, False), (0, False), (1, False), (2, True)]
    # a metric the evaluation did not report (an evaluation of other data) changes nothing
    cb = EarlyStopping(patience=1, threshold=0.0, world_size=1, device="cpu")
    control = SimpleNamespace(should_training_stop=False)
    cb.on_evaluate(SimpleNamespace(metric_for_best_model="eval_loss", greater_is_better=False),
                   SimpleNamespace(best_metric=1.0, best_global_step=10, global_step=20, max_steps=100), control,
                   metrics={"eval_pt_loss": 2.0})
    assert cb.counter == 0 and not control.should_training_stop


def test_the_count_is_a_resumes_and_a_used_up_patience_stops_at_train_begin():
    trainer = SimpleNamespace(early_stopping=EarlyStopping(patience=2, threshold=0.0, world_size=1, device="cpu"))
    state = TrainState()
    state.load_state_dict({"step": 30, "early_stopping_counter": 2})
    assert state.state_dict()["early_stopping_counter"] == 2
    state.apply(SimpleNamespace(**vars(trainer), total_loss_tokens=0, _total_seen=[0, 0]))
    assert trainer.early_stopping.counter == 2
    control = SimpleNamespace(should_training_stop=False)
    trainer.early_stopping.on_train_begin(
        SimpleNamespace(metric_for_best_model="loss"),
        SimpleNamespace(global_step=30, max_steps=100, best_metric=1.5, best_global_step=20), control)
    assert control.should_training_stop and trainer.early_stopping.stopped["resumed_stopped"] is True
    old = TrainState()
    old.load_state_dict({"step": 30})  # a manifest from before early stopping: nothing counted
    assert old.early_stopping_counter == 0


def test_config_checks():
    for bad, message in (("training.early_stopping_patience=0", "training.early_stopping_patience"),
                         ("training.early_stopping_threshold=-1", "training.early_stopping_threshold"),
                         ("training.early_stopping_patience=two", "training.early_stopping_patience")):
        with pytest.raises(ConfigError, match=message):
            load_config(QUICKSTART, [bad])
    cfg = load_config(QUICKSTART, ["training.early_stopping_patience=3", "training.early_stopping_threshold=0.01"])
    assert (cfg.training.early_stopping_patience, cfg.training.early_stopping_threshold) == (3, 0.01)


def test_sft_config_gets_a_best_metric_and_not_the_callbacks_fields():
    from sft_dist.train.args import build_sft_config

    args = build_sft_config(load_config(QUICKSTART, ["training.early_stopping_patience=3"]), device="cpu")
    assert args.metric_for_best_model == "loss" and args.greater_is_better is False
    assert not hasattr(args, "early_stopping_patience")
