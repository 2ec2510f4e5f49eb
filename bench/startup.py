"""Seconds from `sft-dist train` (or torchrun) starting to the first optimizer step being logged, and to the
command's exit, per launcher: local (2 worker processes), local_warm (the same, its workers forked from a
`sft-dist warm` template started once before any timing and stopped by its PID after), torchrun (2 processes),
embedded Ray (a local Ray cluster started for the run, 2 workers forked from the run's own template:
launcher.warm_workers), ray_warm (the same with SFT_DIST_WARM naming that `sft-dist warm`: the driver and the Ray
workers fork from it); the Ray overhead as a ratio to torchrun, and warm's as a ratio to a cold local launch. The
quickstart config, 3 steps, the tokenized-data cache warm (one run before timing), median over --repeats runs,
launchers alternated.

    python bench/startup.py [--repeats 3] [--launchers local,local_warm,torchrun,ray,ray_warm]
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


def bench_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                                             "RAY_ADDRESS", "SFT_DIST_WARM")}


def start_template(sock: Path) -> subprocess.Popen:
    """`sft-dist warm` on `sock`, once it has imported everything (the bench's environment, as the runs')."""
    log = sock.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.Popen([str(BIN / "sft-dist"), "warm", "--socket", str(sock)], env=bench_env(), stdout=f,
                                stderr=subprocess.STDOUT)
    while "export SFT_DIST_WARM=" not in log.read_text():
        if proc.poll() is not None:
            raise SystemExit(f"sft-dist warm exited:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc


def command(launcher: str, out: Path) -> list[str]:
    args = ["train", str(QUICKSTART), f"output_dir={out}", *COMMON]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
                str(free_port()), "--no-python", str(BIN / "sft-dist"), *args]
    if launcher in ("ray", "ray_warm"):
        return [str(BIN / "sft-dist"), *args, "launcher.type=ray"]
    return [str(BIN / "sft-dist"), *args]


def to_first_step(launcher: str, work: Path, warm: Path | None = None) -> tuple[float, float]:
    """(seconds to the first step, seconds to the command's exit)."""
    out = work / launcher
    shutil.rmtree(out, ignore_errors=True)
    env = bench_env()
    if launcher in ("local_warm", "ray_warm"):
        env["SFT_DIST_WARM"] = str(warm)
    t0 = time.perf_counter()
    proc = subprocess.Popen(command(launcher, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            text=True)
    metrics, first = out / "metrics.jsonl", None
    while proc.poll() is None and first is None:
        if metrics.exists() and '"step": 1' in metrics.read_text():
            first = time.perf_counter() - t0
        time.sleep(0.05)
    _, err = proc.communicate(timeout=600)
    done = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{launcher} failed:\n{err[-3000:]}")
    if launcher in ("local_warm", "ray_warm") and "forked warm" not in err:
        raise SystemExit(f"{launcher} started cold:\n{err[-3000:]}")
    if first is None:  # finished between two polls
        first = done
    return first, done


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--launchers", default="local,local_warm,torchrun,ray,ray_warm")
    p.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench_startup")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    launchers = a.launchers.split(",")
    to_first_step("local", a.work)  # warms the data cache and the OS file cache
    template = start_template(a.work / "warm.sock") if {"local_warm", "ray_warm"} & set(launchers) else None
    runs: dict[str, list[float]] = {name: [] for name in launchers}
    total: dict[str, list[float]] = {name: [] for name in launchers}
    try:
        for i in range(a.repeats):
            for name in launchers:
                first, done = to_first_step(name, a.work, a.work / "warm.sock")
                runs[name].append(first)
                total[name].append(done)
                print(f"repeat {i + 1}: {name} {first:.1f} s to the first step, {done:.1f} s to exit", flush=True)
    finally:
        if template is not None:
            template.terminate()
            template.wait(timeout=60)
    med = {name: statistics.median(v) for name, v in runs.items()}
    med_total = {name: statistics.median(v) for name, v in total.items()}
    lines = ["| launcher | seconds to first step (median) | seconds to exit (median) | runs (first step) |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {med[name]:.1f} | {med_total[name]:.1f} | {', '.join(f'{x:.1f}' for x in runs[name])} |"
              for name in launchers]
    ratios = {}
    if "ray" in med and "torchrun" in med:
        ratios["ray_over_torchrun"] = med["ray"] / med["torchrun"]
    if "ray_warm" in med and "torchrun" in med:
        ratios["ray_warm_over_torchrun"] = med["ray_warm"] / med["torchrun"]
    if "local_warm" in med and "local" in med:
        ratios["local_warm_over_local"] = med["local_warm"] / med["local"]
    table = "\n".join(lines) + "\n\n" + "; ".join(f"{k.replace('_', ' ')}: {v:.2f}x" for k, v in ratios.items())
    print(table)
    res = ROOT / "bench" / "results"
    res.mkdir(exist_ok=True)
    meta = {"machine": f"{os.cpu_count()} CPU cores, no GPU", "repeats": a.repeats, "workers": 2,
            "date": time.strftime("%Y-%m-%d")}
    (res / "startup.json").write_text(json.dumps({"meta": meta, "median_s": med, "median_exit_s": med_total,
                                                  "runs_s": runs, "exit_s": total, **ratios}, indent=2))
    (res / "startup.md").write_text(
        f"{meta['machine']}, quickstart, median of {a.repeats}, {meta['date']}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
