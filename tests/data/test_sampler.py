"""The global sample order: world-size independent, every sample exactly once per epoch, O(1) resume."""

from __future__ import annotations

import pytest

from sft_dist.data.sampler import PLACEHOLDER, GlobalBatchSampler, WithPlaceholder


def steps(n, *, micro, accum, world, seed=1, epoch=0, shuffle=True):
    """For each optimizer step, the sorted sample ids all ranks train on."""
    per_rank = []
    for rank in range(world):
        s = GlobalBatchSampler(n, micro=micro, accum=accum, world=world, rank=rank, seed=seed, shuffle=shuffle)
        s.set_epoch(epoch)
        per_rank.append(list(s))
    out = []
    for step in range(len(per_rank[0]) // accum):
        ids = [i for r in per_rank for b in r[step * accum:(step + 1) * accum] for i in b if i != PLACEHOLDER]
        out.append(sorted(ids))
    return out


def test_each_step_trains_the_same_samples_for_any_geometry_of_one_global_batch():
    ref = steps(103, micro=8, accum=1, world=2)
    assert len(ref) == 103 // 16 + 1
    assert steps(103, micro=4, accum=4, world=1) == ref
    assert steps(103, micro=4, accum=2, world=2) == ref
    assert steps(103, micro=2, accum=2, world=4) == ref


@pytest.mark.parametrize("n,micro,accum,world", [(103, 8, 1, 2), (103, 4, 2, 2), (37, 4, 2, 2), (5, 4, 2, 3),
                                                 (1, 2, 1, 2), (96, 8, 1, 2), (17, 1, 1, 4)])
def test_an_epoch_trains_on_every_sample_exactly_once(n, micro, accum, world):
    per_step = steps(n, micro=micro, accum=accum, world=world)
    seen = [i for step in per_step for i in step]
    assert sorted(seen) == list(range(n))  # none dropped, none twice
    g = micro * accum * world
    assert [len(s) for s in per_step] == [g] * (n // g) + ([n % g] if n % g else [])
    s = GlobalBatchSampler(n, micro=micro, accum=accum, world=world, rank=0, seed=1)
    assert len(s) == len(per_step) * accum  # every rank runs every micro-batch of every step
    for rank in range(world):
        r = GlobalBatchSampler(n, micro=micro, accum=accum, world=world, rank=rank, seed=1)
        assert all(1 <= len(b) <= micro for b in r)  # an empty slot holds the placeholder, never nothing


def test_the_last_step_spreads_its_samples_and_says_so():
    s = GlobalBatchSampler(37, micro=4, accum=2, world=2, rank=0, seed=1)
    assert (s.full_steps, s.tail, s.steps_per_epoch, s.empty_tail_slots) == (2, 5, 3, 0)
    assert [len(b) for b in s][-2:] == [2, 1]  # 5 samples over 4 micro-batches: 2, 1 | 1, 1
    assert s.describe() == "data: 37 samples per epoch = 2 steps of 16 + a last step of 5; each sample once per epoch"
    small = GlobalBatchSampler(3, micro=2, accum=2, world=2, rank=1, seed=1)
    assert list(small)[-1] == [PLACEHOLDER] and small.empty_tail_slots == 1
    assert "1 of its 4 micro-batches hold a placeholder that carries no loss" in small.describe()
    assert GlobalBatchSampler(32, micro=4, accum=2, world=2, rank=0, seed=1).describe().endswith(
        "= 2 steps of 16; each sample once per epoch")


def test_epochs_reshuffle_and_the_seed_decides():
    seen = [i for step in steps(103, micro=8, accum=1, world=2) for i in step]
    other_epoch = [i for step in steps(103, micro=8, accum=1, world=2, epoch=1) for i in step]
    assert other_epoch != seen  # reshuffled each epoch
    assert steps(103, micro=8, accum=1, world=2, seed=1) == steps(103, micro=8, accum=1, world=2, seed=1)
    assert steps(103, micro=8, accum=1, world=2, seed=2) != steps(103, micro=8, accum=1, world=2, seed=1)


def test_placeholder_row_keeps_the_columns_and_carries_no_loss():
    from datasets import Dataset

    ds = Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9]], "labels": [[-100, 6, 7], [8, 9]],
                            "sample_id": [10, 11]})
    wrapped = WithPlaceholder(ds)
    rows = wrapped.__getitems__([1, PLACEHOLDER, 0])
    assert rows[0]["sample_id"] == 11 and rows[2]["sample_id"] == 10
    assert rows[1] == {"input_ids": [5, 6, 7], "labels": [-100, -100, -100], "sample_id": PLACEHOLDER}


def test_sequential_order_without_shuffle():
    assert steps(32, micro=4, accum=1, world=2, shuffle=False) == [list(range(8)), list(range(8, 16)),
                                                                    list(range(16, 24)), list(range(24, 32))]


@pytest.mark.parametrize("start", [0, 1, 5, 12])
def test_starting_at_yields_the_rest_of_the_epoch_without_replaying(start):
    s = GlobalBatchSampler(200, micro=4, accum=2, world=2, rank=1, seed=3)
    s.set_epoch(2)
    full = list(s)
    resumed = s.starting_at(start)
    assert list(resumed) == full[start:]
    assert list(resumed) == full  # the offset applies to the first pass only


def test_dataloader_workers_do_not_change_what_a_rank_trains_on():
    from datasets import Dataset

    from sft_dist.data.sampler import CursorDataLoader

    ds = Dataset.from_dict({"input_ids": [[i] for i in range(37)], "labels": [[i] for i in range(37)],
                            "sample_id": list(range(37))})

    def batches(workers):
        s = GlobalBatchSampler(37, micro=4, accum=2, world=2, rank=1, seed=5)
        loader = CursorDataLoader(WithPlaceholder(ds), s, num_workers=workers,
                                  collate_fn=lambda rows: [r["sample_id"] for r in rows])
        return list(loader)

    assert batches(2) == batches(0) == list(GlobalBatchSampler(37, micro=4, accum=2, world=2, rank=1, seed=5))
