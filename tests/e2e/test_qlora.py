"""QLoRA across backends, end to end with 2 gloo workers: the 4-bit base trains the same numbers under DDP,
FSDP2 (4-bit weights sharded: packed in the model's dtype) and ZeRO-3; 8-bit trains with bitsandbytes'
paged 8-bit AdamW; both adapters export."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, QUICKSTART, backend, cli_env

pytestmark = pytest.mark.slow

COMMON = ["training.max_steps=6", "training.eval_strategy=no", "training.save_strategy=steps", "training.save_steps=6"]
BACKENDS = {"ddp": backend("ddp"), "fsdp": backend("full_shard"), "zero3": backend("zero3")}


def sft_dist(*args, timeout=300):
    r = subprocess.run([str(BIN / "sft-dist"), *map(str, args)], check=False, capture_output=True, text=True, timeout=timeout,
                       env=cli_env())
    return r


def train(out: Path, *overrides: str) -> dict:
    r = sft_dist("train", QUICKSTART, f"output_dir={out}", *COMMON, *overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "run_summary.json").read_text())


EVAL = ["training.eval_strategy=steps", "training.eval_steps=3", 'metrics.generate_prompts=["Diga oi.", "Um gato"]',
        "metrics.generate_max_new_tokens=8"]


def evals(run: Path) -> list[tuple[int, float, int]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval_loss"], r["eval_tokens"]) for r in rows if "eval_loss" in r]


def test_4bit_trains_the_same_under_ddp_fsdp2_and_zero3_and_shards(tmp_path):
    # with evaluation and generation samples at steps 3 and 6: sharded weights are gathered inside forward,
    # so every rank must evaluate and generate in step with the others
    runs = {name: train(tmp_path / name, "quantization.bits=4", *EVAL, *extra) for name, extra in BACKENDS.items()}
    assert {name: s["quantized_linear_layers"] for name, s in runs.items()} == {"ddp": 14, "fsdp": 14, "zero3": 14}
    assert runs["fsdp"]["backend_applied"]["wrapper"] == "FSDP2 (fully_shard)"
    ddp_bytes = runs["ddp"]["ranks"][0]["param_bytes_local"]
    for name in ("fsdp", "zero3"):  # each rank holds half of the (quantized) base and adapter
        for rank in runs[name]["ranks"]:
            assert rank["param_bytes_local"] <= 0.51 * ddp_bytes, (name, rank["param_bytes_local"], ddp_bytes)
    r = sft_dist("compare", tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "zero3", "--tol", "1e-5", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    ref = evals(tmp_path / "ddp")
    assert [(s, n) for s, _, n in ref] == [(3, 261), (6, 261)]  # every eval token once, over both ranks
    samples = {name: (tmp_path / name / "samples.jsonl").read_text().splitlines() for name in BACKENDS}
    assert len(samples["ddp"]) == 4 and samples["fsdp"] == samples["ddp"] == samples["zero3"]
    for name in ("fsdp", "zero3"):
        assert all(abs(a[1] - b[1]) <= 1e-5 * abs(b[1]) for a, b in zip(evals(tmp_path / name), ref, strict=True))
    plan = json.loads((tmp_path / "fsdp" / "plan.json").read_text())  # rank 0's preflight, as run
    assert plan["verdict"] == "ok" and "storage float32" in plan["setup"]["quantization"]
    r = sft_dist("export", tmp_path / "fsdp", "--output", tmp_path / "fsdp-adapter")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "fsdp-adapter" / "adapter_model.safetensors").stat().st_size > 10_000


def test_8bit_trains_with_paged_adamw_8bit_and_exports(tmp_path):
    s = train(tmp_path / "q8", "quantization.bits=8", "training.optim=paged_adamw_8bit")
    assert s["quantized_linear_layers"] == 14 and s["last_loss"] < s["first_loss"]
    rank = s["ranks"][0]
    # the head copy (modules_to_save, 38,400 values) keeps 8-bit states; adamw would hold 8 bytes per value
    assert rank["optimizer_state_bytes_local"] < 0.5 * 8 * rank["trainable_numel_local"]
    plan = json.loads((tmp_path / "q8" / "plan.json").read_text())
    assert [r["rule"] for r in plan["rules"]] == ["paged-optimizer-on-cpu"]
    r = sft_dist("export", tmp_path / "q8", "--output", tmp_path / "q8-adapter")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "q8-adapter" / "adapter_model.safetensors").stat().st_size > 10_000


def test_ranks_that_take_turns_at_the_quantized_random_base_train_the_same(tmp_path):
    """With less host memory than the node's ranks need at once (SFT_DIST_HOST_MEMORY_BYTES), the 2 ranks build and
    quantize the random base one after the other (distributed/turns.py): the same weights, the same losses."""
    args = ["train", QUICKSTART, *COMMON, "quantization.bits=4", "training.save_strategy=no"]
    together = sft_dist(*args, f"output_dir={tmp_path / 'together'}")
    env = {**cli_env(), "SFT_DIST_HOST_MEMORY_BYTES": "1000000"}
    r = subprocess.run([str(BIN / "sft-dist"), *map(str, args), f"output_dir={tmp_path / 'turns'}"], check=False,
                       capture_output=True, text=True, timeout=300, env=env)
    assert together.returncode == 0 and r.returncode == 0, r.stderr[-3000:]
    assert "the 2 ranks of a node quantize the random base in 2 turns" in r.stderr
    assert "in 2 turns" not in together.stderr

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(m["step"], m["loss"]) for m in rows if "loss" in m]

    assert len(losses(tmp_path / "turns")) == 6 and losses(tmp_path / "turns") == losses(tmp_path / "together")
