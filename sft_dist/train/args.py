"""Turn the sft_dist config into TRL's `SFTConfig` (HF `TrainingArguments`), and decide the fused kernels.

Kernels: `training.use_liger_kernel` (unset: on where it can run, i.e. CUDA with liger-kernel and triton
installed; true: on or a ConfigError; false: off) applies Liger's RMSNorm, RoPE and SwiGLU/GeGLU kernels to the
model instance here (`apply_liger`), through Liger's own API, instead of TRL's deprecated `use_liger_kernel`
path. The loss needs no kernel from Liger: TRL's SFTTrainer already replaces the LM head with its fused,
chunked log-prob kernel (Triton on CUDA: the full logits are never built). Liger's fused linear cross entropy
would replace that same forward, so it is refused, as TRL refuses it.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sft_dist.backends import get_backend
from sft_dist.config.schema import Config
from sft_dist.errors import ConfigError
from sft_dist.metrics.eval_names import greater_is_better
from sft_dist.model.unwrap import base_model

# What sft_dist turns on; `training.liger_kernel_config` may switch each off. Liger's apply functions take the
# ones that fit the architecture (swiglu for Llama-like MLPs, geglu for Gemma).
LIGER_DEFAULTS = {"rope": True, "rms_norm": True, "swiglu": True, "geglu": True, "layer_norm": True}
# Liger would patch the loss: fused_linear_cross_entropy replaces the forward TRL's fused head replaces, and
# cross_entropy rebinds torch.nn.functional.cross_entropy for the whole process.
LIGER_REFUSED = {
    "fused_linear_cross_entropy": "TRL's SFTTrainer already computes the loss with its own fused, chunked LM head "
                                  "(no full logits); Liger's would replace the same forward",
    "cross_entropy": "it rebinds torch.nn.functional.cross_entropy for the whole process, and the training loss is "
                     "TRL's fused LM head anyway",
}


@dataclass(frozen=True)
class Liger:
    """Whether and how Liger's kernels are applied: `kwargs` for Liger's apply functions, None when off."""

    kwargs: dict[str, bool] | None
    reason: str
    explicit: bool = False  # training.use_liger_kernel: true (a model Liger cannot patch is then an error)

    def describe(self) -> str:
        if self.kwargs is None:
            return f"kernels: Liger off ({self.reason})"
        on = ", ".join(k for k, v in self.kwargs.items() if v) or "nothing"
        return f"kernels: Liger {on} ({self.reason}); loss: TRL's fused chunked LM head"


def liger_choice(training: Mapping[str, Any], *, device: str) -> Liger:
    """Read `training.use_liger_kernel` / `liger_kernel_config` (unset: auto). Raises ConfigError when Liger was
    asked for and cannot run here, or for a kernel key that is unknown or refused."""
    asked = training.get("use_liger_kernel")
    extra = training.get("liger_kernel_config") or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"training.liger_kernel_config: got {extra!r}; expected a mapping such as {{swiglu: false}}")
    problems = []
    for key, value in extra.items():
        if key in LIGER_REFUSED and value:
            problems.append(f"training.liger_kernel_config.{key}: true is not supported: {LIGER_REFUSED[key]}")
        elif key not in LIGER_DEFAULTS and key not in LIGER_REFUSED:
            problems.append(f"training.liger_kernel_config: unknown key {key!r}; allowed: {', '.join(LIGER_DEFAULTS)}")
        elif not isinstance(value, bool):
            problems.append(f"training.liger_kernel_config.{key}: got {value!r}; expected true or false")
    if problems:
        raise ConfigError(problems)
    if asked is False:
        return Liger(None, "training.use_liger_kernel: false")
    missing = _liger_missing(device)
    if missing is not None:
        if asked:
            raise ConfigError(f"training.use_liger_kernel: true, but {missing}; leave it unset (on wherever it can "
                              "run) or set it to false")
        return Liger(None, f"auto: {missing}")
    kwargs = {k: bool(extra.get(k, v)) for k, v in LIGER_DEFAULTS.items()}
    return Liger(kwargs, "training.use_liger_kernel: true" if asked else "auto: CUDA, liger-kernel installed",
                 explicit=bool(asked))


def _liger_missing(device: str) -> str | None:
    if device != "cuda":
        return f"its kernels are Triton kernels for CUDA, and the device is {device}"
    for module, package in (("liger_kernel", "liger-kernel"), ("triton", "triton")):
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed (pip install {package})"
    return None


def apply_liger(model, choice: Liger) -> str:
    """Patch the (base) model's layers in place with Liger's kernels when `choice` says so; the log line.
    Call it on the model before the trainer is built (LoRA may already wrap it)."""
    if choice.kwargs is None:
        return choice.describe()
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    base = base_model(model)
    model_type = getattr(base.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        if choice.explicit:
            raise ConfigError(f"training.use_liger_kernel: true, but liger-kernel has no kernels for model_type "
                              f"{model_type!r}; set it to false")
        return Liger(None, f"auto: liger-kernel has no kernels for model_type {model_type!r}").describe()
    # The loss kernels are passed as off: Liger's Llama apply function defaults fused_linear_cross_entropy to on.
    _apply_liger_kernel_to_instance(model=base, **choice.kwargs, cross_entropy=False, fused_linear_cross_entropy=False)
    takes = inspect.signature(MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]).parameters  # this architecture's kernels
    applied = {k: v for k, v in choice.kwargs.items() if k in takes}
    return Liger(applied, f"{model_type}, {choice.reason}").describe()


def build_sft_config(cfg: Config, *, device: str, world_size: int = 1):
    """The SFTConfig every worker trains with. Raises ConfigError for cross-field problems."""
    from trl import SFTConfig

    from sft_dist.model.build import resolve_precision

    training = dict(cfg.training)
    training.update(resolve_precision(training, device=device))
    # sft_dist applies Liger itself (apply_liger): TRL's use_liger_kernel path is deprecated and would apply
    # the kernels a second time.
    liger_choice(training, device=device)
    training.pop("use_liger_kernel", None)
    training.pop("liger_kernel_config", None)
    training.pop("disable_tqdm", None)  # sft_dist draws its own progress bar (train/callbacks.py)
    training.pop("resume_from_checkpoint", None)  # sft_dist picks and loads checkpoints (sft_dist/checkpoint)
    training.pop("logging_dir", None)  # applied as TENSORBOARD_LOGGING_DIR by the worker (train/run.py)
    training.pop("early_stopping_patience", None)  # a callback of sft_dist's (train/early_stop.py)
    training.pop("early_stopping_threshold", None)
    # The Trainer pickles its arguments into every checkpoint (training_args.bin): hand the hub token
    # over through the environment, where huggingface_hub reads it, so it is never written to disk.
    token = training.pop("hub_token", None)
    if token:
        os.environ["HF_TOKEN"] = token
    # The Trainer's own push would upload the whole output_dir (checkpoints, base model): sft_dist/hub.py pushes
    # the final directory instead, once the run is done (train/run.py).
    training.pop("push_to_hub", None)
    if (cfg.checkpoint.keep_best or cfg.training.early_stopping_patience) and cfg.training.eval_strategy != "no":
        # Track the best checkpoint by eval loss (HF only does when asked), so retention can keep it and early
        # stopping can tell an improvement.
        training.setdefault("metric_for_best_model", "loss")
    if training.get("metric_for_best_model") is not None and training.get("greater_is_better") is None:
        # HF guesses "greater is better" for any name not ending in "loss": the worst checkpoint by perplexity
        better = greater_is_better(training["metric_for_best_model"], cfg.data.eval_sets)
        if better is not None:
            training["greater_is_better"] = better
    cpu = device == "cpu"
    if world_size > 1:  # naming a backend makes accelerate expect an initialised process group
        training["ddp_backend"] = "gloo" if cpu else "nccl"
    try:
        return SFTConfig(
            output_dir=cfg.output_dir,
            max_length=cfg.data.max_length,
            packing=False,  # sft_dist packs in the data layer (data/packing.py), keeping sample ids
            dataset_num_proc=cfg.data.num_proc,
            use_cpu=cpu,
            ddp_timeout=cfg.launcher.timeout_s,
            # Keep `sample_id` for the data trace; the datasets sft_dist builds hold only model inputs.
            remove_unused_columns=False,
            disable_tqdm=True,
            **get_backend(cfg).training_args(),
            dataloader_pin_memory=not cpu,
            **training,
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(f"training: {e}") from None


def one_gpu(args) -> None:
    """A run of one worker on a machine with several visible GPUs: the Trainer would wrap the model in
    nn.DataParallel over all of them (TRL's SFTTrainer refuses that: "does not support nn.DataParallel"). It
    trains on its own GPU, as each worker of a larger run does; more GPUs take launcher.num_workers."""
    _ = args.device  # the Trainer's arguments count the visible GPUs when they first resolve the device
    args._n_gpu = 1  # what the Trainer itself sets for a model it must not replicate (model parallel)


def validate_sft_config(cfg: Config, *, device: str) -> None:
    """Check the training arguments as a whole in a process that will not train (the launcher)."""
    build_sft_config(cfg, device=device)
    # Building TrainingArguments caches accelerate's process state; a launcher must not keep it.
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
