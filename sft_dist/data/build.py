"""Build the tokenized train/eval datasets from the `data` config: read, map columns, split, tokenize,
truncate, and report what was truncated or dropped (never silently)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset

from sft_dist.config.schema import DataConfig
from sft_dist.data.files import read_files, read_hub
from sft_dist.data.formats import IGNORE, OPTIONAL, REQUIRED, Tokenizer
from sft_dist.data.templates import resolve_template
from sft_dist.errors import DataError

log = logging.getLogger(__name__)

INSTRUCTION_FORMATS = ("alpaca", "prompt_completion", "messages")


@dataclass
class SplitStats:
    rows: int = 0
    truncated: int = 0
    dropped_no_loss: int = 0
    loss_tokens: int = 0
    tokens: int = 0

    def describe(self, name: str, max_length: int) -> str:
        return (
            f"{name}: {self.rows} rows, {self.tokens} tokens ({self.loss_tokens} carry loss); "
            f"{self.truncated} truncated to data.max_length={max_length}; "
            f"{self.dropped_no_loss} dropped (no loss-carrying token left)"
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


def build_datasets(cfg: DataConfig, tokenizer, *, seed: int) -> Datasets:
    """Read and tokenize the train (and eval) data. Rows get a stable `sample_id` (their index)."""
    apply_chat_template_override(cfg, tokenizer)
    template = resolve_template(cfg.template) if cfg.format == "alpaca" else ""
    tok = Tokenizer(tokenizer, fmt=cfg.format, template=template, completion_only_loss=completion_only(cfg))

    train_raw = _read(cfg, cfg.train_files, cfg.train_split, "data.train_files")
    eval_raw = None
    if cfg.eval_files is not None or (cfg.dataset is not None and cfg.eval_split is not None):
        eval_raw = _read(cfg, cfg.eval_files, cfg.eval_split, "data.eval_files")
    elif cfg.eval_split_ratio > 0:
        if len(train_raw) < 2:
            raise DataError("data.eval_split_ratio: need at least 2 training rows to hold some out")
        parts = train_raw.train_test_split(test_size=cfg.eval_split_ratio, seed=seed, shuffle=True)
        train_raw, eval_raw = parts["train"], parts["test"]

    out = Datasets(train=None, eval=None)  # type: ignore[arg-type]
    out.train, out.stats["train"] = _tokenize(train_raw, tok, cfg, "train")
    if eval_raw is not None:
        out.eval, out.stats["eval"] = _tokenize(eval_raw, tok, cfg, "eval")
    return out


def _read(cfg: DataConfig, files, split, key: str) -> Dataset:
    ds = read_hub(cfg.dataset, cfg.dataset_config, split) if files is None else read_files(files)
    source = cfg.dataset if files is None else ", ".join(files)
    ds = _map_columns(ds, cfg, source)
    if "sample_id" not in ds.column_names:
        ds = ds.add_column("sample_id", list(range(len(ds))))
    if len(ds) == 0:
        raise DataError(f"{key}: {source} has no rows")
    return ds


def _map_columns(ds: Dataset, cfg: DataConfig, source: str) -> Dataset:
    mapping = cfg.columns or {}
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


def _tokenize(raw: Dataset, tok: Tokenizer, cfg: DataConfig, name: str) -> tuple[Dataset, SplitStats]:
    max_length = cfg.max_length

    def fn(row, idx):
        where = f"{name} row {idx} (sample_id {row['sample_id']})"
        out = tok(row, where)
        full = len(out["input_ids"])
        ids, labels = out["input_ids"][:max_length], out["labels"][:max_length]
        # labels[0] never carries loss: the model predicts token t from tokens < t.
        n_loss = sum(1 for t in labels[1:] if t != IGNORE)
        return {"input_ids": ids, "labels": labels, "sample_id": row["sample_id"],
                "_truncated": full > max_length, "_loss_tokens": n_loss}

    mapped = raw.map(
        fn,
        with_indices=True,
        remove_columns=raw.column_names,
        keep_in_memory=True,
        num_proc=cfg.num_proc,
        desc=f"Tokenizing {name}",
    )
    stats = SplitStats(
        rows=len(mapped),
        truncated=int(sum(mapped["_truncated"])),
        dropped_no_loss=int(sum(1 for n in mapped["_loss_tokens"] if n == 0)),
    )
    kept = mapped.filter(lambda n: n > 0, input_columns=["_loss_tokens"], keep_in_memory=True)
    if len(kept) == 0:
        raise DataError(
            f"{name}: no row has a loss-carrying token within data.max_length={max_length} "
            f"({stats.rows} rows, {stats.truncated} truncated); raise data.max_length"
        )
    stats.loss_tokens = int(sum(kept["_loss_tokens"]))
    stats.tokens = int(sum(len(x) for x in kept["input_ids"]))
    return kept.remove_columns(["_truncated", "_loss_tokens"]), stats
