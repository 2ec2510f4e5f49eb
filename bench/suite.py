"""One table of every benchmark's latest result: what was measured, the figure, its baseline and the
ratio, read from the JSON files the bench scripts wrote to bench/results/, with the machine this ran on
(each row also names the machine and the date of its own result file). Written to bench/results/SUMMARY.md.

    python bench/suite.py               # summarize what is there
    python bench/suite.py --run         # run every bench script first, with its defaults (~1 h on 2 cores)
    python bench/suite.py --run --quick # few steps, 1 repeat: checks the scripts; its noisy figures replace the results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from common import RESULTS, ROOT, machine

# script -> arguments with --quick
SCRIPTS = {
    "startup": ["--repeats", "1"],
    "ray_speed": ["--steps", "20", "--repeats", "1"],
    "vs_trl": ["--steps", "10", "--repeats", "1", "--only", "matched"],
    "scaling": ["--steps", "10", "--repeats", "1"],
    "packing": ["--steps", "10", "--repeats", "1"],
    "rebalance": ["--steps", "8", "--repeats", "1"],
    "eval_order": ["--repeats", "1"],
    "sequence_parallel": ["--length", "4096", "--steps", "4"],
    "checkpoint_io": ["--steps", "2", "--repeats", "1"],
    "tokenize_cache": ["--rows", "5000", "--repeats", "1"],
}


def _rows(name: str, d: dict) -> list[tuple[str, str, str, str]]:
    """(what, figure, baseline, ratio) rows of one result file; unknown shapes give none."""
    if name == "startup":
        m = d["median_s"]
        return [("seconds to first step, embedded Ray (2 workers)", f"{m['ray']:.1f} s", f"torchrun {m['torchrun']:.1f} s",
                 f"{d['ray_over_torchrun']:.2f}x"),
                ("seconds to first step, local launcher", f"{m['local']:.1f} s", f"torchrun {m['torchrun']:.1f} s",
                 f"{m['local'] / m['torchrun']:.2f}x")] + (
               [("seconds to first step, local launcher forked warm (`sft-dist warm`)", f"{m['local_warm']:.1f} s",
                 f"local, cold {m['local']:.1f} s", f"{m['local_warm'] / m['local']:.2f}x")] if "local_warm" in m else [])
    if name == "ray_speed":
        m, r = d["median"], d["ratios"]
        rows = [(f"steady steps/s at logging_steps=1, embedded Ray (2 workers, {d['meta']['steps']} steps)",
                 f"{m['ray']['steady_steps_per_s']:.1f}", f"local launcher {m['local']['steady_steps_per_s']:.1f}",
                 f"{r['steady_steps_per_s_ray_over_local']:.2f}x"),
                ("seconds to first step, embedded Ray (same runs)", f"{m['ray']['first_step_s']:.1f} s",
                 f"torchrun {m['torchrun']['first_step_s']:.1f} s", f"{r['first_step_s_ray_over_torchrun']:.2f}x"),
                ("CPU seconds to first step, embedded Ray (all its processes)", f"{m['ray']['first_step_cpu_s']:.1f}",
                 f"torchrun {m['torchrun']['first_step_cpu_s']:.1f}", f"{r['first_step_cpu_s_ray_over_torchrun']:.2f}x")]
        if "ray_job" in m:
            rows += [("seconds to first step, `ray job submit` to a running head (same runs)",
                      f"{m['ray_job']['first_step_s']:.1f} s", f"torchrun {m['torchrun']['first_step_s']:.1f} s",
                      f"{r['first_step_s_ray_job_over_torchrun']:.2f}x"),
                     ("seconds to exit, `ray job submit` to a running head (same runs)",
                      f"{m['ray_job']['wall_s']:.1f} s", f"torchrun {m['torchrun']['wall_s']:.1f} s",
                      f"{r['wall_s_ray_job_over_torchrun']:.2f}x")]
        return rows
    if name == "vs_trl":
        labels = {"matched": "loss tokens/s, same settings", "defaults": "loss tokens/s, defaults",
                  "packing": "loss tokens/s, data.packing vs TRL defaults"}
        return [(f"{labels.get(k, k)} (2 workers)", f"{r['sft_dist_tokens_per_s']:.0f}",
                 f"TRL script {r['trl_tokens_per_s']:.0f}", f"{r['ratio']:.2f}x") for k, r in d["results"].items()]
    if name == "packing":
        on, off = d["runs"]["true"], d["runs"]["false"]
        return [("loss tokens per CPU s with data.packing (1 worker)", f"{on['loss_tokens_per_cpu_s']:.0f}",
                 f"no packing {off['loss_tokens_per_cpu_s']:.0f}", f"{d['speedup_cpu']:.2f}x"),
                ("padding fraction with data.packing", f"{on['padding_fraction']:.3f}",
                 f"no packing {off['padding_fraction']:.3f}", f"{on['padding_fraction'] / off['padding_fraction']:.2f}x")]
    if name == "rebalance":
        out = []
        for a in (1, 4):
            on, off = d["rows"][f"batch_rebalance, accumulation {a}"], d["rows"][f"random, accumulation {a}"]
            out.append((f"steps/s, train_sampling_strategy batch_rebalance, 2 workers, accumulation {a} (padding "
                        f"{on['padding_fraction']:.2f}; loss max rel diff {on['loss_max_rel_diff']:.0e})",
                        f"{1 / on['wall_s_per_step']:.2f}",
                        f"random {1 / off['wall_s_per_step']:.2f} (padding {off['padding_fraction']:.2f})",
                        f"{d['speedup'][str(a)]:.2f}x"))
        return out
    if name == "sequence_parallel":
        rows = list(d["rows"].values())
        return [(f"memory training adds per rank, rows of {d['setup']['length']:,} tokens, backend.sequence_parallel_size "
                 f"2 (loss max rel diff {rows[1]['loss_max_rel_diff']:.0e})", f"{rows[1]['step_added_mib']:.0f} MiB",
                 f"1 worker, whole rows {rows[0]['step_added_mib']:.0f} MiB", f"{d['ratio']:.2f}x")]
    if name == "eval_order":
        m = d["median_s"]
        return [(f"eval seconds, {d['setup']['rows']} long-tailed rows, rows sorted longest first (1 worker; loss "
                 f"rel diff {d['loss_rel_diff']:.0e})", f"{m['sorted']:.2f} s", f"file order {m['file']:.2f} s",
                 f"{d['speedup']:.2f}x faster")]
    if name == "tokenize_cache":
        c = {r["case"]: r for r in d["results"]}
        rows = d["setup"]["rows"]
        out = []
        if "warm" in c and "cold" in c:
            out.append((f"tokenized-data cache hit, {rows:,} rows", f"{c['warm']['seconds']:.3f} s",
                        f"cold build {c['cold']['seconds']:.1f} s",
                        f"{c['cold']['seconds'] / c['warm']['seconds']:.0f}x faster"))
        if "cold" in c and "map_batched" in c:
            out.append((f"cold cache build, {rows:,} rows", f"{c['cold']['seconds']:.1f} s",
                        f"batched datasets.map floor {c['map_batched']['seconds']:.1f} s",
                        f"{c['cold']['seconds'] / c['map_batched']['seconds']:.2f}x"))
        return out
    if name == "plan_memory":
        ratios = [r["predicted"]["peak"] / r["measured"]["rss_delta"] for r in d["runs"]
                  if r.get("measured", {}).get("rss_delta")]
        if not ratios:
            return []
        return [("predicted peak memory per rank (`sft-dist plan`)", f"{len(ratios)} backend/adapter setups",
                 "measured RSS growth", f"{min(ratios):.2f}-{max(ratios):.2f}x")]
    if name == "scaling":
        m, th = d["median_tokens_per_s"], d["meta"]["threads_per_worker"]
        rows = [(f"loss tokens/s, 2 workers x {th['2 workers']} thread(s), DDP", f"{m['2 workers']:.0f}",
                 f"1 worker x {th['1 worker']} thread(s) {m['1 worker']:.0f}",
                 f"{d['speedup']:.2f}x (efficiency {d['efficiency']:.0%})")]
        if d.get("speedup_vs_one_thread"):
            rows.append(("loss tokens/s, 2 workers (2 cores) vs 1 worker (1 core)", f"{m['2 workers']:.0f}",
                         f"1 worker x 1 thread {m['1 worker, 1 thread']:.0f}",
                         f"{d['speedup_vs_one_thread']:.2f}x (efficiency {d['speedup_vs_one_thread'] / 2:.0%})"))
        return rows
    if name == "checkpoint_io":
        out = []
        for b, r in d["results"].items():
            out.append((f"checkpoint save, {b}", f"{r['save_s']:.2f} s, {_mb(r['checkpoint_bytes'])}",
                        f"plain safetensors save {r['plain_save_s']:.3f} s, adapter {_mb(r['adapter_bytes'])}",
                        f"{r['save_over_plain']:.1f}x time, {r['bytes_over_adapter']:.1f}x bytes"))
            if r.get("resume_s") is not None:
                out.append((f"checkpoint restore, {b}", f"{r['resume_s']:.2f} s",
                            f"plain safetensors load {r['plain_load_s']:.3f} s", f"{r['resume_over_plain']:.1f}x"))
        return out
    return []


def _when(path: Path) -> str:
    """The date of the commit that last changed a result, or of the file itself if changed since (a rerun)."""
    git = ["git", "-C", str(ROOT)]
    changed = subprocess.run([*git, "status", "--porcelain", "--", str(path)], capture_output=True, text=True,
                             check=False)
    if changed.returncode == 0 and not changed.stdout.strip():
        log = subprocess.run([*git, "log", "-1", "--format=%cs", "--", str(path)], capture_output=True, text=True,
                             check=False)
        if log.stdout.strip():
            return log.stdout.strip()
    return datetime.date.fromtimestamp(path.stat().st_mtime).isoformat()


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def summarize() -> str:
    lines = ["| bench | measured | figure | baseline | ratio | result machine, date |", "|---|---|---|---|---|---|"]
    for path in sorted(RESULTS.glob("*.json")):
        d = json.loads(path.read_text())
        meta = d.get("meta") or d.get("setup") or {}
        when = _when(path)
        where = f"{meta['machine']}, {when}" if "machine" in meta else when
        try:
            rows = _rows(path.stem, d)
        except (KeyError, TypeError, ZeroDivisionError) as e:  # an older shape: say so, do not stop
            rows = [("(unreadable result)", f"{type(e).__name__}: {e}", "", "")]
        lines += [f"| {path.stem} | {what} | {fig} | {base} | {ratio} | {where} |" for what, fig, base, ratio in rows]
    head = (f"Benchmark summary, {machine()}, Python {platform.python_version()}, "
            f"{datetime.date.today().isoformat()}")
    return f"{head}\n\n" + "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="store_true", help="run every bench script first")
    p.add_argument("--quick", action="store_true", help="with --run: few steps, 1 repeat")
    p.add_argument("--only", help=f"with --run: comma-separated scripts of {','.join(SCRIPTS)}")
    a = p.parse_args()
    if a.run:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        for name in a.only.split(",") if a.only else SCRIPTS:
            cmd = [sys.executable, str(ROOT / "bench" / f"{name}.py"), *(SCRIPTS[name] if a.quick else [])]
            print(f"$ {' '.join(cmd[1:])}", flush=True)
            if subprocess.run(cmd, env=env, check=False).returncode:
                print(f"{name} failed; summarizing the results there are", file=sys.stderr)
    text = summarize()
    print(text)
    (RESULTS / "SUMMARY.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
