"""Check the data before any worker starts: everything that needs no tokenizer, in seconds.

`precheck(cfg.data, seed=...)` reads every local data file once (jsonl line by line, json, parquet and csv
through pyarrow), the way the build will (files.py, build.py), and runs the same checks with the same
functions (rows.py, formats.row_check): files exist and are of a known type, lines are UTF-8 JSON objects,
values have their column's type, the format's columns are there (after `data.columns`), ids are unique, and
every row has the structure its format needs (text where text is due, a non-empty response, a conversation
with known roles and an assistant turn). The first problem raises the DataError / BadRow the workers would
have raised, with the same message (file and line or row, the sample id, what to do); with
`data.on_bad_row: skip` bad rows are counted instead, and only a file or split left without rows stops.

What it leaves to the workers (it says so in its report): anything that needs the tokenizer (lengths, the chat
template), hub datasets, the rows of a mixture source drawn as a seeded subset, a stream beyond its first
STREAM_ROWS rows, and type clashes inside nested values. A cache entry built from these very files and
options (data/cache.py) was checked when it was built: then nothing is read again.

Imports no torch, transformers or datasets (tests/data/test_precheck.py checks): it runs in the launcher,
before any worker process starts.
"""

from __future__ import annotations

import gc
import glob
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from sft_dist.config.schema import DataConfig
from sft_dist.data.bad_rows import BadRows
from sft_dist.data.formats import CHAT_FORMATS, chat_spec, row_check
from sft_dist.data.rows import (
    SUFFIXES,
    Origins,
    clash_error,
    columns_of,
    duplicate_ids,
    holdout,
    id_column_missing,
    json_document_rows,
    kind,
    load_json_document,
    map_columns,
    mapped_columns,
    no_rows,
    parse_line,
    type_clashes,
)
from sft_dist.data.templates import resolve_template
from sft_dist.errors import BadRow, DataError

STREAM_ROWS = 100_000  # data.streaming: rows of the stream checked up front (the rest as they are trained on)


@dataclass
class PrecheckReport:
    files: int = 0
    rows: dict[str, int] = field(default_factory=dict)  # rows checked, per split
    skipped: dict[str, int] = field(default_factory=dict)  # bad rows counted (data.on_bad_row=skip), per split
    seconds: float = 0.0
    cached: str | None = None  # the cache entry built from these files and options: nothing read
    notes: list[str] = field(default_factory=list)  # what is left to the workers

    def describe(self) -> str:
        if self.cached:
            return (f"data precheck: {self.cached} was built from these files and options (checked then); "
                    f"not read again ({self.seconds:.2f} s)")
        rows = ", ".join(f"{n} {name}" for name, n in self.rows.items()) or "no"
        skipped = "".join(f"; {n} bad {name} row(s) to be skipped" for name, n in self.skipped.items() if n)
        notes = "".join(f"; {n}" for n in self.notes)
        return f"data precheck: {rows} rows in {self.files} file(s) checked in {self.seconds:.2f} s{skipped}{notes}"


@dataclass
class _Split:
    """Rows as read (a row per dict, its Origins code alongside), for one split or mixture source."""

    name: str
    source: str
    rows: list[dict]
    codes: list[int]
    renames: dict[str, str]
    bad: BadRows


def precheck(cfg: DataConfig, *, seed: int = 42) -> PrecheckReport:
    """Check `cfg`'s data files without a tokenizer, as the workers' build would (see the module docstring).

    Args:
        seed: the training seed (`training.seed`): which rows `data.eval_split_ratio` holds out.
    Raises:
        DataError (a file) or BadRow (a row, unless data.on_bad_row=skip), with the build's message."""
    t0 = time.monotonic()
    report = PrecheckReport()
    if cfg.dataset is not None:
        report.notes.append(f"hub dataset {cfg.dataset!r} is checked by the workers")
    elif not cfg.streaming:
        report.cached = _cached_entry(cfg, seed=seed)
    if report.cached is None:
        collecting = gc.isenabled()
        gc.disable()  # ~25% faster: a row is a few dicts, none cyclic; the collector would walk them again and again
        try:
            _check(cfg, seed=seed, report=report)
        finally:
            if collecting:
                gc.enable()
    report.seconds = time.monotonic() - t0
    return report


def _check(cfg: DataConfig, *, seed: int, report: PrecheckReport) -> None:
    skip = cfg.on_bad_row == "skip"
    check = row_check(cfg.format, template=resolve_template(cfg.template) if cfg.format == "alpaca" else "",
                      chat=chat_spec(cfg.format, role_key=cfg.role_key, content_key=cfg.content_key, roles=cfg.roles)
                      if cfg.format in CHAT_FORMATS else None)
    origins = Origins()
    has_eval = cfg.eval_files is not None or (cfg.dataset is not None and cfg.eval_split is not None)
    # In the build's order: every split read (file and line problems), then their rows checked (tokenized), and a
    # stream's rows only as they are trained on.
    rows: list = []  # what to check once everything is read: (split, order) or a mixture's sources
    stream = None
    if cfg.streaming and cfg.train_files is not None:
        stream = _expand(cfg.train_files, "data.train_files")
        for f in stream:
            _check_file(f)
    elif cfg.mixture is not None:
        bad = BadRows(skip=skip)  # one for the mixture, as in the build
        rows.append([_read(cfg, _expand(src["files"], f"data.mixture[{i}].files"), f"data.mixture[{i}].files",
                           "train", bad, origins, src.get("columns") or {}, report)
                     for i, src in enumerate(cfg.mixture)])
    elif cfg.train_files is not None:
        train = _read(cfg, _expand(cfg.train_files, "data.train_files"), "data.train_files", "train",
                      BadRows(skip=skip), origins, cfg.columns, report)
        if not has_eval and cfg.eval_split_ratio > 0:
            if len(train.rows) < 2:
                raise DataError("data.eval_split_ratio: need at least 2 training rows to hold some out")
            keep, held = holdout(len(train.rows), cfg.eval_split_ratio, seed=seed)
            rows += [(train, keep),
                     (_Split("eval", train.source, train.rows, train.codes, train.renames, BadRows(skip=skip)), held)]
        else:
            rows.append((train, range(len(train.rows))))
    sets = cfg.eval_set_files() or ({None: (cfg.eval_files, None)} if cfg.eval_files else {})
    for name, (files, columns) in sets.items():  # named eval sets (data.eval_files: {name: files}): each its own
        key = "data.eval_files" if name is None else f"data.eval_files.{name}"
        ev = _read(cfg, _expand(files, key), key, "eval" if name is None else f"eval {name}", BadRows(skip=skip),
                   origins, cfg.columns if columns is None else columns, report)
        rows.append((ev, range(len(ev.rows))))
    for item in rows:
        if isinstance(item, list):
            _mixture(cfg, item, check, origins, report)
        else:
            _rows(item[0], check, origins, item[1], report)
    if stream is not None:
        _stream(stream, check, BadRows(skip=skip), report)


def _expand(spec: str | list[str], key: str) -> list[str]:
    """Paths and globs to files, as load_config resolves them (it already has, for a loaded config)."""
    from sft_dist.config.load import BUILTIN, builtin_path

    files = []
    for item in [spec] if isinstance(spec, str) else spec:
        path = str(builtin_path(item[len(BUILTIN):])) if item.startswith(BUILTIN) else os.path.expanduser(item)
        if glob.has_magic(path) and not os.path.isfile(path):
            matches = [f for f in sorted(glob.glob(path)) if os.path.isfile(f)]
            if not matches:
                raise DataError(f"{key}: {item!r} matches no file (relative paths are taken from the current "
                                "directory)")
            files += matches
        else:
            files.append(path)
    if not files:
        raise DataError("no data files were given")
    return files


def _read(cfg: DataConfig, files: list[str], key: str, name: str, bad: BadRows, origins: Origins,
          mapping: dict | None, report: PrecheckReport) -> _Split:
    """One split (or mixture source) read like build._read: files, columns, ids."""
    rows: list[dict] = []
    codes: list[int] = []
    columns: dict[str, None] = {}  # every file's, in order: the concatenation's
    kinds: dict[str, tuple[str, str]] = {}  # column -> (its type, the first file with it)
    for f in files:
        _check_file(f)
        before = bad.count
        try:
            read = _READERS[SUFFIXES[Path(f).suffix.lower()]]
            file_rows, file_codes, file_columns, file_kinds = read(f, bad, origins)
        except OSError as e:
            raise DataError(f"{f}: cannot read the file ({e.strerror or e}); check that it is readable") from None
        if not file_rows:
            raise no_rows(f, bad.count - before)
        for col, k in file_kinds.items():
            if col in kinds and kinds[col][0] != k:
                raise DataError(f"data files {files} have different columns or types and cannot be combined: "
                                f"column {col!r} is {kinds[col][0]} in {kinds[col][1]} but {k} in {f}; give it one "
                                "type in every file")
            kinds.setdefault(col, (k, f))
        columns.update(dict.fromkeys(file_columns))
        rows += file_rows
        codes += file_codes
        report.files += 1
    source = ", ".join(files)
    renames = map_columns(cfg.format, list(columns), mapping, source)
    if cfg.id_column is not None:
        col = cfg.id_column
        after = mapped_columns(list(columns), renames)
        if col not in after:
            raise id_column_missing(col, source, after)
        theirs = next((t for t, ours in renames.items() if ours == col), col)
        dropped = duplicate_ids([r.get(theirs) for r in rows], lambda i: origins.where(codes[i]), col, bad)
        if dropped:
            rows = [r for i, r in enumerate(rows) if i not in dropped]
            codes = [c for i, c in enumerate(codes) if i not in dropped]
    if not rows:
        raise DataError(f"{key}: {source} has no rows")
    return _Split(name, source, rows, codes, renames, bad)


def _check_file(f: str) -> None:
    if Path(f).suffix.lower() not in SUFFIXES:
        raise DataError(f"{f}: unsupported file type {Path(f).suffix!r}; use one of {sorted(SUFFIXES)}")
    if not Path(f).is_file():
        what = "is a directory, not a file" if Path(f).is_dir() else "no such file"
        raise DataError(f"{f}: {what}; check data.train_files / data.eval_files")


def _rows(split: _Split, check, origins: Origins, order, report: PrecheckReport) -> None:
    """Every row of `split`, in `order`, through the format's row check, named as the build names it."""
    bad, renames, good = split.bad, split.renames, 0
    for i in order:
        row = split.rows[i]
        if renames:
            row = {**row, **{ours: row.get(theirs) for theirs, ours in renames.items()}}
        try:
            check(row, f"{origins.where(split.codes[i])} ({split.name} sample_id {i})")
            good += 1
        except BadRow as e:
            if not bad.skip:
                raise BadRows.stop(e) from None
            bad.add(BadRow("", e.kind), origins.where(split.codes[i]))
    report.rows[split.name] = report.rows.get(split.name, 0) + len(order)
    report.skipped[split.name] = bad.count
    if len(order) and not good:
        raise DataError(f"{split.source}: every {split.name} row is bad: {bad.summary(split.name)}; fix the data")


def _read_jsonl(path: str, bad: BadRows, origins: Origins):
    base = origins.add(path, ":")
    rows, codes = [], []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                row = parse_line(raw, f"{path}:{lineno}")
            except BadRow as e:
                bad.add(e, f"{path}:{lineno}")
                continue
            if row is not None:
                rows.append(row)
                codes.append(base | lineno)
    return _typed(rows, codes, bad, origins)


def _read_json(path: str, bad: BadRows, origins: Origins):
    with open(path, "rb") as fh:
        data = load_json_document(path, fh)
    if data is None:
        return _read_jsonl(path, bad, origins)
    base = origins.add(path, " row ")
    pairs = json_document_rows(path, data, bad)
    return _typed([r for _, r in pairs], [base | i for i, _ in pairs], bad, origins)


def _typed(rows: list[dict], codes: list[int], bad: BadRows, origins: Origins):
    """(rows, codes, columns, each column's type) of a JSON file, without the rows holding a value whose type
    clashes with its column's (build: files._from_rows)."""
    clashes = type_clashes(rows)
    for i, col, got, want in clashes:
        where = origins.where(codes[i])
        bad.add(clash_error(where, col, got, want), where)
    if clashes:
        dropped = {i for i, *_ in clashes}
        rows = [r for i, r in enumerate(rows) if i not in dropped]
        codes = [c for i, c in enumerate(codes) if i not in dropped]
    kinds: dict[str, str] = {}
    for row in rows:
        for col, v in row.items():
            if v is not None and col not in kinds:
                kinds[col] = kind(v)
    return rows, codes, columns_of(rows), kinds


def _read_table(path: str, bad: BadRows, origins: Origins):
    table = _table(path)
    base = origins.add(path, " row ")
    rows = table.to_pylist()
    return rows, [base | i for i in range(1, len(rows) + 1)], table.column_names, {}


def _table(path: str):
    if Path(path).suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path)
        except Exception as e:
            raise DataError(f"{path}: cannot read parquet file ({e})") from None
    import pyarrow.csv as pcsv

    try:
        return pcsv.read_csv(path)
    except Exception as e:
        raise DataError(f"{path}: cannot read CSV file ({e})") from None


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_table, "csv": _read_table}


def _mixture(cfg: DataConfig, sources: list[_Split], check, origins: Origins, report: PrecheckReport) -> None:
    """The rows of the mixture's sources (read as build._read_mixture reads them) that the mixture draws whole at
    least once, checked under their sample ids in the mixture (a source drawn as a seeded subset: by the workers)."""
    from sft_dist.data.mixture import shares

    bad = sources[0].bad
    # a source's rows held out as its eval set (eval_split_ratio) leave the rest to be mixed
    held = [math.ceil(float(src.get("eval_split_ratio") or 0) * len(s.rows)) for src, s in zip(cfg.mixture, sources)]
    sizes = [len(s.rows) - h for s, h in zip(sources, held)]
    counts = shares(sizes, [float(s["weight"]) for s in cfg.mixture],
                    cfg.mixture_rows if cfg.mixture_rows is not None else sum(sizes))
    offset, good, checked = 0, 0, 0
    for s, n, h in zip(sources, counts, held):
        if h:
            report.notes.append(f"mixture source {s.source}: {h} of its {len(s.rows)} rows are held out for its eval "
                                "set by the seed, their row checks (and the others') are left to the workers")
        elif n >= len(s.rows):
            for i, (row, code) in enumerate(zip(s.rows, s.codes)):
                if s.renames:
                    row = {**row, **{ours: row.get(theirs) for theirs, ours in s.renames.items()}}
                try:
                    check(row, f"{origins.where(code)} (train sample_id {offset + i})")
                    good += 1
                except BadRow as e:
                    if not bad.skip:
                        raise BadRows.stop(e) from None
                    bad.add(BadRow("", e.kind), origins.where(code))
            checked += len(s.rows)
        elif n:
            report.notes.append(f"mixture source {s.source}: {n} of its {len(s.rows)} rows are drawn by the seed, "
                                "their row checks are left to the workers")
        offset += n
    report.rows["train"] = checked
    report.skipped["train"] = bad.count
    if checked and not good:
        raise DataError(f"data.mixture: every train row is bad: {bad.summary('train')}; fix the data")


def _stream(files: list[str], check, bad: BadRows, report: PrecheckReport) -> None:
    """The first STREAM_ROWS rows of the stream, as stream.StreamSource sees them (no type clashes across rows:
    each row is parsed alone)."""
    k = 0
    for f in files:
        report.files += 1
        for where, payload in _stream_rows(f):
            if k == STREAM_ROWS:
                report.notes.append(f"data.streaming: the first {STREAM_ROWS} rows checked, the rest are checked "
                                    "as they are trained on")
                report.rows["train"], report.skipped["train"] = k, bad.count
                return
            try:
                row = parse_line(payload, where) if isinstance(payload, bytes) else payload
                check(row, f"{where} (train sample_id {k})")
            except BadRow as e:
                if not bad.skip:
                    raise BadRows.stop(e) from None
                bad.add(e, where)
            k += 1
    if k == 0:
        raise DataError("data.streaming: the training data has no rows")
    report.rows["train"], report.skipped["train"] = k, bad.count


def _stream_rows(path: str):
    if Path(path).suffix.lower() == ".jsonl":
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if raw.strip():
                    yield f"{path}:{lineno}", raw
        return
    for n, row in enumerate(_table(path).to_pylist(), start=1):
        yield f"{path} row {n}", row


def _cached_entry(cfg: DataConfig, *, seed: int) -> str | None:
    """A complete cache entry built from these files (same path, size, mtime or content) and data options: its
    build checked every row (with any tokenizer: no row check here depends on one)."""
    from sft_dist.data.cache_key import CACHE_VERSION, FORMAT, data_options, default_cache_dir

    root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    if not root.is_dir():
        return None
    want = json.loads(json.dumps(data_options(cfg), sort_keys=True, default=str))
    for meta_path in root.glob("*/meta.json"):
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        identity = meta.get("identity") or {}
        if (meta.get("format") == FORMAT and meta.get("key") == meta_path.parent.name
                and identity.get("version") == CACHE_VERSION and identity.get("seed") == seed
                and identity.get("data") == want):
            return str(meta_path.parent)
    return None
