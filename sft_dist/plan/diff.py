"""The resolved config's difference from the defaults, as dotted keys: what this run changes."""

from __future__ import annotations

from typing import Any

from sft_dist.config.load import config_to_dict
from sft_dist.config.schema import Config


def config_diff(cfg: Config) -> dict[str, dict[str, Any]]:
    """{dotted key: {"value": ..., "default": ...}} for every setting that differs (secrets redacted).
    `training.*` is compared with SFTConfig's own defaults overlaid with sft_dist's."""
    from sft_dist.config.training_args import sft_defaults

    mine, base = config_to_dict(cfg), config_to_dict(Config())
    training, default_training = mine.pop("training"), sft_defaults()
    base.pop("training")
    out = {k: {"value": v, "default": d} for k, v, d in _walk(mine, base, "")}
    for key, value in sorted(training.items()):
        default = default_training.get(key)
        if value != default:
            out[f"training.{key}"] = {"value": value, "default": default}
    return out


def _walk(mine: Any, base: Any, prefix: str):
    if isinstance(mine, dict) and isinstance(base, dict) and base:
        for key, value in mine.items():
            yield from _walk(value, base.get(key), f"{prefix}{key}.")
    elif mine != base:
        yield prefix.rstrip("."), mine, base
