"""Build the tokenized train/eval datasets from the `data` config: read, map columns, split, tokenize,
truncate, and report what was truncated or dropped (never silently)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from datasets import Dataset, concatenate_datasets

from sft_dist.config.schema import DataConfig
from sft_dist.data.bad_rows import BadRows
from sft_dist.data.chat_templates import CHAT_TEMPLATES, missing_delimiters, resolve_chat_template
from sft_dist.data.files import read_files, read_hub
from sft_dist.data.formats import CHAT_FORMATS, IGNORE, OPTIONAL, REQUIRED, Tokenizer, chat_spec
from sft_dist.data.mixture import SourceShare, mix
from sft_dist.data.packing import pack_dataset
from sft_dist.data.rows import ORIGIN, Origins, duplicate_ids, holdout, id_column_missing, map_columns
from sft_dist.data.templates import resolve_template
from sft_dist.errors import BadRow, DataError

log = logging.getLogger(__name__)

# With named eval sets, each eval row's set (its index in data.eval_files); kept in the built (and cached) split.
EVAL_SET = "eval_set"
INSTRUCTION_FORMATS = ("alpaca", "prompt_completion", "messages", "sharegpt")
# More than this fraction of a split's rows losing their answer (cut on the right, dropped as too long, or left
# without a loss-carrying token) is logged as a warning, with the counts and what to change.
CUT_WARNING_FRACTION = 0.05


@dataclass
class SplitStats:
    rows: int = 0
    truncated: int = 0  # cut on the right: the end of the answer lost
    prompt_cut: int = 0  # with data.truncation=left_prompt: prompt cut from the left, the answer whole
    dropped_long: int = 0  # with data.truncation=drop
    split: int = 0  # with data.truncation=split: rows longer than max_length, made windows of it
    windows: int = 0  # the rows (windows) they became, before any without a loss-carrying token was left out
    dropped_no_loss: int = 0
    loss_tokens: int = 0
    tokens: int = 0
    skipped_bad: int = 0  # with data.on_bad_row=skip; counted by kind in their own log line
    sources: list[dict] | None = None  # with data.mixture: what each source gave (mixture.SourceShare)
    packed_rows: int = 0  # with data.packing: the rows of max_length the documents were packed into
    fill: float | None = None  # tokens / (packed_rows * max_length)
    sets: dict[str, int] | None = None  # named eval sets: the rows of each

    def describe(self, name: str, max_length: int) -> str:
        skipped = f"; {self.skipped_bad} skipped as bad" if self.skipped_bad else ""
        long = (f"{self.dropped_long} dropped as longer than data.max_length={max_length}" if self.dropped_long
                else f"{self.truncated} truncated to data.max_length={max_length}")
        if self.prompt_cut:
            long += f" ({self.prompt_cut} more had their prompt cut from the left, the answer kept)"
        if self.split:
            long = (f"{self.split} longer than data.max_length={max_length} split into {self.windows} windows "
                    f"(counted in the rows)")
        packed = (f"; packed into {self.packed_rows} rows of {max_length} ({100 * self.fill:.1f}% filled)"
                  if self.packed_rows else "")
        if self.sets:
            packed += "; sets: " + ", ".join(f"{name} {n}" for name, n in self.sets.items())
        return (
            f"{name}: {self.rows} rows, {self.tokens} tokens ({self.loss_tokens} carry loss); {long}; "
            f"{self.dropped_no_loss} dropped (no loss-carrying token left){skipped}{packed}"
        )

    def warning(self, name: str, max_length: int, truncation: str) -> str | None:
        """A warning when more than CUT_WARNING_FRACTION of the rows lost their answer, else None."""
        if truncation == "split":
            return None  # no answer is cut: a long row's windows hold all of it (one of prompt alone is context)
        # A row left without a loss-carrying token was cut on the right (counted in both) or dropped as too long.
        lost = self.dropped_long + max(self.truncated, self.dropped_no_loss)
        if not self.rows or lost <= CUT_WARNING_FRACTION * self.rows:
            return None
        parts = [f"{n} {what}" for n, what in (
            (self.dropped_long, "dropped as longer (data.truncation=drop)"),
            (self.truncated - min(self.truncated, self.dropped_no_loss),
             "cut on the right (the end of the answer lost)"),
            (self.dropped_no_loss, "dropped with no loss-carrying token left (the prompt fills it)")) if n]
        fix = "raise data.max_length"
        if truncation != "left_prompt":
            fix += ", or set data.truncation=left_prompt to cut prompts from the left and keep answers whole"
        return (f"data {name}: {lost} of {self.rows} rows ({100 * lost / self.rows:.1f}%) lost their answer to "
                f"data.max_length={max_length}: {', '.join(parts)}; {fix}")


def warn_cut(stats: dict[str, SplitStats], cfg: DataConfig) -> list[str]:
    """Log (and return) the split warnings of `SplitStats.warning`."""
    out = [w for name, st in stats.items() if (w := st.warning(name, cfg.max_length, cfg.truncation))]
    for w in out:
        log.warning("%s", w)
    return out


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
    """Set `data.chat_template` (a preset, a .jinja file or a template) on the tokenizer; it is saved with it."""
    if cfg.chat_template is None:
        return
    tokenizer.chat_template = resolve_chat_template(cfg.chat_template)
    if cfg.chat_template in CHAT_TEMPLATES and _is_main():
        split = missing_delimiters(cfg.chat_template, tokenizer)
        if split:
            log.warning("data.chat_template=%s: the tokenizer has no single token for %s, so each is several tokens "
                        "(the model must learn them, and generation stops only at EOS); add them as special tokens "
                        "to the tokenizer (and resize the embeddings) for a model that will use this template",
                        cfg.chat_template, ", ".join(split))


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def row_tokenizer(cfg: DataConfig, tokenizer) -> Tokenizer:
    """The per-row tokenizer `data` asks for (after `data.chat_template` is applied to `tokenizer`)."""
    apply_chat_template_override(cfg, tokenizer)
    template = resolve_template(cfg.template) if cfg.format == "alpaca" else ""
    chat = (chat_spec(cfg.format, role_key=cfg.role_key, content_key=cfg.content_key, roles=cfg.roles)
            if cfg.format in CHAT_FORMATS else None)
    return Tokenizer(tokenizer, fmt=cfg.format, template=template, completion_only_loss=completion_only(cfg),
                     chat=chat, max_length=cfg.max_length, truncation=cfg.truncation)


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
        out = _streaming(cfg, tok, seed)
    else:
        splits = read_splits(cfg, seed=seed)
        out = finalize(cfg, splits, {s.name: tokenize_rows(cfg, tok, s) for s in splits})
    if _is_main():  # every rank builds the same: one warning (the cache warns on its rank 0)
        warn_cut(out.stats, cfg)
    return out


def _streaming(cfg: DataConfig, tok: Tokenizer, seed: int) -> Datasets:
    """The train split as a stream (tokenized as it is trained on); the eval split read and tokenized now."""
    from sft_dist.data.stream import RowStream, StreamSource

    hub = None if cfg.train_files is not None else (cfg.dataset, cfg.dataset_config, cfg.train_split)
    train = StreamSource(RowStream(cfg.train_files, hub), tok, max_length=cfg.max_length,
                         skip_bad=cfg.on_bad_row == "skip", seed=seed, window=cfg.shuffle_window)
    splits = [_read_eval(cfg, BadRows(skip=cfg.on_bad_row == "skip"))] if _has_eval(cfg) else []
    out = finalize(cfg, splits, {s.name: tokenize_rows(cfg, tok, s) for s in splits})
    out.train = train
    return out


def read_splits(cfg: DataConfig, *, seed: int) -> list[RawSplit]:
    """Read train (and eval) rows; `seed` shuffles the held-out eval rows of `data.eval_split_ratio`."""
    skip = cfg.on_bad_row == "skip"
    if cfg.mixture is not None:
        train, held = _read_mixture(cfg, BadRows(skip=skip), seed)
        if held is not None and not _has_eval(cfg):  # given eval data wins; the held-out rows stay out of training
            return [train, held]
    else:
        train = _read(cfg, cfg.train_files, cfg.train_split, "data.train_files", "train", BadRows(skip=skip))
    if _has_eval(cfg):
        return [train, _read_eval(cfg, BadRows(skip=skip))]
    if cfg.eval_split_ratio > 0:
        if len(train.rows) < 2:
            raise DataError("data.eval_split_ratio: need at least 2 training rows to hold some out")
        keep, held = holdout(len(train.rows), cfg.eval_split_ratio, seed=seed)
        return [RawSplit("train", train.rows.select(keep), train.source, train.bad, train.origins),
                RawSplit("eval", train.rows.select(held), train.source, BadRows(skip=skip), train.origins)]
    return [train]


def _has_eval(cfg: DataConfig) -> bool:
    return cfg.eval_files is not None or (cfg.dataset is not None and cfg.eval_split is not None)


def _read_eval(cfg: DataConfig, bad: BadRows) -> RawSplit:
    """The eval split. Named eval sets (`data.eval_files: {name: files}`) are read one by one, each row named by its
    file and line, into one split whose EVAL_SET column holds the set's index (`by_set` parts them again)."""
    if not cfg.eval_sets:
        return _read(cfg, cfg.eval_files, cfg.eval_split, "data.eval_files", "eval", bad)
    files = isinstance(cfg.eval_files, dict)  # else a hub dataset's splits: data.eval_split: {name: split}
    sets = cfg.eval_set_files() if files else {name: (None, None) for name in cfg.eval_split}
    parts, sources, origins = [], [], Origins()  # one Origins: the sets' row codes must not collide
    for name, (paths, columns) in sets.items():
        key = f"data.eval_{'files' if files else 'split'}.{name}"
        raw = _read(cfg, paths, None if files else cfg.eval_split[name], key, "eval", bad, columns=columns,
                    origins=origins)
        parts.append(_format_columns(raw.rows, cfg, like=parts[0] if parts else None))
        sources.append(raw.source)
    return RawSplit("eval", _as_sets(parts), "; ".join(sources), bad, origins)


def _as_sets(parts: list[Dataset]) -> Dataset:
    """Named eval sets' rows as one split, each row's set index in EVAL_SET and its index in its set as its sample_id
    (as its messages say: "<file>:<line> (eval <set> sample_id <i>)")."""
    return concatenate_datasets([ds.add_column(EVAL_SET, [k] * len(ds)).add_column("sample_id", list(range(len(ds))))
                                 for k, ds in enumerate(parts)])


def _set_key(cfg: DataConfig, name: str) -> str:
    """The config key a named eval set comes from."""
    if cfg.eval_files is not None:
        return f"data.eval_files.{name}"
    if cfg.eval_split is not None:
        return f"data.eval_split.{name}"
    i = next(i for i, src in enumerate(cfg.mixture) if src.get("name") == name)
    return f"data.mixture[{i}] ({name})"


def by_set(ds: Dataset | None, names: tuple[str, ...]) -> Dataset | dict[str, Dataset] | None:
    """The eval split as HF's Trainer takes it: one dataset, or with named eval sets {name: that set's rows}."""
    if ds is None or not names:
        return ds
    codes = ds[EVAL_SET]
    return {name: ds.select([i for i, c in enumerate(codes) if c == k]).remove_columns(EVAL_SET)
            for k, name in enumerate(names)}


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
    if cfg.eval_sets and out.eval is not None:
        codes = out.eval[EVAL_SET]
        out.stats["eval"].sets = {name: codes.count(k) for k, name in enumerate(cfg.eval_sets)}
        for k, name in enumerate(cfg.eval_sets):
            if not out.stats["eval"].sets[name]:
                raise DataError(f"{_set_key(cfg, name)}: no row of this eval set is left with a loss-carrying token "
                                f"within data.max_length={cfg.max_length}; raise data.max_length, or fix or drop the "
                                "set")
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
        raise id_column_missing(col, source, ds.column_names)
    codes = ds[ORIGIN]
    dropped = duplicate_ids(ds[col], lambda i: origins.where(codes[i]), col, bad)
    return ds.select([i for i in range(len(ds)) if i not in dropped]) if dropped else ds


def _read_mixture(cfg: DataConfig, bad: BadRows, seed: int) -> tuple[RawSplit, RawSplit | None]:
    """Each source read (and checked) on its own, cut to the format's columns, then mixed by weight; with the eval
    split of the rows the sources hold out before mixing (`eval_split_ratio`: a repeated row is never in both), each
    source's an eval set of its own (EVAL_SET), or None."""
    parts, names, held, origins = [], [], [], Origins()  # one Origins: the sources' row codes must not collide
    for i, src in enumerate(cfg.mixture):
        raw = _read(cfg, src["files"], None, f"data.mixture[{i}].files", "train", bad,
                    columns=src.get("columns") or {}, origins=origins)
        rows = _format_columns(raw.rows, cfg, like=parts[0] if parts else None)
        if src.get("eval_split_ratio"):
            if len(rows) < 2:
                raise DataError(f"data.mixture[{i}].eval_split_ratio: {raw.source} has {len(rows)} row; need at "
                                "least 2 to hold some out")
            keep, out = holdout(len(rows), float(src["eval_split_ratio"]), seed=seed + i)
            held.append(rows.select(out))
            rows = rows.select(keep)
        parts.append(rows)
        names.append(raw.source)
    mixed, shares = mix(parts, names, [float(s["weight"]) for s in cfg.mixture], total=cfg.mixture_rows, seed=seed)
    mixed = mixed.add_column("sample_id", list(range(len(mixed))))
    train = RawSplit("train", mixed, "data.mixture", bad, origins, shares)
    if not held:
        return train, None
    return train, RawSplit("eval", _as_sets(held), "held out of data.mixture", BadRows(skip=bad.skip), origins)


def _format_columns(ds: Dataset, cfg: DataConfig, *, like: Dataset | None) -> Dataset:
    """`ds` cut to the format's columns (and where each row came from), in `like`'s columns and types, so that
    sources read from different files concatenate."""
    keep = [c for c in REQUIRED[cfg.format] + OPTIONAL.get(cfg.format, ()) if c in ds.column_names]
    ds = ds.select_columns(keep + [ORIGIN] + ([cfg.id_column] if cfg.id_column else []))
    for col in OPTIONAL.get(cfg.format, ()):
        if col not in ds.column_names:  # e.g. one alpaca source without `input`: the same as an empty one
            ds = ds.add_column(col, [""] * len(ds))
    if like is None:
        return ds
    ds = ds.select_columns(like.column_names)
    return ds if ds.features == like.features else ds.cast(like.features)


def _map_columns(ds: Dataset, cfg: DataConfig, source: str, mapping: dict | None) -> Dataset:
    renames = map_columns(cfg.format, ds.column_names, mapping, source)
    clashes = [c for c in renames.values() if c in ds.column_names and c not in renames]
    if clashes:
        ds = ds.remove_columns(clashes)
    return ds.rename_columns(renames)


def tokenize_rows(cfg: DataConfig, tok: Tokenizer, split: RawSplit, rows: range | None = None) -> Dataset:
    """Tokenize `split`'s rows (all, or the `rows` slice: a rank's share of a parallel build). A bad row raises
    BadRow naming file:line, or with `data.on_bad_row: skip` stays as an empty row marked `_bad` with its kind;
    `finalize` counts and drops those."""
    max_length, name, origins, skip, sets = cfg.max_length, split.name, split.origins, split.bad.skip, cfg.eval_sets
    raw = split.rows if rows is None else split.rows.select(rows)

    def fn(batch):
        n = len(batch["sample_id"])
        rows = [{k: batch[k][i] for k in batch} for i in range(n)]
        wheres = [f"{origins.where(r[ORIGIN])} ({name}{f' {sets[r[EVAL_SET]]}' if EVAL_SET in r else ''} sample_id "
                  f"{r['sample_id']})" for r in rows]
        cols = {k: [] for k in ("input_ids", "labels", "sample_id", ORIGIN, "_length", "_cut", "_tokens",
                                "_loss_tokens", "_bad", *([EVAL_SET] if EVAL_SET in batch else []))}
        for row, out in zip(rows, tok.batch(rows, wheres)):
            if isinstance(out, BadRow):
                if not skip:
                    raise BadRows.stop(out) from None
                # Counted in `finalize`: with num_proc the map runs in other processes.
                out, e_kind = {"input_ids": [], "labels": []}, out.kind
            else:
                e_kind = ""
            if out.get("_cut") == "split":  # data.truncation=split: a row of each window, the sample's id on each
                for j, (ids, labels) in enumerate(split_windows(out["input_ids"], out["labels"], max_length,
                                                                cfg.split_overlap)):
                    add(cols, row, ids, labels, length=len(ids), cut="split" if j == 0 else "window", bad=e_kind)
                continue
            # The Tokenizer fit the row to max_length (data.truncation); the slices only guard that.
            add(cols, row, out["input_ids"][:max_length], out["labels"][:max_length],
                length=out.get("_length", len(out["input_ids"])),
                cut=out.get("_cut", "right" if len(out["input_ids"]) > max_length else ""), bad=e_kind)
        return cols

    def add(cols, row, ids, labels, *, length: int, cut: str, bad: str) -> None:
        cols["input_ids"].append(ids)
        cols["labels"].append(labels)
        cols["_tokens"].append(len(labels))
        cols["sample_id"].append(row["sample_id"])
        cols[ORIGIN].append(row[ORIGIN])
        cols["_length"].append(length)
        cols["_cut"].append(cut)
        # labels[0] never carries loss: the model predicts token t from tokens < t.
        cols["_loss_tokens"].append(sum(1 for t in labels[1:] if t != IGNORE))
        cols["_bad"].append(bad)
        if EVAL_SET in cols:
            cols[EVAL_SET].append(row[EVAL_SET])

    return raw.map(
        fn,
        batched=True,
        batch_size=1000,
        remove_columns=raw.column_names,
        keep_in_memory=True,
        num_proc=cfg.num_proc,
        desc=f"Tokenizing {name}",
    )


def split_windows(ids: list[int], labels: list[int], max_length: int, overlap: int) -> list[tuple[list, list]]:
    """data.truncation=split: a row longer than max_length as consecutive windows of at most max_length tokens.
    A window after the first starts `overlap` tokens before the previous one ended; those tokens are its context
    and carry no loss there (they did in the window before), so every token's loss counts once. With overlap 0, a
    later window's first token has nothing before it to be predicted from (labels[0] never carries loss)."""
    out, start = [], 0
    while True:
        w_ids, w_labels = ids[start:start + max_length], labels[start:start + max_length]
        if start:
            w_labels = [IGNORE] * overlap + w_labels[overlap:]
        out.append((w_ids, w_labels))
        if start + max_length >= len(ids):
            return out
        start += max_length - overlap


def _finish_split(cfg: DataConfig, split: RawSplit, mapped: Dataset) -> tuple[Dataset, SplitStats]:
    max_length, name, bad, origins = cfg.max_length, split.name, split.bad, split.origins
    # Whole columns at once: iterating a Dataset column goes row by row through the formatter (seconds per 100k).
    cols = mapped.select_columns(["_bad", "_length", "_cut", "_tokens", "_loss_tokens", ORIGIN]).to_dict()
    kinds, lengths, cuts, n_tokens = cols["_bad"], cols["_length"], cols["_cut"], cols["_tokens"]
    n_loss, codes = cols["_loss_tokens"], cols[ORIGIN]
    for kind, code in zip(kinds, codes):
        if kind:
            bad.add(BadRow("", kind), origins.where(code))
    good = [not k for k in kinds]
    truncated = [code for ok, n, code in zip(good, lengths, codes) if ok and n > max_length]
    drop = cfg.truncation == "drop"
    stats = SplitStats(
        rows=sum(good),
        truncated=0 if drop else sum(1 for ok, c in zip(good, cuts) if ok and c == "right"),
        prompt_cut=0 if drop else sum(1 for ok, c in zip(good, cuts) if ok and c == "prompt"),
        split=sum(1 for ok, c in zip(good, cuts) if ok and c == "split"),
        windows=sum(1 for ok, c in zip(good, cuts) if ok and c in ("split", "window")),
        dropped_long=len(truncated) if drop else 0,
        dropped_no_loss=sum(1 for ok, n, full in zip(good, n_loss, lengths)
                            if ok and n == 0 and not (drop and full > max_length)),
    )
    # a skipped bad row has no tokens, so no loss either
    keep = [i for i, (n, full) in enumerate(zip(n_loss, lengths)) if n > 0 and not (drop and full > max_length)]
    kept = mapped.select(keep) if len(keep) < len(mapped) else mapped
    if len(kept) == 0:
        if not stats.rows:
            raise DataError(f"{split.source}: every {name} row is bad: {bad.summary(name)}; fix the data")
        skipped = f", {bad.count} skipped as bad" if bad.count else ""
        longest = (f", the longest {max(lengths)} tokens, the first at {origins.where(truncated[0])}"
                   if truncated else "")
        cut = f"{stats.dropped_long} dropped as too long" if drop else f"{stats.truncated} truncated"
        raise DataError(
            f"{split.source}: no {name} row has a loss-carrying token within data.max_length={max_length} "
            f"({stats.rows} rows, {cut}{longest}{skipped}); raise data.max_length"
        )
    stats.loss_tokens = sum(n_loss[i] for i in keep)
    stats.tokens = sum(n_tokens[i] for i in keep)
    return kept.remove_columns([ORIGIN, "_length", "_cut", "_tokens", "_loss_tokens", "_bad"]), stats
