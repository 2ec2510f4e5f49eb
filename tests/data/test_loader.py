"""The train loader: each rank its part of one global order, started at a cursor without replaying batches."""

from __future__ import annotations

import pytest
from datasets import Dataset

from sft_dist.data.loader import Geometry, train_loader
from sft_dist.errors import SftDistError


def rows(n: int) -> Dataset:
    return Dataset.from_dict({"input_ids": [[i, i + 1] for i in range(n)], "labels": [[i, i + 1] for i in range(n)],
                              "sample_id": list(range(n))})


def ids(batch: list[dict]) -> list[int]:
    return [r["sample_id"] for r in batch]


def batches(world: int, rank: int, *, n: int = 40, start: int = 0) -> list[list[int]]:
    geometry = Geometry(micro=2, accum=4 // world, world=world, rank=rank)  # a global batch of 8 either way
    loader, position = train_loader(rows(n), collate=ids, geometry=geometry, seed=3, shuffle=True)
    assert position.global_batch == 8
    return list(loader.starting_at(start) if start else loader)


def test_the_ranks_split_one_global_order_whatever_the_world_size():
    one = [i for b in batches(1, 0) for i in b]
    two = [batches(2, r) for r in (0, 1)]
    assert sorted(one) == list(range(40))
    # per optimizer step (4 micro-batches on one rank, 2 on each of two) the same 8 samples
    for step in range(5):
        both = sorted(i for r in (0, 1) for b in two[r][2 * step: 2 * step + 2] for i in b)
        assert both == sorted(one[8 * step: 8 * step + 8])


def test_a_loader_started_at_a_cursor_is_the_rest_of_the_full_one():
    full = batches(2, 1)
    assert batches(2, 1, start=4) == full[4:]


def test_an_empty_training_set_is_refused():
    with pytest.raises(SftDistError, match="no samples"):
        train_loader(rows(0), collate=ids, geometry=Geometry(1, 1, 1, 0), seed=0, shuffle=False)
