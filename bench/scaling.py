"""1 -> 2 worker scaling on this machine: steady-state loss-carrying tokens/s of one job (global batch 16:
1 worker x micro-batch 8 x accumulation 2, against 2 workers x micro-batch 8 x accumulation 1), DDP over gloo,
on bench/vs_trl.py's random Llama (hidden 256, 4 layers), tokenizer and 4,000 variable-length rows, LoRA r=8
all-linear, max_length 256, no packing.

Each worker gets the launcher's default threads (cores / workers, unless --threads): on a 2-core CPU the
1-worker run has 2 threads and each of the 2 workers 1, so the same cores do the same work both ways and
the speed-up is what data parallelism buys over intra-op threading. A third run, 1 worker on 1 thread (one
core's worth), is the baseline for scaling proper: 2 workers on 2 cores against 1 on 1. Throughput =
loss-carrying tokens of the steps after the first 5 / their wall time (metrics.jsonl); the median over
--repeats runs, the runs alternated. Speed-up = 2 workers / 1 worker; scaling efficiency = speed-up / 2.

    python bench/scaling.py [--steps 30] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, run_sft_dist, write_results
from vs_trl import MODEL, WARMUP, prepare, steady_tokens_per_s

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH, MICRO = 16, 8


def train(work: Path, model: Path, data: Path, *, workers: int, steps: int, threads: int | None) -> tuple[float, int]:
    """One run; returns (steady loss tokens/s, threads each worker ran with)."""
    out = work / f"run_{workers}w_{threads or 'default'}t"
    shutil.rmtree(out, ignore_errors=True)
    cfg = {"output_dir": str(out), "model": {"name_or_path": str(model)},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
           "data": {"train_files": str(data), "format": "prompt_completion", "max_length": 256, "packing": False},
           "training": {"max_steps": steps, "per_device_train_batch_size": MICRO,
                        "gradient_accumulation_steps": GLOBAL_BATCH // (MICRO * workers), "learning_rate": 1e-4,
                        "logging_steps": 1, "save_strategy": "no", "eval_strategy": "no", "seed": 42},
           "launcher": {"type": "local", "num_workers": workers, "threads_per_worker": threads}}
    stderr = run_sft_dist(cfg, out.with_suffix(".yaml"), f"{workers}-worker run")
    m = re.search(r"(\d+) thread\(s\) each", stderr)
    return steady_tokens_per_s(out / "metrics.jsonl"), int(m.group(1)) if m else -1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="launcher.threads_per_worker for both (default: cores / workers)")
    p.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench_scaling")
    a = p.parse_args()
    if a.steps <= WARMUP:
        p.error(f"--steps must be > {WARMUP} (the warm-up steps left out)")
    a.work.mkdir(parents=True, exist_ok=True)
    model, data = prepare(a.work)
    # name -> (workers, threads); threads None: the launcher's default
    setups = {"1 worker": (1, a.threads), "2 workers": (2, a.threads)}
    if a.threads is None and (os.cpu_count() or 1) > 1:
        setups = {"1 worker": (1, None), "1 worker, 1 thread": (1, 1), "2 workers": (2, None)}
    runs: dict[str, list[float]] = {name: [] for name in setups}
    threads: dict[str, int] = {}
    for i in range(a.repeats):
        t0 = time.time()
        for name, (workers, th) in setups.items():
            tps, threads[name] = train(a.work, model, data, workers=workers, steps=a.steps, threads=th)
            runs[name].append(tps)
        print(f"repeat {i + 1}: " + ", ".join(f"{name} {runs[name][-1]:.0f}" for name in setups)
              + f" loss tokens/s ({time.time() - t0:.0f} s)", flush=True)
    med = {name: statistics.median(v) for name, v in runs.items()}
    speedup = med["2 workers"] / med["1 worker"]
    lines = ["| run | micro x accumulation | threads each | loss tokens/s (median) | runs |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {MICRO} x {GLOBAL_BATCH // (MICRO * w)} | {threads[name]} | {med[name]:.0f} | "
              f"{', '.join(f'{x:.0f}' for x in runs[name])} |" for name, (w, _) in setups.items()]
    table = "\n".join(lines) + (f"\n\nSpeed-up 2 workers x {threads['2 workers']} thread(s) / 1 worker x "
                                f"{threads['1 worker']} thread(s): {speedup:.2f}x; scaling efficiency {speedup / 2:.0%}")
    one_core = med.get("1 worker, 1 thread")
    if one_core:
        table += f". Against 1 worker on 1 thread: {med['2 workers'] / one_core:.2f}x, efficiency " \
                 f"{med['2 workers'] / one_core / 2:.0%}"
    print(table)
    meta = {"machine": machine(), "steps": a.steps, "warmup_steps": WARMUP, "repeats": a.repeats, "model": MODEL,
            "global_batch": GLOBAL_BATCH, "micro_batch": MICRO, "threads_per_worker": threads, "backend": "ddp"}
    write_results("scaling", {"meta": meta, "median_tokens_per_s": med, "runs_tokens_per_s": runs, "speedup": speedup,
                              "efficiency": speedup / 2,
                              "speedup_vs_one_thread": med["2 workers"] / one_core if one_core else None},
                  f"{meta['machine']}, global batch {GLOBAL_BATCH}, {a.steps} steps (first {WARMUP} not timed), "
                  f"median of {a.repeats}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
