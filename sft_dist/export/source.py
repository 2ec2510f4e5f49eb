"""What `sft-dist export` reads: one complete, verified checkpoint, the run config that wrote it, and where
its base model and tokenizer are.

The argument is a checkpoint directory (`.../checkpoint-<step>`), a run directory (its output_dir, holding
config.yaml; checkpoints under checkpoint.dir or <run>/checkpoints) or a directory of checkpoints; for the
last two the newest complete checkpoint is taken, and the incomplete ones skipped are named. A finished run's
final `adapter/` (or `model/`, full fine-tuning) counts as its newest weights when no complete checkpoint is
as new (e.g. the quickstart, which saves no checkpoint).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
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
from sft_dist.export.weights import TrainedWeights

log = logging.getLogger("sft_dist")
REDACTED = "***"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")
FINAL = "final"  # the shard_format of a run's final adapter/ or model/ (not a checkpoint)


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

    @property
    def final(self) -> bool:
        return self.manifest.get("shard_format") == FINAL


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
        store, v, run_dir, options, skipped = _newest_complete(target)
        final = final_output(run_dir) if run_dir is not None else None
        if v is None and final is None:
            detail = "".join(f"\n  - {s}" for s in skipped) or " (none saved: was training.save_strategy 'no'?)"
            unfinished = " (and no final adapter/ or model/ with run_summary.json: has the run finished?)" \
                if run_dir is not None else ""
            raise SftDistError(f"{target}: no complete checkpoint under {store.display()}{unfinished}{detail}")
        for line in skipped:
            log.warning("skipping %s", line)
        if final is not None and (v is None or final.step > v.step):
            return final  # the run's own final weights: newer than any checkpoint, or the only ones
        name = v.name
    point = ResumePoint(store.url, name, store.display(name), v.manifest, options)
    local = fetch(point, rank=0, staging=staging)
    where = f"{point.display}/config.yaml"
    config = yaml.safe_load((local / "config.yaml").read_text(encoding="utf-8")) or {}
    settings = RunSettings.from_dict(config, where=where)
    if run_dir is None and settings.output_dir and (Path(settings.output_dir) / "config.yaml").is_file():
        run_dir = Path(settings.output_dir)
    return ExportSource(point.display, v.manifest, local, settings, run_dir)


def _newest_complete(target: str) -> tuple[Store, Verdict | None, Path | None, dict | None, list[str]]:
    """(checkpoint store, its newest complete checkpoint or None, the local run dir, storage options, the
    incomplete newer ones skipped)."""
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
    run_dir = Path(run.root) if run.local and run.exists("config.yaml") else None
    for name in checkpoint_names(store):
        v = verify(store, name)
        if v.ok:
            return store, v, run_dir, options, skipped
        skipped.append(f"{store.display(name)}: {v.reason}")
    return store, None, run_dir, options, skipped


def final_output(run_dir: Path) -> ExportSource | None:
    """A finished run's final weights as an export source: adapter/ (PEFT) or model/ (full fine-tuning), once
    run_summary.json (written after them) says the run finished, and at which step."""
    summary_path = run_dir / "run_summary.json"
    if not summary_path.is_file() or not (run_dir / "config.yaml").is_file():
        return None
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for sub, marker in (("adapter", "adapter_config.json"), ("model", "config.json")):
        final = run_dir / sub
        if (final / marker).is_file():
            config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
            manifest = {"step": int(summary.get("global_step", 0)), "backend": summary.get("backend"),
                        "shard_format": FINAL, "zero_stage": None, "world_size": summary.get("world_size")}
            return ExportSource(str(final), manifest, final,
                                RunSettings.from_dict(config, where=f"{run_dir}/config.yaml"), run_dir)
    return None


class FinalWeights(TrainedWeights):
    """A run's final adapter/ (PEFT format) or model/ (Hugging Face format) read as the tensors a checkpoint
    holds: keyed by the names of the model that trained them, one tensor at a time from safetensors."""

    def __init__(self, view, final_dir: Path):
        from safetensors import safe_open

        files = sorted(final_dir.glob("*.safetensors"))
        if not files:
            raise SftDistError(f"{final_dir}: no *.safetensors file to export")
        self._where: dict[str, tuple[Path, str]] = {}
        self.specs = {}
        self.frozen: list[str] = []  # frozen base tensors peft saved with the adapter (see below)
        rename = _saved_names(view) if view.lora else None
        state = view.model.state_dict() if view.lora else {}
        unknown = []
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():  # noqa: SIM118 - safe_open is not a dict
                    name = rename.get(key) if rename is not None else key
                    if name is None and key in state:
                        # With a resized vocabulary peft saves the (frozen, resized) embedding and head too.
                        self._where[key] = (f, key)
                        self.frozen.append(key)
                        continue
                    if name is None:
                        unknown.append(key)
                        continue
                    sl = st.get_slice(key)
                    self._where[name] = (f, key)
                    self.specs[name] = (torch.Size(sl.get_shape()), _DTYPES[sl.get_dtype()])
        if unknown:
            raise SftDistError(f"{final_dir}: tensors the run's adapter config does not describe: "
                               f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}; export a checkpoint "
                               "of the run instead")

    def load(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path, key = self._where[name]
        with safe_open(str(path), framework="pt") as st:
            return st.get_tensor(key)


def _saved_names(view) -> dict[str, str]:
    """PEFT's saved key (as `get_peft_model_state_dict` writes it) -> the trainable parameter's name."""
    import warnings

    from peft import get_peft_model_state_dict

    probes = {n: torch.empty(0) for n, p in view.model.named_parameters() if p.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = get_peft_model_state_dict(view.model, state_dict=probes)
    by_id = {id(t): n for n, t in probes.items()}
    return {key: by_id[id(t)] for key, t in saved.items() if id(t) in by_id}


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


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
    if not m.save_init_base:
        raise SftDistError(f"{src.display} was trained from a random init (model.init_config) with "
                           "model.save_init_base: false, so its base weights were never written and there is no "
                           "base to export against; train with model.save_init_base: true to export")
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
