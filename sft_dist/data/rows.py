"""Raw rows before tokenization: parse a jsonl line, unwrap a .json document, find values whose type clashes
with their column's, map column names, find duplicate ids, hold out eval rows.

Plain Python (numpy for the hold-out), no torch, transformers or datasets: the build (files.py, build.py) and
the launcher's precheck (precheck.py) share these, so a row is judged the same way by both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from sft_dist.data.bad_rows import BadRows
from sft_dist.data.formats import OPTIONAL, REQUIRED
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


def parse_line(raw: bytes, where: str) -> dict | None:
    """One jsonl line as a row; None for a blank line. Raises BadRow (not UTF-8, invalid JSON, not an object)."""
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
        raise BadRow(f"{where}: invalid JSON ({json_problem(e)}); a truncated or corrupt line?",
                     "invalid JSON") from None
    if not isinstance(row, dict):
        raise BadRow(f"{where}: expected a JSON object per line, got {type(row).__name__}", "not an object")
    return row


def json_problem(e: json.JSONDecodeError) -> str:
    # Some messages end in "at" ("Unterminated string starting at"): not "at at column".
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def load_json_document(path: str, fh) -> Any | None:
    """A whole .json file's data, from its open binary handle; None when it is JSON Lines after all."""
    try:
        return json.loads(fh.read().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); re-save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # a .json file may be JSON Lines
            return None
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({json_problem(e)})") from None


def json_document_rows(path: str, data: Any, bad: BadRows) -> list[tuple[int, dict]]:
    """(row number from 1, row) of a .json document: a list of objects, or an object holding exactly one list."""
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]} wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of objects (or an object holding exactly one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of JSON objects")
    rows = []
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            bad.add(BadRow(f"{path} row {i}: expected a JSON object, got {type(row).__name__}", "not an object"),
                    f"{path} row {i}")
            continue
        rows.append((i, row))
    return rows


def no_rows(path: str, skipped: int) -> DataError:
    why = f"all {skipped} of its rows were skipped as bad" if skipped else "the file has no rows"
    return DataError(f"{path}: {why}")


def kind(value: Any) -> str:
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


_NUMBER = {int: "number", float: "number"}


def type_clashes(rows: list[dict]) -> list[tuple[int, str, str, str]]:
    """(row index, column, its type, the column's usual type) for values whose type differs from most rows'
    (at most one per row: the first such column)."""
    usual: dict[str, dict[str, int]] = {}
    for row in rows:  # the hot loop of a precheck: `kind` inlined for JSON's own types
        for col, v in row.items():
            if v is not None:
                t = type(v)
                k = _NUMBER.get(t) or t.__name__
                counts = usual.get(col)
                if counts is None:
                    counts = usual[col] = {}
                counts[k] = counts.get(k, 0) + 1
    mixed = {col: max(counts, key=counts.__getitem__) for col, counts in usual.items() if len(counts) > 1}
    if not mixed:
        return []
    out = []
    for i, row in enumerate(rows):
        for col, v in row.items():
            if v is not None and col in mixed and kind(v) != mixed[col]:
                out.append((i, col, kind(v), mixed[col]))
                break
    return out


def clash_error(where: str, col: str, got: str, want: str) -> BadRow:
    return BadRow(f"{where}: column {col!r} is {got}, other rows have {want}; fix the row", "wrong type")


def columns_of(rows: list[dict]) -> list[str]:
    """Every key of any row, in the order first seen (a key missing from a row is a null there)."""
    seen: dict[str, None] = {}
    for row in rows:
        for k in row:
            if k not in seen:
                seen[k] = None
    return list(seen)


def map_columns(fmt: str, columns: list[str], mapping: dict | None, source: str) -> dict[str, str]:
    """The renames {theirs: ours} that `data.columns` (or a mixture source's `columns`) asks for, checked against
    the data's columns; raises DataError naming the option, the source and its columns."""
    mapping = mapping or {}
    allowed = REQUIRED[fmt] + OPTIONAL.get(fmt, ())
    shown = [c for c in columns if c != ORIGIN]
    for ours, theirs in mapping.items():
        if ours not in allowed:
            raise DataError(f"data.columns: {ours!r} is not a column of format {fmt!r}; allowed: {list(allowed)}")
        if theirs not in columns:
            raise DataError(f"data.columns.{ours}: {source} has no column {theirs!r}; its columns: {shown}")
    renames = {theirs: ours for ours, theirs in mapping.items() if theirs != ours}
    after = mapped_columns(columns, renames)
    missing = [c for c in REQUIRED[fmt] if c not in after]
    if missing:
        raise DataError(
            f"{source}: data.format {fmt!r} needs column(s) {missing}, found {[c for c in after if c != ORIGIN]}; "
            f"map yours with data.columns (e.g. data.columns.{missing[0]}=<your column>)"
        )
    return renames


def mapped_columns(columns: list[str], renames: dict[str, str]) -> list[str]:
    """The columns after `renames` ({theirs: ours}); a column of ours that one of theirs replaces goes."""
    return [renames.get(c, c) for c in columns if not (c in renames.values() and c not in renames)]


def id_column_missing(col: str, source: str, columns: list[str]) -> DataError:
    return DataError(f"data.id_column: {source} has no column {col!r}; its columns: "
                     f"{[c for c in columns if c != ORIGIN]}; name the id column or unset data.id_column")


def duplicate_ids(values: list, wheres: Callable[[int], str], col: str, bad: BadRows) -> set[int]:
    """Indices of rows to drop for their id (null, or seen before: the first row with an id is kept). Each goes
    to `bad`, which raises unless skipping."""
    first: dict = {}
    dropped = set()
    for i, value in enumerate(values):
        key = value if isinstance(value, (str, int, float, bool)) else json.dumps(value, sort_keys=True, default=str)
        if value is None:
            where = wheres(i)
            bad.add(BadRow(f"{where}: id column {col!r} is null; give the row an id", "null value"), where)
        elif key in first:
            where = wheres(i)
            bad.add(BadRow(f"{where}: duplicate id {value!r} (column {col!r}), first at {first[key]}; ids must be "
                           "unique", "duplicate id"), where)
        else:
            first[key] = wheres(i)
            continue
        dropped.add(i)
    return dropped


def holdout(n: int, ratio: float, *, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) row indices for `data.eval_split_ratio`: a seeded permutation, its first ceil(ratio*n) rows
    held out (the split `datasets.Dataset.train_test_split` makes, in its order)."""
    import numpy as np

    n_eval = math.ceil(ratio * n)
    if not 0 < n_eval < n:
        raise DataError(f"data.eval_split_ratio={ratio}: holding out {n_eval} of {n} rows leaves no train or no "
                        "eval row; change the ratio or give data.eval_files")
    order = np.random.default_rng(seed).permutation(n).tolist()
    return order[n_eval:], order[:n_eval]
