"""Steady-state training throughput of `sft-dist train` next to a hand-written TRL SFTTrainer script under
torchrun (bench/trl_baseline.py), in one run, on the same random-weight Llama, tokenizer and data:

- matched: the same settings on both sides (2 workers, DDP, LoRA r=8 all-linear, micro-batch 8, no packing,
  no activation checkpointing, max_length 256, lr 1e-4): the cost of sft_dist's machinery (goal >= 0.98);
- defaults: sft_dist's defaults against TRL's (TRL's SFTConfig turns activation checkpointing on), same data;
- packing: sft_dist with `data.packing: true` against the TRL script with TRL's defaults (no packing), on
  the same variable-length data, counted in loss-carrying tokens only (goal >= 1.5).

Throughput = loss-carrying tokens of steps 6..N (summed over ranks) / the wall time of those steps; the
median over --repeats runs, the two sides alternated so load on the machine hits both alike.

    python bench/vs_trl.py [--steps 40] [--repeats 3] [--only matched]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import run_sft_dist, write_results

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WARMUP = 5
MODEL = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512}
WORDS = ["the", "model", "learns", "from", "each", "example", "and", "the", "loss", "goes", "down", "as", "the", "adapter", "trains", "on", "the", "data", "while", "every", "rank", "keeps", "its", "own", "shard", "of", "samples"]


def prepare(work: Path) -> tuple[Path, Path]:
    """A seeded random Llama saved with the bundled tokenizer, and variable-length prompt/completion rows."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir, data = work / "model", work / "data.jsonl"
    if not model_dir.exists():
        tok = AutoTokenizer.from_pretrained(ROOT / "sft_dist" / "assets" / "tokenizer")
        torch.manual_seed(0)
        cfg = AutoConfig.for_model(**MODEL, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.choices(WORDS, k=rng.randint(4, 60))),
             "completion": " " + " ".join(rng.choices(WORDS, k=rng.randint(4, 90)))} for _ in range(4000)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


def sft_dist_run(work: Path, model: Path, data: Path, steps: int, packing: bool) -> float:
    out = work / "sft_dist_run"
    shutil.rmtree(out, ignore_errors=True)
    cfg = {"output_dir": str(out), "model": {"name_or_path": str(model)},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
           "data": {"train_files": str(data), "format": "prompt_completion", "max_length": 256, "packing": packing},
           "training": {"max_steps": steps, "per_device_train_batch_size": 8, "learning_rate": 1e-4,
                        "logging_steps": 1, "save_strategy": "no", "eval_strategy": "no", "seed": 42},
           "launcher": {"type": "local", "num_workers": 2}}
    run_sft_dist(cfg, work / "sft_dist.yaml", "sft-dist")
    return steady_tokens_per_s(out / "metrics.jsonl")


def steady_tokens_per_s(metrics: Path, warmup: int = WARMUP) -> float:
    """Loss-carrying tokens (all ranks) of the steps after `warmup` over those steps' wall time."""
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if '"loss"' in x]
    steady = [x for x in rows if x["step"] > warmup]
    return sum(x["tokens"] for x in steady) / sum(x["step_time_s"] for x in steady)


def trl_run(work: Path, model: Path, data: Path, steps: int, trl_defaults: bool) -> float:
    out = work / "trl.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what torchrun sets by default, said explicitly
    r = subprocess.run([str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                        "--master-port", "29617", str(ROOT / "bench" / "trl_baseline.py"), "--model", str(model),
                        "--data", str(data), "--out", str(out), "--steps", str(steps),
                        *(["--trl-defaults"] if trl_defaults else [])],
                       capture_output=True, text=True, check=False, env=env)
    if r.returncode:
        raise SystemExit(f"TRL baseline failed:\n{r.stderr[-3000:]}")
    m = json.loads(out.read_text())
    ends, tokens = m["step_ends"], m["tokens"]
    return sum(tokens[WARMUP:]) / (ends[-1] - ends[WARMUP - 1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default="matched,defaults,packing")
    p.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench_vs_trl")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    model, data = prepare(a.work)
    results = {}
    for name in a.only.split(","):
        ours, base = [], []
        for i in range(a.repeats):
            t0 = time.time()
            base.append(trl_run(a.work, model, data, a.steps, trl_defaults=name != "matched"))
            ours.append(sft_dist_run(a.work, model, data, a.steps, packing=name == "packing"))
            print(f"{name} repeat {i + 1}: TRL {base[-1]:.0f}, sft_dist {ours[-1]:.0f} loss tokens/s "
                  f"({time.time() - t0:.0f} s)", flush=True)
        results[name] = {"sft_dist_tokens_per_s": statistics.median(ours), "trl_tokens_per_s": statistics.median(base),
                         "ratio": statistics.median(ours) / statistics.median(base), "runs_sft_dist": ours,
                         "runs_trl": base}
    meta = {"machine": f"{os.cpu_count()} CPU cores, no GPU", "steps": a.steps, "warmup_steps": WARMUP,
            "repeats": a.repeats, "model": MODEL, "workers": 2}
    lines = ["| comparison | sft_dist loss tokens/s | TRL script loss tokens/s | ratio |", "|---|---|---|---|"]
    for name, r in results.items():
        label = {"matched": "same settings (no packing, no checkpointing)", "defaults": "defaults vs TRL defaults",
                 "packing": "sft_dist data.packing vs TRL defaults"}[name]
        lines.append(f"| {label} | {r['sft_dist_tokens_per_s']:.0f} | {r['trl_tokens_per_s']:.0f} | {r['ratio']:.2f} |")
    table = "\n".join(lines)
    print(table)
    write_results("vs_trl", {"meta": meta, "results": results},
                  f"{meta['machine']}, {a.steps} steps (first {WARMUP} not timed), median of {a.repeats}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
