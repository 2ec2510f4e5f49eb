"""Silence library noise that says nothing actionable to a user (kept in one place)."""

from __future__ import annotations

import logging
import warnings


def quiet_libraries(*, main: bool = True) -> None:
    import datasets
    import transformers

    transformers.logging.set_verbosity_warning() if main else transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    # Under Ray, its per-report INFO lines ("Reporting training result ...") would pass sft_dist's INFO root.
    for name in ("ray", "ray.train"):  # ray.train sets its own level
        logging.getLogger(name).setLevel(logging.WARNING)
    # peft reads a transformers attribute renamed in v5.x; the warning is theirs and says nothing to a user.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
