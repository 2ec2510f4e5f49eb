"""Padding and loss-carrying tokens/s with and without `data.packing`.

The quickstart model (random Llama, hidden 64, 2 layers, LoRA), 1 worker with 1 thread on CPU, micro-batch
8 x data.max_length 128, on generated alpaca rows whose responses run from 1 to 60 words (rows of ~20 to
past 128 tokens). Each setting trains `--steps` steps `--repeats` times, the two alternated, each run in a
fresh process through `sft_dist.train.run.run` (what every launcher calls) with a callback that reads the
process's CPU time at every step end. Reported: the padding fraction (padding / tokens the model processed,
from run_summary.json), loss-carrying tokens per step (metrics.jsonl), the CPU seconds per step and the
wall seconds per step (medians over the steps after the first two, then the median of the runs), and
loss-carrying tokens per CPU second and per wall second. On a machine other work shares, wall time swings
with the load; CPU time of the single-threaded worker does not, so it is the throughput to compare.

    python bench/packing.py [--steps 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "examples" / "quickstart.yaml"
WARMUP = 2  # first steps left out: allocator and thread-pool warm-up


def variable_rows(path: Path, n: int = 2000) -> Path:
    rng = random.Random(0)
    words = ["casa", "rio", "sol", "dia", "mar", "luz", "pão", "céu", "flor", "vento"]
    rows = [{"instruction": "Repita as palavras.", "output": " ".join(rng.choice(words) for _ in range(rng.randint(1, 60)))}
            for _ in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def worker(out: Path, data: Path, packing: bool, steps: int) -> None:
    """One training run in this process; writes the CPU seconds of every step to out/cpu_steps.json."""
    sys.path.insert(0, str(ROOT))
    from transformers import TrainerCallback

    from sft_dist.config.load import load_config
    from sft_dist.train.run import run

    class CpuClock(TrainerCallback):
        def __init__(self):
            self.last, self.steps = None, []

        def on_step_end(self, args, state, control, **kwargs):
            now = time.process_time()
            if self.last is not None:
                self.steps.append(now - self.last)
            self.last = now

    cfg = load_config(QUICKSTART, [
        f"output_dir={out}", f"data.train_files={data}", "data.eval_files=null", "training.eval_strategy=no",
        f"data.packing={str(packing).lower()}", "launcher.num_workers=1", "launcher.threads_per_worker=1",
        f"training.max_steps={steps}"])
    clock = CpuClock()
    run(cfg, callbacks=[clock])
    (out / "cpu_steps.json").write_text(json.dumps(clock.steps))


def train(out: Path, data: Path, *, packing: bool, steps: int) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "--worker", str(out), str(data), str(packing), str(steps)],
                       check=False, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"packing={packing} failed:\n{r.stderr[-3000:]}")
    s = json.loads((out / "run_summary.json").read_text())
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [m for m in logged if "loss" in m and m["step"] > WARMUP]
    cpu = json.loads((out / "cpu_steps.json").read_text())[WARMUP - 1:]  # deltas start after step 1
    tokens = statistics.mean(m["tokens"] for m in timed)
    cpu_s, wall_s = statistics.median(cpu), statistics.median(m["step_time_s"] for m in timed)
    return {"padding_fraction": s["padding_fraction"], "loss_tokens_per_step": tokens,
            "cpu_s_per_step": cpu_s, "wall_s_per_step": wall_s,
            "loss_tokens_per_cpu_s": tokens / cpu_s, "loss_tokens_per_wall_s": tokens / wall_s,
            "last_loss": s["last_loss"], "data": s["data"]["train"], "seconds": round(time.perf_counter() - t0, 1)}


def table(rows: dict) -> list[str]:
    head = ("| data.packing | padding fraction | loss tokens / step | CPU s / step | loss tokens / CPU s (runs) "
            "| wall s / step | loss tokens / wall s (runs) | train rows | fill |")
    lines = [head, "|" + "---|" * 9]
    for packing, r in rows.items():
        fill = f"{100 * r['fill']:.1f}%" if r["fill"] else "-"
        per = ", ".join(f"{x['loss_tokens_per_cpu_s']:.0f}" for x in r["runs"])
        wall = ", ".join(f"{x['loss_tokens_per_wall_s']:.0f}" for x in r["runs"])
        lines.append(f"| {str(packing).lower()} | {r['padding_fraction']:.3f} | {r['loss_tokens_per_step']:.0f} | "
                     f"{r['cpu_s_per_step']:.3f} | {r['loss_tokens_per_cpu_s']:.0f} ({per}) | "
                     f"{r['wall_s_per_step']:.3f} | {r['loss_tokens_per_wall_s']:.0f} ({wall}) | "
                     f"{r['train_rows']} | {fill} |")
    return lines


def main() -> int:
    if sys.argv[1:2] == ["--worker"]:
        out, data, packing, steps = sys.argv[2:6]
        worker(Path(out), Path(data), packing == "True", int(steps))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_packing")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "packing.json")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    data = variable_rows(args.out / "train.jsonl")
    results: dict[bool, list[dict]] = {False: [], True: []}
    for i in range(args.repeats):
        for packing in (False, True):  # alternated, so a busy machine slows both alike
            r = train(args.out / f"packing-{packing}-{i}", data, packing=packing, steps=args.steps)
            results[packing].append(r)
            print(f"packing={packing} run {i}: padding {r['padding_fraction']:.3f}, "
                  f"{r['loss_tokens_per_cpu_s']:.0f} loss tokens/CPU s, {r['loss_tokens_per_wall_s']:.0f} "
                  f"loss tokens/wall s, {r['seconds']:.0f} s", flush=True)
    rows = {}
    for packing, runs in results.items():
        st = runs[0]["data"]
        med = {k: statistics.median(r[k] for r in runs) for k in
               ("cpu_s_per_step", "wall_s_per_step", "loss_tokens_per_cpu_s", "loss_tokens_per_wall_s")}
        rows[packing] = {"padding_fraction": runs[0]["padding_fraction"],  # the same batches every repeat
                         "loss_tokens_per_step": runs[0]["loss_tokens_per_step"], **med,
                         "train_rows": st["packed_rows"] or st["rows"] - st["dropped_no_loss"], "fill": st["fill"],
                         "runs": runs}
    lines = table(rows)
    speedup = rows[True]["loss_tokens_per_cpu_s"] / rows[False]["loss_tokens_per_cpu_s"]
    print("\n".join(lines) + f"\npacking: {speedup:.2f}x loss-carrying tokens per CPU second")
    setup = {"model": "quickstart (llama hidden 64, 2 layers, LoRA r 8 + lm_head)", "workers": 1, "threads": 1,
             "device": "cpu", "micro_batch": 8, "max_length": 128, "steps": args.steps, "repeats": args.repeats,
             "data": "2000 alpaca rows, responses of 1-60 words", "per_step_medians_over": f"steps > {WARMUP}"}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"setup": setup, "speedup_cpu": speedup,
                                     "runs": {str(k).lower(): v for k, v in rows.items()}}, indent=2))
    args.json.with_suffix(".md").write_text(
        "### Packing: padding and throughput (`python bench/packing.py`)\n\n" + "\n".join(lines)
        + f"\n\nWith packing: {speedup:.2f}x loss-carrying tokens per CPU second.\n")
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
