"""Rank environment detection and the pure pickers (no process group needed)."""

from __future__ import annotations

import pytest

from sft_dist.distributed.env import DistEnv, default_threads, detect_env, pick_backend
from sft_dist.errors import SftDistError


def test_pick_backend():
    assert pick_backend("cpu") == "gloo"
    assert pick_backend("cuda") == "nccl"


def test_detect_env_none_when_started_by_hand():
    assert detect_env({}) is None


def test_detect_env_torchrun():
    env = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h",
           "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}
    assert detect_env(env) == DistEnv(rank=1, world_size=4, local_rank=1, local_world_size=2, launched_by="torchrun")


def test_detect_env_ours_and_incomplete():
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
           "SFT_DIST_LAUNCHER": "local"}
    assert detect_env(env).launched_by == "local"
    with pytest.raises(SftDistError, match=r"\['MASTER_ADDR', 'MASTER_PORT'\] not set"):
        detect_env({"RANK": "0", "WORLD_SIZE": "2"})


def test_default_threads_split_cores():
    assert default_threads(2, cpu_count=2) == 1
    assert default_threads(1, cpu_count=16) == 16
    assert default_threads(4, cpu_count=16) == 4
    assert default_threads(8, cpu_count=2) == 1
