"""Checkpoint save and restore per backend, against a plain save of the same adapter.

For each backend (DDP, DeepSpeed ZeRO-2 and ZeRO-3, FSDP2 full shard; 2 workers on this machine) a short
training of bench/vs_trl.py's random Llama (hidden 256, 4 layers, 4,000 rows), LoRA r=8 all-linear (--rank
for a larger adapter) plus the output head (modules_to_save, as the quickstart ships; --no-head for LoRA
alone), saves one checkpoint at its last step; a second run in the same output_dir resumes from it and
trains one more step. Measured:

- save seconds: `checkpoint_save_s` of run_summary.json (rank 0's wall time in save_checkpoint: shards,
  RNG, train state, hashing, manifest, rename), and the checkpoint's bytes on disk (every file);
- restore seconds: `resume_s` of the resumed run (loading the shards, optimizer and scheduler state);
- the baseline, in this process: the adapter's size (adapter_model.safetensors of the first run), and a
  plain `safetensors` save (with fsync) and load of that state dict, and a `torch.save` for reference.

Ratios: checkpoint bytes / adapter bytes (the optimizer's two Adam moments make ~3x), save seconds / plain
save seconds, restore seconds / plain load seconds. Medians over --repeats, backends alternated.

    python bench/checkpoint_io.py [--steps 3] [--repeats 3] [--backends ddp,zero2,zero3,fsdp_full_shard] [--rank 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, run_sft_dist, write_results
from vs_trl import MODEL, prepare

ROOT = Path(__file__).resolve().parents[1]
DS, FSDP = ROOT / "configs" / "deepspeed", ROOT / "configs" / "fsdp"
BACKENDS = {
    "ddp": {"type": "ddp"},
    "zero2": {"type": "deepspeed", "config": str(DS / "zero2.json")},
    "zero3": {"type": "deepspeed", "config": str(DS / "zero3.json")},
    "fsdp_full_shard": {"type": "fsdp", "config": str(FSDP / "full_shard.yaml")},
}
PLAIN_REPEATS = 5  # in-process baseline timings per run: cheap, so more of them


def train(work: Path, model: Path, data: Path, backend: str, *, steps: int, save: bool, head: bool,
          rank: int) -> dict:
    """One `sft-dist train` of `backend`; its run_summary.json. save=False resumes the last run's checkpoint."""
    out = work / backend
    if save:
        shutil.rmtree(out, ignore_errors=True)
    lora = {"r": rank, "alpha": 2 * rank, "dropout": 0.0, "target_modules": "all-linear"}
    if head:
        lora["modules_to_save"] = ["lm_head"]
    cfg = {"output_dir": str(out), "model": {"name_or_path": str(model)}, "lora": lora,
           "data": {"train_files": str(data), "format": "prompt_completion", "max_length": 256},
           "training": {"max_steps": steps if save else steps + 1, "per_device_train_batch_size": 4,
                        "learning_rate": 1e-4, "logging_steps": 1, "eval_strategy": "no", "seed": 42,
                        **({"save_strategy": "steps", "save_steps": steps} if save else {"save_strategy": "no"})},
           "backend": BACKENDS[backend],
           "launcher": {"type": "local", "num_workers": 2}}
    run_sft_dist(cfg, work / f"{backend}.yaml", f"{backend} ({'save' if save else 'resume'})")
    summary = json.loads((out / "run_summary.json").read_text())
    if save:
        ckpt = out / "checkpoints" / f"checkpoint-{steps}"
        summary["disk_bytes"] = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        summary["adapter_file"] = str(out / "adapter" / "adapter_model.safetensors")
    elif summary.get("resumed_step") != steps or summary.get("resume_s") is None:
        raise SystemExit(f"{backend}: the second run did not resume from step {steps} (run_summary: "
                         f"resumed_step={summary.get('resumed_step')}, resume_s={summary.get('resume_s')})")
    return summary


def plain(adapter_file: str) -> dict[str, float]:
    """Median seconds of a plain safetensors save (fsynced), torch.save (fsynced) and safetensors load."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(adapter_file)

    def timed(fn) -> float:
        times = []
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "state"
            for _ in range(PLAIN_REPEATS):
                t0 = time.perf_counter()
                fn(target)
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def fsynced(write):
        def fn(target: Path) -> None:
            write(target)
            fd = os.open(target, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        return fn

    return {"plain_save_s": timed(fsynced(lambda t: save_file(state, str(t)))),
            "torch_save_s": timed(fsynced(lambda t: torch.save(state, t))),
            "plain_load_s": timed(lambda t: load_file(adapter_file))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated, of {','.join(BACKENDS)}")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (a larger adapter: more bytes to move)")
    p.add_argument("--no-head", dest="head", action="store_false", help="LoRA only, no trained output head")
    p.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench_checkpoint_io")
    a = p.parse_args()
    backends = a.backends.split(",")
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        p.error(f"unknown backends {sorted(unknown)}; choose from {','.join(BACKENDS)}")
    a.work.mkdir(parents=True, exist_ok=True)
    model, data = prepare(a.work)
    keys = ("save_s", "resume_s", "checkpoint_bytes", "adapter_bytes", "plain_save_s", "torch_save_s", "plain_load_s")
    runs: dict[str, dict[str, list]] = {b: {k: [] for k in keys} for b in backends}
    for i in range(a.repeats):
        for b in backends:
            t0 = time.time()
            saved = train(a.work, model, data, b, steps=a.steps, save=True, head=a.head, rank=a.rank)
            base = plain(saved["adapter_file"])
            resumed = train(a.work, model, data, b, steps=a.steps, save=False, head=a.head, rank=a.rank)
            got = {"save_s": saved["checkpoint_save_s"], "resume_s": resumed["resume_s"],
                   "checkpoint_bytes": saved["disk_bytes"], "adapter_bytes": saved["adapter_bytes"], **base}
            for k in keys:
                runs[b][k].append(got[k])
            print(f"repeat {i + 1} {b}: save {got['save_s']:.2f} s ({got['checkpoint_bytes'] / 2**20:.1f} MiB), "
                  f"restore {got['resume_s']:.2f} s; plain save {base['plain_save_s']:.3f} s "
                  f"({got['adapter_bytes'] / 2**20:.1f} MiB), load {base['plain_load_s']:.3f} s "
                  f"({time.time() - t0:.0f} s)", flush=True)
    results = {}
    for b in backends:
        med = {k: statistics.median(v) for k, v in runs[b].items()}
        results[b] = {**med, "bytes_over_adapter": med["checkpoint_bytes"] / med["adapter_bytes"],
                      "save_over_plain": med["save_s"] / med["plain_save_s"],
                      "resume_over_plain": med["resume_s"] / med["plain_load_s"], "runs": runs[b]}
    lines = ["| backend | checkpoint MiB | / adapter | save s | / plain save | restore s | / plain load |",
             "|---|---|---|---|---|---|---|"]
    for b, r in results.items():
        lines.append(f"| {b} | {r['checkpoint_bytes'] / 2**20:.1f} | {r['bytes_over_adapter']:.2f}x | "
                     f"{r['save_s']:.2f} | {r['save_over_plain']:.1f}x | {r['resume_s']:.2f} | "
                     f"{r['resume_over_plain']:.1f}x |")
    r0 = results[backends[0]]
    table = "\n".join(lines) + (
        f"\n\nBaseline: the adapter ({r0['adapter_bytes'] / 2**20:.1f} MiB of safetensors), saved with "
        f"safetensors.save_file + fsync in {r0['plain_save_s']:.3f} s (torch.save + fsync {r0['torch_save_s']:.3f} s), "
        f"loaded in {r0['plain_load_s']:.3f} s.")
    print(table)
    meta = {"machine": machine(), "workers": 2, "steps": a.steps, "repeats": a.repeats, "model": MODEL,
            "adapter": f"LoRA r={a.rank} all-linear" + (" + lm_head" if a.head else ""), "plain_repeats": PLAIN_REPEATS}
    write_results("checkpoint_io", {"meta": meta, "results": results},
                  f"{meta['machine']}, 2 workers, {meta['adapter']}, median of {a.repeats}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
