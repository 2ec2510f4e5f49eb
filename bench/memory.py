"""Per-rank memory of each backend, measured, next to the ZeRO formula.

Trains a random-weight Llama of a few hundred MB (fp32) for a few steps with 2 gloo workers under DDP,
ZeRO-1/2/3 and FSDP2, full fine-tuning and LoRA, and prints what rank 0 held: parameter, gradient and
optimizer-state bytes, and its peak RSS; and what building the model added to each rank's RSS (a random base is
built whole by DDP and ZeRO-1/2 on every rank, by FSDP2 on rank 0 alone, partitioned by ZeRO-3; rank 0 also holds a
copy to write base_model from). The formula column is the classic ZeRO estimate for fp32 Adam
with Ψ parameters (Ψ_t trainable) and N workers: params 4Ψ (ZeRO-3/FSDP: /N), gradients 4Ψ_t (ZeRO-2+: /N),
Adam state 8Ψ_t (ZeRO-1+: /N). (With bf16 weights and fp32 master copies it is the paper's (2Ψ+2Ψ+12Ψ)/N.)

    python bench/memory.py [--hidden 768 --layers 8 --vocab 32000] [--steps 2] [--only ddp,zero3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "examples" / "quickstart.yaml"
DS, FSDP = ROOT / "configs" / "deepspeed", ROOT / "configs" / "fsdp"
BACKENDS = {
    "ddp": ([], dict(p=1, g=1, o=1)),
    "zero1": (["backend.type=deepspeed", f"backend.config={DS / 'zero1.json'}"], dict(p=1, g=1, o=2)),
    "zero2": (["backend.type=deepspeed", f"backend.config={DS / 'zero2.json'}"], dict(p=1, g=2, o=2)),
    "zero3": (["backend.type=deepspeed", f"backend.config={DS / 'zero3.json'}"], dict(p=2, g=2, o=2)),
    "fsdp": (["backend.type=fsdp", f"backend.config={FSDP / 'full_shard.yaml'}"], dict(p=2, g=2, o=2)),
}
MODES = {"full": ["lora.enabled=false", "lora.modules_to_save=null"], "lora": ["lora.modules_to_save=null"]}
MB = 1024 * 1024


def formula(total: int, trainable: int, n: int, shard: dict) -> dict[str, float]:
    """fp32 Adam: 4 bytes per parameter, 4 per gradient, 8 of optimizer state; divided by N where sharded."""
    return {"params": 4 * total / (n if shard["p"] == n else 1), "grads": 4 * trainable / (n if shard["g"] == n else 1),
            "optim": 8 * trainable / (n if shard["o"] == n else 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "memory")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--only", help="comma-separated backends")
    args = ap.parse_args()
    n = 2
    model = {"model_type": "llama", "hidden_size": args.hidden, "intermediate_size": args.hidden * 8 // 3,
             "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 64,
             "num_key_value_heads": args.hidden // 64, "vocab_size": args.vocab, "max_position_embeddings": 512}
    rows = []
    names = [b for b in BACKENDS if not args.only or b in args.only.split(",")]
    print(f"{'run':<12} {'params MB':>10} {'(formula)':>10} {'grads MB':>9} {'(formula)':>10} {'optim MB':>9} "
          f"{'(formula)':>10} {'peak RSS MB':>12} {'built MB per rank':>18} {'s':>5}")
    for mode, mode_args in MODES.items():
        for name in names:
            overrides, shard = BACKENDS[name]
            shard = {k: (n if v == 2 else 1) for k, v in shard.items()}
            run_dir = args.out / f"{name}_{mode}"
            cmd = [sys.executable, "-m", "sft_dist", "train", str(QUICKSTART), f"output_dir={run_dir}",
                   f"model.init_config={json.dumps(model)}", f"training.max_steps={args.steps}",
                   "training.per_device_train_batch_size=2", "training.eval_strategy=no", "data.max_length=128",
                   "training.learning_rate=1e-4", *mode_args, *overrides]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{name}_{mode} failed:\n{r.stderr[-2000:]}")
                return 1
            s = json.loads((run_dir / "run_summary.json").read_text())
            rank0 = s["ranks"][0]
            f = formula(s["total_params"], s["trainable_params"], n, shard)
            row = {"run": f"{name}_{mode}", "total_params": s["total_params"], "trainable_params": s["trainable_params"],
                   "param_bytes": rank0["param_bytes_local"], "grad_bytes": rank0["grad_bytes_local"],
                   "optimizer_state_bytes": rank0["optimizer_state_bytes_local"],
                   "peak_rss_bytes": max(x["peak_rss_bytes"] for x in s["ranks"]),
                   "built_rss_bytes": [x["rss_after_model_bytes"] - x["rss_before_model_bytes"] for x in s["ranks"]],
                   "random_base": [x["random_base"] for x in s["ranks"]],
                   "formula_bytes": f, "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            grads = f"{row['grad_bytes'] / MB:9.1f}" if row["grad_bytes"] is not None else f"{'n/a':>9}"
            print(f"{row['run']:<12} {row['param_bytes'] / MB:10.1f} {f['params'] / MB:10.1f} {grads} "
                  f"{f['grads'] / MB:10.1f} {row['optimizer_state_bytes'] / MB:9.1f} {f['optim'] / MB:10.1f} "
                  f"{row['peak_rss_bytes'] / MB:12.0f} {' / '.join(f'{b / MB:.0f}' for b in row['built_rss_bytes']):>18} "
                  f"{row['seconds']:5.0f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(rows, indent=2))
    print(f"model: {rows[0]['total_params']:,} parameters ({rows[0]['total_params'] * 4 / MB:.0f} MB fp32); "
          f"{n} workers; JSON: {args.out / 'memory.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
