"""`training.train_sampling_strategy`: `random` (the default) against `batch_rebalance`, side by side.

2 workers (gloo, 1 thread each, on CPU), a Llama of hidden 256 and 4 layers from `model.init_config`, LoRA r 8,
data.max_length 512, micro-batch 8, on generated alpaca rows whose responses run from 1 to 200 words with a long
tail (rows of ~20 to 512 tokens), unpacked; once without gradient accumulation and once with 4. Each setting trains
`--steps` steps `--repeats` times, the two strategies alternated, each run a fresh `sft-dist train`. Reported: the
padding fraction (run_summary.json), the wall seconds per step (the median of the steps after the first two: a step
ends when the slower rank's gradients are all-reduced, so waiting for the other rank is in it), loss-carrying tokens
per wall second, and the largest relative difference of the loss curve from `random`'s (the steps train the same
samples: only which rank and micro-batch holds them changes).

    python bench/rebalance.py [--steps 30] [--repeats 2]
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
STRATEGIES = ("random", "batch_rebalance")


def long_tailed_rows(path: Path, n: int = 3000) -> Path:
    rng = random.Random(0)
    words = ["casa", "rio", "sol", "dia", "mar", "luz", "pão", "céu", "flor", "vento"]
    rows = []
    for _ in range(n):
        k = min(200, max(1, int(rng.paretovariate(1.2) * 6)))  # most answers short, some long
        rows.append({"instruction": "Repita as palavras.", "output": " ".join(rng.choice(words) for _ in range(k))})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def config(out: Path, data: Path, strategy: str, accum: int, steps: int) -> dict:
    return {
        "output_dir": str(out),
        "model": {"init_config": {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688,
                                  "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
                                  "max_position_embeddings": 1024},
                  "tokenizer": "builtin:tokenizer", "save_init_base": False},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train_files": str(data), "format": "alpaca", "max_length": 512},
        "launcher": {"num_workers": 2, "threads_per_worker": 1},
        "training": {"max_steps": steps, "per_device_train_batch_size": 8, "gradient_accumulation_steps": accum,
                     "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no", "eval_strategy": "no",
                     "train_sampling_strategy": strategy},
    }


def train(out: Path, data: Path, strategy: str, accum: int, steps: int) -> dict:
    t0 = time.perf_counter()
    run_sft_dist(config(out, data, strategy, accum, steps), out.with_suffix(".json"), f"{strategy} accum {accum}")
    s = json.loads((out / "run_summary.json").read_text())
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [m for m in logged if "loss" in m and m["step"] > WARMUP]
    wall = statistics.median(m["step_time_s"] for m in timed)
    tokens = statistics.mean(m["tokens"] for m in timed)
    return {"padding_fraction": s["padding_fraction"], "wall_s_per_step": wall, "loss_tokens_per_wall_s": tokens / wall,
            "losses": [m["loss"] for m in logged if "loss" in m], "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_rebalance")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    data = long_tailed_rows(args.out / "train.jsonl")
    rows = {}
    for accum in (1, 4):
        runs: dict[str, list[dict]] = {s: [] for s in STRATEGIES}
        for i in range(args.repeats):
            for strategy in STRATEGIES:  # alternated, so a busy machine slows both alike
                r = train(args.out / f"{strategy}-accum{accum}-{i}", data, strategy, accum, args.steps)
                runs[strategy].append(r)
                print(f"{strategy} accum {accum} run {i}: padding {r['padding_fraction']:.3f}, "
                      f"{r['wall_s_per_step']:.3f} s/step, {r['seconds']:.0f} s", flush=True)
        ref = runs["random"][0]["losses"]
        for strategy, rs in runs.items():
            losses = rs[0]["losses"]
            rows[f"{strategy}, accumulation {accum}"] = {
                "strategy": strategy, "accumulation": accum, "padding_fraction": rs[0]["padding_fraction"],
                "wall_s_per_step": statistics.median(r["wall_s_per_step"] for r in rs),
                "loss_tokens_per_wall_s": statistics.median(r["loss_tokens_per_wall_s"] for r in rs),
                "runs_wall_s_per_step": [r["wall_s_per_step"] for r in rs],
                "loss_max_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(losses, ref))}
    lines = ["| setting | padding fraction | wall s / step (runs) | loss tokens / wall s | loss max rel diff |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        runs_s = ", ".join(f"{x:.3f}" for x in r["runs_wall_s_per_step"])
        lines.append(f"| {name} | {r['padding_fraction']:.3f} | {r['wall_s_per_step']:.3f} ({runs_s}) | "
                     f"{r['loss_tokens_per_wall_s']:.0f} | {r['loss_max_rel_diff']:.1e} |")
    speed = {a: rows[f"random, accumulation {a}"]["wall_s_per_step"] / rows[f"batch_rebalance, accumulation {a}"][
        "wall_s_per_step"] for a in (1, 4)}
    summary = ", ".join(f"accumulation {a}: {x:.2f}x" for a, x in speed.items())
    print("\n".join(lines) + f"\nbatch_rebalance steps per second over random's: {summary}")
    setup = {"machine": machine(), "model": "llama hidden 256, 4 layers, LoRA r 8 all-linear", "workers": 2,
             "threads_per_worker": 1, "micro_batch": 8, "max_length": 512, "steps": args.steps,
             "repeats": args.repeats, "data": "3000 alpaca rows, responses of 1-200 words (Pareto tail)"}
    write_results("rebalance", {"setup": setup, "speedup": speed, "rows": rows},
                  "\n".join([f"{setup['machine']}; {json.dumps(setup)}", "", *lines, "", summary, ""]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
