"""Streaming training data: the stream's order (seeded windows, passes), rank layout equal to the
map-style sampler's, O(1)-tokenization resume, DataLoader workers, bad rows, config checks."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from sft_dist.config.load import builtin_path, load_config
from sft_dist.data.formats import Tokenizer
from sft_dist.data.sampler import PLACEHOLDER
from sft_dist.data.stream import (
    RowStream,
    StreamingTrain,
    StreamLoader,
    StreamSource,
    positions,
)
from sft_dist.errors import BadRow, ConfigError
from tests.conftest import QUICKSTART

ROWS = 37


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))


@pytest.fixture
def data(tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"answer {i}"}) + "\n" for i in range(ROWS)))
    return f


def source(tok, files, *, window=8, skip=False) -> StreamSource:
    t = Tokenizer(tok, fmt="alpaca", template="### Q: {instruction}\n### A: {output}", completion_only_loss=True)
    return StreamSource(RowStream([str(f) for f in files]), t, max_length=64, skip_bad=skip, seed=3, window=window)


def step_ids(src, *, micro, accum, world, steps, start=0):
    """Per optimizer step, the sorted sample ids all ranks train on."""
    per_rank = [list(_take(StreamingTrain(src, micro=micro, accum=accum, world=world, rank=r, start=start * accum),
                           (steps - start) * accum)) for r in range(world)]
    return [sorted(ex["sample_id"] for r in per_rank for b in r[s * accum:(s + 1) * accum] for ex in b)
            for s in range(steps - start)]


def _take(it, n):
    for i, x in enumerate(it):
        if i == n:
            return
        yield x


def test_each_pass_is_a_seeded_permutation_of_the_rows(tok, data):
    src = source(tok, [data])
    order = [(sid, where) for _, sid, where, _ in _take(positions(src.stream, seed=3, window=8), 2 * ROWS)]
    first, second = [s for s, _ in order[:ROWS]], [s for s, _ in order[ROWS:]]
    assert sorted(first) == sorted(second) == list(range(ROWS)) and first != second
    assert first != list(range(ROWS)) and sorted(first[:8]) == list(range(8))  # shuffled within windows of 8
    assert order[0][1] == f"{data}:{first[0] + 1}"
    plain = [s for _, s, _, _ in _take(positions(src.stream, seed=3, window=0), ROWS)]
    assert plain == list(range(ROWS))
    resumed = [s for _, s, _, _ in _take(positions(src.stream, seed=3, window=8, start=45), 10)]
    assert resumed == [s for s, _ in order[45:55]]


def test_steps_train_the_same_samples_for_any_geometry_and_resume(tok, data):
    src = source(tok, [data])
    ref = step_ids(src, micro=4, accum=1, world=2, steps=6)
    assert [len(s) for s in ref] == [8] * 6
    assert step_ids(src, micro=2, accum=2, world=2, steps=6) == ref
    assert step_ids(src, micro=2, accum=4, world=1, steps=6) == ref
    assert step_ids(src, micro=4, accum=1, world=2, steps=6, start=4) == ref[4:]  # a resume at step 4
    first_pass = [i for s in ref[:4] for i in s]  # positions 0-31; the pass ends 5 positions into step 4
    assert len(set(first_pass)) == 32 and set(first_pass) | set(ref[4]) == set(range(ROWS))


def test_dataloader_workers_do_not_change_the_order(tok, data):
    src = source(tok, [data])

    def batches(workers):
        loader = StreamLoader(StreamingTrain(src, micro=4, accum=2, world=2, rank=1), collate_fn=lambda b: b,
                              num_workers=workers)
        return [[ex["sample_id"] for ex in b] for b in _take(iter(loader), 9)]

    assert batches(2) == batches(0)
    assert batches(0)[0] == [ex["sample_id"] for ex in next(iter(StreamingTrain(src, micro=4, accum=2, world=2,
                                                                                   rank=1)))]


def test_a_bad_row_stops_with_file_and_line_or_keeps_its_place(tok, tmp_path):
    f = tmp_path / "bad.jsonl"
    rows = [{"instruction": "q", "output": "a"}] * 5 + [{"instruction": "q", "output": ""}] + \
        [{"instruction": "q", "output": "a"}] * 2
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BadRow, match=rf"{f}:6 \(train sample_id 5\): empty response"):
        list(_take(StreamingTrain(source(tok, [f], window=0), micro=8, accum=1, world=1, rank=0), 1))
    (batch,) = _take(StreamingTrain(source(tok, [f], window=0, skip=True), micro=8, accum=1, world=1, rank=0), 1)
    assert [ex["sample_id"] for ex in batch] == [0, 1, 2, 3, 4, PLACEHOLDER, 6, 7]
    assert set(batch[5]["labels"]) == {-100}


@pytest.mark.parametrize("overrides,problem", [
    (["data.streaming=true", "training.max_steps=-1"], "data.streaming: needs `training.max_steps`"),
    (["data.streaming=true", "data.packing=true"], "data.packing: not supported with data.streaming"),
    (["data.streaming=true", "data.shuffle_window=-1"], "data.shuffle_window: got -1"),
])
def test_config_checks(overrides, problem):
    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, overrides)
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def test_a_json_file_cannot_be_streamed(tmp_path):
    f = tmp_path / "d.json"
    f.write_text("[]")
    with pytest.raises(ConfigError, match="cannot be streamed"):
        load_config(QUICKSTART, ["data.streaming=true", f"data.train_files={f}"])
