"""The JSON cache of SFTConfig's field types gives the same validation as TRL's own dataclass."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sft_dist.config import fields_cache
from sft_dist.config.coerce import TypeProblem, coerce, describe
from sft_dist.config.training_args import (
    _defaults_from_trl,
    _fields_from_trl,
    _model_types_from_transformers,
    _report_to_from_transformers,
)

SAMPLES = [None, True, False, 0, 1, 2.5, "2e-4", "linear", "steps", "cosine", "paged_adamw_8bit", "abc", [1],
           ["a"], {"a": 1}, "yes", "no"]


def outcome(value, hint):
    try:
        return "ok", coerce(value, hint)
    except TypeProblem as e:
        return "error", str(e)


def test_cached_hints_validate_exactly_like_the_installed_sftconfig(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fields, trackers, defaults = _fields_from_trl(), _report_to_from_transformers(), _defaults_from_trl()
    fields_cache.store(fields, trackers, defaults, _model_types_from_transformers())
    assert fields_cache.cache_path().is_file() and fields_cache.cache_path().parent.parent == tmp_path
    cached = fields_cache.load()
    assert cached["report_to"] == trackers and set(cached["fields"]) == set(fields) and len(fields) > 100
    assert {"llama", "gpt2", "qwen2"} <= set(cached["model_types"])
    # the defaults the plan's config diff compares with (TRL's own, e.g. its gradient checkpointing default)
    assert cached["defaults"] == defaults and defaults["per_device_train_batch_size"] == 8
    assert defaults["gradient_checkpointing"] is True and defaults["lr_scheduler_type"] == "linear"
    for name, hint in fields.items():
        assert describe(cached["fields"][name]) == describe(hint), name
        for value in SAMPLES:
            assert outcome(value, cached["fields"][name]) == outcome(value, hint), (name, value)


@pytest.mark.slow
def test_a_damaged_cache_is_ignored_and_a_config_is_checked_without_importing_trl(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fields_cache.store(_fields_from_trl(), _report_to_from_transformers(), _defaults_from_trl(),
                       _model_types_from_transformers())
    # the quickstart builds its model from an init_config: its model_type is checked from the cache too
    code = ("import sys; from sft_dist.validate import load_config; "
            "load_config(sys.argv[1], ['training.lr_scheduler_type=cosine']); print('trl' in sys.modules, "
            "'torch' in sys.modules)")
    from tests.conftest import QUICKSTART

    env = {"XDG_CACHE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code, str(QUICKSTART)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False False", r.stderr[-2000:]
    fields_cache.cache_path().write_text("{not json")
    assert fields_cache.load() is None
    r = subprocess.run([sys.executable, "-c", code, str(QUICKSTART)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "True True", r.stderr[-2000:]  # fell back to TRL itself
    assert json.loads(fields_cache.cache_path().read_text())["fields"]  # and rewrote the cache
