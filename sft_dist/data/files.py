"""Read local data files (jsonl, json, parquet, csv) or a hub dataset into an in-memory `Dataset`.

Local files are read here rather than through `load_dataset`, so that a bad line is reported by file
and line number, and so that ranks reading the same files never race on a shared Arrow cache.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from datasets import Dataset, concatenate_datasets

from sft_dist.data.bad_rows import BadRows
from sft_dist.errors import BadRow, DataError

SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ORIGIN = "_origin"  # each row's Origins code: where it came from, for messages


class Origins:
    """Where rows came from: "file:line" (jsonl) or "file row N" (others; N counts from 1).

    A row holds one int64 code (source index << 32 | line or row), the source names are kept here once:
    a path string per row would cost more memory than many rows' tokens."""

    def __init__(self) -> None:
        self.sources: list[tuple[str, str]] = []  # (name, separator before the number)

    def add(self, name: str, sep: str) -> int:
        self.sources.append((name, sep))
        return (len(self.sources) - 1) << 32

    def where(self, code: int) -> str:
        name, sep = self.sources[code >> 32]
        return f"{name}{sep}{code & 0xFFFFFFFF}"


def read_files(files: list[str], bad: BadRows | None = None, origins: Origins | None = None) -> Dataset:
    """Concatenate the rows of every file, in order, with an `_origin` column (codes into `origins`). Raises
    DataError naming the file (and line); a bad line or row goes to `bad`, which raises or skips it."""
    bad = bad or BadRows(skip=False)
    origins = origins if origins is not None else Origins()
    if not files:
        raise DataError("no data files were given")
    parts = []
    for f in files:
        kind = SUFFIXES.get(Path(f).suffix.lower())
        if kind is None:
            raise DataError(f"{f}: unsupported file type {Path(f).suffix!r}; use one of {sorted(SUFFIXES)}")
        if not Path(f).is_file():
            what = "is a directory, not a file" if Path(f).is_dir() else "no such file"
            raise DataError(f"{f}: {what}; check data.train_files / data.eval_files")
        bad_before = bad.count
        try:
            rows = _READERS[kind](f, bad, origins)
        except OSError as e:  # permissions, a file removed or a disk error mid-read
            raise DataError(f"{f}: cannot read the file ({e.strerror or e}); check that it is readable") from None
        if len(rows) == 0:
            skipped = bad.count - bad_before
            why = f"all {skipped} of its rows were skipped as bad" if skipped else "the file has no rows"
            raise DataError(f"{f}: {why}")
        parts.append(rows)
    try:
        return parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    except ValueError as e:
        raise DataError(f"data files {files} have different columns or types and cannot be combined: {e}") from None


def _read_jsonl(path: str, bad: BadRows, origins: Origins) -> Dataset:
    base = origins.add(path, ":")
    rows = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                row = _parse_line(raw, where)
            except BadRow as e:
                bad.add(e, where)
                continue
            if row is not None:
                row[ORIGIN] = base | lineno
                rows.append(row)
    return _from_rows(path, rows, bad, origins)


def _parse_line(raw: bytes, where: str) -> dict | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRow(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start}); re-save the file as UTF-8",
                     "not UTF-8") from None
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRow(f"{where}: invalid JSON ({_json_problem(e)}); a truncated or corrupt line?",
                     "invalid JSON") from None
    if not isinstance(row, dict):
        raise BadRow(f"{where}: expected a JSON object per line, got {type(row).__name__}", "not an object")
    return row


def _json_problem(e: json.JSONDecodeError) -> str:
    # Some messages end in "at" ("Unterminated string starting at"): not "at at column".
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def _read_json(path: str, bad: BadRows, origins: Origins) -> Dataset:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); re-save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        # A .json file may be JSON Lines; try that before giving up.
        if e.msg == "Extra data":
            return _read_jsonl(path, bad, origins)
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({_json_problem(e)})") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]} wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of objects (or an object holding exactly one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of JSON objects")
    base = origins.add(path, " row ")
    rows = []
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            bad.add(BadRow(f"{path} row {i}: expected a JSON object, got {type(row).__name__}", "not an object"),
                    f"{path} row {i}")
            continue
        rows.append({**row, ORIGIN: base | i})
    return _from_rows(path, rows, bad, origins)


def _from_rows(path: str, rows: list[dict], bad: BadRows, origins: Origins) -> Dataset:
    if not rows:
        return Dataset.from_dict({})
    try:
        return Dataset.from_list(rows)
    except Exception as e:  # pyarrow type clash between rows, e.g. a number where others have text
        clashes = _type_clashes(rows)
        if not clashes:
            raise DataError(f"{path}: rows have inconsistent column types ({e}); fix the rows or the column") from None
    for i, col, got, want in clashes:
        where = origins.where(rows[i][ORIGIN])
        bad.add(BadRow(f"{where}: column {col!r} is {got}, other rows have {want}; fix the row", "wrong type"), where)
    dropped = {i for i, *_ in clashes}
    return _from_rows(path, [r for i, r in enumerate(rows) if i not in dropped], bad, origins)


def _type_clashes(rows: list[dict]) -> list[tuple[int, str, str, str]]:
    """(row index, column, its type, the column's usual type) for values whose type differs from most rows'."""
    def kind(v):
        return "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v).__name__

    usual: dict[str, Counter] = {}
    for row in rows:
        for col, v in row.items():
            if v is not None:
                usual.setdefault(col, Counter())[kind(v)] += 1
    out = []
    for i, row in enumerate(rows):
        for col, v in row.items():
            if v is not None and len(usual[col]) > 1 and kind(v) != usual[col].most_common(1)[0][0]:
                out.append((i, col, kind(v), usual[col].most_common(1)[0][0]))
                break
    return out


def _read_parquet(path: str, bad: BadRows, origins: Origins) -> Dataset:
    import pyarrow.parquet as pq

    try:
        return _numbered(Dataset(pq.read_table(path)), origins.add(path, " row "))
    except Exception as e:
        raise DataError(f"{path}: cannot read parquet file ({e})") from None


def _read_csv(path: str, bad: BadRows, origins: Origins) -> Dataset:
    import pyarrow.csv as pcsv

    try:
        return _numbered(Dataset(pcsv.read_csv(path)), origins.add(path, " row "))
    except Exception as e:
        raise DataError(f"{path}: cannot read CSV file ({e})") from None


def _numbered(ds: Dataset, base: int) -> Dataset:
    return ds.add_column(ORIGIN, [base | i for i in range(1, len(ds) + 1)])


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "csv": _read_csv}


def read_hub(name: str, config: str | None, split: str, origins: Origins | None = None) -> Dataset:
    from datasets import load_dataset

    try:
        ds = load_dataset(name, config, split=split)
    except Exception as e:
        raise DataError(f"data.dataset {name!r} (split {split!r}): cannot load from the hub or cache: {e}") from None
    origins = origins if origins is not None else Origins()
    return _numbered(ds, origins.add(f"{name} split {split!r}", " row "))
