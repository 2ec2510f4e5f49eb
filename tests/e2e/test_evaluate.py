"""`sft-dist evaluate` and `lora.init_adapter`, end to end: a finished run (the shared `checkpointed_run`, 2 workers,
20 steps, evaluated at step 20) evaluated again without training gives the eval loss its training gave at its last
step, under DDP and under the sharding backends; and a run started from its adapter begins from its weights."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import BIN, QUICKSTART, backend, cli_env

pytestmark = pytest.mark.slow


def sft_dist(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "sft-dist"), *args], capture_output=True, text=True, timeout=600, env=cli_env())


def final_eval(run: Path) -> dict:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r][-1]


def digests(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", ["zero3", "full_shard"])
def test_evaluate_a_run_under_a_sharding_backend(checkpointed_run, tmp_path, name):
    out = tmp_path / "eval"
    r = sft_dist("evaluate", str(checkpointed_run), f"output_dir={out}", *backend(name))
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((out / "eval_results.json").read_text())
    assert results["metrics"]["eval_loss"] == pytest.approx(final_eval(checkpointed_run)["eval_loss"], rel=1e-5)
    # each rank held half of the weights while it evaluated (the tiny model's layers shard evenly)
    held = [rank["param_numel_local"] for rank in results["ranks"]]
    assert len(held) == 2 and max(held) < 0.6 * sum(held), held
    assert not (out / "adapter").exists() and not (out / "checkpoints").exists()


def test_evaluate_a_run_in_its_own_directory(checkpointed_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(checkpointed_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    before = digests(run)
    r = sft_dist("evaluate", str(run), "metrics.generate_eval_rows=4")
    assert r.returncode == 0, r.stderr[-3000:]
    out = run / "eval"
    results = json.loads((out / "eval_results.json").read_text())
    trained = final_eval(run)
    metrics = results["metrics"]
    assert metrics["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-6)
    assert metrics["eval_tokens"] == trained["eval_tokens"] and metrics["eval_generated"] == 4
    assert 0.0 <= metrics["eval_rouge_l"] <= 1.0 and results["eval_rows"] == 48
    assert results["weights"] == f"adapter {run / 'adapter'}"
    assert len((out / "eval_generations.jsonl").read_text().splitlines()) == 4
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["eval_loss"] for x in logged if "eval_loss" in x] == [metrics["eval_loss"]]
    assert not any("loss" in x for x in logged)  # nothing trained
    # the training run's own files are untouched
    assert {k: v for k, v in digests(run).items() if not k.startswith("eval/")} == before
    # an evaluation never writes over a training run's output_dir
    r = sft_dist("evaluate", str(run), f"output_dir={run}")
    assert r.returncode == 1 and "holds a training run (run_summary.json, adapter)" in r.stderr, r.stderr[-2000:]
    assert {k: v for k, v in digests(run).items() if not k.startswith("eval/")} == before
    # nothing to evaluate on: refused before any worker starts
    r = sft_dist("evaluate", str(run), "data.eval_files=null", f"output_dir={tmp_path / 'none'}")
    assert r.returncode == 1 and "evaluate-without-eval-data" in r.stderr, r.stderr[-2000:]


def test_evaluate_a_checkpoint(checkpointed_run, tmp_path):
    """A checkpoint's weights are exported (as `sft-dist export` writes them) and evaluated with the config that
    wrote it: the eval loss its run logged at that step."""
    run = tmp_path / "run"
    shutil.copytree(checkpointed_run, run)
    r = sft_dist("evaluate", str(run / "checkpoints" / "checkpoint-10"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = run / "eval-checkpoint-10"
    assert (out / "weights" / "adapter_model.safetensors").is_file()
    results = json.loads((out / "eval_results.json").read_text())
    at_10 = [x for x in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if x.get("step") == 10
             and "eval_loss" in x][0]
    assert results["metrics"]["eval_loss"] == pytest.approx(at_10["eval_loss"], rel=1e-6)
    assert results["metrics"]["eval_loss"] != pytest.approx(final_eval(run)["eval_loss"], rel=1e-3)  # not step 20's


def test_train_on_from_a_runs_adapter(checkpointed_run, tmp_path):
    """With a learning rate far under fp32's resolution of the weights (a rate must be > 0) the steps change
    nothing: the adapter saved is the one loaded, to the bit, and its head (modules_to_save) came along."""
    out = tmp_path / "more"
    r = sft_dist("train", str(QUICKSTART), f"output_dir={out}", f"lora.init_adapter={checkpointed_run}",
                 "training.learning_rate=1e-30", "training.max_steps=2", "training.eval_strategy=no")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "lora.init_adapter: loaded 29 tensors" in r.stderr
    before = load_file(str(checkpointed_run / "adapter" / "adapter_model.safetensors"))
    after = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert sorted(before) == sorted(after) and any("lm_head" in k for k in after)
    for key, t in before.items():
        assert torch.equal(after[key], t), key
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    trained_first = json.loads((checkpointed_run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] < 0.7 * trained_first["loss"]  # the same first batch, on trained weights


@pytest.mark.parametrize("setup", [
    # TRL casts a quantized model's trained parameters to bf16, and sft_dist puts peft's fp32 tensors back, values
    # included; a cast back left the loaded adapter rounded to bf16 (measured: 1.1e-5 off)
    ["quantization.bits=4"],
    # a bf16 base under ZeRO-2: the engine computes in bf16 while training; evaluated without it, under autocast
    # (without: 1e-5 off)
    ["model.dtype=bfloat16", "training.bf16=true", *backend("zero2")],
], ids=["qlora", "zero2-bf16"])
def test_a_run_evaluated_again_gives_its_eval_loss_exactly(tmp_path, setup):
    run = tmp_path / "run"
    r = sft_dist("train", str(QUICKSTART), f"output_dir={run}", *setup, "training.max_steps=6", "training.eval_steps=6")
    assert r.returncode == 0, r.stderr[-3000:]
    r = sft_dist("evaluate", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((run / "eval" / "eval_results.json").read_text())
    assert results["metrics"]["eval_loss"] == pytest.approx(final_eval(run)["eval_loss"], rel=1e-9)


def test_named_eval_sets(checkpointed_run, tmp_path):
    """`data.eval_files: {name: files}`: each set scored on its own (eval_<name>_*) and all together (eval_*). The
    run's eval file split in two: together they give the run's own eval loss, and each set the loss it gives alone."""
    lines = (Path(__file__).parents[2] / "sft_dist/assets/data/alpaca_demo_eval.jsonl").read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:30]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[30:]) + "\n")
    out = tmp_path / "both"
    r = sft_dist("evaluate", str(checkpointed_run), f"output_dir={out}", "metrics.generate_eval_rows=2",
                 f"data.eval_files={{first: {tmp_path / 'a.jsonl'}, rest: {tmp_path / 'b.jsonl'}}}")
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((out / "eval_results.json").read_text())
    m = results["metrics"]
    assert m["eval_loss"] == pytest.approx(final_eval(checkpointed_run)["eval_loss"], rel=1e-6)
    assert m["eval_first_tokens"] + m["eval_rest_tokens"] == m["eval_tokens"]
    assert m["eval_tokens"] == final_eval(checkpointed_run)["eval_tokens"]
    assert results["eval_rows"] == 48 and results["eval_set_rows"] == {"eval_first": 30, "eval_rest": 18}
    assert m["eval_first_loss"] != pytest.approx(m["eval_rest_loss"], rel=1e-3)
    # answers: 2 per set, each named by its set; the mean over all four
    answers = [json.loads(x) for x in (out / "eval_generations.jsonl").read_text().splitlines()]
    assert [(a["eval_set"], a["row"]) for a in answers] == [("first", 0), ("first", 1), ("rest", 0), ("rest", 1)]
    assert m["eval_generated"] == 4 and m["eval_rouge_l"] == pytest.approx(
        (m["eval_first_rouge_l"] + m["eval_rest_rouge_l"]) / 2)
    # the second set alone gives the loss it was given as a named set
    alone = tmp_path / "alone"
    r = sft_dist("evaluate", str(checkpointed_run), f"output_dir={alone}", f"data.eval_files={tmp_path / 'b.jsonl'}")
    assert r.returncode == 0, r.stderr[-3000:]
    single = json.loads((alone / "eval_results.json").read_text())["metrics"]
    assert single["eval_loss"] == pytest.approx(m["eval_rest_loss"], rel=1e-6)
    assert single["eval_tokens"] == m["eval_rest_tokens"] and "eval_set_rows" not in single
