"""The global sample order: world-size independent, every sample at most once per epoch, O(1) resume."""

from __future__ import annotations

import pytest

from sft_dist.data.sampler import GlobalBatchSampler


def steps(n, *, micro, accum, world, seed=1, epoch=0, shuffle=True):
    """For each optimizer step, the sorted sample ids all ranks train on."""
    per_rank = []
    for rank in range(world):
        s = GlobalBatchSampler(n, micro=micro, accum=accum, world=world, rank=rank, seed=seed, shuffle=shuffle)
        s.set_epoch(epoch)
        per_rank.append(list(s))
    out = []
    for step in range(len(per_rank[0]) // accum):
        ids = [i for r in per_rank for b in r[step * accum:(step + 1) * accum] for i in b]
        out.append(sorted(ids))
    return out


def test_each_step_trains_the_same_samples_for_any_geometry_of_one_global_batch():
    ref = steps(103, micro=8, accum=1, world=2)
    assert len(ref) == 103 // 16
    assert steps(103, micro=4, accum=4, world=1) == ref
    assert steps(103, micro=4, accum=2, world=2) == ref
    assert steps(103, micro=2, accum=2, world=4) == ref


def test_an_epoch_sees_each_sample_at_most_once_and_drops_only_the_tail():
    s = GlobalBatchSampler(103, micro=8, accum=1, world=2, rank=0, seed=1)
    assert s.dropped_per_epoch == 103 - 6 * 16
    seen = [i for step in steps(103, micro=8, accum=1, world=2) for i in step]
    assert len(seen) == len(set(seen)) == 96
    other_epoch = [i for step in steps(103, micro=8, accum=1, world=2, epoch=1) for i in step]
    assert other_epoch != seen  # reshuffled each epoch
    assert steps(103, micro=8, accum=1, world=2, seed=1) == steps(103, micro=8, accum=1, world=2, seed=1)
    assert steps(103, micro=8, accum=1, world=2, seed=2) != steps(103, micro=8, accum=1, world=2, seed=1)


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
