"""Numerical equivalence of backends and batch geometries: one config, the same training.

Runs the quickstart (tiny Llama, LoRA, variable-length alpaca data, fp32, fixed seed) for N steps with
2 gloo workers under DDP, DeepSpeed ZeRO-1/2/3 (+offload) and FSDP2 (full and hybrid shard), and at one
global batch of 16 with three geometries; prints the max relative deviation of each run's per-step loss
and final adapter from the DDP run, and writes the table as JSON.

Every run checkpoints at steps/2. The `resume_*` runs then continue a copy of a finished run from that
checkpoint (its final checkpoint and adapter removed), on the same or another number of workers, and are
compared with the run they continue: same world size must be bitwise identical, another within --tol.

    python bench/equivalence.py --out outputs/equivalence [--steps 20] [--only ddp,zero3] [--jobs 2]

`--jobs N` runs N of the runs at a time (each a separate `sft-dist train`, its workers at the thread count they
would have alone): a small model's run leaves the cores idle through its start and its saves. The numbers are
the same; only the wall time changes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "examples" / "quickstart.yaml"
DS = ROOT / "configs" / "deepspeed"
FSDP = ROOT / "configs" / "fsdp"

from common import run_concurrently  # noqa: E402 (bench/, this script's directory)

# Runs compared with "ddp" (2 workers x micro-batch 8 x accumulation 1 = 16 sequences per step).
BACKENDS = {
    "ddp": [],
    "zero1": ["backend.type=deepspeed", f"backend.config={DS / 'zero1.json'}"],
    "zero2": ["backend.type=deepspeed", f"backend.config={DS / 'zero2.json'}"],
    "zero3": ["backend.type=deepspeed", f"backend.config={DS / 'zero3.json'}"],
    "zero2_offload": ["backend.type=deepspeed", f"backend.config={DS / 'zero2_offload.json'}"],
    "zero3_offload": ["backend.type=deepspeed", f"backend.config={DS / 'zero3_offload.json'}"],
    "fsdp_full_shard": ["backend.type=fsdp", f"backend.config={FSDP / 'full_shard.yaml'}"],
    # the file's other options: FSDP's activation checkpointing, keep parameters gathered until backward
    "fsdp_ckpt_no_reshard": ["backend.type=fsdp", f"backend.config={FSDP / 'full_shard.yaml'}",
                             "backend.options={activation_checkpointing: true, reshard_after_forward: false}"],
}
# Hybrid sharding needs a 2-D mesh: 4 workers as 2 replicas x 2 shards, compared with DDP on 4 workers
# at the same global batch (a different number of workers sums gradients in a different order).
FOUR = ["launcher.num_workers=4", "training.per_device_train_batch_size=4"]
HYBRID = {
    "ddp_4workers": FOUR,
    "fsdp_hybrid_shard": [*FOUR, "backend.type=fsdp", f"backend.config={FSDP / 'hybrid_shard.yaml'}",
                          "backend.options={shard_size: 2}"],
}
GEOMETRIES = {
    "geometry_1x4x4": ["launcher.num_workers=1", "training.per_device_train_batch_size=4",
                       "training.gradient_accumulation_steps=4"],
    "geometry_2x4x2": ["training.per_device_train_batch_size=4", "training.gradient_accumulation_steps=2"],
}
# resumed run -> (the run it continues, overrides added to that run's)
RESUMES = {
    "resume_ddp": ("ddp", []),
    "resume_zero2": ("zero2", []),
    "resume_zero3": ("zero3", []),
    "resume_fsdp": ("fsdp_full_shard", []),
    "resume_ddp_2to1": ("ddp", ["launcher.num_workers=1"]),  # accumulation 1 -> 2
    "resume_geometry_1to2": ("geometry_1x4x4", ["launcher.num_workers=2"]),  # accumulation 4 -> 2
    "resume_fsdp_2to4": ("fsdp_full_shard", ["launcher.num_workers=4", "training.per_device_train_batch_size=4"]),
}
# Same for every run: the quickstart as shipped (LoRA on every linear layer + a trained output head).
COMMON = ["training.learning_rate=5e-3", "training.warmup_steps=0",
          "training.eval_strategy=no", "training.save_strategy=steps"]


def run(name: str, overrides: list[str], out: Path, steps: int, *, fresh: bool = True) -> dict:
    run_dir = out / name
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "sft_dist", "train", str(QUICKSTART), f"output_dir={run_dir}",
           f"training.max_steps={steps}", f"training.save_steps={steps // 2}", *COMMON, *overrides]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{name} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    summary = json.loads((run_dir / "run_summary.json").read_text())
    return {"name": name, "dir": str(run_dir), "seconds": round(time.perf_counter() - t0, 1), "summary": summary}


def same_base(ref: str, run_dir: str) -> bool | None:
    """Whether a run wrote the random base (base_model/) the DDP run wrote, tensor for tensor (None: none written).
    Each backend builds it its own way (whole, a layer at a time, rank 0 alone, partitioned under zero.Init)."""
    import torch
    from safetensors.torch import load_file

    files = [Path(d) / "base_model" / "model.safetensors" for d in (ref, run_dir)]
    if not all(f.is_file() for f in files):
        return None
    a, b = (load_file(f) for f in files)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def resume(name: str, source: dict, extra: list[str], out: Path, steps: int, matrix: dict) -> dict:
    """Continue a copy of `source` from its middle checkpoint, as if it had stopped there."""
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(source["dir"], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / f"checkpoint-{steps}")
    for leftover in ("adapter", "model", "run_summary.json"):
        target = run_dir / leftover
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    res = run(name, [*matrix[source["name"]], *extra], out, steps, fresh=False)
    if res["summary"].get("resumed_step") != steps // 2:
        raise SystemExit(f"{name} did not resume from checkpoint-{steps // 2}: {res['summary'].get('resumed_from')}")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "equivalence")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--only", help="comma-separated run names (ddp is always run)")
    ap.add_argument("--skip", default="", help="comma-separated run names to leave out (the test suite's subset)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (the resumes after the runs they continue)")
    args = ap.parse_args()

    from sft_dist.compare import compare

    matrix = {**BACKENDS, **GEOMETRIES, **HYBRID}
    wanted = set(args.only.split(",")) if args.only else set(matrix)
    if "fsdp_hybrid_shard" in wanted:
        wanted.add("ddp_4workers")
    skip = set(filter(None, args.skip.split(",")))
    names = ["ddp"] + [n for n in matrix if n != "ddp" and n in wanted and n not in skip]
    results = run_concurrently(lambda n: run(n, matrix[n], args.out, args.steps), names, args.jobs)
    by_name = {r["name"]: r for r in results}
    resumes = [(name, source, extra) for name, (source, extra) in RESUMES.items()
               if source in by_name and name not in skip and (not args.only or name in wanted or source in wanted)]
    results += run_concurrently(lambda r: resume(r[0], by_name[r[1]], r[2], args.out, args.steps, matrix), resumes,
                                args.jobs)
    dirs = {r["name"]: r["dir"] for r in results}
    sources = {name: src for name, (src, _) in RESUMES.items()}
    rows = []
    print(f"{'run':<20} {'wrapper':<24} {'params/rank':>11} {'optim/rank':>10} {'loss max rel':>12} "
          f"{'adapter rel L2':>14} {'adapter max rel':>15} {'s':>5}  ok  bitwise")
    for res in results:
        # hybrid vs DDP on its own 4 workers (bitwise-comparable sums) unless that row was skipped
        four = "ddp_4workers" if "ddp_4workers" in dirs else "ddp"
        ref = four if res["name"] == "fsdp_hybrid_shard" else sources.get(res["name"], "ddp")
        dev = compare(dirs[ref], res["dir"])
        s = res["summary"]
        rank0 = s["ranks"][0]
        row = {"run": res["name"], "dir": res["dir"], "reference": ref, "wrapper": s["backend_applied"].get("wrapper"),
               "zero_stage": s["backend_applied"].get("zero_stage"), "world_size": s["world_size"],
               "param_numel_rank0": rank0["param_numel_local"], "total_params": s["total_params"],
               "optimizer_state_numel_rank0": rank0["optimizer_state_numel_local"],
               "trainable_params": s["trainable_params"], "mesh": s["backend_applied"].get("mesh"),
               "random_base": [r.get("random_base") for r in s["ranks"]],
               "loss_max_rel": dev.loss_max_rel,
               "weights_rel_l2": dev.weights_rel_l2, "weights_max_rel": dev.weights_max_rel, "steps": dev.steps, "seconds": res["seconds"],
               "bitwise": dev.bitwise, "resumed_step": s.get("resumed_step"),
               "checkpoint_bytes": s.get("checkpoint_bytes"), "adapter_bytes": s.get("adapter_bytes"),
               "base_model_as_ddp": same_base(dirs["ddp"], res["dir"]), "ok": dev.within(args.tol)}
        rows.append(row)
        wrapper = str(row["wrapper"]) + (f" z{row['zero_stage']}" if row["zero_stage"] is not None else "")
        print(f"{row['run']:<20} {wrapper:<24} {row['param_numel_rank0']:>11,} "
              f"{row['optimizer_state_numel_rank0']:>10,} {row['loss_max_rel']:>12.2e} "
              f"{row['weights_rel_l2']:>14.2e} {row['weights_max_rel']:>15.2e} {row['seconds']:>5}  "
              f"{'yes' if row['ok'] else 'NO':<3} {'yes' if row['bitwise'] else 'no'}")
    (args.out / "equivalence.json").write_text(json.dumps(rows, indent=2))
    print(f"max deviation over all runs: loss {max(r['loss_max_rel'] for r in rows):.2e}, "
          f"adapter rel L2 {max(r['weights_rel_l2'] for r in rows):.2e}, "
          f"adapter max elementwise {max(r['weights_max_rel'] for r in rows):.2e} (tolerance {args.tol:g}); "
          f"resumed runs bitwise equal to the run they continue: "
          f"{', '.join(r['run'] for r in rows if r['resumed_step'] and r['bitwise']) or 'none'}; "
          f"JSON: {args.out / 'equivalence.json'}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
