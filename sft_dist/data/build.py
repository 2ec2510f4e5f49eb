"""Build the tokenized train/eval datasets from the `data` config: read, map columns, split, tokenize,
truncate, and report what was truncated or dropped (never silently)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset

from sft_dist.config.schema import DataConfig
from sft_dist.data.bad_rows import BadRows
from sft_dist.data.files import ORIGIN, Origins, read_files, read_hub
from sft_dist.data.formats import IGNORE, OPTIONAL, REQUIRED, Tokenizer
from sft_dist.data.mixture import SourceShare, mix
from sft_dist.data.packing import pack_dataset
from sft_dist.data.templates import resolve_template
from sft_dist.errors import BadRow, DataError

log = logging.getLogger(__name__)

INSTRUCTION_FORMATS = ("alpaca", "prompt_completion", "messages")


@dataclass
class SplitStats:
    rows: int = 0
    truncated: int = 0
    dropped_long: int = 0  # with data.truncation=drop
    dropped_no_loss: int = 0
    loss_tokens: int = 0
    tokens: int = 0
    skipped_bad: int = 0  # with data.on_bad_row=skip; counted by kind in their own log line
    sources: list[dict] | None = None  # with data.mixture: what each source gave (mixture.SourceShare)
    packed_rows: int = 0  # with data.packing: the rows of max_length the documents were packed into
    fill: float | None = None  # tokens / (packed_rows * max_length)

    def describe(self, name: str, max_length: int) -> str:
        skipped = f"; {self.skipped_bad} skipped as bad" if self.skipped_bad else ""
        long = (f"{self.dropped_long} dropped as longer than data.max_length={max_length}" if self.dropped_long
                else f"{self.truncated} truncated to data.max_length={max_length}")
        packed = (f"; packed into {self.packed_rows} rows of {max_length} ({100 * self.fill:.1f}% filled)"
                  if self.packed_rows else "")
        return (
            f"{name}: {self.rows} rows, {self.tokens} tokens ({self.loss_tokens} carry loss); {long}; "
            f"{self.dropped_no_loss} dropped (no loss-carrying token left){skipped}{packed}"
        )


@dataclass
class Datasets:
    train: Dataset
    eval: Dataset | None
    stats: dict[str, SplitStats] = field(default_factory=dict)


def completion_only(cfg: DataConfig) -> bool:
    if cfg.completion_only_loss is not None:
        return cfg.completion_only_loss
    return cfg.format in INSTRUCTION_FORMATS


def apply_chat_template_override(cfg: DataConfig, tokenizer) -> None:
    if cfg.chat_template is None:
        return
    text = cfg.chat_template
    if text.endswith(".jinja") and Path(text).is_file():
        text = Path(text).read_text(encoding="utf-8")
    tokenizer.chat_template = text


def row_tokenizer(cfg: DataConfig, tokenizer) -> Tokenizer:
    """The per-row tokenizer `data` asks for (after `data.chat_template` is applied to `tokenizer`)."""
    apply_chat_template_override(cfg, tokenizer)
    template = resolve_template(cfg.template) if cfg.format == "alpaca" else ""
    return Tokenizer(tokenizer, fmt=cfg.format, template=template, completion_only_loss=completion_only(cfg))


@dataclass
class RawSplit:
    """One split as read: its rows (with `sample_id` and `_origin`), where they came from, its bad rows so far."""

    name: str
    rows: Dataset
    source: str
    bad: BadRows
    origins: Origins
    shares: list[SourceShare] | None = None  # with data.mixture: what each source gave


def build_datasets(cfg: DataConfig, tokenizer, *, seed: int) -> Datasets:
    """Read and tokenize the train (and eval) data. Rows get a stable `sample_id` (their index).

    The three phases (`read_splits`, `tokenize_rows`, `finalize`) are separate so that the cache
    (data/cache.py) can tokenize slices on several ranks and finalize once.

    Raises DataError naming the file and line/row; a bad row is skipped and counted instead with
    `data.on_bad_row: skip` (one log line per split), a bad file never is."""
    tok = row_tokenizer(cfg, tokenizer)
    if cfg.streaming:
        return _streaming(cfg, tok, seed)
    splits = read_splits(cfg, seed=seed)
    return finalize(cfg, splits, {s.name: tokenize_rows(cfg, tok, s) for s in splits})


def _streaming(cfg: DataConfig, tok: Tokenizer, seed: int) -> Datasets:
    """The train split as a stream (tokenized as it is trained on); the eval split read and tokenized now."""
    from sft_dist.data.stream import RowStream, StreamSource

    hub = None if cfg.train_files is not None else (cfg.dataset, cfg.dataset_config, cfg.train_split)
    train = StreamSource(RowStream(cfg.train_files, hub), tok, max_length=cfg.max_length,
                         skip_bad=cfg.on_bad_row == "skip", seed=seed, window=cfg.shuffle_window)
    splits = [_read(cfg, cfg.eval_files, cfg.eval_split, "data.eval_files", "eval", BadRows(skip=cfg.on_bad_row == "skip"))
              ] if cfg.eval_files is not None or (cfg.dataset is not None and cfg.eval_split is not None) else []
    out = finalize(cfg, splits, {s.name: tokenize_rows(cfg, tok, s) for s in splits})
    out.train = train
    return out


def read_splits(cfg: DataConfig, *, seed: int) -> list[RawSplit]:
    """Read train (and eval) rows; `seed` shuffles the held-out eval rows of `data.eval_split_ratio`."""
    skip = cfg.on_bad_row == "skip"
    if cfg.mixture is not None:
        train = _read_mixture(cfg, BadRows(skip=skip), seed)
    else:
        train = _read(cfg, cfg.train_files, cfg.train_split, "data.train_files", "train", BadRows(skip=skip))
    if cfg.eval_files is not None or (cfg.dataset is not None and cfg.eval_split is not None):
        return [train, _read(cfg, cfg.eval_files, cfg.eval_split, "data.eval_files", "eval", BadRows(skip=skip))]
    if cfg.eval_split_ratio > 0:
        if len(train.rows) < 2:
            raise DataError("data.eval_split_ratio: need at least 2 training rows to hold some out")
        parts = train.rows.train_test_split(test_size=cfg.eval_split_ratio, seed=seed, shuffle=True)
        return [RawSplit("train", parts["train"], train.source, train.bad, train.origins),
                RawSplit("eval", parts["test"], train.source, BadRows(skip=skip), train.origins)]
    return [train]


def finalize(cfg: DataConfig, splits: list[RawSplit], tokenized: dict[str, Dataset]) -> Datasets:
    """Everything after tokenization, on the tokenized rows of each split in order: count bad and truncated
    rows, drop rows without loss, stats. A step added after tokenization belongs here, so the cache stores
    its output."""
    out = Datasets(train=None, eval=None)  # type: ignore[arg-type]
    for s in splits:
        ds, out.stats[s.name] = _finish_split(cfg, s, tokenized[s.name])
        setattr(out, s.name, ds)
    for s in splits:
        out.stats[s.name].skipped_bad = s.bad.count
        if s.bad.count:
            log.info("%s", s.bad.summary(s.name))
        if s.shares is not None:
            out.stats[s.name].sources = [vars(x) for x in s.shares]
            log.info("data mixture: %d samples per epoch from %d sources: %s", len(s.rows), len(s.shares),
                     "; ".join(x.describe() for x in s.shares))
    if cfg.packing and out.train is not None:
        # Train only: eval rows are scored one by one (train/evaluation.py), packed or not.
        out.train = pack_dataset(out.train, cfg.max_length)
        st = out.stats["train"]
        st.packed_rows, st.fill = len(out.train), st.tokens / (len(out.train) * cfg.max_length)
    return out


def _read(cfg: DataConfig, files, split, key: str, name: str, bad: BadRows, *, columns: dict | None = None,
          origins: Origins | None = None) -> RawSplit:
    origins = origins if origins is not None else Origins()
    if files is None:
        ds = read_hub(cfg.dataset, cfg.dataset_config, split, origins)
    else:
        ds = read_files(files, bad, origins)
    source = cfg.dataset if files is None else ", ".join(files)
    ds = _map_columns(ds, cfg, source, cfg.columns if columns is None else columns)
    if cfg.id_column is not None:
        ds = _drop_duplicate_ids(ds, cfg.id_column, source, bad, origins)
    if "sample_id" not in ds.column_names:
        ds = ds.add_column("sample_id", list(range(len(ds))))
    if len(ds) == 0:
        raise DataError(f"{key}: {source} has no rows")
    return RawSplit(name, ds, source, bad, origins)


def _drop_duplicate_ids(ds: Dataset, col: str, source: str, bad: BadRows, origins: Origins) -> Dataset:
    if col not in ds.column_names:
        raise DataError(f"data.id_column: {source} has no column {col!r}; its columns: "
                        f"{[c for c in ds.column_names if c != ORIGIN]}; name the id column or unset data.id_column")
    first: dict = {}
    dropped = set()
    for i, (value, code) in enumerate(zip(ds[col], ds[ORIGIN])):
        where = origins.where(code)
        key = value if isinstance(value, (str, int, float, bool)) else json.dumps(value, sort_keys=True, default=str)
        if value is None:
            bad.add(BadRow(f"{where}: id column {col!r} is null; give the row an id", "null value"), where)
        elif key in first:
            bad.add(BadRow(f"{where}: duplicate id {value!r} (column {col!r}), first at {first[key]}; ids must be "
                           "unique", "duplicate id"), where)
        else:
            first[key] = where
            continue
        dropped.add(i)  # skip mode: the first row with an id is kept
    return ds.select([i for i in range(len(ds)) if i not in dropped]) if dropped else ds


def _read_mixture(cfg: DataConfig, bad: BadRows, seed: int) -> RawSplit:
    """Each source read (and checked) on its own, cut to the format's columns, then mixed by weight."""
    parts, names, origins = [], [], Origins()  # one Origins: the sources' row codes must not collide
    for i, src in enumerate(cfg.mixture):
        raw = _read(cfg, src["files"], None, f"data.mixture[{i}].files", "train", bad,
                    columns=src.get("columns") or {}, origins=origins)
        ds = raw.rows
        keep = [c for c in REQUIRED[cfg.format] + OPTIONAL.get(cfg.format, ()) if c in ds.column_names]
        ds = ds.select_columns(keep + [ORIGIN] + ([cfg.id_column] if cfg.id_column else []))
        for col in OPTIONAL.get(cfg.format, ()):
            if col not in ds.column_names:  # e.g. one alpaca source without `input`: the same as an empty one
                ds = ds.add_column(col, [""] * len(ds))
        if parts:
            ds = ds.select_columns(parts[0].column_names).cast(parts[0].features)
        parts.append(ds)
        names.append(raw.source)
    mixed, shares = mix(parts, names, [float(s["weight"]) for s in cfg.mixture], total=cfg.mixture_rows, seed=seed)
    mixed = mixed.add_column("sample_id", list(range(len(mixed))))
    return RawSplit("train", mixed, "data.mixture", bad, origins, shares)


def _map_columns(ds: Dataset, cfg: DataConfig, source: str, mapping: dict | None) -> Dataset:
    mapping = mapping or {}
    allowed = REQUIRED[cfg.format] + OPTIONAL.get(cfg.format, ())
    for ours, theirs in mapping.items():
        if ours not in allowed:
            raise DataError(f"data.columns: {ours!r} is not a column of format {cfg.format!r}; allowed: {list(allowed)}")
        if theirs not in ds.column_names:
            raise DataError(f"data.columns.{ours}: {source} has no column {theirs!r}; its columns: {ds.column_names}")
    renames = {theirs: ours for ours, theirs in mapping.items() if theirs != ours}
    clashes = [c for c in renames.values() if c in ds.column_names]
    if clashes:
        ds = ds.remove_columns(clashes)
    ds = ds.rename_columns(renames)
    missing = [c for c in REQUIRED[cfg.format] if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{source}: data.format {cfg.format!r} needs column(s) {missing}, found {ds.column_names}; "
            f"map yours with data.columns (e.g. data.columns.{missing[0]}=<your column>)"
        )
    return ds


def tokenize_rows(cfg: DataConfig, tok: Tokenizer, split: RawSplit, rows: range | None = None) -> Dataset:
    """Tokenize `split`'s rows (all, or the `rows` slice: a rank's share of a parallel build). A bad row raises
    BadRow naming file:line, or with `data.on_bad_row: skip` stays as an empty row marked `_bad` with its kind;
    `finalize` counts and drops those."""
    max_length, name, origins, skip = cfg.max_length, split.name, split.origins, split.bad.skip
    raw = split.rows if rows is None else split.rows.select(rows)

    def fn(batch):
        n = len(batch["sample_id"])
        rows = [{k: batch[k][i] for k in batch} for i in range(n)]
        wheres = [f"{origins.where(r[ORIGIN])} ({name} sample_id {r['sample_id']})" for r in rows]
        cols = {k: [] for k in ("input_ids", "labels", "sample_id", ORIGIN, "_length", "_loss_tokens", "_bad")}
        for row, out in zip(rows, tok.batch(rows, wheres)):
            if isinstance(out, BadRow):
                if not skip:
                    raise BadRows.stop(out) from None
                # Counted in `finalize`: with num_proc the map runs in other processes.
                out, e_kind = {"input_ids": [], "labels": []}, out.kind
            else:
                e_kind = ""
            labels = out["labels"][:max_length]
            cols["input_ids"].append(out["input_ids"][:max_length])
            cols["labels"].append(labels)
            cols["sample_id"].append(row["sample_id"])
            cols[ORIGIN].append(row[ORIGIN])
            cols["_length"].append(len(out["input_ids"]))
            # labels[0] never carries loss: the model predicts token t from tokens < t.
            cols["_loss_tokens"].append(sum(1 for t in labels[1:] if t != IGNORE))
            cols["_bad"].append(e_kind)
        return cols

    return raw.map(
        fn,
        batched=True,
        batch_size=1000,
        remove_columns=raw.column_names,
        keep_in_memory=True,
        num_proc=cfg.num_proc,
        desc=f"Tokenizing {name}",
    )


def _finish_split(cfg: DataConfig, split: RawSplit, mapped: Dataset) -> tuple[Dataset, SplitStats]:
    max_length, name, bad, origins = cfg.max_length, split.name, split.bad, split.origins
    # Whole columns at once: iterating a Dataset column goes row by row through the formatter (seconds per 100k).
    cols = mapped.select_columns(["_bad", "_length", "_loss_tokens", ORIGIN]).to_dict()
    kinds, lengths, n_loss, codes = cols["_bad"], cols["_length"], cols["_loss_tokens"], cols[ORIGIN]
    for kind, code in zip(kinds, codes):
        if kind:
            bad.add(BadRow("", kind), origins.where(code))
    good = [not k for k in kinds]
    truncated = [code for ok, n, code in zip(good, lengths, codes) if ok and n > max_length]
    drop = cfg.truncation == "drop"
    stats = SplitStats(
        rows=sum(good),
        truncated=0 if drop else len(truncated),
        dropped_long=len(truncated) if drop else 0,
        dropped_no_loss=sum(1 for ok, n, full in zip(good, n_loss, lengths)
                            if ok and n == 0 and not (drop and full > max_length)),
    )
    # a skipped bad row has no tokens, so no loss either
    keep = [i for i, (n, full) in enumerate(zip(n_loss, lengths)) if n > 0 and not (drop and full > max_length)]
    kept = mapped.select(keep) if len(keep) < len(mapped) else mapped
    if len(kept) == 0:
        skipped = f", {bad.count} skipped as bad" if bad.count else ""
        longest = (f", the longest {max(lengths)} tokens, the first at {origins.where(truncated[0])}"
                   if truncated else "")
        cut = f"{stats.dropped_long} dropped as too long" if drop else f"{stats.truncated} truncated"
        raise DataError(
            f"{split.source}: no {name} row has a loss-carrying token within data.max_length={max_length} "
            f"({stats.rows} rows, {cut}{longest}{skipped}); raise data.max_length"
        )
    stats.loss_tokens = sum(n_loss[i] for i in keep)
    stats.tokens = sum(min(lengths[i], max_length) for i in keep)  # input_ids were cut to max_length
    return kept.remove_columns([ORIGIN, "_length", "_loss_tokens", "_bad"]), stats
