"""TrainState: the counters a resume carries, read from a trainer and put back into one."""

from __future__ import annotations

from types import SimpleNamespace

from sft_dist.data.sampler import GlobalBatchSampler
from sft_dist.train.state import KEYS, TrainState


def trainer(step: int, **counters):
    sampler = GlobalBatchSampler(100, micro=2, accum=3, world=2, rank=0, seed=7, shuffle=True)
    return SimpleNamespace(
        args=SimpleNamespace(per_device_train_batch_size=2, gradient_accumulation_steps=3, world_size=2),
        state=SimpleNamespace(global_step=step), train_sampler=sampler,
        total_loss_tokens=counters.get("loss", 0), _total_seen=counters.get("seen", [0, 0]),
        _total_train_tokens=counters.get("trl", 0), early_stopping=None)


def test_state_round_trips_through_its_dict():
    saved = TrainState.of(trainer(5, loss=1234, seen=[900, 1000], trl=950))
    d = saved.state_dict()
    assert sorted(d) == sorted(KEYS)
    assert d["batch"] == {"per_device": 2, "accumulation": 3, "world_size": 2, "global": 12}
    assert d["data_cursor"]["samples_total"] == 5 * 12
    fresh = trainer(0)
    loaded = TrainState()
    loaded.load_state_dict({"step": 5, **d})
    loaded.apply(fresh)
    assert (fresh.total_loss_tokens, fresh._total_seen, fresh._total_train_tokens) == (1234, [900, 1000], 950)
    assert loaded == saved
    assert "60 samples in all, 1234 loss tokens seen" in loaded.describe()


def test_an_older_manifest_without_the_later_counters_starts_them_at_zero():
    s = TrainState()
    s.load_state_dict({"step": 3, "batch": {"global": 8}, "data_cursor": {"epoch": 0, "samples_in_epoch": 24,
                                                                          "samples_total": 24}, "tokens_seen": 77})
    assert (s.loss_tokens, s.tokens_processed, s.trl_num_tokens) == (77, [0, 0], 0)
