"""End to end: the quickstart on variable-length data with and without `data.packing` (1 worker, to stay
short; test_train_local's 2-worker run reports padding too): packing processes less padding, both runs
report it, every document is trained on at most once."""

from __future__ import annotations

import json
import math
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import QUICKSTART, backend
from tests.e2e.test_train_local import sft_dist

pytestmark = pytest.mark.slow

STEPS = 8


def variable_rows(path, n: int = 600):
    rnd = random.Random(0)
    words = ["casa", "rio", "sol", "dia", "mar", "luz", "pão", "céu", "flor", "vento"]
    rows = [{"instruction": "Repita.", "output": " ".join(rnd.choice(words) for _ in range(rnd.randint(1, 50)))}
            for _ in range(n)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packing")
    data = variable_rows(tmp / "train.jsonl")
    common = [QUICKSTART, f"data.train_files={data}", f"training.max_steps={STEPS}"]
    todo = {}  # key -> overrides; the compiled run first: it is the longest (inductor's builds)
    for packing, attn, compiled in ((True, "varlen_attention", True), (False, "auto", False), (True, "auto", False),
                                    (True, "varlen_attention", False), (False, "varlen_attention", False)):
        key = packing if attn == "auto" else attn + ("+compile" if compiled else "") + ("" if packing else "+unpacked")
        todo[key] = [f"output_dir={tmp / f'packing-{packing}-{attn}-{compiled}'}",
                     f"data.packing={str(packing).lower()}", "data.trace_samples=true", "launcher.num_workers=1",
                     f"model.attn_implementation={attn}",
                     f"training.torch_compile={str(compiled).lower()}",
                     f"training.eval_steps={STEPS}" if packing else "training.eval_strategy=no"]
    # The packed run again under ZeRO-3 on 2 workers, 4 rows each: the same 8 rows a step
    todo["zero3"] = [f"output_dir={tmp / 'packing-zero3'}", "data.packing=true", "launcher.num_workers=2",
                     "training.per_device_train_batch_size=4", f"training.eval_steps={STEPS}", *backend("zero3")]

    def train(key):
        r = sft_dist("train", *common, *todo[key], timeout=300)
        assert r.returncode == 0, f"{key}: {r.stderr[-3000:]}"
        return Path(todo[key][0].split("=", 1)[1]), r.stderr

    # two at a time: a run's workers keep the threads they have alone (the same numbers); its start-up and
    # inductor's compiler leave the cores idle a good part of the time
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(todo, pool.map(train, todo)))


def summary(run):
    return json.loads((run / "run_summary.json").read_text())


def test_packing_processes_less_padding_and_both_runs_report_it(runs):
    plain, packed = summary(runs[False][0]), summary(runs[True][0])
    assert 0.2 < plain["padding_fraction"] < 0.8  # rows of 1 to 50 words, padded to the longest of 8
    assert 0 <= packed["padding_fraction"] < 0.1 < plain["padding_fraction"] - packed["padding_fraction"]
    for run, _ in runs.values():
        steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        train = [s for s in steps if "loss" in s]
        assert len(train) == STEPS and all(0 <= s["padding_fraction"] < 1 for s in train)
        assert all(math.isfinite(s["loss"]) for s in train)
    # the start-up check ran on the packed run's model, as the trainer feeds it (model/packed_positions.py leak)
    assert "packing: checked at start, LlamaForCausalLM keeps a packed row's documents apart" in runs[True][1]
    assert "packing: checked at start" not in runs[False][1]
    # eval rows stay unpacked, collated like the packed ones (position_ids, no attention_mask)
    evals = [json.loads(line) for line in (runs[True][0] / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(next(s for s in evals if "eval_loss" in s)["eval_loss"])
    # TRL's num_tokens: the real tokens trained on (8 rows a step, packed ones ~96% of 128 tokens)
    last = [s for s in map(json.loads, (runs[True][0] / "metrics.jsonl").read_text().splitlines()) if "loss" in s][-1]
    assert last["step"] == STEPS and last["num_tokens"] > STEPS * 8 * 128 * 0.9
    # packed rows carry more loss-carrying tokens per optimizer step than single documents
    assert packed["loss_tokens"] > 1.2 * plain["loss_tokens"]


def test_packed_data_stats_and_log_line(runs):
    run, stderr = runs[True]
    st = summary(run)["data"]["train"]
    assert st["rows"] == 600 and st["truncated"] == 0 and st["packed_rows"] < 600 and st["fill"] > 0.9
    assert f"packed into {st['packed_rows']} rows of 128 ({100 * st['fill']:.1f}% filled)" in stderr


def test_packed_documents_are_trained_on_at_most_once(runs):
    run, _ = runs[True]
    seen = [i for line in (run / "trace" / "samples.rank0.jsonl").read_text().splitlines()
            for i in json.loads(line)["sample_ids"]]
    assert len(seen) == len(set(seen)) > STEPS * 8 * 1.5  # 8 packed rows per step hold more than 8 documents


def test_varlen_attention_trains_the_packed_rows_as_sdpa_does(runs):
    """The flattened layout with the collator's boundaries (the GPU default, run here through its per-document
    reference path): every step's loss and the unpacked eval rows' loss equal sdpa's with the block mask."""
    def curve(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [s["loss"] for s in rows if "loss" in s], next(s["eval_loss"] for s in rows if "eval_loss" in s)

    (sdpa, sdpa_eval), (varlen, varlen_eval) = curve(runs[True][0]), curve(runs["varlen_attention"][0])
    assert "attention: sdpa (auto" in runs[True][1] and "attention: varlen_attention (as configured)" in \
        runs["varlen_attention"][1]
    assert len(varlen) == len(sdpa) == STEPS and sdpa[0] != sdpa[-1]
    assert max(abs(a - b) for a, b in zip(sdpa, varlen)) < 1e-5
    assert varlen_eval == pytest.approx(sdpa_eval, abs=1e-5)
    # under torch.compile: the same curve (inductor reorders float sums), in seconds, not a compile per batch
    compiled, compiled_eval = curve(runs["varlen_attention+compile"][0])
    assert len(compiled) == STEPS and max(abs(a - b) for a, b in zip(varlen, compiled)) < 1e-3
    assert compiled_eval == pytest.approx(varlen_eval, abs=1e-3)


def test_unpacked_rows_on_varlen_attention_are_collated_padding_free(runs):
    """Without packing, attention that reads boundaries gets the micro-batch flattened, each row a document:
    the padding is never computed, and every step's loss is the padded sdpa run's."""
    run, stderr = runs["varlen_attention+unpacked"]
    assert "data: rows collated padding-free (varlen_attention reads each row's boundaries" in stderr
    losses = {name: [json.loads(x)["loss"] for x in (r / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
              for name, r in (("padded", runs[False][0]), ("flat", run))}
    assert len(losses["flat"]) == STEPS and max(abs(a - b) for a, b in zip(losses["padded"], losses["flat"])) < 1e-5
    assert summary(run)["padding_fraction"] < 0.01 < 0.2 < summary(runs[False][0])["padding_fraction"]
    assert summary(run)["loss_tokens"] == summary(runs[False][0])["loss_tokens"]


def test_the_start_up_check_runs_on_the_wrapped_zero3_model_and_changes_nothing(runs):
    """Where no rank holds the whole model before the wrap (ZeRO-3's partitions over 2 workers), the packing check runs
    on the wrapped model as training begins, on every rank (train/packing_check.py); ZeRO-3 then records its prefetch
    order from training's own steps, as without the check: the 1-worker packed run's losses, step by step."""
    run, stderr = runs["zero3"]
    assert "packing: checked at start on the sharded model, LlamaForCausalLM keeps a packed row's documents apart" \
        in stderr
    losses = {name: [json.loads(x)["loss"] for x in (r / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
              for name, r in (("ddp", runs[True][0]), ("zero3", run))}
    assert len(losses["zero3"]) == STEPS and max(abs(a - b) / a for a, b in zip(*losses.values())) < 1e-5
