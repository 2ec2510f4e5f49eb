"""The plan's config diff: what a run changes from the defaults, with secrets never shown."""

from __future__ import annotations

from sft_dist.config.load import load_config
from sft_dist.plan.diff import config_diff
from tests.conftest import QUICKSTART


def test_diff_names_only_changed_settings_and_redacts_secrets():
    cfg = load_config(QUICKSTART, ["training.hub_token=hf_secret123", "lora.r=16",
                                   "checkpoint.storage_options={key: AKIA1, secret: s3cr3t}"])
    diff = config_diff(cfg)
    assert diff["lora.r"] == {"value": 16, "default": 8}
    assert diff["training.hub_token"]["value"] == "***"
    assert diff["checkpoint.storage_options"]["value"]["secret"] == "***"
    assert "hf_secret123" not in repr(diff) and "s3cr3t" not in repr(diff)
    # unchanged: not listed (lora.alpha is 16 in both; sft_dist's own training defaults are the baseline)
    assert "lora.alpha" not in diff and "training.report_to" not in diff and "training.logging_steps" not in diff
