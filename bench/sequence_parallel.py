"""`backend.sequence_parallel_size`: the same long packed rows trained by one worker whole and by 2 workers holding
half of every row each (model/ulysses.py), side by side.

A Llama of hidden 512, 4 layers, 8 heads from `model.init_config`, LoRA r 8 on every linear layer, packed rows of
`--length` tokens (generated text documents of ~300 to ~1,500 tokens), 1 row per step (micro-batch 1, so both
settings train the same rows: the 2 workers are one group), on CPU (gloo; 2 threads for the one worker, 1 for each
of the two). Reported per setting: the largest peak RSS of a rank, what the step added to it (peak minus the RSS
after the model was built: activations, gradients, optimizer state, the mask and the all-to-all buffers), the
plan's estimate of the activations per rank, the wall seconds per step (median after the first two), and the loss
curve's largest relative difference from the whole rows'. On a CPU the all-to-alls go through gloo and the two
workers share the cores: the point is memory per rank, and that the numbers match.

    python bench/sequence_parallel.py [--length 8192] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from common import ROOT, machine, run_sft_dist, write_results

WARMUP = 2
MiB = 2**20


def documents(path: Path, n: int = 400) -> Path:
    rng = random.Random(0)
    words = ["casa", "rio", "sol", "dia", "mar", "luz", "pão", "céu", "flor", "vento", "terra", "água"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(150, 750)))},
                                       ensure_ascii=False) + "\n" for _ in range(n)), encoding="utf-8")
    return path


def config(out: Path, data: Path, size: int, length: int, steps: int) -> dict:
    return {
        "output_dir": str(out),
        "model": {"init_config": {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1376,
                                  "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
                                  "max_position_embeddings": length},
                  "tokenizer": "builtin:tokenizer", "save_init_base": False},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train_files": str(data), "format": "text", "max_length": length, "packing": True},
        "backend": {"sequence_parallel_size": size},
        "launcher": {"num_workers": size, "threads_per_worker": 2 // size},
        "training": {"max_steps": steps, "per_device_train_batch_size": 1, "learning_rate": 1e-3, "logging_steps": 1,
                     "save_strategy": "no", "eval_strategy": "no"},
    }


def train(out: Path, data: Path, size: int, length: int, steps: int) -> dict:
    t0 = time.perf_counter()
    run_sft_dist(config(out, data, size, length, steps), out.with_suffix(".json"), f"sequence parallel {size}")
    s = json.loads((out / "run_summary.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [m for m in logged if "loss" in m and m["step"] > WARMUP]
    return {"peak_rss_mib": max(r["peak_rss_bytes"] for r in s["ranks"]) / MiB,
            "step_added_mib": max(r["peak_rss_bytes"] - r["rss_after_model_bytes"] for r in s["ranks"]) / MiB,
            "planned_activations_mib": plan["memory_per_rank"]["activations"] / MiB,
            "wall_s_per_step": statistics.median(m["step_time_s"] for m in timed),
            "losses": [m["loss"] for m in logged if "loss" in m], "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_sequence_parallel")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    data = documents(args.out / "train.jsonl")
    rows = {}
    for size in (1, 2):
        r = train(args.out / f"sp{size}", data, size, args.length, args.steps)
        rows[size] = r
        print(f"sequence parallel {size}: peak RSS {r['peak_rss_mib']:.0f} MiB (step added {r['step_added_mib']:.0f}), "
              f"{r['wall_s_per_step']:.2f} s/step, {r['seconds']:.0f} s", flush=True)
    ref = rows[1]["losses"]
    for r in rows.values():
        r["loss_max_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(r.pop("losses"), ref))
    lines = ["| setting | peak RSS per rank (MiB) | added by training (MiB) | planned activations (MiB) | "
             "wall s / step | loss max rel diff |", "|---|---|---|---|---|---|"]
    names = {1: "1 worker, whole rows", 2: "2 workers, sequence_parallel_size 2 (half of each row each)"}
    for size, r in rows.items():
        lines.append(f"| {names[size]} | {r['peak_rss_mib']:.0f} | {r['step_added_mib']:.0f} | "
                     f"{r['planned_activations_mib']:.0f} | {r['wall_s_per_step']:.2f} | {r['loss_max_rel_diff']:.1e} |")
    ratio = rows[2]["step_added_mib"] / rows[1]["step_added_mib"]
    summary = f"memory added by training per rank, split over whole: {ratio:.2f}"
    print("\n".join(lines) + "\n" + summary)
    setup = {"machine": machine(), "model": "llama hidden 512, 4 layers, 8 heads, LoRA r 8 all-linear",
             "length": args.length, "micro_batch": 1, "steps": args.steps, "data": "400 text documents of 150-750 words"}
    write_results("sequence_parallel", {"setup": setup, "ratio": ratio, "rows": {names[k]: v for k, v in rows.items()}},
                  "\n".join([f"{setup['machine']}; {json.dumps(setup)}", "", *lines, "", summary, ""]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
