"""Seconds from `sft-dist train` (or torchrun) starting to the first optimizer step being logged, per launcher:
local (2 worker processes), torchrun (2 processes), embedded Ray (a local Ray cluster started for the run, 2
workers); and the Ray overhead as a ratio to torchrun. The quickstart config, 3 steps, the tokenized-data cache
warm (one run before timing), median over --repeats runs, launchers alternated.

    python bench/startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUICKSTART = ROOT / "configs" / "examples" / "quickstart.yaml"
COMMON = ["training.max_steps=3", "training.eval_strategy=no", "training.save_strategy=no"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(launcher: str, out: Path) -> list[str]:
    args = ["train", str(QUICKSTART), f"output_dir={out}", *COMMON]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
                str(free_port()), "--no-python", str(BIN / "sft-dist"), *args]
    if launcher == "ray":
        return [str(BIN / "sft-dist"), *args, "launcher.type=ray"]
    return [str(BIN / "sft-dist"), *args]


def to_first_step(launcher: str, work: Path) -> float:
    out = work / launcher
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                                             "RAY_ADDRESS")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(command(launcher, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            text=True)
    metrics, first = out / "metrics.jsonl", None
    while proc.poll() is None and first is None:
        if metrics.exists() and '"step": 1' in metrics.read_text():
            first = time.perf_counter() - t0
        time.sleep(0.05)
    _, err = proc.communicate(timeout=600)
    if proc.returncode:
        raise SystemExit(f"{launcher} failed:\n{err[-3000:]}")
    if first is None:  # finished between two polls
        first = time.perf_counter() - t0
    return first


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench_startup")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    launchers = ["local", "torchrun", "ray"]
    to_first_step("local", a.work)  # warms the data cache and the OS file cache
    runs: dict[str, list[float]] = {name: [] for name in launchers}
    for i in range(a.repeats):
        for name in launchers:
            runs[name].append(to_first_step(name, a.work))
            print(f"repeat {i + 1}: {name} {runs[name][-1]:.1f} s to the first step", flush=True)
    med = {name: statistics.median(v) for name, v in runs.items()}
    lines = ["| launcher | seconds to first step (median) | runs |", "|---|---|---|"]
    lines += [f"| {name} | {med[name]:.1f} | {', '.join(f'{x:.1f}' for x in runs[name])} |" for name in launchers]
    table = "\n".join(lines) + f"\n\nRay / torchrun: {med['ray'] / med['torchrun']:.2f}x"
    print(table)
    res = ROOT / "bench" / "results"
    res.mkdir(exist_ok=True)
    meta = {"machine": f"{os.cpu_count()} CPU cores, no GPU", "repeats": a.repeats, "workers": 2}
    (res / "startup.json").write_text(json.dumps({"meta": meta, "median_s": med, "runs_s": runs,
                                                  "ray_over_torchrun": med["ray"] / med["torchrun"]}, indent=2))
    (res / "startup.md").write_text(f"{meta['machine']}, quickstart, median of {a.repeats}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
