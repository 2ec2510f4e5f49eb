"""Read local data files (jsonl, json, parquet, csv) or a hub dataset into an in-memory `Dataset`.

Local files are read here rather than through `load_dataset`, so that a bad line is reported by file
and line number, and so that ranks reading the same files never race on a shared Arrow cache.
"""

from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset, concatenate_datasets

from sft_dist.errors import DataError

SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def read_files(files: list[str]) -> Dataset:
    """Concatenate the rows of every file, in order. Raises DataError naming the file (and line)."""
    if not files:
        raise DataError("no data files were given")
    parts = []
    for f in files:
        kind = SUFFIXES.get(Path(f).suffix.lower())
        if kind is None:
            raise DataError(f"{f}: unsupported file type {Path(f).suffix!r}; use one of {sorted(SUFFIXES)}")
        rows = _READERS[kind](f)
        if len(rows) == 0:
            raise DataError(f"{f}: the file has no rows")
        parts.append(rows)
    try:
        return parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    except ValueError as e:
        raise DataError(f"data files {files} have different columns or types and cannot be combined: {e}") from None


def _read_jsonl(path: str) -> Dataset:
    rows = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
    return _from_rows(path, rows)


def _read_json(path: str) -> Dataset:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        # A .json file may be JSON Lines; try that before giving up.
        if e.msg == "Extra data":
            return _read_jsonl(path)
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]} wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of objects (or an object holding exactly one list)")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a list of JSON objects")
    return _from_rows(path, data)


def _from_rows(path: str, rows: list[dict]) -> Dataset:
    if not rows:
        return Dataset.from_dict({})
    try:
        return Dataset.from_list(rows)
    except Exception as e:  # pyarrow type clash between rows, e.g. a number where others have text
        raise DataError(f"{path}: rows have inconsistent column types ({e}); fix the rows or the column") from None


def _read_parquet(path: str) -> Dataset:
    import pyarrow.parquet as pq

    try:
        return Dataset(pq.read_table(path))
    except Exception as e:
        raise DataError(f"{path}: cannot read parquet file ({e})") from None


def _read_csv(path: str) -> Dataset:
    import pyarrow.csv as pcsv

    try:
        return Dataset(pcsv.read_csv(path))
    except Exception as e:
        raise DataError(f"{path}: cannot read CSV file ({e})") from None


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "csv": _read_csv}


def read_hub(name: str, config: str | None, split: str) -> Dataset:
    from datasets import load_dataset

    try:
        return load_dataset(name, config, split=split)
    except Exception as e:
        raise DataError(f"data.dataset {name!r} (split {split!r}): cannot load from the hub or cache: {e}") from None
