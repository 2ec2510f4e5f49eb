"""The model's transformers config, read without building the model or loading any weight."""

from __future__ import annotations

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


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings / RoPE table were built for (None: unbounded)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
