"""Checkpoint selection and retention on real directories: complete, partial, corrupt, and mismatched."""

from __future__ import annotations

import json
import logging
import os
import stat
from types import SimpleNamespace

import pytest

from sft_dist.checkpoint.manifest import (
    FORMAT,
    MANIFEST,
    hash_files,
    list_files,
    verify,
)
from sft_dist.checkpoint.resume import ResumePoint, check_fit, resume_request, select
from sft_dist.checkpoint.manager import CheckpointManager
from sft_dist.checkpoint.save import _retain
from sft_dist.checkpoint.store import Store
from sft_dist.config.load import dump_config, load_config
from sft_dist.errors import ConfigError
from tests.conftest import QUICKSTART


def _dcp_metadata(tmp) -> bytes:
    """A genuine DCP `.metadata` (verify parses it: a checkpoint's metadata must be of DCP's form)."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {"w": torch.zeros(4)}}, storage_writer=dcp.FileSystemWriter(str(tmp)), no_dist=True)
    return (tmp / ".metadata").read_bytes()


def make_checkpoint(root, step, *, world=2, backend="ddp", fmt="dcp", stage=None, batch=(8, 1), config_yaml="x: 1\n"):
    d = root / f"checkpoint-{step}"
    (d / "shards").mkdir(parents=True)
    for rank in range(world):
        (d / "shards" / f"__{rank}_0.distcp").write_bytes(os.urandom(1000 + rank))
    if fmt == "dcp":
        (d / "shards" / ".metadata").write_bytes(_dcp_metadata(root / f".dcp-{step}"))
    (d / "config.yaml").write_text(config_yaml)
    files = hash_files(d, list_files(d))
    micro, accum = batch
    manifest = {"format": FORMAT, "step": step, "world_size": world, "backend": backend, "shard_format": fmt,
                "zero_stage": stage, "batch": {"per_device": micro, "accumulation": accum, "world_size": world,
                                               "global": micro * accum * world}, "files": files}
    (d / MANIFEST).write_text(json.dumps(manifest))
    return d


def test_a_complete_checkpoint_verifies(tmp_path):
    make_checkpoint(tmp_path, 10)
    v = verify(Store(str(tmp_path)), "checkpoint-10")
    assert v.ok and v.manifest["step"] == 10


@pytest.mark.parametrize("damage, reason", [
    (lambda d: (d / MANIFEST).unlink(), "no manifest.json"),
    (lambda d: (d / "shards" / "__1_0.distcp").unlink(), "__1_0.distcp is missing"),
    (lambda d: (d / "shards" / "__0_0.distcp").write_bytes(b"short"), "has 5 bytes"),
    (lambda d: _flip_byte(d / "shards" / "__0_0.distcp"), "does not match its sha256"),
    (lambda d: (d / MANIFEST).write_text("{not json"), "unreadable manifest.json"),
])
def test_partial_or_corrupt_checkpoints_are_refused_with_the_reason(tmp_path, damage, reason):
    d = make_checkpoint(tmp_path, 10)
    damage(d)
    v = verify(Store(str(tmp_path)), "checkpoint-10")
    assert not v.ok and reason in v.reason


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))


def test_auto_takes_the_newest_complete_checkpoint_and_says_what_it_skipped(tmp_path, caplog):
    make_checkpoint(tmp_path, 10)
    _flip_byte(make_checkpoint(tmp_path, 20) / "shards" / "__0_0.distcp")
    (tmp_path / ".tmp-checkpoint-30" / "shards").mkdir(parents=True)  # a save killed mid-write
    with caplog.at_level(logging.INFO, logger="sft_dist"):
        point = select(Store(str(tmp_path)), "auto")
    assert point.name == "checkpoint-10" and point.step == 10
    assert "skipping checkpoint" in caplog.text and "checkpoint-20" in caplog.text and "sha256" in caplog.text
    assert ".tmp-checkpoint-30" in caplog.text


def test_auto_with_no_checkpoint_starts_fresh(tmp_path):
    assert select(Store(str(tmp_path / "none")), "auto") is None


def test_an_explicit_incomplete_checkpoint_is_an_error_not_a_fallback(tmp_path):
    d = make_checkpoint(tmp_path, 10)
    (d / MANIFEST).unlink()
    with pytest.raises(ConfigError, match="cannot be resumed from: no manifest.json"):
        select(Store(str(tmp_path)), str(d))
    with pytest.raises(ConfigError, match="not a checkpoint directory"):
        select(Store(str(tmp_path)), str(tmp_path))


@pytest.mark.parametrize("value, expected", [("auto", "auto"), (None, None), ("never", None), (False, None),
                                             (True, "auto"), ("/x/checkpoint-3", "/x/checkpoint-3")])
def test_resume_request(value, expected):
    assert resume_request({"resume_from_checkpoint": value}) == expected


def test_retention_keeps_the_last_k_and_the_best_and_deletes_only_older_ones(tmp_path):
    for step in (5, 10, 15, 20, 25):
        make_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-30").mkdir()  # newer than the current save (an older checkpoint was resumed)
    ck = CheckpointManager(store=Store(str(tmp_path)), rank=0, world_size=1, staging=tmp_path / "s", config_yaml="",
                       config_hash="", backend="ddp", keep_last=2, keep_best=True)
    trainer = SimpleNamespace(state=SimpleNamespace(best_global_step=5))
    removed = _retain(trainer, ck, current="checkpoint-25")
    assert sorted(removed) == ["checkpoint-10", "checkpoint-15"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith("check")) == [
        "checkpoint-20", "checkpoint-25", "checkpoint-30", "checkpoint-5"]


def _point(tmp_path, cfg, **kw):
    d = make_checkpoint(tmp_path, 10, config_yaml=dump_config(cfg), **kw)
    v = verify(Store(str(tmp_path)), d.name)
    return ResumePoint(str(tmp_path), d.name, str(d), v.manifest)


def test_fit_another_world_size_adjusts_accumulation_to_keep_the_global_batch(tmp_path, caplog):
    cfg = load_config(QUICKSTART, ["launcher.num_workers=1"])
    point = _point(tmp_path, cfg, world=2, batch=(8, 1))
    with caplog.at_level(logging.INFO, logger="sft_dist"):
        assert check_fit(point, cfg, world_size=1, shard_format="dcp", zero_stage=None) == 2
    assert "gradient_accumulation_steps 1 -> 2 keeps the global batch of 16" in caplog.text
    assert check_fit(point, cfg, world_size=2, shard_format="dcp", zero_stage=None) is None
    with pytest.raises(ConfigError, match="per_device_train_batch_size to a divisor"):
        check_fit(point, load_config(QUICKSTART, ["training.per_device_train_batch_size=3"]), world_size=4,
                  shard_format="dcp", zero_stage=None)


def test_fit_refuses_a_changed_batch_on_the_same_workers(tmp_path):
    cfg = load_config(QUICKSTART)
    point = _point(tmp_path, cfg, world=2, batch=(8, 1))
    with pytest.raises(ConfigError, match="global batch of 16"):
        check_fit(point, load_config(QUICKSTART, ["training.per_device_train_batch_size=4"]), world_size=2,
                  shard_format="dcp", zero_stage=None)


def test_fit_refuses_another_model_or_data_config_and_names_the_keys(tmp_path):
    point = _point(tmp_path, load_config(QUICKSTART))
    other = load_config(QUICKSTART, ["lora.r=4", "data.max_length=64"])
    with pytest.raises(ConfigError) as e:
        check_fit(point, other, world_size=2, shard_format="dcp", zero_stage=None)
    assert "lora.r: 8 -> 4" in str(e.value) and "data.max_length: 128 -> 64" in str(e.value)


def test_fit_refuses_deepspeed_on_another_world_size_and_across_formats(tmp_path):
    cfg = load_config(QUICKSTART)
    point = _point(tmp_path, cfg, world=2, backend="deepspeed", fmt="deepspeed", stage=2)
    with pytest.raises(ConfigError, match="cannot be loaded by 1. Resume with launcher.num_workers=2"):
        check_fit(point, cfg, world_size=1, shard_format="deepspeed", zero_stage=2)
    with pytest.raises(ConfigError, match="written by ZeRO stage 2; this run uses stage 3"):
        check_fit(point, cfg, world_size=2, shard_format="deepspeed", zero_stage=3)
    with pytest.raises(ConfigError, match="holds deepspeed shards"):
        check_fit(point, cfg, world_size=2, shard_format="dcp", zero_stage=None)


def test_small_files_are_replaced_atomically_and_readable(tmp_path):
    store = Store(str(tmp_path))
    store.write_text("checkpoint-10\n", "latest")
    store.write_text("checkpoint-20\n", "latest")
    assert store.read_text("latest") == "checkpoint-20\n"
    assert stat.S_IMODE((tmp_path / "latest").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]  # no temp file left


def test_bundled_files_are_identified_by_name_not_by_where_sft_dist_is_installed():
    from sft_dist.checkpoint.manifest import config_identity
    from sft_dist.config.load import config_to_dict

    d = config_to_dict(load_config(QUICKSTART, []))
    moved = json.loads(json.dumps(d).replace(str(d["data"]["train_files"][0]).split("/sft_dist/")[0],
                                             "/tmp/ray/session_x/working_dir_files/_ray_pkg_1"))
    assert moved["data"]["train_files"] != d["data"]["train_files"]
    assert config_identity(moved) == config_identity(d)
    other = json.loads(json.dumps(d))
    other["data"]["train_files"] = ["/data/train.jsonl"]
    assert config_identity(other) != config_identity(d)  # a user's own file is still identified by its path


def test_new_data_keys_at_their_defaults_keep_older_checkpoints_resumable():
    from sft_dist.checkpoint.manifest import config_identity
    from sft_dist.config.load import config_to_dict

    d = config_to_dict(load_config(QUICKSTART, []))
    older = json.loads(json.dumps(d))
    del older["data"]["on_bad_row"], older["data"]["id_column"], older["data"]["truncation"]  # before these keys
    assert config_identity(older) == config_identity(d)
    with_ids = config_to_dict(load_config(QUICKSTART, ["data.id_column=id"]))
    assert config_identity(with_ids) != config_identity(d)
    dropping = config_to_dict(load_config(QUICKSTART, ["data.truncation=drop"]))
    assert config_identity(dropping) != config_identity(d)  # other rows: another data cursor


def test_data_cache_keys_never_block_a_resume():
    from sft_dist.checkpoint.manifest import config_identity
    from sft_dist.config.load import config_to_dict

    d = config_to_dict(load_config(QUICKSTART, []))
    older = json.loads(json.dumps(d))
    del older["data"]["cache"], older["data"]["cache_dir"], older["data"]["cache_fingerprint"]  # before the cache
    assert config_identity(older) == config_identity(d)
    moved = config_to_dict(load_config(QUICKSTART, ["data.cache=false", "data.cache_dir=/elsewhere",
                                                    "data.cache_fingerprint=content"]))
    assert config_identity(moved) == config_identity(d)


def test_older_spellings_and_attention_choice_keep_checkpoints_resumable():
    """Checkpoints written before `truncation: right` and `attn_implementation: auto` (both only renamed or
    how the same weights are computed) still resume."""
    from sft_dist.checkpoint.manifest import config_identity
    from sft_dist.config.load import config_to_dict

    d = config_to_dict(load_config(QUICKSTART, []))
    older = json.loads(json.dumps(d))
    older["data"]["truncation"] = "truncate"
    older["model"]["attn_implementation"] = "sdpa"
    del older["model"]["save_init_base"], older["data"]["role_key"], older["data"]["roles"]
    assert config_identity(older) == config_identity(d)
