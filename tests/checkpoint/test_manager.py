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


def test_the_best_checkpoint_is_this_stores_checkpoint_of_the_best_step(tmp_path):
    """On resume the best is found from the step: the checkpoint's trainer_state.json, written before its manifest
    committed it, names the best before it (and a copied run's, the original's directory)."""
    from types import SimpleNamespace

    from sft_dist.checkpoint.manifest import MANIFEST
    from sft_dist.checkpoint.save import set_best

    for step in (20, 30):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / MANIFEST).write_text("{}")
    (tmp_path / "checkpoint-40").mkdir()  # not committed: no manifest
    trainer = SimpleNamespace(state=SimpleNamespace(best_global_step=30,
                                                    best_model_checkpoint="/elsewhere/checkpoint-20"))
    set_best(trainer, manager(tmp_path))
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-30")
    for step in (40, 50, None):
        trainer.state.best_global_step = step
        set_best(trainer, manager(tmp_path))
        assert trainer.state.best_model_checkpoint is None, step
