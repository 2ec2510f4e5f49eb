"""Streaming training data (`data.streaming: true`): rows read and tokenized as training goes, for
datasets that do not fit on local disk (or that nobody wants to tokenize up front).

The stream is the rows of the files in order (or a hub dataset in streaming mode), pass after pass. Within
a pass, windows of `data.shuffle_window` consecutive rows are permuted by a seeded generator (0: file
order). Stream position p is a sample; it is laid out exactly like the map-style sampler (sampler.py):
optimizer step s trains on positions [s*G, (s+1)*G), rank r's micro-batch m on the `micro` positions from
s*G + (m*world + r)*micro. Every rank scans the stream but parses and tokenizes only its own rows, so the
cursor is one number (positions consumed = steps x G), the same for any world size, and a resume scans
to it without tokenizing anything. Passes run into each other (no short last step): `training.max_steps`
decides the length of training.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset

from sft_dist.config.batch import global_batch
from sft_dist.data.bad_rows import BadRows
from sft_dist.data.formats import IGNORE, Tokenizer
from sft_dist.data.rows import parse_line
from sft_dist.data.sampler import PLACEHOLDER
from sft_dist.errors import BadRow, DataError

STREAMABLE = (".jsonl", ".parquet", ".csv")


class RowStream:
    """One pass over the raw rows: (where, payload), payload the undecoded line (jsonl) or a dict."""

    def __init__(self, files: list[str] | None, hub: tuple[str, str | None, str] | None = None):
        self.files, self.hub = files, hub

    def __iter__(self) -> Iterator[tuple[str, bytes | dict]]:
        if self.hub is not None:
            from datasets import load_dataset

            name, config, split = self.hub
            for i, row in enumerate(load_dataset(name, config, split=split, streaming=True), start=1):
                yield f"{name} split {split!r} row {i}", row
            return
        for f in self.files:
            suffix = Path(f).suffix.lower()
            if suffix == ".jsonl":
                with open(f, "rb") as fh:
                    for lineno, raw in enumerate(fh, start=1):
                        if raw.strip():
                            yield f"{f}:{lineno}", raw
            else:
                yield from _table_rows(f, suffix)


def _table_rows(path: str, suffix: str) -> Iterator[tuple[str, dict]]:
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    batches = pq.ParquetFile(path).iter_batches() if suffix == ".parquet" else pcsv.open_csv(path)
    n = 0
    for batch in batches:
        for row in batch.to_pylist():
            n += 1
            yield f"{path} row {n}", row


def _window_order(size: int, *, seed: int, pass_: int, window: int) -> list[int]:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + pass_) * 1_000_033 + window)
    return torch.randperm(size, generator=g).tolist()


def positions(stream: RowStream, *, seed: int, window: int, start: int = 0) -> Iterator[tuple[int, int, str, bytes | dict]]:
    """(stream position, sample id = row index in its pass, where, payload) from position `start` on,
    pass after pass, each pass's windows permuted."""
    pos, pass_ = 0, 0
    while True:
        rows = 0
        it = iter(stream)
        for w, chunk in enumerate(_chunks(it, window)):
            rows += len(chunk)
            if pos + len(chunk) <= start:  # skipped on resume: nothing parsed
                pos += len(chunk)
                continue
            order = _window_order(len(chunk), seed=seed, pass_=pass_, window=w) if window > 1 else range(len(chunk))
            base = rows - len(chunk)
            for k in order:
                if pos >= start:
                    yield pos, base + k, *chunk[k]
                pos += 1
        if rows == 0:
            raise DataError("data.streaming: the training data has no rows")
        pass_ += 1


def _chunks(it: Iterator, size: int) -> Iterator[list]:
    size = max(1, size)
    chunk: list = []
    for item in it:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class StreamSource:
    """The training stream and how to turn its rows into examples; the loader adds the batch geometry."""

    def __init__(self, stream: RowStream, tok: Tokenizer, *, max_length: int, skip_bad: bool, seed: int,
                 window: int):
        self.stream, self.tok, self.max_length, self.skip_bad = stream, tok, max_length, skip_bad
        self.seed, self.window = seed, window

    def example(self, sample_id: int, where: str, payload) -> dict:
        try:
            row = parse_line(payload, where) if isinstance(payload, bytes) else payload
            out = self.tok(row, f"{where} (train sample_id {sample_id})")
        except BadRow as e:
            if not self.skip_bad:
                raise BadRows.stop(e) from None
            return _no_loss()
        ids, labels = out["input_ids"][: self.max_length], out["labels"][: self.max_length]
        if all(t == IGNORE for t in labels[1:]):
            return _no_loss()
        return {"input_ids": ids, "labels": labels, "sample_id": sample_id}

    def describe(self) -> str:
        order = f"windows of {self.window} rows shuffled" if self.window > 1 else "file order"
        what = f"{len(self.stream.files)} file(s)" if self.stream.files else f"hub dataset {self.stream.hub[0]}"
        return f"data train: streaming {what}, {order}; rows are tokenized as they are trained on"


def _no_loss() -> dict:
    # Keeps the row's place in its micro-batch (ranks stay aligned); the trace does not list it.
    return {"input_ids": [0, 0], "labels": [IGNORE, IGNORE], "sample_id": PLACEHOLDER}


class StreamingTrain(IterableDataset):
    """This rank's micro-batches (lists of examples) of the stream, from micro-batch `start` on. A row that
    cannot be used (skipped as bad, or no loss-carrying token left) keeps its place as a row whose labels
    carry no loss, so every rank's micro-batches stay aligned with the others'."""

    def __init__(self, source: StreamSource, *, micro: int, accum: int, world: int, rank: int, start: int = 0):
        self.source = source
        self.micro, self.accum, self.world, self.rank = micro, accum, world, rank
        self.global_batch = global_batch(micro, accum, world)
        self.start = start

    def _mine(self, pos: int) -> int | None:
        """This rank's micro-batch number for a stream position, or None when another rank's."""
        step, within = divmod(pos, self.global_batch)
        m, r = divmod(within // self.micro, self.world)
        return step * self.accum + m if r == self.rank else None

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, me = (info.num_workers, info.id) if info else (1, 0)
        src = self.source
        first = self.start // self.accum * self.global_batch  # the step this rank's micro-batch `start` is in
        batch, current = [], None
        for pos, sample_id, where, payload in positions(src.stream, seed=src.seed, window=src.window, start=first):
            b = self._mine(pos)
            if b is None or b < self.start or b % workers != me:  # DataLoader workers take turns by micro-batch
                continue
            if current is not None and b != current:
                yield batch
                batch = []
            current = b
            batch.append(src.example(sample_id, where, payload))

    def cursor(self, step: int) -> dict:
        """What a checkpoint records (the counterpart of GlobalBatchSampler.cursor)."""
        return {"samples_total": step * self.global_batch, "streaming": True, "seed": self.source.seed,
                "shuffle_window": self.source.window}


class StreamLoader(DataLoader):
    """DataLoader of a StreamingTrain: no length (training.max_steps decides); `starting_at` repositions it
    by scanning the stream to the cursor without tokenizing."""

    def __init__(self, dataset: StreamingTrain, **kwargs):
        super().__init__(dataset, batch_size=None, **kwargs)
        self._kwargs = kwargs

    def set_epoch(self, epoch: int) -> None:  # one endless stream: passes are counted by position
        pass

    def starting_at(self, batches: int) -> StreamLoader:
        d = self.dataset
        return StreamLoader(StreamingTrain(d.source, micro=d.micro, accum=d.accum, world=d.world, rank=d.rank,
                                           start=batches), **self._kwargs)
