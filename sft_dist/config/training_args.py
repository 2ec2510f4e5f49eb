"""Validate `training.*`: TRL `SFTConfig` / HF `TrainingArguments` fields, by their own names.

The field list and types come from the installed `SFTConfig`, so every knob users know is reachable.
A few fields are owned by other sections (the data, backend and launcher decide them); setting them
under `training` is an error that says where they live.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any

from sft_dist.config.coerce import TypeProblem, closest, coerce
from sft_dist.config.training import DEFAULTS

# Fields set by sft_dist from another section; the value says where the user sets them.
OWNED: dict[str, str] = {
    "output_dir": "set the top-level `output_dir`",
    "max_length": "set `data.max_length`",
    "max_seq_length": "set `data.max_length`",
    "packing": "set `data.packing`",
    # sft_dist packs in the data layer and collates packed rows itself (sft_dist/data/packing.py)
    "packing_strategy": "set `data.packing` (best-fit decreasing, documents kept whole)",
    "eval_packing": "set `data.packing` (it packs the training rows; eval rows stay unpacked)",
    "padding_free": "set `data.packing` (packed rows are collated without padding across documents; unpacked "
                    "rows are collated padding-free where the attention reads boundaries, the GPU default)",
    "dataset_text_field": "use `data.format: text` and `data.columns: {text: <column>}`",
    "dataset_kwargs": "sft_dist tokenizes the data itself (see the `data` section)",
    "dataset_num_proc": "set `data.num_proc`",
    "completion_only_loss": "set `data.completion_only_loss`",
    "assistant_only_loss": "set `data.completion_only_loss` (with `data.format: messages`)",
    "deepspeed": "set `backend.type: deepspeed` and `backend.config: <file>`",
    "fsdp": "set `backend.type: fsdp` and `backend.config: <file>`",
    "fsdp_config": "set `backend.type: fsdp` and `backend.config: <file>`",
    "use_cpu": "set `launcher.device: cpu`",
    "no_cuda": "set `launcher.device: cpu`",
    "ddp_backend": "sft_dist picks gloo on CPU and nccl on GPU (`launcher.device`)",
    "local_rank": "the launcher sets the rank",
    "remove_unused_columns": "sft_dist manages dataset columns itself",
}

# Names users know from earlier transformers releases, mapped to the field that does the same now.
# (transformers 5 folded warmup_ratio into warmup_steps: a value < 1 is a fraction of the steps. Its
# gradient_checkpointing alias is ignored once activation_checkpointing is set, as sft_dist's default is.)
ALIASES: dict[str, str] = {"warmup_ratio": "warmup_steps", "evaluation_strategy": "eval_strategy",
                           "gradient_checkpointing": "activation_checkpointing"}

# Fields sft_dist accepts beyond SFTConfig's own. logging_dir: where the TensorBoard tracker writes
# (transformers 5 reads it from TENSORBOARD_LOGGING_DIR; sft_dist sets that on every rank). early_stopping_*: HF's
# EarlyStoppingCallback arguments, by their names there (train/early_stop.py).
EXTRA: dict[str, Any] = {"logging_dir": str, "early_stopping_patience": int, "early_stopping_threshold": float}

# (low, high, inclusive-low) bounds for common numeric fields; None = unbounded.
RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "learning_rate": (0.0, None, False),
    "per_device_train_batch_size": (1, None, True),
    "per_device_eval_batch_size": (1, None, True),
    "gradient_accumulation_steps": (1, None, True),
    "num_train_epochs": (0.0, None, False),
    "warmup_ratio": (0.0, 1.0, True),
    "warmup_steps": (0.0, None, True),
    "weight_decay": (0.0, None, True),
    "max_grad_norm": (0.0, None, True),
    "save_total_limit": (1, None, True),
    "logging_steps": (0.0, None, False),
    "eval_steps": (0.0, None, False),
    "save_steps": (0.0, None, False),
    "early_stopping_patience": (1, None, True),
    "early_stopping_threshold": (0.0, None, True),
}


@functools.cache
def _schema() -> dict[str, Any]:
    """The installed SFTConfig's fields and the known trackers: from the JSON cache, else from TRL (and
    then cached for the next process: a launcher checking a config need not import TRL)."""
    from sft_dist.config import fields_cache

    cached = fields_cache.load()
    if cached is not None:
        return cached
    schema = {"fields": _fields_from_trl(), "report_to": _report_to_from_transformers(),
              "defaults": _defaults_from_trl(), "model_types": _model_types_from_transformers()}
    fields_cache.store(schema["fields"], schema["report_to"], schema["defaults"], schema["model_types"])
    return schema


def model_types() -> list[str]:
    """The `model_type`s the installed transformers can build from a config (CONFIG_MAPPING imports torch:
    ~2.5 s in a launcher that only checks the config)."""
    return _schema()["model_types"]


def _model_types_from_transformers() -> list[str]:
    from transformers import CONFIG_MAPPING

    return sorted(CONFIG_MAPPING.keys())


def sft_fields() -> dict[str, Any]:
    """{field name: type hint} of the installed SFTConfig (enum-or-str hints narrowed to the enum)."""
    return _schema()["fields"]


def _fields_from_trl() -> dict[str, Any]:
    from trl import SFTConfig

    hints = typing.get_type_hints(SFTConfig)
    out = {}
    for f in dataclasses.fields(SFTConfig):
        if not f.init or f.name.startswith("_"):
            continue
        out[f.name] = _narrow(hints.get(f.name, Any), f.metadata.get("choices"))
    return out


def sft_defaults() -> dict[str, Any]:
    """SFTConfig's own defaults (plain values only; enums as their values), overlaid with sft_dist's."""
    return {**_schema()["defaults"], **DEFAULTS}


def _defaults_from_trl() -> dict[str, Any]:
    from trl import SFTConfig

    out = {}
    for f in dataclasses.fields(SFTConfig):
        if not f.init or f.name.startswith("_") or f.default is dataclasses.MISSING:
            continue
        value = f.default.value if isinstance(f.default, enum.Enum) else f.default
        if value is None or isinstance(value, (str, int, float, bool)):
            out[f.name] = value
    return out


def _narrow(hint: Any, choices: list | None) -> Any:
    if choices:
        return typing.Literal[tuple(choices)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums:  # `SchedulerType | str` accepts only the enum's values at runtime
            rest = [a for a in args if a is not str and a not in enums]
            return typing.Union[tuple(enums + rest)] if rest else enums[0]
    return hint


def _report_to_choices() -> list[str]:
    return _schema()["report_to"]


def _report_to_from_transformers() -> list[str]:
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return ["all", "none", *sorted(INTEGRATION_TO_CALLBACK)]


def validate_training(training: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Check each `training.*` key and value. Returns (coerced values, problems)."""
    fields = {**sft_fields(), **EXTRA}
    out: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in training.items():
        full = f"training.{key}"
        if key in ALIASES:
            new = ALIASES[key]
            if new in training:
                problems.append(f"{full}: set either `training.{key}` or `training.{new}`, not both")
                continue
            if key == "warmup_ratio" and not (isinstance(value, (int, float)) and 0 <= value < 1):
                problems.append(f"{full}: got {value!r}; must be a fraction in [0, 1)")
                continue
            key, full = new, f"training.{new}"
        if key in OWNED:
            problems.append(f"{full}: not set here; {OWNED[key]}")
            continue
        if key not in fields:
            hint = closest(key, list(fields) + list(OWNED) + list(ALIASES))
            extra = f"; did you mean `training.{hint}`?" if hint else ""
            problems.append(f"{full}: unknown TrainingArguments/SFTConfig field{extra}")
            continue
        try:
            value = coerce(value, fields[key])
        except TypeProblem as e:
            problems.append(f"{full}: got {value!r}; {e}")
            continue
        problem = _check_value(key, value)
        if problem:
            problems.append(f"{full}: got {value!r}; {problem}")
            continue
        out[key] = value
    return out, problems


def _check_value(key: str, value: Any) -> str | None:
    if key == "report_to" and value is not None:
        allowed = _report_to_choices()
        bad = [v for v in ([value] if isinstance(value, str) else value) if v not in allowed]
        if bad:
            return f"unknown tracker(s) {bad}; allowed: {allowed}"
    if key in RANGES and isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi, lo_inclusive = RANGES[key]
        if lo is not None and (value < lo or (value == lo and not lo_inclusive)):
            return f"must be {'>=' if lo_inclusive else '>'} {lo}"
        if hi is not None and value > hi:
            return f"must be <= {hi}"
    if key == "max_steps" and isinstance(value, int) and value == 0:
        return "must be > 0, or -1 to train for num_train_epochs"
    return None
