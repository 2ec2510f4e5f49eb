"""Turn the sft_dist config into TRL's `SFTConfig` (HF `TrainingArguments`)."""

from __future__ import annotations

import os

from sft_dist.backends import backend_training_args
from sft_dist.config.schema import Config
from sft_dist.errors import ConfigError


def resolve_precision(training: dict, *, device: str) -> dict:
    """bf16/fp16 only when asked, or bf16 on GPUs that support it. TRL's SFTConfig defaults bf16=True,
    which on CPU would silently train under bf16 autocast; never let that default through."""
    import torch

    if "bf16" in training or "fp16" in training:
        return {"bf16": bool(training.get("bf16", False)), "fp16": bool(training.get("fp16", False))}
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    return {"bf16": bf16, "fp16": False}


def build_sft_config(cfg: Config, *, device: str, world_size: int = 1):
    """The SFTConfig every worker trains with. Raises ConfigError for cross-field problems."""
    from trl import SFTConfig

    training = dict(cfg.training)
    training.update(resolve_precision(training, device=device))
    training.pop("disable_tqdm", None)  # sft_dist draws its own progress bar (train/callbacks.py)
    training.pop("resume_from_checkpoint", None)  # sft_dist picks and loads checkpoints (sft_dist/checkpoint)
    training.pop("logging_dir", None)  # applied as TENSORBOARD_LOGGING_DIR by the worker (train/run.py)
    # The Trainer pickles its arguments into every checkpoint (training_args.bin): hand the hub token
    # over through the environment, where huggingface_hub reads it, so it is never written to disk.
    token = training.pop("hub_token", None)
    if token:
        os.environ["HF_TOKEN"] = token
    if cfg.checkpoint.keep_best and str(training.get("eval_strategy", "no")) != "no":
        # Track the best checkpoint by eval loss (HF only does when asked), so retention can keep it.
        training.setdefault("metric_for_best_model", "loss")
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
            **backend_training_args(cfg),
            dataloader_pin_memory=not cpu,
            **training,
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(f"training: {e}") from None


def validate_sft_config(cfg: Config, *, device: str) -> None:
    """Check the training arguments as a whole in a process that will not train (the launcher)."""
    build_sft_config(cfg, device=device)
    # Building TrainingArguments caches accelerate's process state; a launcher must not keep it.
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
