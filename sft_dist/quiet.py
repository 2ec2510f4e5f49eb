"""Silence library noise that says nothing actionable to a user (kept in one place)."""

from __future__ import annotations

import logging
import os
import sys
import warnings


def quiet_libraries(*, main: bool = True) -> None:
    import datasets
    import transformers

    transformers.logging.set_verbosity_warning() if main else transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    # Under Ray, its per-report INFO lines ("Reporting training result ...") would pass sft_dist's INFO root;
    # some Ray modules log under their file path, so filter by where a record comes from.
    for handler in logging.getLogger().handlers:
        handler.addFilter(_below_warning_from_ray)
    # peft reads a transformers attribute renamed in v5.x; the warning is theirs and says nothing to a user.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
    # DeepSpeed's ZeRO-3 calls the old collective names: two warnings per rank per step on gloo.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                            "is deprecated", category=FutureWarning)


def _below_warning_from_ray(record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING or "ray" not in sys.modules:
        return True
    ray_dir = os.path.dirname(sys.modules["ray"].__file__ or "") + os.sep
    return not record.pathname.startswith(ray_dir)
