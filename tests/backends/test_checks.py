"""Backend preflight: what cannot work is refused before any model loads, with what to change."""

from __future__ import annotations

import json

import pytest

from sft_dist.backends.fsdp import decoder_layer_classes, fsdp_training_args
from sft_dist.errors import ConfigError
from sft_dist.validate import load_config
from tests.conftest import QUICKSTART, ROOT

DS = ROOT / "configs" / "deepspeed"
FSDP = ROOT / "configs" / "fsdp"


def problems(*overrides):
    with pytest.raises(ConfigError) as ei:
        load_config(QUICKSTART, list(overrides))
    return "\n".join(ei.value.problems)


def write_ds(tmp_path, **zero):
    cfg = json.loads((DS / "zero2.json").read_text())
    cfg["zero_optimization"].update(zero)
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(cfg))
    return p


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"])
def test_shipped_deepspeed_configs_pass_preflight(name):
    cfg = load_config(QUICKSTART, ["backend.type=deepspeed", f"backend.config={DS / name}.json"])
    assert cfg.backend.config == str(DS / f"{name}.json")


def test_deepspeed_incompatible_options(tmp_path):
    text = problems("backend.type=deepspeed", f"backend.config={write_ds(tmp_path, offload_param={'device': 'cpu'})}")
    assert "offload_param needs ZeRO stage 3 (got stage 2); use zero3_offload.json" in text
    cfg = json.loads((DS / "zero2.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = 4
    (tmp_path / "mb.json").write_text(json.dumps(cfg))
    text = problems("backend.type=deepspeed", f"backend.config={tmp_path / 'mb.json'}")
    assert 'train_micro_batch_size_per_gpu=4 disagrees with training.per_device_train_batch_size=8; set it to "auto"' in text


def test_deepspeed_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    assert f"{bad}:1: invalid JSON" in problems("backend.type=deepspeed", f"backend.config={bad}")
    assert "backend.config: required with backend.type=deepspeed" in problems("backend.type=deepspeed")
    assert "backend.config/options: DDP takes no config file" in problems(f"backend.config={DS / 'zero2.json'}")


def test_fsdp_refusals(tmp_path):
    full = f"backend.config={FSDP / 'full_shard.yaml'}"
    assert "with launcher.num_workers=1 nothing would be sharded" in problems(
        "backend.type=fsdp", full, "launcher.num_workers=1")
    typo = tmp_path / "typo.yaml"
    typo.write_text("sharding: full_shard\nreshard_after_foward: true\n")
    assert "unknown key 'reshard_after_foward'; did you mean 'reshard_after_forward'?" in problems(
        "backend.type=fsdp", f"backend.config={typo}")
    one = tmp_path / "one.yaml"
    one.write_text("sharding: hybrid_shard\nshard_size: 1\n")
    assert "shard_size must be >= 2" in problems("backend.type=fsdp", f"backend.config={one}")


@pytest.mark.parametrize("init, expected", [
    ({"model_type": "llama"}, ["LlamaDecoderLayer"]),
    ({"model_type": "gpt2"}, ["GPT2Block"]),
    ({"model_type": "qwen2"}, ["Qwen2DecoderLayer"]),
])
def test_fsdp_wraps_the_models_own_decoder_layer(init, expected):
    cfg = load_config(QUICKSTART, ["backend.type=fsdp", f"backend.config={FSDP / 'full_shard.yaml'}",
                                   f"model.init_config={json.dumps(init)}"])
    assert decoder_layer_classes(cfg) == expected
    args = fsdp_training_args(cfg)
    assert args["fsdp_config"]["transformer_layer_cls_to_wrap"] == expected
    assert args["fsdp_config"]["version"] == 2


def test_backend_options_merge_over_the_file():
    from sft_dist.config.backend_file import backend_file

    cfg = load_config(QUICKSTART, ["backend.type=deepspeed", f"backend.config={DS / 'zero3.json'}",
                                   "backend.options={zero_optimization: {reduce_bucket_size: 1000}}"])
    ds = backend_file(cfg, shipped="configs/deepspeed/zero{1,2,3}.json")
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000
    assert ds["zero_optimization"]["stage"] == 3  # the rest of the nested mapping is kept
    text = problems("backend.type=deepspeed", f"backend.config={DS / 'zero2.json'}",
                    "backend.options={zero_optimization: {offload_param: {device: cpu}}}")
    assert "offload_param needs ZeRO stage 3" in text


def test_fsdp_cpu_offload_is_refused_on_cpu_workers(tmp_path):
    off = tmp_path / "off.yaml"
    off.write_text("sharding: full_shard\ncpu_offload: true\n")
    assert "CPU workers have nothing to offload" in problems("backend.type=fsdp", f"backend.config={off}",
                                                            "launcher.device=cpu")


def test_deepspeed_jit_builds_with_the_environments_own_ninja(monkeypatch):
    """Two ninja versions on PATH rebuild DeepSpeed's ops at every switch; the venv's own goes first."""
    import os
    import sys

    from sft_dist.backends.deepspeed import pin_jit_ninja

    bindir = os.path.dirname(sys.executable)
    assert os.path.isfile(os.path.join(bindir, "ninja"))  # installed with deepspeed
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin"]))
    pin_jit_ninja()
    pin_jit_ninja()  # idempotent
    assert os.environ["PATH"].split(os.pathsep) == [bindir, "/usr/bin", "/bin"]
