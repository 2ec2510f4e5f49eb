"""The config checks that need more than the config: the model classes, the data formats and templates, the backends.

`config/` parses, coerces and checks what the config alone can tell, and imports nothing above it. The checks
here use the layers above it; `load_config` runs both at load, into one `ConfigError`, before any model loads.
It is the `load_config` of the CLI (and of anything that turns a user's config into a run).
"""

from __future__ import annotations

import os

from sft_dist.backends import get_backend
from sft_dist.config import load
from sft_dist.config.schema import Config, DataConfig
from sft_dist.data.chat_templates import resolve_chat_template
from sft_dist.data.formats import CHAT_FORMATS, ROLES
from sft_dist.data.templates import resolve_template
from sft_dist.errors import ConfigError


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Read, override, validate and resolve a config. Raises ConfigError with every problem."""
    return load.load_config(path, overrides, checks=check)


def check(cfg: Config, found: list[str]) -> list[str]:
    """The problems only the layers above config/ can see. `found`: those config/ found (the model class is
    asked only about a model section without problems of its own)."""
    p: list[str] = []
    if not any(x.startswith("model") for x in found):
        from sft_dist.model.attention import check_config

        p += check_config(cfg.model, device=cfg.launcher.device)  # a value the model class rejects, from its config
    d = cfg.data
    if d.format == "alpaca":
        try:
            resolve_template(d.template)
        except ConfigError as e:
            p += e.problems
    p += _check_chat(d)
    p += get_backend(cfg).check()
    return p


def _check_chat(d: DataConfig) -> list[str]:
    p: list[str] = []
    if d.chat_template is not None:
        try:
            resolve_chat_template(d.chat_template)
        except ConfigError as e:
            p += e.problems
    for key in ("role_key", "content_key", "roles"):
        if getattr(d, key) is not None and d.format not in CHAT_FORMATS:
            p.append(f"data.{key}: only for data.format {' or '.join(CHAT_FORMATS)} (got format {d.format!r})")
    for name, ours in (d.roles or {}).items():
        if ours not in ROLES:
            p.append(f"data.roles.{name}: got {ours!r}; map each role name to one of {', '.join(ROLES)}")
    return p
