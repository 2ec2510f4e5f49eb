"""Ray next to the local launcher and torchrun on the same tiny job (the quickstart, 2 workers, logging every
step, no eval or checkpoints): steady steps/s, seconds and CPU seconds to the first step, and where Ray's
start-up goes.

- steady steps/s = 1 / the median `step_time_s` of steps 6..N in metrics.jsonl (a step's time includes what
  the callbacks did after the step before, e.g. a report to Ray);
- to the first step: from the command starting to step 1 in metrics.jsonl, wall seconds and the CPU seconds
  the command's whole process tree used by then (Ray's cluster processes included): CPU seconds hardly move
  with the load other processes put on the machine, wall seconds do;
- phases: when each launcher's log first shows a milestone (Ray's lines are Ray 2.60's).

Launchers alternate within each repeat; the tokenized-data cache is warmed first. Medians over --repeats.

    python bench/ray_speed.py [--steps 60] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from common import ROOT, machine, write_results
from startup import command

WARMUP = 5
# (phase name, the log line that ends it); phases absent from a launcher's log are skipped
MILESTONES = {
    "ray": [("driver: imports and config checks", "starting an embedded Ray"),
            ("ray.init (GCS, raylet, dashboard)", "Ray Train run"),
            ("Train controller", "Requesting resources"),
            ("worker group + process group", "Started training worker group"),
            ("worker imports (torch, transformers, TRL, peft)", "worker(s) (ray)"),
            ("data, model, trainer", "first step")],
    "torchrun": [("agent + worker imports", "worker(s) (torchrun)"), ("data, model, trainer", "first step")],
    "local": [("launcher + worker imports", "worker(s) (local)"), ("data, model, trainer", "first step")],
}


def one_run(launcher: str, work: Path, steps: int) -> dict:
    out = work / launcher
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                                             "RAY_ADDRESS", "OMP_NUM_THREADS")}
    cmd = command(launcher, out)
    cmd = [a for a in cmd if not a.startswith("training.max_steps=")] + [
        f"training.max_steps={steps}", "training.logging_steps=1"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1)
    seen: dict[str, float] = {}
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            now = time.perf_counter() - t0
            for _, marker in MILESTONES[launcher]:
                if marker in line:
                    seen.setdefault(marker, now)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    cpu: dict[int, float] = {}  # pid -> CPU seconds at its last sample (exited processes keep theirs)
    root = psutil.Process(proc.pid)
    metrics, first_cpu = out / "metrics.jsonl", None
    while proc.poll() is None:
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    t = p.cpu_times()
                    cpu[p.pid] = t.user + t.system
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        if "first step" not in seen and metrics.exists() and '"step": 1,' in metrics.read_text():
            seen["first step"], first_cpu = time.perf_counter() - t0, sum(cpu.values())
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    reader.join(timeout=10)
    if proc.returncode:
        raise SystemExit(f"{launcher} failed:\n{''.join(lines)[-3000:]}")
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r and r["step"] > WARMUP]
    phases, prev = {}, 0.0
    for name, marker in MILESTONES[launcher]:
        if marker in seen:
            phases[name], prev = round(seen[marker] - prev, 2), seen[marker]
    return {"first_step_s": seen.get("first step"), "first_step_cpu_s": first_cpu,
            "steady_steps_per_s": 1 / statistics.median(times) if times else None, "wall_s": wall,
            "phases_s": phases}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--launchers", default="local,torchrun,ray")
    p.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench_ray_speed")
    a = p.parse_args()
    launchers = a.launchers.split(",")
    a.work.mkdir(parents=True, exist_ok=True)
    one_run("local", a.work, 3)  # warms the data cache and the OS file cache
    runs: dict[str, list[dict]] = {name: [] for name in launchers}
    for i in range(a.repeats):
        for name in launchers:
            r = one_run(name, a.work, a.steps)
            runs[name].append(r)
            print(f"repeat {i + 1}: {name}: {r['steady_steps_per_s']:.1f} steps/s, first step at "
                  f"{r['first_step_s']:.1f} s ({r['first_step_cpu_s']:.1f} CPU s)", flush=True)

    summary = {}
    for name, rs in runs.items():
        summary[name] = {k: statistics.median(r[k] for r in rs)
                         for k in ("steady_steps_per_s", "first_step_s", "first_step_cpu_s", "wall_s")}
        summary[name]["phases_s"] = {ph: statistics.median(r["phases_s"][ph] for r in rs)
                                     for ph in rs[0]["phases_s"] if all(ph in r["phases_s"] for r in rs)}
    ratios = {f"{k}_ray_over_{base}": summary["ray"][k] / summary[base][k]
              for base in ("local", "torchrun") if base in summary and "ray" in summary
              for k in ("steady_steps_per_s", "first_step_s", "first_step_cpu_s")}
    lines = ["| launcher | steady steps/s | to first step, s | CPU s to first step | whole command, s |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | {s['steady_steps_per_s']:.1f} | {s['first_step_s']:.1f} | {s['first_step_cpu_s']:.1f} | "
              f"{s['wall_s']:.1f} |" for n, s in summary.items()]
    for n, s in summary.items():
        lines += ["", f"{n}, seconds per start-up phase (median):", ""]
        lines += [f"- {ph}: {sec:.1f}" for ph, sec in s["phases_s"].items()]
    lines += ["", *(f"{k}: {v:.2f}x" for k, v in ratios.items())]
    table = "\n".join(lines)
    print(table)
    meta = {"machine": machine(), "steps": a.steps, "repeats": a.repeats, "workers": 2, "warmup_steps": WARMUP,
            "load_average_at_end": os.getloadavg()}
    write_results("ray_speed", {"meta": meta, "median": summary, "ratios": ratios, "runs": runs},
                  f"{meta['machine']}, quickstart, {a.steps} steps at logging_steps=1, median of {a.repeats}\n\n"
                  f"{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
