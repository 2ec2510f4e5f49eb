"""The typed, read-only `training` section (config/training.py) and the frozen config around it."""

from __future__ import annotations

import dataclasses
import enum
import pickle

import pytest
import yaml

from sft_dist.config.batch import global_batch
from sft_dist.config.load import dump_config, load_config
from sft_dist.config.schema import Config
from sft_dist.config.training import SFT_DEFAULTS, Training
from tests.conftest import QUICKSTART


def test_the_defaults_sft_dist_falls_back_on_are_the_installed_sftconfigs():
    """An upgrade of TRL/transformers that moves one of these defaults fails here, not silently in a run."""
    from trl import SFTConfig

    installed = {f.name: f.default for f in dataclasses.fields(SFTConfig) if f.name in SFT_DEFAULTS}
    assert set(installed) == set(SFT_DEFAULTS), set(SFT_DEFAULTS) - set(installed)
    for name, default in installed.items():
        value = default.value if isinstance(default, enum.Enum) else default
        assert value == SFT_DEFAULTS[name], (name, value, SFT_DEFAULTS[name])


def test_unset_fields_read_as_sftconfig_defaults_and_set_ones_as_given():
    empty = Training()
    assert (empty.seed, empty.micro_batch, empty.accumulation, empty.max_steps) == (42, 8, 1, -1)
    assert (empty.eval_strategy, empty.optim, empty.optim_args, empty.save_total_limit) == (
        "no", SFT_DEFAULTS["optim"], "", None)
    assert (empty.use_liger_kernel, empty.liger_kernel_config, empty.activation_checkpointing) == (None, {}, False)
    t = Training({"seed": 7, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 3, "max_steps": 20,
                  "use_liger_kernel": False, "learning_rate": 1e-4})
    assert (t.seed, t.micro_batch, t.accumulation, t.max_steps, t.use_liger_kernel) == (7, 4, 3, 20, False)
    assert global_batch(t.micro_batch, t.accumulation, 2) == 24
    assert t["learning_rate"] == 1e-4 and dict(t) == t.as_dict() and len(t) == 6  # the rest passes through


def test_the_loaded_config_is_read_only_and_changes_only_as_a_copy():
    cfg = load_config(QUICKSTART)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.launcher.num_workers = 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.output_dir = "elsewhere"
    with pytest.raises(TypeError):
        cfg.training["max_steps"] = 1  # a Mapping, not a dict
    with pytest.raises(AttributeError):
        cfg.training.max_steps = 1
    changed = dataclasses.replace(cfg, training=cfg.training.replace(gradient_accumulation_steps=4))
    assert (changed.training.accumulation, cfg.training.accumulation) == (4, 1)
    assert isinstance(Config(training={"seed": 3}).training, Training)  # a plain mapping is wrapped
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # as it travels to Ray workers


def test_the_dump_holds_the_training_fields_as_plain_yaml():
    cfg = load_config(QUICKSTART, ["training.hub_token=hf_secret", "training.lr_scheduler_kwargs={power: 2}"])
    dumped = yaml.safe_load(dump_config(cfg))
    assert dumped["training"]["max_steps"] == cfg.training.max_steps
    assert dumped["training"]["hub_token"] == "***" and "hf_secret" not in dump_config(cfg)
    assert dumped["training"]["lr_scheduler_kwargs"] == {"power": 2}
