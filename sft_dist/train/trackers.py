"""Experiment trackers (`training.report_to`): HF's integrations do the logging; sft_dist checks that the
package is installed before anything starts, and keeps each tracker's local files under output_dir unless
the user pointed it elsewhere (W&B offline runs, an MLflow file store)."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sft_dist.errors import ConfigError

PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
            "comet_ml": ("comet_ml",), "clearml": ("clearml",), "trackio": ("trackio",), "swanlab": ("swanlab",)}


def requested(training: Mapping[str, Any]) -> list[str]:
    value = training.get("report_to", "none")
    names = [value] if isinstance(value, str) else list(value or [])
    return [n for n in names if n not in ("none", "all")]


def check_installed(training: Mapping[str, Any]) -> None:
    missing = [n for n in requested(training) if n in PACKAGES
               and not any(importlib.util.find_spec(m) for m in PACKAGES[n])]
    if missing:
        raise ConfigError([f"training.report_to: {n} is not installed in this environment; pip install "
                           f"{PACKAGES[n][0]} (or remove it from report_to)" for n in missing])


def redact_argv() -> None:
    """Trackers record the command line (W&B's run metadata does): a secret given as an override
    (`training.hub_token=...`) must not go with it. The process's own /proc cmdline still shows it:
    prefer the environment (HF_TOKEN) or the config file for secrets."""
    from sft_dist.config.load import _is_secret

    sys.argv = [f"{a.split('=', 1)[0]}=***" if "=" in a and _is_secret(a.split("=", 1)[0].rsplit(".", 1)[-1])
                else a for a in sys.argv]


def set_local_dirs(training: Mapping[str, Any], out: Path) -> None:
    """Defaults, in the environment HF's callbacks read, that keep tracker files in the run's directory."""
    names = requested(training)
    if names:
        redact_argv()
    if "wandb" in names:
        os.environ.setdefault("WANDB_DIR", str(out))  # offline runs land in output_dir/wandb/
        os.environ.setdefault("WANDB_PROJECT", "sft_dist")
    if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
        # A local file store next to the run (MLflow 3 keeps it behind an opt-in, in maintenance mode).
        os.environ["MLFLOW_TRACKING_URI"] = (out / "mlruns").as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "sft_dist")
