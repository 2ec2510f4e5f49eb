"""The backend's config file (DeepSpeed JSON / FSDP YAML) with `backend.options` merged over it, parsed.

Reading and type-checking the file is config work, kept here at the bottom so that everything above
(`plan`, `backends`, `train`) reads the same values; what the settings mean for training is `backends/`'s.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from sft_dist.config.coerce import TypeProblem, closest, coerce
from sft_dist.config.load import read_mapping
from sft_dist.config.schema import Config
from sft_dist.errors import ConfigError


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def backend_file(cfg: Config, *, shipped: str) -> dict[str, Any]:
    """The backend config file's contents (DeepSpeed JSON / FSDP YAML) with `backend.options` merged over.
    `shipped`: the files sft_dist ships for this backend (named when the file cannot be read)."""
    raw = read_mapping(cfg.backend.config, what="backend.config:", hint=f" (shipped: {shipped})")
    return merge(raw, cfg.backend.options or {})


@dataclasses.dataclass
class FsdpConfig:
    sharding: Literal["full_shard", "hybrid_shard"] = "full_shard"
    shard_size: int | None = None
    reshard_after_forward: bool = True
    activation_checkpointing: bool = False
    cpu_offload: bool = False


def fsdp_settings(cfg: Config) -> FsdpConfig:
    """The FSDP settings: the backend file with `backend.options` merged over it, type-checked."""
    raw, path = backend_file(cfg, shipped="configs/fsdp/*.yaml"), cfg.backend.config
    names = [f.name for f in dataclasses.fields(FsdpConfig)]
    hints = typing.get_type_hints(FsdpConfig)
    problems, kwargs = [], {}
    for key, value in raw.items():
        if key not in names:
            hint = closest(key, names)
            problems.append(f"backend.config ({path}): unknown key {key!r}" + (f"; did you mean {hint!r}?" if hint else ""))
            continue
        try:
            kwargs[key] = coerce(value, hints[key])
        except TypeProblem as e:
            problems.append(f"backend.config ({path}): {key}: got {value!r}; {e}")
    if problems:
        raise ConfigError(problems)
    return FsdpConfig(**kwargs)
