"""CheckpointManager (checkpoint/manager.py): the shard format comes from the backend object, and the named states
it restores outside the shards (the RNG streams here; weights, optimizer and scheduler in the e2e resume tests)."""

from __future__ import annotations

import torch

from sft_dist.backends import get_backend
from sft_dist.checkpoint.manager import CheckpointManager
from sft_dist.checkpoint.shards import DcpShards, DeepSpeedShards, shard_io
from sft_dist.checkpoint.state import rng_file, rng_state, save_pt
from sft_dist.checkpoint.store import Store
from sft_dist.validate import load_config
from tests.conftest import QUICKSTART, backend


def manager(tmp_path, *, rank=0, fmt="dcp") -> CheckpointManager:
    return CheckpointManager(store=Store(str(tmp_path)), rank=rank, world_size=2, staging=tmp_path / "s",
                             config_yaml="", config_hash="h", backend="ddp", shard_format=fmt)


def test_each_backend_names_a_shard_format_with_a_reader_and_writer():
    formats = {}
    for name in ("ddp", "zero2", "zero3", "full_shard"):
        b = get_backend(load_config(QUICKSTART, ["launcher.num_workers=2", *backend(name)]))
        formats[name] = type(shard_io(b.shard_format))
    assert formats == {"ddp": DcpShards, "zero2": DeepSpeedShards, "zero3": DeepSpeedShards,
                       "full_shard": DcpShards}


def test_rng_streams_are_restored_per_rank_and_a_missing_rank_is_reported(tmp_path):
    torch.manual_seed(7)
    save_pt(rng_state(), tmp_path / rng_file(1))
    want = torch.rand(4)
    torch.manual_seed(0)
    assert manager(tmp_path, rank=1).restore_rng(tmp_path) is True
    assert torch.equal(torch.rand(4), want)
    assert manager(tmp_path, rank=0).restore_rng(tmp_path) is False  # written by a run without this rank
