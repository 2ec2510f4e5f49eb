"""A resume that would bend the learning-rate schedule is refused, naming the change (or allowed, with a warning)."""

from __future__ import annotations

import logging

import pytest

from sft_dist.checkpoint.resume import ResumePoint, check_fit
from sft_dist.config.load import dump_config, load_config
from sft_dist.errors import ConfigError
from tests.conftest import QUICKSTART


def _point(tmp_path, *overrides: str) -> ResumePoint:
    ck = tmp_path / "checkpoints" / "checkpoint-10"
    ck.mkdir(parents=True)
    (ck / "config.yaml").write_text(dump_config(load_config(str(QUICKSTART), list(overrides))))
    manifest = {"step": 10, "world_size": 2, "shard_format": "dcp", "backend": "ddp",
                "batch": {"global": 16, "per_device": 8, "accumulation": 1}}
    return ResumePoint(str(tmp_path / "checkpoints"), "checkpoint-10", str(ck), manifest)


def _fit(point, *overrides: str):
    return check_fit(point, load_config(str(QUICKSTART), list(overrides)), world_size=2, shard_format="dcp",
                     zero_stage=None)


def test_same_schedule_resumes(tmp_path):
    assert _fit(_point(tmp_path)) is None


@pytest.mark.parametrize("override,said", [
    ("training.max_steps=400", "training.max_steps 200 -> 400"),
    ("training.learning_rate=1e-4", "training.learning_rate 0.005 -> 0.0001"),
    ("training.lr_scheduler_type=linear", "training.lr_scheduler_type 'cosine' -> 'linear'"),
    ("training.warmup_steps=0", "training.warmup_steps 10 -> 0"),
])
def test_a_changed_schedule_is_refused(tmp_path, override, said):
    with pytest.raises(ConfigError, match="another learning-rate schedule") as e:
        _fit(_point(tmp_path), override)
    assert said in str(e.value) and "checkpoint.allow_schedule_change=true" in str(e.value)


def test_a_longer_constant_schedule_is_fine(tmp_path):
    point = _point(tmp_path, "training.lr_scheduler_type=constant")
    assert _fit(point, "training.lr_scheduler_type=constant", "training.max_steps=400") is None


def test_allowed_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="sft_dist"):
        assert _fit(_point(tmp_path), "training.max_steps=400", "checkpoint.allow_schedule_change=true") is None
    assert "changed learning-rate schedule (training.max_steps 200 -> 400)" in caplog.text
    assert "from step 10 on" in caplog.text
