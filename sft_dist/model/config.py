"""The model's transformers config, read without building the model or loading any weight."""

from __future__ import annotations

import json
from pathlib import Path

from sft_dist.config.schema import ModelConfig
from sft_dist.errors import ConfigError


def model_config(m: ModelConfig):
    """`init_config` as a transformers config, or the config.json of `name_or_path` (local dir or hub id)."""
    from transformers import AutoConfig

    if m.init_config is not None:
        init = dict(m.init_config)
        try:
            return AutoConfig.for_model(init.pop("model_type"), **init)
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"model.init_config: {e}") from None
    try:
        return AutoConfig.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code, revision=m.revision)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path: cannot read the config of {m.name_or_path!r}: {e}") from None


def raw_config(m: ModelConfig) -> dict | None:
    """`init_config`, or the config.json of a local directory or of a hub id already in the Hugging Face cache, as
    a plain dict: read without importing a config class (which costs a launcher ~3 s: transformers pulls in its
    kernels hub). None for a hub id not downloaded yet or an unreadable file. A cached hub config is the revision
    the cache last fetched: what the launcher checks before the workers load (and, online, refresh) it."""
    raw = m.init_config
    if raw is None and m.name_or_path:
        path = _config_file(m)
        try:
            raw = json.loads(path.read_text(encoding="utf-8")) if path else None
        except (OSError, ValueError):
            raw = None
    return raw if isinstance(raw, dict) else None


def _config_file(m: ModelConfig) -> Path | None:
    local = Path(m.name_or_path) / "config.json"
    if local.is_file():
        return local
    if Path(m.name_or_path).exists() or m.name_or_path.count("/") > 1:
        return None  # a local path without a config.json, not a hub id
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(m.name_or_path, "config.json", revision=m.revision)
    except ValueError:  # not a valid repo id
        return None
    return Path(found) if isinstance(found, str) else None


def model_type(m: ModelConfig) -> str | None:
    """The model_type that `init_config` or a local or cached config.json names."""
    value = (raw_config(m) or {}).get("model_type")
    return value if isinstance(value, str) else None


POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def max_positions(m: ModelConfig) -> int | None:
    """The longest sequence the model's position embeddings / RoPE table were built for (None: unbounded).
    Read from the raw config where it names it; the config class is imported only when needed."""
    raw = raw_config(m)
    if raw is not None:
        found = _positions(raw.get)
        if found is not None or m.init_config is None:
            return found
    return _positions(lambda name: getattr(model_config(m), name, None))


def _positions(get) -> int | None:
    for name in POSITION_KEYS:
        value = get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
