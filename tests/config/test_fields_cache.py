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


def _fsdp_config(write_config, more: dict | None = None, *, name: str = "cfg.yaml"):
    from tests.conftest import FSDP

    return write_config({"backend.type": "fsdp", "backend.config": str(FSDP / "full_shard.yaml"), **(more or {})},
                        name=name)


def test_decoder_layers_are_cached_per_model_type_and_never_for_remote_code(tmp_path, monkeypatch, write_config):
    from sft_dist.backends.fsdp import decoder_layer_classes
    from sft_dist.validate import load_config

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert fields_cache.decoder_layers("llama") is None
    cfg = load_config(_fsdp_config(write_config), [])  # its FSDP check reads them (the quickstart's is a Llama)
    assert fields_cache.decoder_layers("llama") == ["LlamaDecoderLayer"]
    assert decoder_layer_classes(cfg) == ["LlamaDecoderLayer"]
    fields_cache.record_decoder_layers("gpt2", ["GPT2Block"])  # merged, not replaced
    assert fields_cache.decoder_layers("llama") == ["LlamaDecoderLayer"]
    # what is cached is what is used...
    fields_cache.record_decoder_layers("llama", ["Recorded"])
    assert decoder_layer_classes(cfg) == ["Recorded"]
    # ...except for remote code: its classes are the model repository's, read from the model every time
    remote = load_config(_fsdp_config(write_config, {"model.trust_remote_code": True}, name="remote.yaml"), [])
    assert decoder_layer_classes(remote) == ["LlamaDecoderLayer"]
    path = next(tmp_path.glob("sft_dist/decoder_layers-*.json"))
    path.write_text("[not a dict")
    assert fields_cache.decoder_layers("llama") is None
    assert decoder_layer_classes(cfg) == ["LlamaDecoderLayer"]
    assert json.loads(path.read_text()) == {"llama": ["LlamaDecoderLayer"]}  # rewritten whole


@pytest.mark.slow
def test_an_fsdp_config_is_checked_without_importing_torch_once_its_model_type_was_seen(tmp_path, write_config):
    """The launcher's FSDP check reads the model's decoder-layer class: the first time by importing it, then from
    the cache (a launch 5 s sooner on 2 cores)."""
    code = ("import sys; from sft_dist.validate import load_config; from sft_dist.backends.fsdp import "
            "decoder_layer_classes; cfg = load_config(sys.argv[1], []); "
            "print(decoder_layer_classes(cfg), 'torch' in sys.modules)")
    env = {"XDG_CACHE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    outs = [subprocess.run([sys.executable, "-c", code, str(_fsdp_config(write_config))], capture_output=True,
                           text=True, env=env, timeout=120) for _ in range(2)]
    assert [(r.returncode, r.stdout.strip()) for r in outs] == [
        (0, "['LlamaDecoderLayer'] True"), (0, "['LlamaDecoderLayer'] False")], outs[-1].stderr[-2000:]
