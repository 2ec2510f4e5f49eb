"""Ray next to the local launcher and torchrun on the same tiny job (the quickstart, 2 workers, logging every
step, no eval or checkpoints): steady steps/s, seconds and CPU seconds to the first step, and where Ray's
start-up goes. Launchers:

- local, torchrun: `sft-dist train` / `torchrun --nproc-per-node 2 ... sft-dist train`;
- ray: `sft-dist train ... launcher.type=ray`, which starts an embedded single-node Ray for the run;
- ray_job: `ray job submit -- sft-dist train ... launcher.type=ray` to a Ray head already running on 127.0.0.1
  (token authentication on, as in the README; started once, before any timing, and stopped by its PIDs);
- ray_job_node: the same, with a `sft-dist warm` template kept on the node (started with the head, before any
  timing; the job's runtime env names it in SFT_DIST_WARM): the Ray workers fork from it.

Figures:

- steady steps/s = 1 / the median `step_time_s` of steps 6..N in metrics.jsonl (a step's time includes what
  the callbacks did after the step before, e.g. a report to Ray);
- to the first step: from the command starting to step 1 in metrics.jsonl, wall seconds and the CPU seconds
  used by then by the command's process tree and, for ray_job, by the head's (what its processes used since
  the submit; an idle head's own rate is in meta). CPU seconds hardly move with the load other processes put
  on the machine, wall seconds do. Also split by process (Ray names its workers `ray::<actor class>`);
- phases: when each launcher's log first shows a milestone (Ray's lines are Ray 2.60's).

Launchers alternate within each repeat; the tokenized-data cache is warmed first. Medians over --repeats.

    python bench/ray_speed.py [--steps 60] [--repeats 3] [--launchers local,torchrun,ray,ray_job,ray_job_node]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil
from common import ROOT, machine, write_results
from startup import BIN, command, free_port

WARMUP = 5
# (phase name, the log line that ends it); phases absent from a launcher's log are skipped
MILESTONES = {
    "ray": [("driver: imports and config checks", "starting an embedded Ray"),
            ("ray.init (GCS, raylet, agents)", "Ray Train run"),
            ("Train controller", "Attempting to start training worker group"),
            ("worker group + process group", "Started training worker group"),
            ("worker imports (transformers, TRL, peft)", "worker(s) (ray"),
            ("data, model, trainer", "first step")],
    "ray_job": [("job submission, supervisor, driver start", "Ray Train run"),
                ("Train controller", "Attempting to start training worker group"),
                ("worker group + process group", "Started training worker group"),
                ("worker imports (transformers, TRL, peft)", "worker(s) (ray"),
                ("data, model, trainer", "first step")],
    "torchrun": [("agent + worker imports", "worker(s) (torchrun)"), ("data, model, trainer", "first step")],
    "local": [("launcher + worker imports", "worker(s) (local)"), ("data, model, trainer", "first step")],
}
MILESTONES["ray_job_node"] = MILESTONES["ray_job"]
JOBS = ("ray_job", "ray_job_node")
TRAIN_ACTORS = ("TrainController", "SynchronizationActor", "PlacementGroupCleaner", "_AutoscalingCoordinatorActor",
                "DatasetManager", "TrainStateActor", "PreemptionWatcher")


class Head:
    """A Ray head on 127.0.0.1 with token authentication, as the README starts one; stopped by its PIDs."""

    def __init__(self, work: Path, node_template: bool):
        self.env = _clean_env()
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
        self.template = self.socket = None
        if node_template:  # `sft-dist warm` next to the head, in its environment (as the README starts one)
            self.socket = work / "node-template" / "warm.sock"
            self.template = subprocess.Popen([str(BIN / "sft-dist"), "warm", "--socket", str(self.socket)],
                                             stdout=(work / "node-template.log").open("w"), stderr=subprocess.STDOUT,
                                             env=self.env, start_new_session=True)
        dash = free_port()
        self.address = f"http://127.0.0.1:{dash}"
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2"],
            stdout=(work / "head.log").open("w"), stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        deadline = time.monotonic() + 120
        while subprocess.run([str(BIN / "ray"), "job", "list", "--address", self.address], capture_output=True,
                             env=self.env, timeout=60).returncode:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"the Ray head did not start:\n{(work / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
        while self.template is not None and not self.socket.exists():
            if self.template.poll() is not None or time.monotonic() > deadline + 120:
                self.stop()
                raise SystemExit(f"sft-dist warm did not start:\n{(work / 'node-template.log').read_text()[-3000:]}")
            time.sleep(0.5)
        time.sleep(5)  # let its start-up settle
        before = _tree_cpu(self.proc.pid)
        time.sleep(10)
        self.idle_cpu_per_s = (sum(_tree_cpu(self.proc.pid).values()) - sum(before.values())) / 10

    def pids(self) -> list[int]:
        return [self.proc.pid] + ([self.template.pid] if self.template is not None else [])

    def stop(self) -> None:
        tree = []
        for pid in self.pids():
            try:
                tree += [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=20)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                                             "RAY_ADDRESS", "OMP_NUM_THREADS")}


def _tree_cpu(pid: int, names: dict[int, str] | None = None) -> dict[int, float]:
    """pid -> CPU seconds of `pid` and its descendants; fills `names` with each one's process title."""
    out = {}
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    for p in tree:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
            if names is not None:
                title = " ".join(p.cmdline()) or p.name()
                # An actor's worker starts as ray::IDLE; a title read while it changes may come cut short.
                if p.pid not in names or not (title.startswith("ray::IDLE") or names[p.pid].startswith(title)):
                    names[p.pid] = title
        except psutil.Error:
            pass
    return out


def _role(title: str, *, is_root: bool, launcher: str) -> str:
    """Which part of a launch a process is, from its title."""
    if title.startswith("ray::"):
        actor = title[5:].split(".")[0].split()[0]
        if actor == "RayTrainWorker":
            return "train workers"
        if actor in TRAIN_ACTORS:
            return f"Ray Train: {actor}"
        if actor == "JobSupervisor":
            return "job supervisor"
        if actor == "IDLE":
            return "idle prestarted workers"
        return f"Ray: {actor}"
    if is_root:
        return {"local": "launcher", "torchrun": "torchrun agent", "ray": "driver",
                "ray_job": "`ray job submit` client", "ray_job_node": "`ray job submit` client"}[launcher]
    if "sft-dist warm" in title:  # ray_job_node: what the node's template forked that names itself no other way
        return "driver, forked from the node template"
    if "_template_main" in title:  # launcher.warm_workers: distributed/ray_warm.py
        return "warm template (the Ray workers' imports)"
    if "sft_dist.distributed.ray_exec" in title:
        return "warm relays (ray_exec)"
    if "sft-dist train" in title or "-m sft_dist train" in title:  # the local launcher's workers: python -m
        return "driver" if launcher.startswith("ray") else "workers"
    if launcher.startswith("ray") and ("ray-dashboard-" in title or "multiprocessing" in title):
        return "Ray: dashboard modules"
    for daemon in ("gcs_server", "raylet", "dashboard.py", "log_monitor", "monitor.py"):
        if daemon in title:
            return f"Ray: {daemon.removesuffix('.py')}"
    return "other"


def one_run(launcher: str, work: Path, steps: int, head: Head | None = None) -> dict:
    out = work / launcher
    shutil.rmtree(out, ignore_errors=True)
    env = head.env if launcher in JOBS else _clean_env()
    cmd = command("ray" if launcher in JOBS else launcher, out)
    cmd = [a for a in cmd if not a.startswith("training.max_steps=")] + [
        f"training.max_steps={steps}", "training.logging_steps=1"]
    if launcher in JOBS:
        node = ["--runtime-env-json", json.dumps({"env_vars": {"SFT_DIST_WARM": str(head.socket)}})]
        cmd = [str(BIN / "ray"), "job", "submit", "--address", head.address,
               *(node if launcher == "ray_job_node" else []), "--", *cmd]
    head_before = {}
    if launcher in JOBS:  # the head's processes, and the node template's (it forks the workers)
        for pid in head.pids():
            head_before.update(_tree_cpu(pid))
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
    names: dict[int, str] = {}
    metrics, first_cpu = out / "metrics.jsonl", None
    while proc.poll() is None:
        cpu.update(_tree_cpu(proc.pid, names))
        if head is not None and launcher in JOBS:
            for root in head.pids():
                for pid, c in _tree_cpu(root, names).items():
                    cpu[pid] = c - head_before.get(pid, 0.0)
        if first_cpu is None and metrics.exists() and '"step": 1,' in metrics.read_text():
            seen["first step"], first_cpu = time.perf_counter() - t0, dict(cpu)
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    reader.join(timeout=10)
    if proc.returncode or first_cpu is None:
        raise SystemExit(f"{launcher} failed:\n{''.join(lines)[-3000:]}")
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r and r["step"] > WARMUP]
    phases, prev = {}, 0.0
    for name, marker in MILESTONES[launcher]:
        if marker in seen:
            phases[name], prev = round(seen[marker] - prev, 2), seen[marker]
    by_role: dict[str, float] = defaultdict(float)
    for pid, c in first_cpu.items():
        if c > 0.005:
            by_role[_role(names.get(pid, "?"), is_root=pid == proc.pid, launcher=launcher)] += c
    return {"first_step_s": seen["first step"], "first_step_cpu_s": round(sum(first_cpu.values()), 2),
            "steady_steps_per_s": 1 / statistics.median(times) if times else None, "wall_s": wall,
            "phases_s": phases, "first_step_cpu_s_by_process": {k: round(v, 2) for k, v in sorted(
                by_role.items(), key=lambda kv: -kv[1])}}


def summarize(runs: dict[str, list[dict]]) -> dict:
    summary = {}
    for name, rs in runs.items():
        s = {k: statistics.median(r[k] for r in rs)
             for k in ("steady_steps_per_s", "first_step_s", "first_step_cpu_s", "wall_s")}
        for part in ("phases_s", "first_step_cpu_s_by_process"):
            keys = dict.fromkeys(k for r in rs for k in r[part])  # a process seen in some runs only counts 0 in the rest
            s[part] = {k: statistics.median(r[part].get(k, 0.0) for r in rs) for k in keys
                       if part != "phases_s" or all(k in r[part] for r in rs)}
        s["first_step_cpu_s_by_process"] = dict(sorted(s["first_step_cpu_s_by_process"].items(),
                                                        key=lambda kv: -kv[1]))
        summary[name] = s
    return summary


def render(summary: dict, ratios: dict) -> str:
    lines = ["| launcher | steady steps/s | to first step, s | CPU s to first step | whole command, s |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | {s['steady_steps_per_s']:.1f} | {s['first_step_s']:.1f} | {s['first_step_cpu_s']:.1f} | "
              f"{s['wall_s']:.1f} |" for n, s in summary.items()]
    for n, s in summary.items():
        lines += ["", f"{n}, seconds per start-up phase (median):", ""]
        lines += [f"- {ph}: {sec:.1f}" for ph, sec in s["phases_s"].items()]
        lines += ["", f"{n}, CPU seconds to the first step by process (median):", ""]
        lines += [f"- {p}: {sec:.1f}" for p, sec in s["first_step_cpu_s_by_process"].items() if sec >= 0.05]
    lines += ["", *(f"{k}: {v:.2f}x" for k, v in ratios.items())]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--launchers", default="local,torchrun,ray,ray_job,ray_job_node")
    p.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench_ray_speed")
    a = p.parse_args()
    launchers = a.launchers.split(",")
    a.work.mkdir(parents=True, exist_ok=True)
    one_run("local", a.work, 3)  # warms the data cache and the OS file cache
    head = Head(a.work, "ray_job_node" in launchers) if set(JOBS) & set(launchers) else None
    runs: dict[str, list[dict]] = {name: [] for name in launchers}
    try:
        for i in range(a.repeats):
            for name in launchers:
                r = one_run(name, a.work, a.steps, head)
                runs[name].append(r)
                print(f"repeat {i + 1}: {name}: {r['steady_steps_per_s']:.1f} steps/s, first step at "
                      f"{r['first_step_s']:.1f} s ({r['first_step_cpu_s']:.1f} CPU s), exit at {r['wall_s']:.1f} s, "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        if head is not None:
            head.stop()

    summary = summarize(runs)
    ratios = {f"{k}_{ray}_over_{base}": summary[ray][k] / summary[base][k]
              for ray in ("ray", *JOBS) for base in ("local", "torchrun") if ray in summary and base in summary
              for k in ("steady_steps_per_s", "first_step_s", "first_step_cpu_s", "wall_s")}
    table = render(summary, ratios)
    print(table)
    meta = {"machine": machine(), "steps": a.steps, "repeats": a.repeats, "workers": 2, "warmup_steps": WARMUP,
            "date": time.strftime("%Y-%m-%d"), "load_average_at_end": os.getloadavg(),
            "idle_head_cpu_s_per_s": head.idle_cpu_per_s if head else None}
    idle = f"; the idle head used {head.idle_cpu_per_s:.2f} CPU s/s" if head else ""
    write_results("ray_speed", {"meta": meta, "median": summary, "ratios": ratios, "runs": runs},
                  f"{meta['machine']}, quickstart, {a.steps} steps at logging_steps=1, median of {a.repeats}, "
                  f"{meta['date']}, load average at the end {meta['load_average_at_end'][1]:.1f} (5 min){idle}\n\n"
                  f"{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
