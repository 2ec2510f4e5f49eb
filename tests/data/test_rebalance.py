"""training.train_sampling_strategy: batch_rebalance (data/rebalance.py): each step trains the random order's samples,
re-divided among ranks and micro-batches so that ranks have like work and micro-batches little padding; never more
padded tokens in a micro-batch than the random order allows; the same on every rank and after a resume."""

from __future__ import annotations

import random

import pytest

from sft_dist.config.load import load_config
from sft_dist.data.rebalance import assign, cost
from sft_dist.data.sampler import PLACEHOLDER, GlobalBatchSampler
from sft_dist.errors import ConfigError
from tests.conftest import QUICKSTART

Q = 1 / (6 * 64)


def lengths_of(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice([rng.randint(5, 20), rng.randint(30, 60), rng.randint(90, 128)]) for _ in range(n)]


def batches(n, *, micro, accum, world, lengths=None, seed=1, epoch=0):
    """Each rank's micro-batches, in order."""
    out = []
    for rank in range(world):
        s = GlobalBatchSampler(n, micro=micro, accum=accum, world=world, rank=rank, seed=seed, lengths=lengths, q=Q)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


def step_sets(per_rank, accum):
    return [sorted(i for r in per_rank for b in r[k * accum:(k + 1) * accum] for i in b if i != PLACEHOLDER)
            for k in range(len(per_rank[0]) // accum)]


@pytest.mark.parametrize("n,micro,accum,world", [(103, 8, 1, 2), (103, 4, 2, 2), (37, 4, 2, 2), (5, 4, 2, 3),
                                                 (96, 2, 4, 4), (17, 1, 1, 4), (64, 8, 1, 1)])
def test_each_step_trains_the_random_orders_samples_each_once(n, micro, accum, world):
    lengths = lengths_of(n)
    plain = batches(n, micro=micro, accum=accum, world=world)
    balanced = batches(n, micro=micro, accum=accum, world=world, lengths=lengths)
    assert [len(r) for r in balanced] == [len(r) for r in plain]  # every rank runs every micro-batch
    assert step_sets(balanced, accum) == step_sets(plain, accum)
    seen = [i for r in balanced for b in r for i in b if i != PLACEHOLDER]
    assert sorted(seen) == list(range(n))
    assert all(b for r in balanced for b in r)  # an empty slot holds the placeholder
    cap = micro * max(lengths)
    assert all(len(b) * max(lengths[i] for i in b) <= cap for r in balanced for b in r if b != [PLACEHOLDER])


def test_ranks_get_like_work_and_micro_batches_little_padding():
    wins = 0
    for seed in range(20):
        lengths = lengths_of(64, seed)
        samples = list(range(64))
        slots = assign(samples, lengths, world=4, accum=2, q=Q, max_tokens=8 * max(lengths))
        plain = [samples[k * 8:(k + 1) * 8] for k in range(8)]

        def worst(parts):
            return max(sum(cost(len(p), max(lengths[i] for i in p), Q) for p in parts[r::4] if p) for r in range(4))

        def padded(parts):
            return sum(len(p) * max(lengths[i] for i in p) for p in parts if p)

        assert worst(slots) <= worst(plain) and padded(slots) <= padded(plain), seed
        wins += worst(slots) < 0.8 * worst(plain)
    assert wins >= 15  # most steps: the slowest rank has at least a fifth less to do
    # a rank's micro-batches run dearest first
    lengths = lengths_of(64, 3)
    slots = assign(list(range(64)), lengths, world=2, accum=4, q=Q, max_tokens=8 * 128)
    for r in range(2):
        mine = [cost(len(p), max(lengths[i] for i in p), Q) if p else 0 for p in slots[r::2]]
        assert mine == sorted(mine, reverse=True)


def test_the_same_on_every_rank_and_from_a_resume_point():
    lengths = lengths_of(103)
    whole = batches(103, micro=4, accum=2, world=2, lengths=lengths, epoch=1)
    for rank in range(2):
        s = GlobalBatchSampler(103, micro=4, accum=2, world=2, rank=rank, seed=1, lengths=lengths, q=Q)
        s.set_epoch(1)
        assert list(s.starting_at(5)) == whole[rank][5:]
    assert "divided among ranks and micro-batches by cost (batch_rebalance)" in GlobalBatchSampler(
        103, micro=4, accum=2, world=2, rank=0, seed=1, lengths=lengths).describe()


def test_the_strategy_is_checked_with_the_config(capsys):
    from sft_dist.cli import main

    assert load_config(QUICKSTART, ["training.train_sampling_strategy=batch_rebalance"])
    assert main(["plan", str(QUICKSTART), "training.train_sampling_strategy=batch_rebalance"]) == 0
    assert ("batch_rebalance: each step's 16 sequences re-divided by length: a micro-batch holds more short rows or "
            "fewer long ones, never more padded tokens than 8 x the longest row") in capsys.readouterr().out
    with pytest.raises(ConfigError, match="a stream does not know"):
        load_config(QUICKSTART, ["training.train_sampling_strategy=batch_rebalance", "data.streaming=true",
                                 "data.eval_files=null", "training.eval_strategy=no"])
    with pytest.raises(ConfigError, match="use `random` \\(default\\), `batch_rebalance`"):
        load_config(QUICKSTART, ["training.train_sampling_strategy=group_by_length"])


def test_token_lengths_read_from_the_arrow_column():
    from datasets import Dataset

    from sft_dist.data.loader import token_lengths

    ds = Dataset.from_dict({"input_ids": [[1, 2, 3], [4], list(range(40))], "labels": [[1, 2, 3], [4], [0] * 40]})
    assert token_lengths(ds) == [3, 1, 40]
    assert token_lengths(ds.select([2, 0])) == [40, 3]  # an indices mapping: the rows as selected
