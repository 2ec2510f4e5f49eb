"""The key of a cached tokenized dataset: a sha256 over everything its rows depend on.

That is: each data file's identity (or a hub dataset's name, config, split and fingerprint), the tokenizer's
full state, every `data.*` option except those that change only how the build runs, the seed that splits off
eval rows, and CACHE_VERSION. Bump CACHE_VERSION whenever sft_dist's data code would produce other rows from
the same inputs: old entries then simply stop matching.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from sft_dist.config.schema import DataConfig
from sft_dist.data.templates import resolve_template
from sft_dist.digest import sha256_file
from sft_dist.errors import DataError

FORMAT = "sft_dist-data-cache/1"  # an entry's meta.json "format"
CACHE_VERSION = 2  # 2: data.truncation left_prompt, prompt_cut stats, union of jsonl keys as columns
# Options that change how (or where) the build runs, never its rows.
NOT_IN_KEY = ("num_proc", "trace_samples", "cache", "cache_dir", "cache_fingerprint")


def default_cache_dir() -> Path:
    return Path(os.environ.get("SFT_DIST_CACHE") or Path.home() / ".cache" / "sft_dist" / "data")


def cache_key(cfg: DataConfig, tokenizer, *, seed: int) -> tuple[str, dict]:
    """(hex key, the identity it hashes). Apply `data.chat_template` to `tokenizer` first (row_tokenizer does)."""
    options = data_options(cfg)
    if cfg.dataset is not None:
        options["dataset_fingerprints"] = _hub_fingerprints(cfg)
    identity = {"version": CACHE_VERSION, "seed": seed, "data": options, "tokenizer": tokenizer_digest(tokenizer)}
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32], identity


def data_options(cfg: DataConfig) -> dict:
    """The `data` part of the identity, for local files: the options and each file's identity (hub datasets add
    their fingerprints in `cache_key`)."""
    options = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_KEY}
    options["train_files"] = _files(cfg.train_files, cfg.cache_fingerprint)
    options["eval_files"] = ({name: {"files": _files(f, cfg.cache_fingerprint), "columns": columns}
                              for name, (f, columns) in cfg.eval_set_files().items()}
                             if isinstance(cfg.eval_files, dict) else _files(cfg.eval_files, cfg.cache_fingerprint))
    if cfg.mixture is not None:  # each source's files by identity too, not only by name
        options["mixture"] = [{**src, "files": _files(src.get("files"), cfg.cache_fingerprint)} for src in cfg.mixture]
    if cfg.format == "alpaca":
        options["template_text"] = resolve_template(cfg.template)  # a preset's text may change with sft_dist
    return options


def tokenizer_digest(tokenizer) -> str:
    """sha256 of the tokenizer's state that decides token ids: its class, its backend (vocab, merges,
    normalizer, pre-tokenizer, post-processor: BOS/EOS insertion), special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = {
        "class": type(tokenizer).__name__,
        "backend": backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "special_ids": list(tokenizer.all_special_ids),
        "added": {str(k): str(v) for k, v in sorted(tokenizer.added_tokens_decoder.items())},
        "chat_template": tokenizer.chat_template,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


def _files(files: list[str] | str | None, how: str) -> list[dict] | None:
    if files is None:
        return None
    out = []
    for f in [files] if isinstance(files, str) else files:
        p = Path(f).resolve()
        try:
            st = p.stat()
        except OSError:
            out.append({"path": str(p), "missing": True})  # the build reports it, naming the file
            continue
        entry = {"path": str(p), "size": st.st_size}
        if how == "content":
            try:
                entry["sha256"] = sha256_file(p)
            except OSError as e:
                raise DataError(f"{f}: cannot read the file ({e.strerror or e}); check that it is readable") from None
        else:
            entry["mtime_ns"] = st.st_mtime_ns
        out.append(entry)
    return out


def _hub_fingerprints(cfg: DataConfig) -> dict[str, str]:
    """datasets' own fingerprint of each split used: it changes with the dataset's files or revision."""
    from datasets import load_dataset

    out = {}
    named = list(cfg.eval_split.values()) if isinstance(cfg.eval_split, dict) else [cfg.eval_split]
    for split in filter(None, (cfg.train_split, *named)):
        try:
            out[split] = load_dataset(cfg.dataset, cfg.dataset_config, split=split)._fingerprint
        except Exception as e:  # noqa: BLE001 - reported as the read would report it
            raise DataError(f"data.dataset {cfg.dataset!r} (split {split!r}): cannot load from the hub or cache: "
                            f"{e}") from None
    return out
