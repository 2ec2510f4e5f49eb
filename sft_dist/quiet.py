"""Silence library noise that says nothing actionable to a user (kept in one place)."""

from __future__ import annotations

import logging
import os
import sys
import warnings


def before_imports() -> None:
    """What must be set before the libraries are imported; first thing in every entry point (the CLI, Ray's worker
    function and its warm template). bitsandbytes warns when imported (peft imports it), on CPUs with AVX512-BF16,
    that it could not fetch an optional 4-bit CPU kernel from the Hub ("Failed to load CPU gemm_4bit_forward from
    kernels-community ... pip install kernels"): its own fallback computes the same, and runs here are offline. It
    opened every CPU run's log, once per worker. Its errors still show."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


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
