"""The installed SFTConfig's field types (and transformers' model types, and the decoder-layer classes of the
model types seen so far), cached as JSON so that checking a config needs no TRL (or torch) import.

Importing TRL (and with it transformers, peft, bitsandbytes) takes ~9 s on a small machine; a launcher
that only checks field names and types before starting workers (which import TRL anyway) would pay it on
every run. The cache is keyed by the versions of the libraries that define the fields and holds only
plain data (no pickle): type hints written as JSON and read back as equivalent hints.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import types
import typing
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

LIBRARIES = ("trl", "transformers", "accelerate")
_SIMPLE = {"Any": Any, "None": type(None), "bool": bool, "int": int, "float": float, "str": str}


def cache_path() -> Path | None:
    """Where the cache for the installed library versions lives (None if a version is unknown)."""
    try:
        versions = {lib: metadata.version(lib) for lib in LIBRARIES}
    except metadata.PackageNotFoundError:
        return None
    from sft_dist import __version__

    key = hashlib.sha256(json.dumps([__version__, versions], sort_keys=True).encode()).hexdigest()[:16]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sft_dist"
    return root / f"sft_fields-{key}.json"


def load() -> dict[str, Any] | None:
    """{"fields": {name: hint}, "report_to": [...], "defaults": {name: value}, "model_types": [...]} from the
    cache, or None (missing, unreadable, or written before a key existed)."""
    path = cache_path()
    if path is None:
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {"fields": {k: decode(v) for k, v in raw["fields"].items()}, "report_to": list(raw["report_to"]),
                "defaults": dict(raw["defaults"]), "model_types": list(raw["model_types"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store(fields: dict[str, Any], report_to: list[str], defaults: dict[str, Any], model_types: list[str]) -> None:
    """Write the cache atomically; skipped quietly if a hint has no JSON form or the disk refuses."""
    path = cache_path()
    if path is None:
        return
    try:
        data = {"fields": {k: encode(v) for k, v in fields.items()}, "report_to": report_to, "defaults": defaults,
                "model_types": model_types}
    except TypeError:
        return
    _write(path, data)


def decoder_layers(model_type: str) -> list[str] | None:
    """The decoder-layer classes (`_no_split_modules`) recorded for a transformers model_type, or None."""
    path = _decoder_layers_path()
    try:
        found = json.loads(path.read_text(encoding="utf-8")).get(model_type) if path else None
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, list) and all(isinstance(c, str) for c in found) else None


def record_decoder_layers(model_type: str, classes: list[str]) -> None:
    """Add one model_type's decoder-layer classes to the cache (read, merged, written atomically; a write lost to
    a concurrent launcher only costs that one's import again)."""
    path = _decoder_layers_path()
    if path is None:
        return
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    _write(path, {**known, model_type: list(classes)})


def _decoder_layers_path() -> Path | None:
    # Keyed like the fields: the model classes come with the installed transformers.
    path = cache_path()
    return path.with_name(path.name.replace("sft_fields-", "decoder_layers-")) if path else None


def _write(path: Path, data: dict) -> None:
    """Write JSON atomically; skipped quietly if the disk refuses (the cache only saves an import)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass


def encode(hint: Any) -> Any:
    """A type hint as JSON. Enums become their values (what `coerce` accepts and returns for them)."""
    for name, simple in _SIMPLE.items():
        if hint is simple:
            return name
    origin = typing.get_origin(hint)
    if hint is dict or origin is dict:
        return "dict"
    if origin is Literal:
        values = list(typing.get_args(hint))
        _check_json(values)
        return {"literal": values}
    if origin in (typing.Union, types.UnionType):
        return {"union": [encode(a) for a in typing.get_args(hint)]}
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return {"list": encode(args[0]) if args else "Any"}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        values = [m.value for m in hint]
        _check_json(values)
        return {"literal": values}
    if isinstance(hint, type):  # a library class no YAML value can be an instance of
        return {"class": hint.__name__}
    raise TypeError(f"no JSON form for {hint!r}")


def decode(node: Any) -> Any:
    if node == "dict":
        return dict[str, Any]
    if isinstance(node, str):
        return _SIMPLE[node]
    if "literal" in node:
        return Literal[tuple(node["literal"])]
    if "union" in node:
        return typing.Union[tuple(decode(a) for a in node["union"])]
    if "list" in node:
        return list[decode(node["list"])]
    if "class" in node:
        return type(str(node["class"]), (), {})
    raise ValueError(f"unknown hint {node!r}")


def _check_json(values: list) -> None:
    if not all(isinstance(v, (str, int, float, bool)) or v is None for v in values):
        raise TypeError("values without a JSON form")
