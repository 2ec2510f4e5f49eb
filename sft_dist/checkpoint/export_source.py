"""What `sft-dist export` reads: one complete, verified checkpoint, the run config that wrote it, and where
its base model and tokenizer are.

The argument is a checkpoint directory (`.../checkpoint-<step>`), a run directory (its output_dir, holding
config.yaml; checkpoints under checkpoint.dir or <run>/checkpoints) or a directory of checkpoints; for the
last two the newest complete checkpoint is taken, and the incomplete ones skipped are named.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from sft_dist.checkpoint.manifest import (
    MANIFEST,
    NAME,
    Verdict,
    checkpoint_names,
    verify,
)
from sft_dist.checkpoint.resume import ResumePoint, fetch
from sft_dist.checkpoint.store import Store
from sft_dist.config.schema import LoraConfig, ModelConfig, QuantizationConfig
from sft_dist.errors import ConfigError, SftDistError

log = logging.getLogger("sft_dist")
REDACTED = "***"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass
class RunSettings:
    """The sections of the checkpoint's config.yaml that define its weights."""

    model: ModelConfig
    lora: LoraConfig
    quant: QuantizationConfig
    output_dir: str
    device: str = "auto"  # launcher.device

    @classmethod
    def from_dict(cls, d: dict, *, where: str) -> RunSettings:
        try:
            return cls(ModelConfig(**d.get("model", {})), LoraConfig(**d.get("lora", {})),
                       QuantizationConfig(**d.get("quantization", {})), str(d.get("output_dir", "")),
                       str((d.get("launcher") or {}).get("device", "auto")))
        except TypeError as e:
            raise ConfigError(f"{where}: {e} (written by a different sft_dist version?)") from None


@dataclass
class ExportSource:
    display: str  # the checkpoint as users name it (URL for remote stores)
    manifest: dict
    local_dir: Path  # the checkpoint's files on local disk
    settings: RunSettings
    run_dir: Path | None  # the run's output_dir, when it is on this machine

    @property
    def step(self) -> int:
        return int(self.manifest["step"])


def locate(target: str, *, staging: Path) -> ExportSource:
    """Find, verify (sizes and sha256) and fetch the checkpoint `target` names. Raises SftDistError."""
    target = target.rstrip("/")
    parent, _, name = target.rpartition("/")
    if NAME.match(name):
        store, run_dir, options = Store(parent or ".", None), None, None
        if not store.exists(name):
            raise SftDistError(f"{store.display(name)}: no such checkpoint directory")
        v = verify(store, name)
        if not v.ok:
            raise SftDistError(f"{store.display(name)} is not a complete checkpoint: {v.reason}. Export a complete "
                               "one, or pass the run directory to take its newest complete checkpoint.")
        if store.local and (Path(store.root).parent / "config.yaml").is_file():
            run_dir = Path(store.root).parent  # the default layout: <run>/checkpoints/checkpoint-<step>
    else:
        store, v, run_dir, options = _newest_complete(target)
        name = v.name
    point = ResumePoint(store.url, name, store.display(name), v.manifest, options)
    local = fetch(point, rank=0, staging=staging)
    where = f"{point.display}/config.yaml"
    config = yaml.safe_load((local / "config.yaml").read_text(encoding="utf-8")) or {}
    settings = RunSettings.from_dict(config, where=where)
    if run_dir is None and settings.output_dir and (Path(settings.output_dir) / "config.yaml").is_file():
        run_dir = Path(settings.output_dir)
    return ExportSource(point.display, v.manifest, local, settings, run_dir)


def _newest_complete(target: str) -> tuple[Store, Verdict, Path | None, dict | None]:
    run = Store(target, None)
    if not run.fs.exists(run.root):
        raise SftDistError(f"{target}: no such run or checkpoint directory")
    if run.exists("config.yaml"):
        config = yaml.safe_load(run.read_text("config.yaml")) or {}
        ck = config.get("checkpoint") or {}
        # Secrets are redacted in config.yaml: leave them out so fsspec takes credentials from the environment.
        options = {k: v for k, v in (ck.get("storage_options") or {}).items() if v != REDACTED} or None
        store = Store(ck.get("dir") or f"{target}/checkpoints", options)
    elif checkpoint_names(run):  # a checkpoint root (<run>/checkpoints, or checkpoint.dir)
        store, options = run, None
        run = Store(str(Path(run.root).parent)) if run.local else run
    else:
        if run.exists(MANIFEST):
            raise SftDistError(f"{target}: a checkpoint directory must be named checkpoint-<step>")
        raise SftDistError(f"{target} is neither a checkpoint directory (checkpoint-<step> with manifest.json), "
                           "a directory of checkpoints, nor a run directory (an output_dir with config.yaml)")
    skipped = []
    for name in checkpoint_names(store):
        v = verify(store, name)
        if v.ok:
            for line in skipped:
                log.warning("skipping %s", line)
            run_dir = Path(run.root) if run.local and run.exists("config.yaml") else None
            return store, v, run_dir, options
        skipped.append(f"{store.display(name)}: {v.reason}")
    detail = "".join(f"\n  - {s}" for s in skipped) or " (none saved: was training.save_strategy 'no'?)"
    raise SftDistError(f"{target}: no complete checkpoint under {store.display()}{detail}")


def base_model_path(src: ExportSource) -> str:
    """The base the adapter was trained on: the saved random init (`model.init_config` runs), else
    `model.name_or_path` (a local directory or a hub id)."""
    m = src.settings.model
    if m.init_config is None:
        if not m.name_or_path:
            raise SftDistError(f"{src.display}/config.yaml names no model (model.name_or_path is empty)")
        return m.name_or_path
    candidates = [d / "base_model" for d in (src.run_dir, Path(src.settings.output_dir or ".")) if d is not None]
    for c in candidates:
        if (c / "config.json").is_file():
            return str(c)
    raise SftDistError(
        f"{src.display} was trained from a random init (model.init_config) whose weights the run saved to "
        f"<output_dir>/base_model, but none was found (looked in {', '.join(map(str, candidates))}). Export on the "
        "machine that holds the run's output_dir, or pass the run directory.")


def local_model_dir(base: str, *, revision: str | None) -> Path:
    """A local directory holding the base's config and safetensors (downloaded once for a hub id)."""
    if Path(base).is_dir():
        return Path(base)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # noqa: BLE001 - hub errors come in many types; the message is what matters
        raise SftDistError(f"model.name_or_path: cannot fetch {base!r} from the hub: {e}") from None


def tokenizer_source(src: ExportSource, base: str) -> str:
    """The run's saved tokenizer (adapter/, model/, base_model/), else the configured one."""
    if src.run_dir is not None:
        for sub in ("adapter", "model", "base_model"):
            if any((src.run_dir / sub / f).is_file() for f in TOKENIZER_FILES):
                return str(src.run_dir / sub)
    if src.settings.model.init_config is not None:
        return base
    return src.settings.model.tokenizer or base
