"""GPU speed of sft_dist next to plain TRL, in one command, on a machine with a GPU and no network (issue 17).

Each step runs in its own process under its own timeout; its result is appended to OUT/gpu.jsonl as soon as it
ends, and the table (OUT/gpu.md) is rewritten, so a machine taken back mid-way still leaves what was measured.
Steps run most important first; one that does not fit the time left of --budget-s is skipped, not started. Every
step sees one GPU (CUDA_VISIBLE_DEVICES) except ddp_nccl, and runs offline (HF_*_OFFLINE=1 unless set).

  prepare           the 1.5B Llama shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocab
                    128256), random, built on the GPU in bf16 and saved once; variable-length prompt/completion rows
  sft_dist          sft_dist defaults on it: bf16, LoRA r16 all-linear, data.packing 8 x 2048, attention and Liger auto;
                    lora.dropout 0 as in the 2026-12-04 reference runs (and peft's default; every LoRA run here)
  sft_dist_safe     only where the sft_dist step failed: the same on sdpa, without Liger and the fused LoRA forward
                    (the features first run on a GPU here); where it trains, the 8B steps run so too
  llama8b           Llama-3-8B shape from model.init_config, LoRA r16, packed 2048 (4 rows x 2 accumulation, or
                    2 x 4 ... where `sft-dist plan` puts the peak over 90% of the GPU; once more at half the
                    micro-batch if the GPU runs out of memory): tokens/s, MFU, and the seconds from the command to
                    the first optimizer step; needs the prepare step's data only, not its 1.5B model
  llama8b_qlora     the same, 4-bit (bitsandbytes; the random base quantized from memory, no file), 1 row x 8
                    accumulation without activation checkpointing: no recompute, planned at 17.4 GiB (under the
                    goal's 24 GiB; skipped without bitsandbytes)
  trl_fastest       plain TRL, its fastest setting that keeps documents apart: bfd padding-free on flash attention
                    (if installed) or flex_attention, activation checkpointing off, Liger (if installed)
  isolation         packed rows vs each document alone, per attention implementation here (bench/gpu/isolation.py)
  trl_default       plain TRL SFTTrainer, its defaults (bfd packing, padding-free, activation checkpointing on)
  attention         packed attention alone: 4 layers of the 1.5B shape, forward + backward of one packed micro-batch,
                    per attention implementation (bench/gpu/attention.py)
  loss_head         the LM head and its loss alone (8 x 2048 tokens, vocab 128256): TRL's chunked head (sft_dist's),
                    Liger's fused linear cross entropy, the full logits; time, memory, agreement (bench/gpu/loss_head.py)
  sft_dist_<attn>   the sft_dist step on each other attention implementation (sdpa with the packed block mask,
                    varlen_attention, flex_attention, flash_attention_2): the one auto picked is not run twice
  sft_dist_liger    the sft_dist step with Liger's kernels switched the other way
  sft_dist_peft_lora  the sft_dist step with peft's own LoRA forward (lora.fused_forward=false): the input cast and
                    the unfused scaled add of the 2026-12-04 runs
  paged_adamw_8bit  the sft_dist step with training.optim=paged_adamw_8bit (skipped without bitsandbytes)
  sft_dist_compile  the sft_dist step with training.torch_compile=true
  ddp_nccl          the sft_dist step on every GPU (local launcher, nccl; skipped with fewer than 2 GPUs)
  sft_dist_sequence_parallel  the sft_dist step's rows, each GPU 1/N of every row (skipped with fewer than 2 GPUs)
  lora_dropout_005  the sft_dist step with lora.dropout=0.05 (sft_dist's default and the presets'): what dropout costs
  llama8b_qlora_ckpt, llama8b_qlora_every2  the QLoRA step at 4 rows x 2 with every decoder layer checkpointed
                    (planned at 9.8 GiB, half again the compute), and at 2 x 4 checkpointing one layer in two (planned
                    at 18.1 GiB): near the end of the list, past the default budget; run them with
                    --only llama8b_qlora_ckpt,llama8b_qlora_every2 (--only adds the prepare step they need)
  trl_wrapped       plain TRL, packing_strategy=wrapped: documents attend to each other (not correct; reference)

Figures: loss-carrying tokens/s and MFU over the steps after the warm-up (sft_dist's own metrics.jsonl; for TRL
counted the same way, bench/gpu/trl_run.py), peak allocated GPU memory, mean step time, seconds from the command
to its first optimizer step, and, for sft_dist variants, the largest loss difference from the sft_dist step
(same weights, data and seed: a correct speed feature stays within bf16 noise).

On the GPU machine (no network; wheels made here with `bash bench/gpu/wheels.sh`, see FIELD-NOTES "On a GPU"),
`bash bench/gpu/run.sh [arguments]` does this:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 \\
        python3 bench/gpu.py --out "$OUT" [--budget-s 420] [--only sft_dist,trl_default] [--work /tmp/bench_gpu]

OUT gets three files (gpu.jsonl, gpu.md, gpu.log: each step's last lines); models, runs and full logs go to
--work (default: <tmp>/sft_dist_bench_gpu; on a GPU mostly the 1.5B base, 1.51B x 2 bytes = 3 GB; the 8B steps
write none). Here, on a CPU, the same steps with tiny models (the budget skips what does not fit; --budget-s 900 runs every step):

    python bench/gpu.py --tiny
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import ROOT, machine
from gpu_goals import summary

HERE = ROOT / "bench" / "gpu"
LLAMA_1B5 = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
             "max_position_embeddings": 8192, "rope_theta": 500000.0}
LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "max_position_embeddings": 8192, "rope_theta": 500000.0}
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
TINY_8B = {**TINY, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4}
WORDS = ("the model learns from each example and the loss goes down as the adapter trains on the data while every "
         "rank keeps its own shard of samples packed into rows of whole documents").split()


@dataclass
class Setup:
    """What differs between a GPU run and --tiny on a CPU; everything else is the same code path."""

    tiny: bool
    device: str
    seq: int
    rows: int
    steps: int
    warmup: int
    shape: dict
    big_shape: dict
    peak_tflops: float | None  # None: sft_dist's table for the GPU; --tiny: a nominal 1 TFLOP/s (MFU column exercised)
    work: Path
    gpus: int = 0
    model_dir: Path | None = None
    data: Path | None = None
    results: dict = field(default_factory=dict)  # step name -> result

    @classmethod
    def make(cls, tiny: bool, work: Path) -> "Setup":
        if tiny:  # 2 CPU workers stand in for 2 GPUs (the several-GPU steps' configs are checked too)
            return cls(True, "cpu", 256, 8, 6, 2, TINY, TINY_8B, 1.0, work, gpus=2)
        import torch

        return cls(False, "cuda", 2048, 8, 14, 4, LLAMA_1B5, LLAMA_8B, None, work, gpus=torch.cuda.device_count())

    def est(self, gpu_s: float, tiny_s: float) -> float:
        return tiny_s if self.tiny else gpu_s


# --- running one step -----------------------------------------------------------------------------------------

@dataclass
class Proc:
    rc: int | None
    timed_out: bool
    wall_s: float
    first_step_s: float | None  # command start -> the first "step 1/" line (first optimizer step done)
    tail: list[str]
    marks: dict[str, str]  # first line starting with each watched prefix


def child_env(all_gpus: bool = False) -> dict:
    """The environment of a step's process: this checkout importable, not inside another launcher, offline (the
    machine has no network: a hub probe would wait for its timeout), and on one GPU unless the step is the one that
    uses them all (plain TRL with several GPUs visible to one process refuses to train: nn.DataParallel)."""
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMP_NUM_THREADS"):
        env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.setdefault(k, "1")
    if not all_gpus:
        env["CUDA_VISIBLE_DEVICES"] = (env.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    return env


def run_proc(cmd: list[str], *, timeout: float, log: Path,
             watch: tuple[str, ...] = ("attention:", "kernels:", "model:"), all_gpus: bool = False) -> Proc:
    """Run `cmd` in its own process group, its output to `log`; killed (the whole group) at `timeout`."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(all_gpus),
                         start_new_session=True, bufsize=1, errors="replace")
    tail: list[str] = []
    marks: dict[str, str] = {}
    first: list[float] = []

    def read() -> None:
        with open(log, "w", encoding="utf-8") as f:
            for line in p.stdout:
                f.write(line)
                line = line.rstrip("\n")
                tail.append(line)
                del tail[:-40]
                s = line.lstrip().removeprefix("[rank 0] ")  # several workers: rank 0's lines name themselves
                if not first and s.startswith("step 1/"):
                    first.append(time.perf_counter() - t0)
                for w in watch:
                    if s.startswith(w) and w not in marks:
                        marks[w] = s

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    timed_out = False
    try:
        p.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(p)
    reader.join(timeout=5)
    return Proc(p.returncode, timed_out, time.perf_counter() - t0, first[0] if first else None, tail, marks)


def _kill_group(p: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL: a step past its time costs the budget 15 s at most (the last step's comes on top of
    --budget-s; device time is counted)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _failed(proc: Proc) -> dict:
    if proc.timed_out:
        return {"status": "timeout", "reason": f"killed after {proc.wall_s:.0f} s", "tail": proc.tail[-8:]}
    errors = [x for x in proc.tail if "Error" in x or "error" in x]
    return {"status": "failed", "reason": (errors[-1] if errors else f"exit {proc.rc}")[:300], "tail": proc.tail[-12:]}


# --- sft_dist and TRL runs --------------------------------------------------------------------------------------

def sft_dist_config(s: Setup, name: str, **over) -> dict:
    """The sft_dist step's config; `over` replaces whole sections' keys (dotted: section.key)."""
    cfg = {
        "output_dir": str(s.work / "runs" / name),
        "model": {"name_or_path": str(s.model_dir)},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train_files": str(s.data), "format": "prompt_completion", "max_length": s.seq, "packing": True,
                 "cache_dir": str(s.work / "data_cache")},
        "training": {"max_steps": s.steps, "per_device_train_batch_size": s.rows, "learning_rate": 1e-4,
                     "logging_steps": 1, "save_strategy": "no", "eval_strategy": "no", "seed": 42,
                     "resume_from_checkpoint": "never"},
        "launcher": {"type": "local", "num_workers": 1, "device": s.device},
        "metrics": {"peak_tflops": s.peak_tflops},
    }
    for key, value in over.items():
        section, _, sub = key.partition(".")
        if sub:
            cfg.setdefault(section, {})[sub] = value
        else:
            cfg[section] = value
    return cfg


def write_config(s: Setup, name: str, cfg: dict) -> Path:
    path = s.work / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    return path


def gpu_total_bytes() -> int | None:
    """GPU 0's memory by nvidia-smi (this process creates no CUDA context: the runs get the whole GPU)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return int(out.split()[0]) * 2**20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def fit_micro_batch(s: Setup, name: str, cfg: dict, share: float = 0.9, *, within: float = 300.0) -> str | None:
    """Halve the micro-batch of `cfg` (in place; the accumulation doubled, so the global batch stays) until the
    peak `sft-dist plan` estimates fits `share` of the GPU, planning for `within` seconds at most (the step's run
    keeps the rest of its time). The note, or None where there is nothing to fit."""
    total = None if s.tiny else gpu_total_bytes()
    training = cfg["training"]
    if total is None:
        return None
    rows = training["per_device_train_batch_size"]
    deadline = time.perf_counter() + within
    while True:
        try:
            proc = subprocess.run([sys.executable, "-m", "sft_dist", "plan", str(write_config(s, name, cfg)),
                                   "--device", s.device, "--json"], capture_output=True, text=True, env=child_env(),
                                  timeout=max(5.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            return f"micro-batch {training['per_device_train_batch_size']} (no memory estimate within {within:.0f} s)"
        try:
            peak = json.loads(proc.stdout)["memory_per_rank"]["detail"]["peak"]
        except (ValueError, KeyError, TypeError):
            return f"micro-batch {training['per_device_train_batch_size']} (no memory estimate: exit {proc.returncode})"
        micro = training["per_device_train_batch_size"]
        if peak <= share * total or micro == 1:
            return (f"micro-batch {micro} x {training['gradient_accumulation_steps']} accumulation: planned peak "
                    f"{peak / 2**30:.1f} GiB of {total / 2**30:.1f} GiB" + (f" (from {rows})" if micro != rows else ""))
        training["per_device_train_batch_size"] = micro // 2
        training["gradient_accumulation_steps"] *= 2


def _devices(s: Setup) -> str:
    """What the several-worker steps ran on: GPUs over nccl, or under --tiny the CPU workers standing in for them."""
    return f"{s.gpus} CPU workers, gloo (--tiny)" if s.tiny else f"{s.gpus} GPUs, nccl"


def run_sft_dist(s: Setup, name: str, cfg: dict, timeout: float, warmup: int | None = None) -> dict:
    out = Path(cfg["output_dir"])
    shutil.rmtree(out, ignore_errors=True)
    path = write_config(s, name, cfg)
    proc = run_proc([sys.executable, "-m", "sft_dist", "train", str(path)], timeout=timeout,
                    log=s.work / "logs" / f"{name}.log", all_gpus=cfg["launcher"]["num_workers"] > 1)
    res = {"wall_s": round(proc.wall_s, 1), "first_step_s": _round(proc.first_step_s),
           "attention": proc.marks.get("attention:"), "kernels": proc.marks.get("kernels:") or
           "kernels: no log line (this sft_dist does not apply Liger itself)", "model": proc.marks.get("model:")}
    metrics = out / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if '"loss"' in x] if metrics.exists() else []
    if rows:
        res.update(_steady(rows, s.warmup if warmup is None else warmup))
    summary = out / "run_summary.json"
    ranks = json.loads(summary.read_text())["ranks"] if summary.exists() else []
    built = [r.get("build_peak_mem_bytes") for r in ranks]
    if any(built):  # the per-step peaks count from the first step; building the model may have needed more
        res["build_peak_gib"] = max(b for b in built if b) / 2**30
    rss = [r.get("peak_rss_bytes") for r in ranks]
    if any(rss):  # host memory: a quantized random base is built there first (model/layerwise.py)
        res["host_peak_gib"] = max(b for b in rss if b) / 2**30
    if proc.rc != 0 or proc.timed_out:
        res.update(_failed(proc))
        res["out_of_memory"] = any("out of memory" in x.lower() for x in proc.tail)
    elif not rows:
        res.update(status="failed", reason="no metrics.jsonl rows", tail=proc.tail[-12:])
    else:
        res["status"] = "ok"
    return res


def _steady(rows: list[dict], warmup: int) -> dict:
    steady = [r for r in rows if r["step"] > warmup] or rows
    t = sum(r["step_time_s"] for r in steady)
    mfu = [r for r in steady if r.get("mfu") is not None]
    peak = max((r.get("peak_mem_bytes") or 0) for r in rows)
    return {"steps": len(rows), "tokens_per_s": sum(r["tokens"] for r in steady) / t if t else None,
            # the time-weighted mean: model FLOPs of all those steps over their time
            "mfu": sum(r["mfu"] * r["step_time_s"] for r in mfu) / sum(r["step_time_s"] for r in mfu) if mfu else None,
            "peak_gib": peak / 2**30 if peak else None, "step_s": t / len(steady),
            "losses": [round(r["loss"], 5) for r in rows]}


def run_trl(s: Setup, name: str, timeout: float, *, attn: str, strategy: str = "bfd",
            checkpointing: bool | None = None, liger: bool = False) -> dict:
    out = s.work / "runs" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / "trl_run.py"), "--model", str(s.model_dir), "--data", str(s.data),
           "--out", str(out), "--steps", str(s.steps), "--batch", str(s.rows), "--max-length", str(s.seq),
           "--attn", attn, "--packing-strategy", strategy, "--device", s.device, "--liger", str(int(liger))]
    if checkpointing is not None:
        cmd += ["--activation-checkpointing", str(int(checkpointing))]
    if s.peak_tflops is not None:
        cmd += ["--peak-tflops", str(s.peak_tflops)]
    proc = run_proc(cmd, timeout=timeout, log=s.work / "logs" / f"{name}.log")
    res = {"wall_s": round(proc.wall_s, 1), "first_step_s": _round(proc.first_step_s),
           "attention": f"attention: {attn}", "kernels": "kernels: TRL use_liger_kernel" if liger else None}
    if proc.rc != 0 or proc.timed_out or not out.exists():
        return {**res, **_failed(proc)}
    from sft_dist.metrics.flops import ModelFlops

    m = json.loads(out.read_text())
    w = min(s.warmup, len(m["step_ends"]) - 1)
    ends, tokens, real = m["step_ends"], m["tokens"][w:], m["real_tokens"][w:]
    elapsed = ends[-1] - ends[w - 1] if w else ends[-1] - ends[0]
    if not w:
        tokens, real = tokens[1:], real[1:]
    flops = ModelFlops(**m["flops_per_token_at_seq"])
    seq = sum(real) / (len(real) * m["rows_per_step"])
    mfu = flops.per_token(seq) * sum(real) / elapsed / (m["peak_tflops"] * 1e12) if m["peak_tflops"] else None
    return {**res, "status": "ok", "steps": len(m["step_ends"]), "tokens_per_s": sum(tokens) / elapsed, "mfu": mfu,
            "peak_gib": m["peak_mem_bytes"] / 2**30 if m["peak_mem_bytes"] else None,
            "step_s": elapsed / len(tokens), "losses": [round(x, 5) for x in m["losses"]],
            "padding_free": m["padding_free"]}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


# --- the steps --------------------------------------------------------------------------------------------------

def make_data(s: Setup) -> None:
    """Prompt/completion rows of ~16 tokens to ~0.95 of a row, log-uniform (the bundled tokenizer: ~2.9 tokens a
    word), so that packing has work to do; enough for every step to train on documents of its own."""
    rng = random.Random(0)
    n_rows, longest = (600, s.seq // 3) if s.tiny else (1200, s.seq * 95 // 100)
    lines = []
    for _ in range(n_rows):
        words = max(4, int(2 ** rng.uniform(2.5, math.log2(longest / 2.9))))
        prompt = rng.randint(2, max(3, words // 5))
        lines.append(json.dumps({"prompt": " ".join(rng.choices(WORDS, k=prompt)),
                                 "completion": " " + " ".join(rng.choices(WORDS, k=max(1, words - prompt)))}))
    s.data = s.work / "data.jsonl"
    s.data.write_text("\n".join(lines) + "\n")


def step_isolation(s: Setup, timeout: float) -> dict:
    out = s.work / "isolation.json"
    out.unlink(missing_ok=True)
    proc = run_proc([sys.executable, str(HERE / "isolation.py"), "--out", str(out), "--device", s.device],
                    timeout=timeout, log=s.work / "logs" / "isolation.log")
    try:
        d = json.loads(out.read_text()) if out.exists() else None
    except ValueError:  # torn by a kill mid-write
        d = None
    if d is None:
        return {"wall_s": round(proc.wall_s, 1), **_failed(proc)}
    cases = d["cases"]
    if proc.timed_out:
        return {"wall_s": round(proc.wall_s, 1), "cases": cases, **_failed(proc),
                "note": f"{len(cases)} cases checked before the timeout, "
                        f"{sum(1 for c in cases if not c.get('ok'))} wrong"}
    note = "; ".join(f"{c.get('arch', 'llama')} {c['attn']}{' (auto)' if c.get('auto') else ''} {c['dtype']} "
                     f"{c.get('layout', '')}: " + (
        f"{c['max_abs_diff']:.1e} (leak {c['leak']:.1e})" if "max_abs_diff" in c else c.get("error", "?"))
        for c in cases)
    autos = "; ".join(f"auto for {arch}: {a['name']}" for arch, a in d.get("auto", {}).items())
    return {"status": "ok" if proc.rc == 0 else "failed", "wall_s": round(proc.wall_s, 1), "cases": cases,
            "auto": d.get("auto"), "note": f"{d['documents']} documents in {d['rows']} rows of {d['row']}: {note}"
                                           + (f" ({autos})" if autos else ""),
            **({} if proc.rc == 0 else {"reason": _isolation_failure(cases, proc)})}


def _isolation_failure(cases: list[dict], proc: Proc) -> str:
    """Why the isolation step failed: logits that differ, implementations that raised, or the script itself."""
    differ = [c for c in cases if "max_abs_diff" in c and not c.get("ok")]
    raised = [c for c in cases if "error" in c]
    if differ:
        return f"{len(differ)} case(s): a packed document's logits differ from it alone"
    if raised:
        return f"{len(raised)} implementation(s) raised: {raised[0]['error'][:200]}"
    return "the script failed: " + " | ".join(proc.tail[-3:])[:300]


def run_microbench(s: Setup, name: str, timeout: float) -> tuple[Proc, dict | None]:
    """bench/gpu/<name>.py on the device: its process, and the JSON it wrote (None if it wrote none)."""
    out = s.work / f"{name}.json"
    out.unlink(missing_ok=True)
    proc = run_proc([sys.executable, str(HERE / f"{name}.py"), "--out", str(out), "--device", s.device,
                     "--iters", "3" if s.tiny else "10"], timeout=timeout, log=s.work / "logs" / f"{name}.log")
    try:
        return proc, json.loads(out.read_text()) if out.exists() else None
    except ValueError:  # torn by a kill mid-write (the scripts write whole files; an older one may not)
        return proc, None


def step_attention(s: Setup, timeout: float) -> dict:
    proc, d = run_microbench(s, "attention", timeout)
    if d is None:
        return {"wall_s": round(proc.wall_s, 1), **_failed(proc)}
    note = "; ".join(f"{c['attn']}: " + (f"{c['ms_per_step']} ms, {c['real_tokens_per_s']:,} tokens/s, "
                                         f"{c.get('speedup_vs_sdpa', '-')}x sdpa" if "ms_per_step" in c
                                         else c.get("error", "?")) for c in d["cases"])
    return {"status": "ok" if proc.rc == 0 else "failed", "wall_s": round(proc.wall_s, 1), "cases": d["cases"],
            "note": f"{d['layers']} layers fwd+bwd, {d['rows']} packed rows of {d['row']} ({d['documents']} "
                    f"documents); varlen probe: {d.get('varlen_probe')}, grouped k/v heads "
                    f"{'passed as they are' if d.get('varlen_native_gqa') else 'repeated'}: {note}"}


def step_loss_head(s: Setup, timeout: float) -> dict:
    proc, d = run_microbench(s, "loss_head", timeout)
    if d is None:
        return {"wall_s": round(proc.wall_s, 1), **_failed(proc)}

    def figures(c: dict) -> str:
        if "ms_per_step" not in c:
            return c.get("error", "?")
        extra = f", +{c['peak_extra_gib']} GiB" if c.get("peak_extra_gib") is not None else ""
        diff = f", loss diff {c['loss_diff_vs_plain']:.1e}" if "loss_diff_vs_plain" in c else ""
        return f"{c['ms_per_step']} ms, {c['loss_tokens_per_s']:,} tokens/s{extra}{diff}"

    note = "; ".join(f"{c['head']}: {figures(c)}" for c in d["cases"])
    return {"status": "ok" if proc.rc == 0 else "failed", "wall_s": round(proc.wall_s, 1), "cases": d["cases"],
            "note": f"{d['tokens']} tokens, hidden {d['hidden']}, vocab {d['vocab']}, {d['dtype']}, fwd+bwd; "
                    f"fastest {d['fastest']}: {note}"}


def step_prepare(s: Setup, timeout: float) -> dict:
    make_data(s)
    s.model_dir = s.work / ("model_tiny" if s.tiny else "model_1p5b")
    if (s.model_dir / "complete").exists():  # written by make_model.py once everything is saved
        return {"status": "ok", "note": f"reused {s.model_dir}", "wall_s": 0.0}
    proc = run_proc([sys.executable, str(HERE / "make_model.py"), "--config", json.dumps(s.shape), "--out",
                     str(s.model_dir), "--device", s.device, "--dtype", "float32" if s.tiny else "bfloat16"],
                    timeout=timeout, log=s.work / "logs" / "prepare.log")
    if proc.rc != 0 or proc.timed_out:
        shutil.rmtree(s.model_dir, ignore_errors=True)
        return {"wall_s": round(proc.wall_s, 1), **_failed(proc)}
    # the last line that is JSON: a library may print something else at interpreter exit
    info = next((json.loads(x) for x in reversed(proc.tail) if x.startswith("{")), None)
    if info is None:
        return {"status": "ok", "wall_s": round(proc.wall_s, 1), "note": f"saved {s.model_dir} (no summary line)"}
    return {"status": "ok", "wall_s": round(proc.wall_s, 1),
            "note": f"{info['params'] / 1e6:,.1f}M params built in {info['build_s']} s on {s.device}, saved in "
                    f"{info['save_s']} s; {s.data.stat().st_size / 1e6:.1f} MB of rows"}


def _need(*names: str):
    def check(s: Setup) -> str | None:
        for n in names:
            if s.results.get(n, {}).get("status") != "ok":
                return f"needs the {n} step, which did not succeed"
        return None
    return check


def _has(module: str, what: str, then=None):
    def check(s: Setup) -> str | None:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({what})"
        return (then or _need("prepare"))(s)
    return check


# What the sft_dist_safe step turns off: every speed feature of the defaults that had not run on a GPU before
SAFE = {"model.attn_implementation": "sdpa", "training.use_liger_kernel": False, "lora.fused_forward": False}


def safe_settings(s: Setup) -> dict:
    """SAFE where the sft_dist step failed and the sft_dist_safe step trained: the 8B steps then measure what
    runs (their note says so); else nothing."""
    failed = s.results.get("sft_dist", {}).get("status") not in ("ok", None, "skipped")
    return dict(SAFE) if failed and s.results.get("sft_dist_safe", {}).get("status") == "ok" else {}


def _safe_note(s: Setup) -> str | None:
    return ("the sft_dist step failed and sft_dist_safe trained: run on sdpa, without Liger and the fused LoRA "
            "forward" if safe_settings(s) else None)


def _default_attn(s: Setup) -> str | None:
    line = s.results.get("sft_dist", {}).get("attention") or ""
    return line.split()[1] if line.startswith("attention: ") else None


def _default_liger_on(s: Setup) -> bool:
    return (s.results.get("sft_dist", {}).get("kernels") or "").startswith("kernels: Liger ") and \
        "Liger off" not in s.results["sft_dist"]["kernels"]


def torch_version() -> str:
    import importlib.metadata as md

    return md.version("torch").split("+")[0]


def _flash() -> bool:
    """flash-attn 2 itself (flash-attn 4 is also imported as `flash_attn`; transformers tells them apart)."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    from transformers.utils import import_utils

    return import_utils.is_flash_attn_2_available()


@dataclass
class Step:
    name: str
    what: str
    gpu_s: float  # what it needs, roughly: skipped when less time is left
    tiny_s: float
    run: object  # (Setup, timeout) -> dict
    ready: object = None  # (Setup) -> reason it cannot run, or None
    cap_s: float = 600  # its own timeout, at most


def steps() -> list[Step]:
    def sft(name: str, **over):
        return lambda s, t: run_sft_dist(s, name, sft_dist_config(s, name, **over), t)

    def attn_variant(attn: str) -> Step:
        def ready(s: Setup) -> str | None:
            if attn == "flash_attention_2" and (s.tiny or not _flash()):
                return "flash-attn is not installed" if not s.tiny else "flash attention needs CUDA"
            if attn == "flex_attention" and s.tiny:
                return f"FlexAttention has no backward on a CPU (torch {torch_version()}: NotImplementedError)"
            if _default_attn(s) == attn:
                return f"the sft_dist step already ran {attn} (attention auto)"
            return _need("prepare")(s)  # not the sft_dist step: where it failed, the variants show which part did
        return Step(f"sft_dist_{attn}", f"sft_dist, model.attn_implementation={attn}", 90, 25,
                    sft(f"sft_dist_{attn}", **{"model.attn_implementation": attn}), ready, 300)

    def paged(s: Setup, t: float) -> dict:
        r = run_sft_dist(s, "paged_adamw_8bit", sft_dist_config(s, "paged_adamw_8bit",
                                                                **{"training.optim": "paged_adamw_8bit"}), t)
        if not s.tiny:  # (a CPU's peak is the process's RSS: everything counted)
            r["note"] = ("peak GiB leaves out the 8-bit Adam states (~2 bytes per trainable parameter): bitsandbytes "
                         "pages them in CUDA managed memory, outside torch's allocator")
        return r

    def liger(s: Setup, t: float) -> dict:
        on = not _default_liger_on(s)
        name = "sft_dist_liger_" + ("on" if on else "off")
        r = run_sft_dist(s, name, sft_dist_config(s, name, **{"training.use_liger_kernel": on}), t)
        r["note"] = f"training.use_liger_kernel={str(on).lower()}"
        return r

    def liger_ready(s: Setup) -> str | None:
        if not _default_liger_on(s) and (s.tiny or importlib.util.find_spec("liger_kernel") is None):
            return "liger-kernel is not installed" if not s.tiny else "Liger's kernels need CUDA (Triton)"
        return _need("prepare")(s)

    def llama8b(s: Setup, t: float) -> dict:
        n = "llama8b"
        # the random base is not written (model.save_init_base: false): the start-up measured is build + first step
        cfg = sft_dist_config(s, n, model={"init_config": s.big_shape, "tokenizer": "builtin:tokenizer",
                                           "save_init_base": False},
                              **{"training.per_device_train_batch_size": s.rows // 2,
                                 "training.gradient_accumulation_steps": 2, "training.max_steps": s.steps - 4},
                              **safe_settings(s))
        t0 = time.perf_counter()
        # planned at 61.2 GiB for 4 x 2 without Liger: kept on an 80 GB H100. Planning takes a fifth of the step's
        # time at most; the run what is left (a run too short to reach its steps is skipped, not timed out).
        fitted = fit_micro_batch(s, n, cfg, within=min(120.0, t / 5))
        left = t - (time.perf_counter() - t0)
        if left < 60:
            return {"status": "skipped", "reason": f"{left:.0f} s left after planning its micro-batch ({fitted})"}
        r = run_sft_dist(s, n, cfg, left, warmup=max(1, s.warmup - 1))
        training = cfg["training"]
        left = t - (time.perf_counter() - t0)
        if r.get("out_of_memory") and training["per_device_train_batch_size"] > 1 and left > 60:
            # the plan was wrong for this GPU: once more at half the micro-batch (same global batch)
            tried = f"{training['per_device_train_batch_size']} x {training['gradient_accumulation_steps']}"
            training["per_device_train_batch_size"] //= 2
            training["gradient_accumulation_steps"] *= 2
            r = run_sft_dist(s, n, cfg, left, warmup=max(1, s.warmup - 1))
            fitted = (f"{tried} ran out of GPU memory; rerun at {training['per_device_train_batch_size']} x "
                      f"{training['gradient_accumulation_steps']}")
        r["note"] = "; ".join(filter(None, ["init_config; first_step_s is the start-up goal (<= 60 s)", fitted,
                                            _safe_note(s)]))
        return r

    def qlora(n: str, rows: int, accumulation: int, checkpointing: bool = True, **policy):
        def run(s: Setup, t: float) -> dict:
            # quantized from memory, no base written (model.save_init_base: false): start-up is build + first step
            model = {"init_config": s.big_shape, "tokenizer": "builtin:tokenizer", "save_init_base": False}
            cfg = sft_dist_config(s, n, model=model, **{"quantization.bits": 4,
                                                       "training.per_device_train_batch_size": rows,
                                                       "training.gradient_accumulation_steps": accumulation,
                                                       "training.activation_checkpointing": checkpointing, **policy,
                                                       "training.max_steps": s.steps - 4, **safe_settings(s)})
            r = run_sft_dist(s, n, cfg, t, warmup=max(1, s.warmup - 1))
            ckpt = f"checkpointing {policy}" if policy else "checkpointing" if checkpointing else "no checkpointing"
            r["note"] = "; ".join(filter(None, [f"init_config quantized from memory, {rows} x {accumulation}, {ckpt}; "
                                                "goals: >= 8k tokens/s at <= 24 GiB", _safe_note(s)]))
            return r
        return run

    def ddp(s: Setup, t: float) -> dict:
        r = run_sft_dist(s, "ddp_nccl", sft_dist_config(s, "ddp_nccl", **{"launcher.num_workers": s.gpus}), t)
        r["note"] = f"{_devices(s)}; tokens/s of all of them"
        return r

    def sequence_parallel(s: Setup, t: float) -> dict:
        # one group of every GPU: the sft_dist step's rows, each GPU 1/N of every row (its losses are comparable)
        r = run_sft_dist(s, "sft_dist_sequence_parallel", sft_dist_config(
            s, "sft_dist_sequence_parallel", **{"launcher.num_workers": s.gpus,
                                               "backend.sequence_parallel_size": s.gpus}), t)
        r["note"] = f"{_devices(s)} in one sequence-parallel group (all-to-all); tokens/s of all of them"
        return r

    def trl_fastest(s: Setup, t: float) -> dict:
        attn = "flash_attention_2" if _flash() and not s.tiny else ("sdpa" if s.tiny else "flex_attention")
        liger = not s.tiny and importlib.util.find_spec("liger_kernel") is not None
        t0 = time.perf_counter()
        # flex attention compiles (again for each new row width): its try leaves the sdpa fallback its time
        first = min(t, max(120.0, t - 120.0)) if attn == "flex_attention" else t
        r = run_trl(s, "trl_fastest", first, attn=attn, checkpointing=False, liger=liger)
        failed = None
        left = t - (time.perf_counter() - t0)
        if r["status"] != "ok" and attn in ("flex_attention", "flash_attention_2") and left > 60:
            # TRL's padding-free row changes width every batch, so transformers' compiled flex attention compiles
            # again for dynamic shapes (and a flash-attn build may not match this torch): where that fails, TRL's
            # next fastest correct setting is the same on sdpa
            failed, attn = f"{attn} failed ({r.get('reason', '?')[:120]}), so", "sdpa"
            r = run_trl(s, "trl_fastest", left, attn=attn, checkpointing=False, liger=liger)
        r["note"] = ((f"{failed} " if failed else "") + f"bfd padding-free on {attn}, activation checkpointing off"
                     + (", Liger" if liger else "")
                     + (" (tiny: sdpa; FlexAttention has no backward on a CPU)" if s.tiny else ""))
        return r

    prep = _need("prepare")

    def data(s: Setup) -> str | None:  # the 8B steps build their model: the data is all they need from `prepare`
        return None if s.data is not None and s.data.exists() else "needs the prepare step's data, which is missing"

    def safe_ready(s: Setup) -> str | None:
        if s.results.get("sft_dist", {}).get("status") in ("ok", None, "skipped"):
            return "the sft_dist step did not fail"
        return prep(s)

    # Most important first: the goals of issue 17 (1.5B and 8B throughput, start-up, QLoRA, sft_dist against
    # plain TRL's fastest correct setting), then packing isolation on this GPU's kernels, plain TRL's defaults,
    # then each speed feature alone. Estimates: what a step needs on an H200 / on 2 idle CPU cores.
    return [
        Step("prepare", "the base model (1.5B Llama shape; --tiny: 2 layers of 64) saved; the data", 40, 10,
             step_prepare, None, 240),
        Step("sft_dist", "sft_dist defaults (attention auto, Liger auto), bf16, LoRA r16, packed 8 x seq",
             60, 25, sft("sft_dist"), prep, 300),
        Step("sft_dist_safe", "only where the sft_dist step failed: the same on sdpa, without Liger and the fused "
             "LoRA forward (the 8B steps then run so too)", 60, 25, sft("sft_dist_safe", **SAFE), safe_ready, 300),
        Step("llama8b", "Llama-3-8B shape from init_config, LoRA r16, packed 4 x seq x 2 accumulation", 120, 25,
             llama8b, data, 420),
        Step("llama8b_qlora", "Llama-3-8B shape, QLoRA 4-bit, 1 x seq x 8, no activation checkpointing", 110, 25,
             qlora("llama8b_qlora", 1, 8, checkpointing=False), _has("bitsandbytes", "QLoRA", data), 420),
        Step("trl_fastest", "plain TRL, fastest setting that keeps documents apart", 90, 25, trl_fastest, prep, 300),
        Step("isolation", "packed rows vs documents alone, per attention implementation", 90, 25, step_isolation,
             None, 180),
        Step("trl_default", "plain TRL SFTTrainer, its defaults (bfd padding-free, activation checkpointing)", 70, 25,
             lambda s, t: run_trl(s, "trl_default", t, attn="sdpa"), prep, 300),
        Step("attention", "packed attention alone: a few 1.5B-shape layers, fwd+bwd, per implementation", 60, 15,
             step_attention, None, 180),
        Step("loss_head", "the LM head and loss alone: TRL's chunked head, Liger's fused CE, full logits", 30, 10,
             step_loss_head, None, 120),
        attn_variant("sdpa"),
        attn_variant("varlen_attention"),
        attn_variant("flex_attention"),
        Step("sft_dist_liger", "sft_dist with Liger switched the other way", 70, 25, liger, liger_ready, 300),
        Step("sft_dist_peft_lora", "sft_dist with peft's own LoRA forward (lora.fused_forward=false)", 70, 25,
             sft("sft_dist_peft_lora", **{"lora.fused_forward": False}), prep, 300),
        Step("paged_adamw_8bit", "sft_dist with training.optim=paged_adamw_8bit", 70, 25, paged,
             _has("bitsandbytes", "8-bit optimizers"), 300),
        Step("sft_dist_compile", "sft_dist with training.torch_compile=true", 240, 150,
             sft("sft_dist_compile", **{"training.torch_compile": True}), prep, 480),
        attn_variant("flash_attention_2"),
        Step("ddp_nccl", "sft_dist on every GPU (DDP, nccl)", 90, 25, ddp,
             lambda s: "fewer than 2 GPUs" if s.gpus < 2 else prep(s), 300),
        Step("sft_dist_sequence_parallel", "the sft_dist step's rows split over every GPU (backend.sequence_parallel_"
             "size)", 90, 25, sequence_parallel, lambda s: "fewer than 2 GPUs" if s.gpus < 2 else prep(s), 300),
        Step("lora_dropout_005", "sft_dist with lora.dropout=0.05", 70, 25,
             sft("lora_dropout_005", **{"lora.dropout": 0.05}),
             prep, 300),
        Step("llama8b_qlora_ckpt", "the QLoRA step at 4 x 2, every decoder layer checkpointed", 150, 25,
             qlora("llama8b_qlora_ckpt", 4, 2), _has("bitsandbytes", "QLoRA", data), 420),
        Step("llama8b_qlora_every2", "the QLoRA step at 2 x 4, checkpointing one decoder layer in two", 150, 25,
             qlora("llama8b_qlora_every2", 2, 4,
                   **{"training.activation_checkpointing_kwargs": {"every_n_layers": 2}}),
             _has("bitsandbytes", "QLoRA", data), 420),
        Step("trl_wrapped", "plain TRL, packing_strategy=wrapped (documents attend to each other: not correct)",
             70, 25, lambda s, t: run_trl(s, "trl_wrapped", t, attn="sdpa", strategy="wrapped"), prep, 300),
    ]


# --- the table --------------------------------------------------------------------------------------------------

# sft_dist steps on the sft_dist step's model, data, batches and seed: their loss curves must agree
SAME_RUN = ("sft_dist_", "paged_adamw_8bit", "lora_dropout_")


def loss_gap(s: Setup, name: str, r: dict) -> float | None:
    ref = s.results.get("sft_dist", {}).get("losses")
    mine = r.get("losses")
    if not ref or not mine or not name.startswith(SAME_RUN):
        return None
    n = min(len(ref), len(mine))
    return max(abs(a - b) for a, b in zip(ref[:n], mine[:n]))


def table(s: Setup, meta: dict) -> str:
    head = ("| step | status | loss tokens/s | MFU | peak GiB | step s | to 1st step s | max dloss vs sft_dist | "
            "attention / kernels / note |")
    lines = [head, "|" + "---|" * 9]
    for name, r in s.results.items():
        def f(key, fmt, scale=1.0, unit=""):
            v = r.get(key)
            return format(v * scale, fmt) + unit if isinstance(v, (int, float)) else "-"
        kernels = r.get("kernels") if name.startswith(("sft", "llama", "paged", "ddp", "lora")) else None
        built = (f"{r['build_peak_gib']:.1f} GiB peak while building the model"
                 if (r.get("build_peak_gib") or 0) > (r.get("peak_gib") or 0) else None)
        host = (f"host RSS peak {r['host_peak_gib']:.1f} GiB"
                if name.startswith("llama8b") and r.get("host_peak_gib") else None)
        note = "; ".join(x for x in (r.get("attention"), kernels, built, host, r.get("note"), r.get("reason")) if x)
        lines.append(f"| {name} | {r['status']} | {f('tokens_per_s', ',.0f')} | {f('mfu', '.1f', 100, '%')} | "
                     f"{f('peak_gib', '.1f')} | {f('step_s', '.3f')} | {f('first_step_s', '.1f')} | "
                     f"{f('max_dloss', '.4f')} | {note.replace('|', '/')} |")
    mfu = "MFU against a nominal 1 TFLOP/s (tiny CPU run)" if s.tiny else "MFU against the GPU's dense bf16 peak"
    return (f"{meta['machine']}; {meta['date']}; {meta['versions']}\n"
            f"{'TINY MODELS ON A CPU: checks the script, the figures mean nothing' if s.tiny else ''}\n"
            f"{s.steps} steps of {s.rows} x {s.seq} tokens, the first {s.warmup} not counted; {mfu}; "
            f"budget {meta['budget_s']:.0f} s\n\n" + "\n".join(lines) + "\n" + summary(s.results))


def versions() -> str:
    import importlib.metadata as md

    out = []
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "liger-kernel", "bitsandbytes", "flash-attn",
                 "triton"):
        try:
            out.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            out.append(f"{name} -")
    return ", ".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--budget-s", type=float, default=None, help="total seconds (default 420; --tiny 120)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_gpu", help="gpu.jsonl, gpu.md, gpu.log")
    p.add_argument("--work", type=Path, default=None, help="models, runs, logs (default <tmp>/sft_dist_bench_gpu)")
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU: checks the script end to end")
    p.add_argument("--only", default=None, help="comma-separated step names (prepare is added when needed)")
    p.add_argument("--skip", default="", help="comma-separated step names")
    a = p.parse_args()
    t0 = time.perf_counter()
    budget = a.budget_s if a.budget_s is not None else (120.0 if a.tiny else 420.0)
    deadline = t0 + budget
    a.out.mkdir(parents=True, exist_ok=True)
    work = a.work or Path(tempfile.gettempdir()) / ("sft_dist_bench_gpu" + ("_tiny" if a.tiny else ""))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    s = Setup.make(a.tiny, work.resolve())
    if not a.tiny:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device here: run with --tiny to check the script on a CPU")
    os.environ.setdefault("SFT_DIST_CACHE", str(s.work / "data_cache"))
    meta = {"machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "versions": versions(), "budget_s": budget, "tiny": a.tiny, "steps": s.steps, "warmup": s.warmup,
            "rows": s.rows, "seq": s.seq, "shape": s.shape, "big_shape": s.big_shape}
    jsonl, md, log = a.out / "gpu.jsonl", a.out / "gpu.md", a.out / "gpu.log"
    jsonl.write_text(json.dumps({"meta": meta}) + "\n")
    log.write_text("")
    only = set(a.only.split(",")) if a.only else None
    if only:
        only.add("prepare")
    skip = set(filter(None, a.skip.split(",")))
    print(f"bench/gpu.py: {meta['machine']}\n{meta['versions']}\nbudget {budget:.0f} s, work {s.work}", flush=True)
    for step in steps():
        if (only and step.name not in only) or step.name in skip:
            continue
        left = deadline - time.perf_counter()
        need = s.est(step.gpu_s, step.tiny_s)
        reason = step.ready(s) if step.ready else None
        if reason is None and left < need:
            reason = f"needs ~{need:.0f} s, {max(0, left):.0f} s of the budget left"
        t1 = time.perf_counter()
        if reason is not None:
            r = {"status": "skipped", "reason": reason}
        else:
            print(f"[{time.perf_counter() - t0:5.0f} s] {step.name}: {step.what} "
                  f"(timeout {min(step.cap_s, left):.0f} s)", flush=True)
            try:
                r = step.run(s, min(step.cap_s, left))
            except Exception as e:  # noqa: BLE001 - a broken step is a result; the others still run
                r = {"status": "failed", "reason": f"bench: {type(e).__name__}: {e}"[:300]}
        r.setdefault("wall_s", round(time.perf_counter() - t1, 1))
        r["max_dloss"] = loss_gap(s, step.name, r)
        r["what"] = step.what
        s.results[step.name] = r
        with open(jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step.name, **r}) + "\n")
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"== {step.name}: {r['status']} {r.get('reason', '')}\n" + "\n".join(r.get("tail", [])) + "\n")
        md.write_text(table(s, meta))
        print(f"[{time.perf_counter() - t0:5.0f} s] {step.name}: {r['status']}"
              + (f" ({r['reason']})" if r.get("reason") else "")
              + (f", {r['tokens_per_s']:,.0f} loss tokens/s" if r.get("tokens_per_s") else ""), flush=True)
    print("\n" + table(s, meta), flush=True)
    print(f"results: {jsonl}, {md}; logs: {s.work / 'logs'}; {time.perf_counter() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
