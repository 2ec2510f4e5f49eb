"""End to end: `sft-dist train` with 2 real worker processes over gloo, torchrun, generate, failures."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import BIN, QUICKSTART, cli_env, cold_env

pytestmark = pytest.mark.slow

STEPS = 12
COMMON = [f"training.max_steps={STEPS}", "training.eval_steps=6", "data.trace_samples=true", "metrics.peak_tflops=0.05"]


def sft_dist(*args, timeout=300, **kw):
    return subprocess.run([str(BIN / "sft-dist"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(), **kw)


def train_losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "run"
    r = sft_dist("train", QUICKSTART, f"output_dir={out}", *COMMON)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_two_workers_train_in_one_process_group(local_run):
    out, r = local_run
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["launched_by"] == "local"
    assert summary["global_step"] == STEPS and summary["global_batch"] == 16
    # every rank ended with the same weights
    assert len(summary["rank_weight_digests"]) == 2 and len(set(summary["rank_weight_digests"])) == 1
    assert "batch: 8 per device x 1 accumulation x 2 workers = 16 sequences per optimizer step" in r.stderr


def test_ranks_saw_different_samples(local_run):
    out, _ = local_run
    seen = {}
    for rank in (0, 1):
        records = [json.loads(line) for line in (out / "trace" / f"samples.rank{rank}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))
        seen[rank] = [i for r in records for i in r["sample_ids"]]
        assert len(seen[rank]) == STEPS * 8  # 12 steps x micro-batch 8, no sample repeated within a rank
        assert len(set(seen[rank])) == len(seen[rank])
    assert not set(seen[0]) & set(seen[1])


def test_metrics_file_and_loss_goes_down(local_run):
    out, _ = local_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for r in train:
        assert {"step", "loss", "learning_rate", "tokens", "step_time_s", "tokens_per_s", "grad_norm", "mfu",
                "peak_mem_bytes", "data_wait_s", "eta_s", "padding_fraction"} <= r.keys()
        assert r["tokens"] > 0 and r["step_time_s"] > 0 and 0 < r["padding_fraction"] < 1
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / 2)
        assert 0 <= r["data_wait_s"] < r["step_time_s"] and 0 < r["mfu"] < 1
        assert r["peak_mem_bytes"] > 100 * 2**20  # a worker process's peak RSS: torch alone is more
        assert r["eta_s"] == pytest.approx(r["step_time_s"] * (STEPS - r["step"]))
    assert sum(r["tokens"] for r in train) == json.loads((out / "run_summary.json").read_text())["loss_tokens"]
    assert [r["step"] for r in evals] == [6, 12]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]


def test_eval_loss_is_the_token_weighted_mean_over_the_whole_eval_set(local_run):
    """The eval at the last step (the final weights), split over 2 ranks, equals one process scoring every eval
    row alone: the same tokens, once each, the same mean."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_dist.config.load import load_config
    from sft_dist.data.build import build_datasets

    out, _ = local_run
    cfg = load_config(out / "config.yaml")
    data = build_datasets(cfg.data, AutoTokenizer.from_pretrained(out / "adapter"), seed=42)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base_model"), out / "adapter").eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids, labels in zip(data.eval["input_ids"], data.eval["labels"]):
            n = sum(1 for t in labels[1:] if t != -100)
            total += model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item() * n
            tokens += n
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line][-1]
    assert last["step"] == STEPS and last["eval_tokens"] == tokens == data.stats["eval"].loss_tokens
    assert last["eval_loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert last["eval_perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)


def test_run_writes_a_report_with_its_curves(local_run):
    from tests.metrics.test_report import BLUE, ORANGE, check_report, share_of

    out, r = local_run
    charts = check_report(out)
    assert {"loss", "throughput", "learning_rate"} <= set(charts)
    assert share_of(charts["loss"], BLUE) > 0.002 and share_of(charts["loss"], ORANGE) > 0.0005
    assert f"report: {out / 'report.html'}" in r.stderr


def test_outputs_adapter_loads_with_peft_and_config_is_saved(local_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = local_run
    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    model = PeftModel.from_pretrained(base, out / "adapter")
    saved = adapter(out)
    assert saved and all(t.abs().sum() > 0 for t in saved.values())  # never an empty adapter
    state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(state) == len([k for k in saved if "lora_" in k])
    cfg_text = (out / "config.yaml").read_text()
    assert "output_dir: " + str(out) in cfg_text


def test_generate_uses_the_trained_adapter(local_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sft_dist.generate import format_prompt, load_trained

    out, _ = local_run
    r = sft_dist("generate", out, "--prompt", "Qual é a capital de Portugal?", "--max-new-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["prompt"] == "Qual é a capital de Portugal?" and isinstance(line["completion"], str)
    # what generate loads is the base plus the trained adapter, in the run's alpaca_pt template
    model, tok, cfg = load_trained(out)
    assert isinstance(model, PeftModel)
    text = format_prompt(cfg, tok, "Qual é a capital de Portugal?")
    assert text == "### Instrução:\nQual é a capital de Portugal?\n\n### Resposta:\n"
    ids = tok(text, return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(out / "base_model").eval()
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits, atol=1e-3)


def test_eval_rows_are_answered_scored_and_pick_the_best_checkpoint(tmp_path):
    """metrics.generate_eval_rows over 2 ranks: each eval row answered once (the ranks split them), the logged
    metrics the mean of the rows' scores, the best checkpoint chosen by ROUGE-L; and the answers at the best step
    are what the saved adapter answers greedily from the same prompt tokens."""
    from sft_dist.config.load import load_config
    from sft_dist.data.build import build_datasets
    from sft_dist.generate import load_trained
    from sft_dist.metrics.text import scores
    from sft_dist.train.evaluation import prompt_and_answer

    out = tmp_path / "run"
    overrides = [f"output_dir={out}", "training.max_steps=100", "training.eval_steps=50", "training.save_strategy=steps",
                 "training.save_steps=50", "metrics.generate_eval_rows=12", "training.load_best_model_at_end=true",
                 "training.metric_for_best_model=rouge_l"]
    r = sft_dist("train", QUICKSTART, *overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval_loss"' in x]
    answers = [json.loads(x) for x in (out / "eval_generations.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [50, 100]
    for e in evals:
        mine = [a for a in answers if a["step"] == e["step"]]
        assert [a["row"] for a in mine] == list(range(12)) and e["eval_generated"] == 12  # every row once
        for a in mine:
            assert {k: a[k] for k in ("exact_match", "token_f1", "rouge_l")} == scores(a["answer"], a["reference"])
        for name in ("exact_match", "token_f1", "rouge_l"):
            assert e[f"eval_{name}"] == pytest.approx(sum(a[name] for a in mine) / 12)
    assert max(e["eval_rouge_l"] for e in evals) > 0  # 100 steps answer some rows partly right
    best = max(evals, key=lambda e: (e["eval_rouge_l"], -e["step"]))  # the Trainer keeps the first of equals
    assert f"loading the best checkpoint {out}/checkpoints/checkpoint-{best['step']} (rouge_l " in r.stderr
    # the adapter saved at the end is the best one: its greedy answers from the rows' own prompt tokens
    cfg = load_config(QUICKSTART, overrides)
    model, tok, _ = load_trained(out)
    rows = build_datasets(cfg.data, tok, seed=cfg.training.seed).eval
    for a in (a for a in answers if a["step"] == best["step"]):
        prompt, reference = prompt_and_answer(rows[a["row"]]["input_ids"], rows[a["row"]]["labels"])
        ids = torch.tensor([prompt])
        with torch.no_grad():
            new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=2 * len(reference) + 8, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)[0, len(prompt):]
        assert tok.decode(new, skip_special_tokens=True).strip() == a["answer"], a


def test_named_eval_sets_during_training_and_the_best_checkpoint_by_one(tmp_path):
    """`data.eval_files: {name: files}` while training on 2 ranks: each evaluation logs every set's metrics and their
    union's, and the best checkpoint is the one with the lowest loss on the set `metric_for_best_model` names."""
    lines = (Path(__file__).parents[2] / "sft_dist/assets/data/alpaca_demo_eval.jsonl").read_text().splitlines()
    (tmp_path / "pt.jsonl").write_text("\n".join(lines[::2]) + "\n")
    (tmp_path / "en.jsonl").write_text("\n".join(lines[1::2]) + "\n")
    out = tmp_path / "run"
    r = sft_dist("train", QUICKSTART, f"output_dir={out}", "training.max_steps=60", "training.eval_steps=20",
                 "training.save_strategy=steps", "training.save_steps=20", "training.load_best_model_at_end=true",
                 "training.metric_for_best_model=eval_en_loss",
                 f"data.eval_files={{pt: {tmp_path / 'pt.jsonl'}, en: {tmp_path / 'en.jsonl'}}}")
    assert r.returncode == 0, r.stderr[-3000:]
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval_loss"' in x]
    assert [e["step"] for e in evals] == [20, 40, 60]
    for e in evals:
        assert e["eval_pt_tokens"] + e["eval_en_tokens"] == e["eval_tokens"]
        union = (e["eval_pt_loss"] * e["eval_pt_tokens"] + e["eval_en_loss"] * e["eval_en_tokens"]) / e["eval_tokens"]
        assert e["eval_loss"] == pytest.approx(union, rel=1e-9)
        assert f"eval at step {e['step']}: loss {e['eval_loss']:.4f} (pt {e['eval_pt_loss']:.4f}, en " in r.stderr
    best = min(evals, key=lambda e: (e["eval_en_loss"], e["step"]))
    assert (f"loading the best checkpoint {out}/checkpoints/checkpoint-{best['step']} (eval_en_loss "
            f"{best['eval_en_loss']}" in r.stderr), r.stderr[-3000:]
    assert "eval loss: en" in (out / "report.html").read_text()


def test_torchrun_gives_the_same_loss_curve_as_local(local_run, tmp_path):
    out, _ = local_run
    tr = tmp_path / "torchrun"
    from sft_dist.distributed.local import free_port

    port = free_port("127.0.0.1")
    cmd = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
           "--no-python", str(BIN / "sft-dist"), "train", str(QUICKSTART), f"output_dir={tr}", *COMMON]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=cli_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tr / "run_summary.json").read_text())["launched_by"] == "torchrun"
    a, b = train_losses(out), train_losses(tr)
    assert [s for s, _ in a] == [s for s, _ in b]
    assert max(abs(x - y) / abs(x) for (_, x), (_, y) in zip(a, b)) <= 1e-6
    wa, wb = adapter(out), adapter(tr)
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-6, atol=1e-7) for k in wa)


def test_launch_script_runs_under_torchrun(tmp_path):
    from sft_dist.distributed.local import free_port
    from tests.conftest import ROOT

    out = tmp_path / "run"
    cmd = [str(BIN / "torchrun"), "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port("127.0.0.1")), str(ROOT / "launch" / "torchrun_train.py"), str(QUICKSTART),
           f"output_dir={out}", "training.max_steps=2", "training.eval_strategy=no"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=cli_env())
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert (summary["launched_by"], summary["world_size"], summary["global_step"]) == ("torchrun", 1, 2)
    assert "launcher.num_workers=2 does not apply: torchrun started 1 workers" in r.stderr


def test_bad_config_fails_fast_with_one_message(tmp_path):
    t0 = time.monotonic()
    r = sft_dist("train", QUICKSTART, f"output_dir={tmp_path}", "lora.rank=8", "launcher.num_workers=two")
    assert r.returncode != 0
    assert time.monotonic() - t0 < 30
    assert r.stderr.count("invalid config") == 1 and "Traceback" not in r.stderr
    assert "lora.rank: unknown key" in r.stderr and "launcher.num_workers: got 'two'" in r.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_worker_error_is_reported_once_by_the_launcher(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    r = sft_dist("train", QUICKSTART, f"output_dir={tmp_path / 'run'}", f"data.train_files={bad}",
                 "data.eval_files=null")
    assert r.returncode == 1
    assert "bad.jsonl:2: invalid JSON" in r.stderr
    assert r.stderr.count("invalid JSON") == 1 and "Traceback" not in r.stderr


def test_killed_worker_stops_the_job_without_a_hang(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([str(BIN / "sft-dist"), "train", str(QUICKSTART), f"output_dir={out}",
                             "training.max_steps=100000", "training.eval_strategy=no"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cold_env())
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size > 0):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        workers = {int(p.environ()["RANK"]): p for p in psutil.Process(proc.pid).children()}
        assert sorted(workers) == [0, 1]
        workers[1].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - t0 < 30
        assert proc.returncode == 1
        assert "worker rank 1 was killed by SIGKILL" in err
        assert not workers[0].is_running() or workers[0].status() == psutil.STATUS_ZOMBIE
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()


def test_cli_help():
    for args in (["--help"], ["train", "--help"], ["generate", "--help"], ["config", "--help"]):
        r = subprocess.run([sys.executable, "-m", "sft_dist", *args], capture_output=True, text=True, env=cli_env())
        assert r.returncode == 0 and "usage: sft-dist" in r.stdout
