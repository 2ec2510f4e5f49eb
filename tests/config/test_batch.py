"""Batch geometry: one global-batch function, HF's default micro-batch read in one place."""

from __future__ import annotations

from sft_dist.config.batch import HF_MICRO_BATCH, accumulation, global_batch, micro_batch
from sft_dist.config.training_args import sft_defaults


def test_hf_default_micro_batch_is_the_installed_one():
    assert sft_defaults()["per_device_train_batch_size"] == HF_MICRO_BATCH


def test_geometry():
    assert (micro_batch({}), accumulation({})) == (HF_MICRO_BATCH, 1)
    training = {"per_device_train_batch_size": 3, "gradient_accumulation_steps": 4}
    assert global_batch(micro_batch(training), accumulation(training), 2) == 24
