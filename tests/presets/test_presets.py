"""Every preset under configs/models/: its first line says how to run it and on what; it validates; `sft-dist plan`
puts it within that hardware's memory; and a tiny model of the same architecture trains under its backend on CPU.

No hub here: each family's published config.json is shipped in tests/presets/fixtures/ and stands in for the hub id
(`model.name_or_path=<fixture>`), for the plan (full size) and for the tiny model (dimensions shrunk).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from sft_dist.cli import main
from sft_dist.validate import load_config
from tests.conftest import BIN, ROOT, cli_env
from tests.presets.conftest import STEPS as MATRIX_STEPS, SUITE_FAMILIES
from tests.presets.presets import (PRESETS, STEPS, build_tiny_model, chat_rows, family_presets, read_preset,
                                  tiny_config, tiny_overrides)

IDS = [p.stem for p in PRESETS]
GiB = 2**30


def test_issue_16_families_and_setups_have_presets():
    presets = [read_preset(p) for p in PRESETS]
    by_model = {}
    for p in presets:
        by_model.setdefault(p.raw["model"]["name_or_path"], []).append(p)
    llama8 = by_model["meta-llama/Llama-3.1-8B-Instruct"]
    setups = {(p.world_size, p.raw.get("quantization", {}).get("bits"), p.raw["backend"]["type"],
               p.raw["launcher"]["type"]) for p in llama8}
    assert {(1, None, "ddp", "local"), (1, 4, "ddp", "local"), (8, None, "fsdp", "local"),
            (16, None, "fsdp", "torchrun"), (16, None, "fsdp", "ray")} <= setups
    (llama70,) = by_model["meta-llama/Llama-3.1-70B-Instruct"]
    assert (llama70.world_size, llama70.gpu_gb, llama70.raw["quantization"]["bits"],
            llama70.raw["backend"]["type"]) == (8, 80, 4, "fsdp")
    (qwen,) = by_model["Qwen/Qwen2.5-7B-Instruct"]
    assert qwen.raw["backend"]["config"].endswith("zero3.json")
    for family in ("mistralai/Mistral-7B-Instruct-v0.3", "google/gemma-2-9b-it", "microsoft/Phi-3-mini-4k-instruct",
                   "Qwen/Qwen3-30B-A3B"):
        assert family in by_model


@pytest.mark.parametrize("path", PRESETS, ids=IDS)
def test_first_line_is_the_command_and_the_hardware(path):
    p = read_preset(path)
    assert f"configs/models/{path.name}" in p.command.split()
    launcher = p.raw["launcher"]["type"]
    starts = {"local": "sft-dist train ", "torchrun": "torchrun ", "ray": "ray job submit "}[launcher]
    assert p.command.startswith(starts), p.command
    if launcher == "torchrun":
        assert f"--nnodes {p.nodes}" in p.command and f"--nproc-per-node {p.gpus_per_node}" in p.command
    elif launcher == "ray":
        assert p.raw["launcher"]["num_workers"] == p.world_size
    else:
        assert p.nodes == 1 and p.raw["launcher"]["num_workers"] == p.gpus_per_node
    assert p.raw["launcher"].get("device", "cuda") == "cuda" and p.gpu_gb in (24, 40, 48, 80, 141)


@pytest.mark.parametrize("path", PRESETS, ids=IDS)
def test_preset_validates(path, monkeypatch):
    """As shipped, but for the hub id: FSDP's check reads the model's config for its decoder-layer class, and there
    is no hub here, so the family's config.json stands in (the tokenizer stays the model's own)."""
    monkeypatch.chdir(ROOT)  # backend files are relative to the checkout, as the first line's command runs them
    p = read_preset(path)
    assert "/" in p.raw["model"]["name_or_path"] and "init_config" not in p.raw["model"]  # a hub id
    cfg = load_config(path, [f"model.name_or_path={p.fixture}"])
    assert cfg.model.init_config is None and cfg.model.tokenizer is None  # the model's own tokenizer
    assert cfg.training["bf16"] is True and cfg.data.packing
    if cfg.lora.enabled:
        assert not cfg.lora.modules_to_save  # pretrained heads: nothing but the adapter to save
    if cfg.data.format in ("messages", "sharegpt"):
        from sft_dist.data.chat_templates import CHAT_TEMPLATES

        # the model's own template, or the family's named one where its own cannot mark assistant turns
        assert cfg.data.chat_template is None or cfg.data.chat_template in CHAT_TEMPLATES


@pytest.mark.parametrize("path", PRESETS, ids=IDS)
def test_plan_fits_the_stated_hardware(path, monkeypatch, capsys):
    """`sft-dist plan PRESET --device cuda --world-size N model.name_or_path=<config.json>`: options before an
    override (argparse alone refused that), the full-size model, and a peak within 90% of the stated GPU."""
    monkeypatch.chdir(ROOT)
    p = read_preset(path)
    rc = main(["plan", str(path), "--device", "cuda", "--world-size", str(p.world_size), "--json",
               f"model.name_or_path={p.fixture}"])
    plan = json.loads(capsys.readouterr().out)
    assert rc == 0 and plan["verdict"] == "ok", plan["rules"]
    m = plan["memory_per_rank"]
    assert m is not None, plan["memory_error"]
    d = m["detail"]
    lora = p.raw.get("lora", {}).get("enabled", True)
    # the weights are counted in the dtype the setup line names (bf16 LoRA base, fp32 masters for full FT)
    assert plan["setup"]["precision"] == "bf16"
    assert plan["setup"]["model_dtype"] == d["load_dtype"] == ("bfloat16" if lora else "float32")
    assert d["world_size"] == p.world_size and d["device"] == "cuda"
    if not p.raw.get("quantization", {}).get("bits"):
        frozen = d["weights_unsharded"] - 4 * d["trainable_params"]  # the adapter is fp32
        per_param = frozen / d["frozen_params"] if lora else d["weights_unsharded"] / d["total_params"]
        assert per_param == pytest.approx(2.0 if lora else 4.0, abs=0.01)
    print(f"{p.name}: peak {d['peak'] / GiB:.2f} GiB per GPU (training {m['total'] / GiB:.2f}, load "
          f"{d['load_peak'] / GiB:.2f}), budget {p.budget_bytes / GiB:.1f} GiB of {p.gpu_gb} GB")
    assert d["peak"] <= p.budget_bytes


@pytest.mark.parametrize("fixture", sorted({read_preset(p).fixture for p in PRESETS}), ids=lambda f: f.name)
def test_tiny_model_keeps_the_family_architecture(fixture):
    real = json.loads((fixture / "config.json").read_text())
    tiny = tiny_config(fixture, vocab_size=1024, special_ids={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    assert tiny["model_type"] == real["model_type"] and tiny["num_hidden_layers"] == 2 and tiny["hidden_size"] <= 112
    group = real["num_attention_heads"] // real["num_key_value_heads"]
    assert tiny["num_attention_heads"] // tiny["num_key_value_heads"] == group
    for key in ("tie_word_embeddings", "rope_scaling", "rope_theta", "attn_logit_softcapping",
                "final_logit_softcapping", "num_experts", "num_experts_per_tok", "norm_topk_prob", "use_sliding_window",
                "hidden_act", "hidden_activation", "rms_norm_eps"):
        assert tiny.get(key) == real.get(key), key
    if real.get("sliding_window") and real.get("use_sliding_window", True):
        assert tiny["sliding_window"] < 128  # shorter than the test rows: the window bites
    if "head_dim" in real and real["head_dim"] * real["num_attention_heads"] != real["hidden_size"]:
        assert tiny["head_dim"] * tiny["num_attention_heads"] != tiny["hidden_size"]  # Qwen3-MoE, Gemma 2
    if real["model_type"] == "gemma2":
        assert tiny["query_pre_attn_scalar"] == tiny["head_dim"]  # as published: 256 = head_dim


# --- the presets train: a tiny model of each family, a few steps on CPU under the preset's backend ------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny model per family (built once) and the demo data as chat rows."""
    root = tmp_path_factory.mktemp("tiny")
    models = {}

    def model_for(p):
        if p.fixture not in models:
            models[p.fixture] = build_tiny_model(p.fixture, root / p.fixture.name)
        return models[p.fixture]

    return model_for, chat_rows(root / "chat.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("path", PRESETS, ids=IDS)
def test_tiny_model_trains_under_the_preset(path, tiny, tmp_path, request):
    p = read_preset(path)
    base = {q.name: kind for kind, q in family_presets().items() if kind in SUITE_FAMILIES}
    if p.name in base:  # a family's base preset: its run is the architecture matrix's cell of its own backend
        own = {"ddp": "ddp", "fsdp": "fsdp"}.get(p.raw["backend"]["type"]) or Path(p.raw["backend"]["config"]).stem
        row = request.getfixturevalue("arch_matrix")[0][(base[p.name], own)]
        assert "error" not in row, row["error"]
        assert row["preset"] == p.name and row["steps"] == MATRIX_STEPS and row["last_loss"] < row["first_loss"]
        print(f"{p.name}: loss {row['first_loss']:.4f} -> {row['last_loss']:.4f} ({row['wrapper']}, the matrix's run)")
        return
    model_for, rows = tiny
    out = tmp_path / "run"
    over = tiny_overrides(p, model_for(p), rows, out)
    env = {**cli_env(), "OMP_NUM_THREADS": "1"}
    if p.raw["launcher"]["type"] == "torchrun":  # its own launcher, as its first line runs it (one node of 2)
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python", str(BIN / "sft-dist"),
               "train", str(path), *over]
    else:
        cmd = [str(BIN / "sft-dist"), "train", str(path), *over]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    s = json.loads((out / "run_summary.json").read_text())
    assert s["global_step"] == STEPS and s["world_size"] == (1 if p.world_size == 1 else 2)
    assert s["last_loss"] < s["first_loss"], (s["first_loss"], s["last_loss"])
    applied = s["backend_applied"]
    backend = p.raw["backend"]["type"]
    if backend == "fsdp":
        assert applied["wrapper"] == "FSDP2 (fully_shard)"
    elif backend == "deepspeed":
        assert (applied["wrapper"], applied["zero_stage"]) == ("DeepSpeedEngine", 3)
    elif s["world_size"] > 1:
        assert applied["wrapper"] == "DistributedDataParallel"
    bits = p.raw.get("quantization", {}).get("bits")
    assert (s["quantized_linear_layers"] > 0) == bool(bits)
    print(f"{p.name}: loss {s['first_loss']:.4f} -> {s['last_loss']:.4f} in {s['train_seconds']:.1f} s, "
          f"{applied['wrapper']}, {s['trainable_params']:,} of {s['total_params']:,} params trainable")
