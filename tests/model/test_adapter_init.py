"""`lora.init_adapter`: a trained adapter's shape taken into the config before anything loads (config/adapter.py),
its tensors loaded into the adapter peft builds from it (model/adapter_init.py). The adapters here are real: a tiny
Llama wrapped by peft, its LoRA matrices set to random values, saved by `save_pretrained`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sft_dist.checkpoint.manifest import config_identity
from sft_dist.config.load import build_config, config_to_dict
from sft_dist.config.schema import LoraConfig
from sft_dist.errors import ConfigError, SftDistError
from sft_dist.model.adapter_init import load_weights
from sft_dist.model.lora import apply_lora

SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=96, max_position_embeddings=64, tie_word_embeddings=False)


def tiny(**over):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **{**SHAPE, **over}))


def saved_adapter(path: Path, lora: LoraConfig, **over) -> dict[str, torch.Tensor]:
    """A trained-looking adapter (every LoRA matrix random, B too) saved as peft saves it; its tensors by name."""
    model = apply_lora(tiny(**over), lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p))
    model.save_pretrained(str(path))
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def config(tmp_path: Path, lora: dict) -> dict:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    return {"output_dir": str(tmp_path / "out"), "model": {"name_or_path": "org/model"},
            "data": {"train_files": str(data)}, "lora": lora}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    lora = LoraConfig(r=4, alpha=8, target_modules="all-linear", modules_to_save=["lm_head"], use_rslora=True)
    return path, saved_adapter(path, lora)


def test_the_adapters_shape_is_taken_and_its_tensors_loaded(adapter, tmp_path):
    path, tensors = adapter
    cfg = build_config(config(tmp_path, {"init_adapter": str(path), "dropout": 0.1}))
    lo = cfg.lora
    assert (lo.r, lo.alpha, lo.use_rslora, lo.modules_to_save, lo.dropout) == (4, 8, True, ["lm_head"], 0.1)
    assert len(lo.target_modules) == 14 and all(t.startswith("model.layers.") for t in lo.target_modules)
    assert lo.init_adapter == str(path)
    model = apply_lora(tiny(), lo)
    line = load_weights(model, lo.init_adapter)
    assert line.startswith(f"lora.init_adapter: loaded {len(tensors)} tensors")
    got = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(got) == sorted(tensors)
    for name, t in tensors.items():
        assert torch.equal(got[name], t), name
    # the same numbers out: the scaling (rsLoRA, alpha) is the adapter's too
    reference = apply_lora(tiny(), dataclasses.replace(lo, init_adapter=None))
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if p.requires_grad:
                p.copy_(tensors[name])
    ids = torch.randint(0, 96, (2, 9))
    model.eval(), reference.eval()  # lora.dropout 0.1 is a training choice
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    # a sft_dist run directory names its adapter/
    run = path.parent
    assert build_config(config(tmp_path, {"init_adapter": str(run)})).lora.init_adapter == str(path)


@pytest.mark.parametrize("lora, wrong", [
    ({"r": 8}, "lora.r: 8 here, 4 in the adapter"),
    ({"alpha": 16}, "lora.alpha: 16 here, 8 in the adapter"),
    ({"use_rslora": False}, "lora.use_rslora: False here, True in the adapter"),
    ({"modules_to_save": None}, "lora.modules_to_save: None here, ['lm_head'] in the adapter"),
    ({"target_modules": ["q_proj", "v_proj"]}, "lora.target_modules: ['q_proj', 'v_proj'] here"),
])
def test_a_field_the_config_sets_against_the_adapter_is_refused(adapter, tmp_path, lora, wrong):
    path, _ = adapter
    with pytest.raises(ConfigError) as e:
        build_config(config(tmp_path, {"init_adapter": str(path), **lora}))
    assert wrong in str(e.value) and "drop lora." in str(e.value)


def test_what_agrees_with_the_adapter_is_accepted(adapter, tmp_path):
    path, _ = adapter
    leaves = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for targets in ("all-linear", leaves):
        cfg = build_config(config(tmp_path, {"init_adapter": str(path), "r": 4, "target_modules": targets,
                                             "modules_to_save": ["lm_head"]}))
        assert cfg.lora.r == 4 and len(cfg.lora.target_modules) == 14


def test_unusable_adapters_are_refused_before_anything_loads(adapter, tmp_path):
    path, _ = adapter
    cases = {}
    cases["missing"] = tmp_path / "nope"
    empty = tmp_path / "empty"
    empty.mkdir()
    cases["no config"] = empty
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    cases["pickle only"] = pickled
    other = tmp_path / "ia3"
    other.mkdir()
    meta = json.loads((path / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**meta, "peft_type": "IA3"}))
    (other / "adapter_model.safetensors").write_bytes((path / "adapter_model.safetensors").read_bytes())
    cases["IA3"] = other
    expected = {"missing": "does not exist", "no config": "has no adapter_config.json",
                "pickle only": "is a pickle, which sft_dist does not load", "IA3": "is a IA3 adapter"}
    for name, where in cases.items():
        with pytest.raises(ConfigError) as e:
            build_config(config(tmp_path, {"init_adapter": str(where)}))
        assert "lora.init_adapter" in str(e.value) and expected[name] in str(e.value), (name, str(e.value))
    with pytest.raises(ConfigError, match="needs `lora.enabled: true`"):
        build_config(config(tmp_path, {"init_adapter": str(path), "enabled": False}))


def test_an_moe_adapter_is_rebuilt_as_peft_built_it(tmp_path):
    """peft files the projections of fused MoE experts under target_parameters, with a rank_pattern of its own
    (transformers 5's Qwen3-MoE); the lora section shows neither, so the new adapter is built from the adapter's
    own config."""
    from tests.model.test_moe_lora import tiny as tiny_moe

    trained = apply_lora(tiny_moe("qwen3_moe"), LoraConfig(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(2)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.1)
    trained.save_pretrained(str(tmp_path / "moe"))
    meta = json.loads((tmp_path / "moe" / "adapter_config.json").read_text())
    assert meta["target_parameters"] and meta["rank_pattern"]  # what this test is about
    cfg = build_config(config(tmp_path, {"init_adapter": str(tmp_path / "moe"), "dropout": 0.0}))
    model = apply_lora(tiny_moe("qwen3_moe"), cfg.lora)
    assert "loaded 28 tensors" in load_weights(model, cfg.lora.init_adapter)
    ids = torch.randint(0, 256, (2, 7))
    trained.eval(), model.eval()
    assert torch.equal(model(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_an_adapter_of_another_base_is_refused_not_half_loaded(adapter, tmp_path):
    path, _ = adapter
    lo = build_config(config(tmp_path, {"init_adapter": str(path)})).lora
    wider = apply_lora(tiny(hidden_size=48, num_attention_heads=4), lo)  # the same modules, other shapes
    with pytest.raises(SftDistError, match="do not fit this model.*size mismatch"):
        load_weights(wider, lo.init_adapter)
    # tensors the adapter's own config does not account for: a head saved whole, with modules_to_save dropped from
    # its adapter_config.json, would land on the frozen base head
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    meta = json.loads((path / "adapter_config.json").read_text())
    (mixed / "adapter_config.json").write_text(json.dumps({**meta, "modules_to_save": None}))
    (mixed / "adapter_model.safetensors").write_bytes((path / "adapter_model.safetensors").read_bytes())
    lo = build_config(config(tmp_path, {"init_adapter": str(mixed)})).lora
    with pytest.raises(SftDistError, match=r"1 of its tensors would replace frozen base weights \(base_model.model.lm_head"):
        load_weights(apply_lora(tiny(), lo), lo.init_adapter)


def test_a_checkpoints_identity_is_unchanged_without_an_adapter(tmp_path):
    d = config_to_dict(build_config(config(tmp_path, {})))
    assert "init_adapter" not in config_identity(d)["lora"]
    d["lora"]["init_adapter"] = "/x/adapter"
    assert config_identity(d)["lora"]["init_adapter"] == "/x/adapter"
