"""`training.*` as one read-only value: the TRL `SFTConfig` / HF `TrainingArguments` fields a config gives, by
their own names (validated in `training_args.py`, passed through to `SFTConfig` as they are), plus typed
attributes for the fields sft_dist reads itself.

The defaults live here: sft_dist's own (`DEFAULTS`, merged into the mapping by `load_config`), and `SFTConfig`'s
for the fields sft_dist reads (`SFT_DEFAULTS`, what the attributes fall back to; tests/config/test_training.py
compares that table with the installed `SFTConfig`, so an upgrade that moves a default fails loudly).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from sft_dist.errors import ConfigError

# Defaults that differ from SFTConfig's, and why (README, the `training` section lists them).
DEFAULTS: dict[str, Any] = {
    # TRL defaults to True: slower for small models and a source of LoRA reentrancy errors; opt in.
    "activation_checkpointing": False,
    # Trackers only when asked (they may try the network).
    "report_to": "none",
    "logging_steps": 1,
    # LoRA uses every adapter parameter in forward; searching for unused ones costs a graph walk per step.
    "ddp_find_unused_parameters": False,
    # Pick up the newest complete checkpoint of this run (sft_dist/checkpoint/resume.py); `never` to start over.
    "resume_from_checkpoint": "auto",
}

# SFTConfig's defaults for the fields sft_dist reads itself.
SFT_DEFAULTS: dict[str, Any] = {
    "seed": 42,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "max_steps": -1,
    "num_train_epochs": 3.0,
    "learning_rate": 2e-5,
    "lr_scheduler_type": "linear",
    "lr_scheduler_kwargs": None,
    "warmup_steps": 0,
    "eval_strategy": "no",
    "load_best_model_at_end": False,
    "save_total_limit": None,
    "optim": "adamw_torch_fused",
    "optim_args": None,
    "liger_kernel_config": None,
    "disable_tqdm": None,
    "train_sampling_strategy": "random",
}


class Training(Mapping):
    """The validated `training` section, immutable: a Mapping for the pass-through, attributes for sft_dist."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any] | None = None):
        object.__setattr__(self, "_values", dict(values or {}))

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the config is read-only after load; use .replace({name}=...) for a changed copy")

    def __repr__(self) -> str:
        return f"Training({self._values!r})"

    def __reduce__(self):  # pickled to Ray workers and across processes
        return (Training, (self._values,))

    def replace(self, **changes: Any) -> Training:
        return Training({**self._values, **changes})

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def value(self, key: str) -> Any:
        """The value set, else SFTConfig's default (for the fields in SFT_DEFAULTS)."""
        return self._values[key] if key in self._values else SFT_DEFAULTS[key]

    # Typed views of the fields sft_dist reads.
    @property
    def seed(self) -> int:
        return int(self.value("seed"))

    @property
    def micro_batch(self) -> int:
        """Sequences per device per forward (`per_device_train_batch_size`)."""
        return int(self._values.get("per_device_train_batch_size") or SFT_DEFAULTS["per_device_train_batch_size"])

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step (`gradient_accumulation_steps`)."""
        return int(self._values.get("gradient_accumulation_steps") or SFT_DEFAULTS["gradient_accumulation_steps"])

    @property
    def max_steps(self) -> int:
        """Optimizer steps to train; -1: as many as `num_train_epochs` give."""
        return int(self._values.get("max_steps") or -1)

    @property
    def eval_only(self) -> bool:
        """`do_train: false` given: evaluate the model once and train nothing (`sft-dist evaluate`). HF's default
        for it (False) means nothing to its Trainer, so only a false the config gives itself counts."""
        return self._values.get("do_train") is False

    @property
    def eval_strategy(self) -> str:
        return _text(self.value("eval_strategy"))

    @property
    def save_total_limit(self) -> int | None:
        return self.value("save_total_limit")

    @property
    def optim(self) -> str:
        return _text(self.value("optim"))

    @property
    def optim_args(self) -> str:
        return str(self.value("optim_args") or "")

    @property
    def use_liger_kernel(self) -> bool | None:
        """None when unset: sft_dist decides (Liger's kernels where they apply and are installed)."""
        return self._values.get("use_liger_kernel")

    @property
    def liger_kernel_config(self) -> dict[str, Any]:
        return dict(self.value("liger_kernel_config") or {})

    @property
    def activation_checkpointing(self) -> bool:
        return bool(self._values.get("activation_checkpointing"))

    @property
    def activation_checkpointing_kwargs(self) -> dict[str, Any]:
        """What the Trainer passes to `activation_checkpointing_enable`: `every_n_layers` (checkpoint every N-th
        decoder layer), `offload` (the checkpointed layers' inputs kept on the host), the rest for
        torch.utils.checkpoint (`use_reentrant`). Under the name or its older alias, as the Trainer reads them."""
        value = self._values.get("activation_checkpointing_kwargs")
        if value is None:
            value = self._values.get("gradient_checkpointing_kwargs")
        if isinstance(value, str):  # TrainingArguments takes the dict as JSON text too
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ConfigError(f"training.activation_checkpointing_kwargs: {value!r} is not JSON ({e}); give a "
                                  "mapping such as {every_n_layers: 2}") from None
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"training.activation_checkpointing_kwargs: got {value!r}; expected a mapping such as "
                              "{every_n_layers: 2}")
        return dict(value or {})

    @property
    def disable_tqdm(self) -> bool:
        return bool(self.value("disable_tqdm"))

    @property
    def logging_dir(self) -> str | None:
        return self._values.get("logging_dir") or None

    @property
    def early_stopping_patience(self) -> int | None:
        """Evaluations without improvement of `metric_for_best_model` after which training stops; None: never."""
        value = self._values.get("early_stopping_patience")
        return None if value is None else int(value)

    @property
    def early_stopping_threshold(self) -> float:
        """How much better than the best so far an evaluation must be to count as an improvement (absolute)."""
        return float(self._values.get("early_stopping_threshold") or 0.0)

    @property
    def train_sampling_strategy(self) -> Any:
        return self.value("train_sampling_strategy")


def _text(value: Any) -> str:
    """An option's name, whether given as text or as transformers' enum."""
    return str(getattr(value, "value", value))
