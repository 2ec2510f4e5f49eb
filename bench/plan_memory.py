"""`sft-dist plan`'s memory estimate next to what training really held, per rank.

Trains a random-weight Llama of a few hundred MB (fp32) for a few steps with 2 gloo workers under DDP, ZeRO-2,
ZeRO-3 and FSDP2, full fine-tuning, LoRA and 4-bit QLoRA, and compares `sft_dist.plan.memory.estimate_memory`
for the same config with the run summary: parameter, gradient and optimizer-state bytes of the rank, and the
training peak against its RSS growth from just before the model was built (peak RSS - RSS before the model).
RSS is read on the last rank: rank 0 also serializes the random base to disk, a copy the others never make.

    python bench/plan_memory.py [--only ddp_lora,zero3_full] [--steps 3] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
QUICKSTART = ROOT / "configs" / "examples" / "quickstart.yaml"
DS, FSDP = ROOT / "configs" / "deepspeed", ROOT / "configs" / "fsdp"
MODEL = {"model_type": "llama", "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8,
         "num_attention_heads": 12, "num_key_value_heads": 12, "vocab_size": 32000, "max_position_embeddings": 512}
FULL = ["lora.enabled=false"]
Q4 = ["quantization.bits=4"]
ZERO2 = ["backend.type=deepspeed", f"backend.config={DS / 'zero2.json'}"]
ZERO3 = ["backend.type=deepspeed", f"backend.config={DS / 'zero3.json'}"]
FSDP2 = ["backend.type=fsdp", f"backend.config={FSDP / 'full_shard.yaml'}"]
RUNS = {
    "ddp_full": FULL,
    "ddp_lora": [],
    "ddp_lora_ckpt": ["training.activation_checkpointing=true"],
    "zero2_full": FULL + ZERO2,
    "zero3_full": FULL + ZERO3,
    "fsdp_full": FULL + FSDP2,
    "ddp_qlora4": Q4,
    "fsdp_qlora4": Q4 + ["quantization.quant_storage=float32"] + FSDP2,
    "zero3_qlora4": Q4 + ZERO3,
}
# Returned-to-the-OS frees: glibc would otherwise keep freed blocks (and raise its mmap threshold up to 32 MB
# after the first large free), so RSS would only ever grow and overstate what is live.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "2"}
MiB = 1024 * 1024


def long_texts(out: Path) -> Path:
    """Rows longer than data.max_length, so every micro-batch is full (the demo data averages ~30 tokens, and
    batches are padded to their longest row only: the estimate is for full-length batches)."""
    import random

    rng = random.Random(0)
    words = ["memory", "shard", "gradient", "adapter", "rank", "tensor", "optimizer", "layer", "token", "batch"]
    path = out / "long_texts.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"text": " ".join(rng.choice(words) for _ in range(400))} for _ in range(64)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def overrides(name: str, out: Path, steps: int) -> list[str]:
    return [f"output_dir={out / name}", f"data.train_files={out / 'long_texts.jsonl'}", "data.format=text",
            "data.eval_files=null", f"model.init_config={json.dumps(MODEL)}", f"training.max_steps={steps}",
            "training.per_device_train_batch_size=4", "data.max_length=128", "training.eval_strategy=no",
            "training.save_strategy=no", "training.learning_rate=1e-4", "lora.modules_to_save=null", *RUNS[name]]


def predict(over: list[str]) -> dict:
    from sft_dist.config.load import load_config
    from sft_dist.plan.memory import estimate_memory

    cfg = load_config(QUICKSTART, over)
    e = estimate_memory(cfg, world_size=2, device="cpu")
    weights_params = e.detail["param_bytes"]  # the summary counts parameters only, not buffers / quant state
    # the summary counts the optimizer's own state tensors; DeepSpeed's fp32 master partition is not among them
    states = e.optimizer - e.detail["optimizer_master_copy"]
    return {"weights": e.weights, "params": weights_params, "gradients": e.gradients, "optimizer": e.optimizer,
            "optimizer_states": states,
            "activations": e.activations, "total": e.total, "peak": e.detail["peak"], "notes": e.notes,
            "detail": e.detail}


def measure(name: str, over: list[str], out: Path, *, reuse: bool) -> dict:
    env = {**os.environ, **MALLOC_ENV}
    summary = out / name / "run_summary.json"
    cmd = [sys.executable, "-m", "sft_dist", "train", str(QUICKSTART), *over]
    t0 = time.perf_counter()
    if not (reuse and summary.exists()):
        summary.unlink(missing_ok=True)
        r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=ROOT)
        if r.returncode != 0:
            raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
    s = json.loads(summary.read_text())
    last = s["ranks"][-1]
    return {"params": last["param_bytes_local"], "gradients": last["grad_bytes_local"],
            "optimizer": last["optimizer_state_bytes_local"],
            "rss_delta": last["peak_rss_bytes"] - last["rss_before_model_bytes"],
            "rss_delta_rank0": s["ranks"][0]["peak_rss_bytes"] - s["ranks"][0]["rss_before_model_bytes"],
            "total_params": s["total_params"], "trainable_params": s["trainable_params"],
            "seconds": round(time.perf_counter() - t0, 1)}


def ratio(pred: float, meas: float | None) -> str:
    if not meas:
        return "  -  " if not pred else " n/a "
    return f"{pred / meas:5.2f}"


def table(rows: list[dict]) -> list[str]:
    head = ("| run | params MiB pred / meas | grads MiB pred / meas | optimizer states MiB pred / meas "
            "| activations MiB | peak MiB pred / RSS delta |")
    lines = [head, "|" + "---|" * 6]
    for r in rows:
        p, m = r["predicted"], r["measured"]
        p.setdefault("optimizer_states", p["optimizer"] - p["detail"]["optimizer_master_copy"])
        cells = [r["run"]]
        for key, pkey in (("params", "params"), ("gradients", "gradients"), ("optimizer", "optimizer_states")):
            got = m[key] or 0
            cells.append(f"{p[pkey] / MiB:.1f} / {got / MiB:.1f} ({ratio(p[pkey], got).strip()})")
        cells.append(f"{p['activations'] / MiB:.0f}")
        cells.append(f"{p['peak'] / MiB:.0f} / {m['rss_delta'] / MiB:.0f} ({ratio(p['peak'], m['rss_delta']).strip()})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "plan_memory")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "plan_memory.json")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", help="comma-separated run names: " + ",".join(RUNS))
    ap.add_argument("--reuse", action="store_true", help="measure from an existing run_summary.json, do not train")
    args = ap.parse_args()
    names = [n for n in RUNS if not args.only or n in args.only.split(",")]
    long_texts(args.out)
    rows = []
    for name in names:
        over = overrides(name, args.out, args.steps)
        row = {"run": name, "overrides": RUNS[name], "predicted": predict(over), "measured": measure(name, over, args.out, reuse=args.reuse)}
        rows.append(row)
        print(table([row])[-1], f"{row['measured']['seconds']:.0f} s", flush=True)
    # --only reruns replace their rows in the results file and keep the others
    kept = json.loads(args.json.read_text())["runs"] if args.only and args.json.exists() else []
    by_name = {r["run"]: r for r in kept} | {r["run"]: r for r in rows}
    rows = [by_name[n] for n in RUNS if n in by_name]
    print("\n".join(table(rows)))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": MODEL, "world_size": 2, "device": "cpu", "micro_batch": [4, 128], "steps": args.steps,
            "malloc_env": MALLOC_ENV, "rss_rank": "last"}
    args.json.write_text(json.dumps({"setup": meta, "runs": rows}, indent=2))
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
