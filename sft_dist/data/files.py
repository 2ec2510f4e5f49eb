"""Read local data files (jsonl, json, parquet, csv) or a hub dataset into an in-memory `Dataset`.

Local files are read here rather than through `load_dataset`, so that a bad line is reported by file
and line number, and so that ranks reading the same files never race on a shared Arrow cache.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, concatenate_datasets

from sft_dist.data.bad_rows import BadRows
from sft_dist.data.rows import (
    ORIGIN,
    SUFFIXES,
    Origins,
    clash_error,
    columns_of,
    json_document_rows,
    load_json_document,
    no_rows,
    parse_line,
    type_clashes,
)
from sft_dist.errors import BadRow, DataError

__all__ = ["ORIGIN", "SUFFIXES", "Origins", "read_files", "read_hub"]


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
            raise no_rows(f, bad.count - bad_before)
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
                row = parse_line(raw, where)
            except BadRow as e:
                bad.add(e, where)
                continue
            if row is not None:
                row[ORIGIN] = base | lineno
                rows.append(row)
    return _from_rows(path, rows, bad, origins)


def _read_json(path: str, bad: BadRows, origins: Origins) -> Dataset:
    with open(path, "rb") as fh:
        data = load_json_document(path, fh)
    if data is None:
        return _read_jsonl(path, bad, origins)
    base = origins.add(path, " row ")
    rows = [{**row, ORIGIN: base | i} for i, row in json_document_rows(path, data, bad)]
    return _from_rows(path, rows, bad, origins)


def _from_rows(path: str, rows: list[dict], bad: BadRows, origins: Origins) -> Dataset:
    if not rows:
        return Dataset.from_dict({})
    # Every key of any row is a column (Dataset.from_list would keep only the first row's keys).
    columns = {k: [r.get(k) for r in rows] for k in columns_of(rows)}
    try:
        return Dataset.from_dict(columns)
    except Exception as e:  # pyarrow type clash between rows, e.g. a number where others have text
        clashes = type_clashes(rows)
        if not clashes:
            # Inside nested values (a turn's content a number): kept as JSON, for the format's row check to name
            # the row, as the precheck does.
            try:
                return Dataset.from_dict(columns, on_mixed_types="use_json")
            except Exception:
                raise DataError(f"{path}: rows have inconsistent column types ({e}); fix the rows or the "
                                "column") from None
    for i, col, got, want in clashes:
        where = origins.where(rows[i][ORIGIN])
        bad.add(clash_error(where, col, got, want), where)
    dropped = {i for i, *_ in clashes}
    return _from_rows(path, [r for i, r in enumerate(rows) if i not in dropped], bad, origins)


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
