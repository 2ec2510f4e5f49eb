"""manifest.json: the last file written into a checkpoint, and the proof that it is complete.

It lists every file with its size and sha256, and the facts a resume must agree with: step, world size,
batch geometry, data cursor, backend and shard format, and a hash of the config that defines the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sft_dist.checkpoint.store import Store
from sft_dist.digest import sha256_file, sha256_stream

FORMAT = "sft_dist-checkpoint/1"
MANIFEST = "manifest.json"
NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def hash_files(local_dir: Path, rel_files: list[str]) -> dict[str, dict]:
    return {rel: {"size": (local_dir / rel).stat().st_size, "sha256": sha256_file(local_dir / rel)}
            for rel in rel_files}


def list_files(local_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(local_dir)) for p in local_dir.rglob("*") if p.is_file())


@dataclass
class Verdict:
    name: str
    ok: bool
    reason: str = ""
    manifest: dict | None = None

    @property
    def step(self) -> int:
        m = NAME.match(self.name)
        return int(m.group(1)) if m else -1


def read_manifest(store: Store, name: str) -> dict:
    data = json.loads(store.read_text(name, MANIFEST))
    if data.get("format") != FORMAT:
        raise ValueError(f"unknown checkpoint format {data.get('format')!r} (expected {FORMAT})")
    return data


def verify(store: Store, name: str, *, checksums: bool = True) -> Verdict:
    """Whether `name` is a complete checkpoint: manifest present, every listed file there with its size and
    (with `checksums`) its sha256."""
    if not store.exists(name, MANIFEST):
        return Verdict(name, False, "no manifest.json (the save did not finish)")
    try:
        manifest = read_manifest(store, name)
    except (ValueError, OSError) as e:
        return Verdict(name, False, f"unreadable manifest.json ({e})")
    present = store.files(name)
    for rel, meta in manifest["files"].items():
        if rel not in present:
            return Verdict(name, False, f"{rel} is missing")
        if present[rel] != meta["size"]:
            return Verdict(name, False, f"{rel} has {present[rel]} bytes, the manifest says {meta['size']}")
    if checksums:
        for rel, meta in manifest["files"].items():
            with store.open(name, rel) as f:
                digest = sha256_stream(f)
            if digest != meta["sha256"]:
                return Verdict(name, False, f"{rel} does not match its sha256 in the manifest (corrupt)")
        untrusted = _untrusted_metadata(store, name, manifest)
        if untrusted:
            return Verdict(name, False, f"untrusted, not loaded: {untrusted}")
    return Verdict(name, True, manifest=manifest)


def _untrusted_metadata(store: Store, name: str, manifest: dict) -> str | None:
    """Why the checkpoint's DCP metadata is not of the form sft_dist writes (None: it is). The sha256 above
    proves only that the files match the manifest, which whoever wrote them could write as well."""
    if manifest.get("shard_format") != "dcp":
        return None  # DeepSpeed's files are read with weights_only=True (checkpoint/deepspeed_io.py)
    from sft_dist.checkpoint.dcp_safe import METADATA, UntrustedCheckpoint, parse_metadata
    from sft_dist.checkpoint.shards import DCP_DIR

    rel = f"{DCP_DIR}/{METADATA}"
    if rel not in manifest["files"]:
        return f"the manifest lists no {rel}"
    try:
        with store.open(name, rel) as f:
            parse_metadata(f.read(), where=rel)
    except UntrustedCheckpoint as e:
        return str(e)
    return None


def checkpoint_names(store: Store) -> list[str]:
    """Checkpoint directories under the root, newest step first (complete or not)."""
    names = [n for n in store.listdir() if NAME.match(n)]
    return sorted(names, key=lambda n: int(NAME.match(n).group(1)), reverse=True)


ASSETS = "/sft_dist/assets/"


# Data keys added after checkpoints were first written: at their default they stay out of the identity, so
# a checkpoint from before them still resumes (a run they would have stopped never wrote one).
LATER_DEFAULTS = {"on_bad_row": "error", "id_column": None, "truncation": "right", "mixture": None,
                  "mixture_rows": None, "streaming": False, "shuffle_window": 10000, "role_key": None,
                  "content_key": None, "roles": None, "split_overlap": 0}
LORA_LATER_DEFAULTS = {"init_adapter": None}  # the same for the lora section
RENAMED = {("truncation", "truncate"): "right"}  # old spellings of the same value
# Model keys that choose how the weights are computed or stored, never what they are.
MODEL_NOT_IDENTITY = ("attn_implementation", "save_init_base")
# Data keys that change where or how fast the data is prepared, never what it is: never in the identity (so a
# run resumes with another cache directory, or with the cache off).
NOT_IDENTITY = ("trace_samples", "num_proc", "cache", "cache_dir", "cache_fingerprint")


def config_identity(d: dict) -> dict:
    """The parts of a config (as `config_to_dict` gives it) a checkpoint's weights and data cursor depend on."""
    data = {k: _builtin(_renamed(k, v)) for k, v in d["data"].items()
            if k not in NOT_IDENTITY and not (k in LATER_DEFAULTS and _renamed(k, v) == LATER_DEFAULTS[k])}
    return {
        "model": {k: _builtin(v) for k, v in d["model"].items() if k not in MODEL_NOT_IDENTITY},
        "lora": {k: v for k, v in d["lora"].items() if not (k in LORA_LATER_DEFAULTS and v == LORA_LATER_DEFAULTS[k])},
        "quantization": d["quantization"],
        "data": data,
        "seed": d["training"].get("seed", 42),
    }


def _renamed(key: str, value):
    return RENAMED.get((key, value), value) if isinstance(value, str) else value


def _builtin(value):
    """Shipped assets by name, not by where this copy of sft_dist sits (an installed package, a Ray job's
    uploaded working_dir, a container image): the same bundled file must not block a resume."""
    if isinstance(value, list):
        return [_builtin(v) for v in value]
    if isinstance(value, str) and ASSETS in value.replace(os.sep, "/"):
        return "builtin:" + value.replace(os.sep, "/").split(ASSETS, 1)[1]
    return value


def config_hash(cfg) -> str:
    from sft_dist.config.load import config_to_dict

    identity = config_identity(config_to_dict(cfg))
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def identity_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config identities."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += identity_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out
