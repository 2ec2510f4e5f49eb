"""The private parts of HF's Trainer and TRL's SFTTrainer that sft_dist overrides or reads, in one place.

HF's Trainer has no public hook for where checkpoints are written and read, how the train loader starts at a
resume point, or when the model is wrapped: sft_dist overrides these private methods (`train/hooks.py`,
`train/trainer.py`) and reads two private counters. A release that renames one would not fail: the override
would just never be called (a resume that silently restarts the data, an RNG not restored). So each is listed
here with why, and `check_private_seams` (run when the trainer is built, and in the suite) fails loudly, naming
the seam and the installed versions, when one has moved. Attribute swaps of third-party modules are listed in
`tests/test_architecture.py` (SEAMS).
"""

from __future__ import annotations

import functools
import inspect
import re

from sft_dist.errors import SftDistError

TRAINER = "transformers.Trainer"
SFT = "trl.SFTTrainer"

# name -> (owner, kind, why). kind: "override" (a method sft_dist replaces: it must exist and be called by the
# owner's own code), "call" (a method sft_dist calls), "attribute" (an instance attribute sft_dist reads/sets).
PRIVATE_SEAMS: dict[str, tuple[str, str, str]] = {
    "_save_checkpoint": (TRAINER, "override", "sft_dist writes the sharded checkpoint with its manifest"),
    "_load_from_checkpoint": (TRAINER, "override", "weights load with the optimizer, after wrapping"),
    "_load_optimizer_and_scheduler": (TRAINER, "override",
                                      "shards, scheduler, scaler and TrainState load from sft_dist's checkpoint"),
    "_load_scaler": (TRAINER, "override", "the grad scaler loads with the optimizer state"),
    "_load_rng_state": (TRAINER, "override", "per-rank RNG from the checkpoint, read weights-only"),
    "_load_best_model": (TRAINER, "override", "the best checkpoint found through sft_dist's store and manifest"),
    "_prepare_for_training": (TRAINER, "override",
                              "the first point where the model is wrapped: the backend's wrapper check"),
    "_run_epoch": (TRAINER, "override", "a run resumed after early stopping stopped it trains no step"),
    "_track_num_input_tokens": (TRAINER, "override", "under sequence parallelism a group's rows counted once"),
    "_clip_grad_norm": (TRAINER, "override", "after backward, before the step: the gradient bytes a rank holds"),
    "_save": (TRAINER, "call", "FSDP2's gathered full state dict written by rank 0 (backends/save.py)"),
    "_train_batch_size": (TRAINER, "attribute", "the micro-batch HF resolved, for sft_dist's global sampler"),
    "_metrics": (SFT, "attribute", "TRL's num_tokens metric corrected for packing's padding"),
    "_total_train_tokens": (SFT, "attribute", "TRL's num_tokens counter restored on resume (TrainState)"),
}


def _owner(name: str):
    if name == TRAINER:
        from transformers import Trainer

        return Trainer
    from trl import SFTTrainer

    return SFTTrainer


@functools.cache
def _module_source(owner: str) -> str:
    return inspect.getsource(inspect.getmodule(_owner(owner)))


def moved_seams() -> list[str]:
    """The seams the installed transformers/TRL no longer offer, each as one line."""
    out = []
    for name, (owner, kind, why) in PRIVATE_SEAMS.items():
        cls, src = _owner(owner), _module_source(owner)
        if kind in ("override", "call") and not callable(getattr(cls, name, None)):
            out.append(f"{owner}.{name} is gone ({why})")
        elif kind == "override" and not re.search(rf"self\.{name}\(", src):
            out.append(f"{owner} no longer calls self.{name}() ({why})")
        elif kind == "attribute" and not re.search(rf"self\.{name}\b", src):
            out.append(f"{owner} no longer has self.{name} ({why})")
    return out


@functools.cache
def check_private_seams() -> None:
    """Raise when an installed transformers/TRL moved a private part sft_dist depends on."""
    moved = moved_seams()
    if moved:
        import transformers
        import trl

        raise SftDistError(
            f"transformers {transformers.__version__} / trl {trl.__version__} moved what sft_dist's trainer relies "
            f"on: {'; '.join(moved)}. Install the versions pyproject.toml admits (see `make test-latest`).")
