"""Every architecture under every backend: a tiny model of each preset family, trained under DDP, ZeRO-2, ZeRO-3,
FSDP2 and QLoRA on 2 CPU gloo workers, resumed, exported merged, and compared with DDP.

Per family (the model types of configs/models/: Llama, Qwen2, Qwen3-MoE, Mistral, Gemma 2, Phi-3), the tiny model
keeps the published config.json but for its dimensions (tests/presets/presets.py): head grouping, tied or untied
head, sliding window, soft-capping, qk-norm, MoE routing. Its base config is the family's LoRA preset as shipped
(target modules, dropout, packing, chat template, optimizer), with tests/presets' tiny overrides (CPU, fp32, the
demo data as chat rows), N steps and a checkpoint at N/2. Per backend:

- train: N steps; loss curve (within --tol, the equivalence suite's 1e-5) and final adapter (--weights-tol)
  compared with the family's DDP run, as maximum relative deviations;
- resume: a copy of the run continued from checkpoint-N/2 must equal the run bitwise (every loss, every tensor);
- export: `sft-dist export RUN --merge` (QLoRA: `--dequantize`) of the final adapter, loaded as a plain
  transformers model, must give the logits of the base model with the adapter (peft) on fixed token ids.

QLoRA (4-bit NF4 base) is not compared with DDP: its base is not the same model.

    python bench/arch_matrix.py [--families llama,gemma2] [--backends ddp,fsdp] [--resume fsdp,zero3] [--steps 8]
                                [--jobs 2]

`--jobs N` trains N families at a time (the runs of a tiny model leave the cores idle through start-up and saves;
each worker keeps the thread count it has alone): the same numbers in less wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import machine, run_concurrently, write_results  # noqa: E402
from tests.presets.presets import build_tiny_model, chat_rows, family_presets, tiny_overrides  # noqa: E402

DS, FSDP = ROOT / "configs" / "deepspeed", ROOT / "configs" / "fsdp"
DEFAULT_OUT = ROOT / "outputs" / "arch_matrix"
BACKENDS = {
    "ddp": ["backend.type=ddp", "backend.config=null"],
    "zero2": ["backend.type=deepspeed", f"backend.config={DS / 'zero2.json'}"],
    "zero3": ["backend.type=deepspeed", f"backend.config={DS / 'zero3.json'}"],
    "fsdp": ["backend.type=fsdp", f"backend.config={FSDP / 'full_shard.yaml'}"],
    "qlora": ["backend.type=ddp", "backend.config=null", "quantization.bits=4", "quantization.quant_type=nf4",
              "quantization.double_quant=true"],
}
NOT_COMPARED = {"qlora"}  # another base model (4-bit): its own resume and export checks only
WRAPPERS = {"ddp": ("DistributedDataParallel", None), "zero2": ("DeepSpeedEngine", 2),
            "zero3": ("DeepSpeedEngine", 3), "fsdp": ("FSDP2 (fully_shard)", None),
            "qlora": ("DistributedDataParallel", None)}
IDS_SHAPE = (2, 24)
# With --jobs > 1, families run in threads: one prints (or swaps sys.stdout for an export) at a time.
OUTPUT = threading.RLock()


def backend_overrides(p, cell: str) -> list[str]:
    """The cell's backend; the preset's own options only where the cell is the preset's own backend file."""
    over = list(BACKENDS[cell])
    own = p.raw["backend"]
    same = own["type"] == over[0].split("=")[1] and Path(str(own.get("config"))).name == Path(over[1].split("=")[1]).name
    return over if same else [*over, "backend.options={}"]


def env() -> dict[str, str]:
    import os

    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT", "SFT_DIST_ERROR_FILE")}
    e["OMP_NUM_THREADS"] = "1"
    e["PATH"] = f"{Path(sys.executable).parent}:{e.get('PATH', '')}"
    return e


def train(p, over: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "sft_dist", "train", str(p.path), *over, f"output_dir={out}"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"exit {r.returncode}: {r.stderr[-3000:]}")
    return {"seconds": round(time.perf_counter() - t0, 1), **json.loads((out / "run_summary.json").read_text())}


def resume_copy(src: Path, dst: Path, steps: int) -> None:
    """`src` as if it had stopped right after checkpoint-steps/2."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / f"checkpoint-{steps}")
    for leftover in ("adapter", "model", "run_summary.json"):
        target = dst / leftover
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


def export_merged(run: Path, model_dir: Path, out: Path, *, quantized: bool) -> dict:
    """Merge the run's final adapter and compare the merged model's logits with base + adapter under peft."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from sft_dist.cli import main
    from sft_dist.model.build import keep_4bit_layout

    shutil.rmtree(out, ignore_errors=True)
    buf = io.StringIO()
    with OUTPUT, redirect_stdout(buf), redirect_stderr(buf):  # sys.stdout is the process's: no row printed meanwhile
        rc = main(["export", str(run), "--output", str(out), "--merge", *(["--dequantize"] if quantized else [])])
    if rc != 0:
        raise RuntimeError(f"export exit {rc}: {buf.getvalue()[-2000:]}")
    ids = torch.randint(3, 500, IDS_SHAPE, generator=torch.Generator().manual_seed(0))
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32) if quantized else None
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.float32)
    keep_4bit_layout(base)  # the layout the run trained with (tests/export/test_export.py)
    with torch.no_grad():
        want = PeftModel.from_pretrained(base, run / "adapter").eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
    record = json.loads((out / "export.json").read_text())
    return {"logits_max_abs": (got - want).abs().max().item(), "logit_scale": want.abs().max().item(),
            "lora_layers_merged": record.get("lora_layers_merged")}


def markdown(rows: list[dict]) -> str:
    def num(row, key):
        return f"{row[key]:.1e}" if key in row else "—"

    lines = ["| family | backend | wrapper | loss step 1 -> last | vs DDP: loss | vs DDP: adapter (rel L2) | resume bitwise "
             "| merged logits vs peft | ok |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        wrapper = str(r.get("wrapper")) + (f" ZeRO-{r['zero_stage']}" if r.get("zero_stage") else "")
        loss = f"{r['first_loss']:.4f} -> {r['last_loss']:.4f}" if "last_loss" in r else "—"
        resume = {True: "yes", False: "NO"}.get(r.get("resume_bitwise"), "—")
        lines.append(f"| {r['family']} | {r['cell']} | {wrapper} | {loss} | {num(r, 'loss_max_rel')} | "
                     f"{num(r, 'weights_rel_l2')} | {resume} | {num(r, 'logits_max_abs')} | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--families", help="comma-separated model types (default: every preset family)")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated cells; ddp always runs")
    ap.add_argument("--resume", default="all", help="cells whose resume is checked: all, none or a list")
    ap.add_argument("--export", default="all", help="cells whose merged export is checked: all, none or a list")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=1, help="families at a time (a family's cells run in turn)")
    ap.add_argument("--tol", type=float, default=1e-5, help="max relative loss deviation from DDP, any step")
    # ZeRO-3 reduce-scatters gradients in another order than DDP's all-reduce: ~1e-7 relative, which Adam's
    # normalized step magnifies on elements whose gradient is near zero (measured up to 1.4e-5 over 8 steps)
    ap.add_argument("--weights-tol", type=float, default=1e-4, help="max relative L2 deviation of the adapter")
    ap.add_argument("--export-tol", type=float, default=1e-4, help="max |logit difference| merged vs peft")
    args = ap.parse_args()

    from sft_dist.compare import compare

    families = family_presets()
    if args.families:
        families = {k: families[k] for k in args.families.split(",")}
    cells = ["ddp"] + [c for c in args.backends.split(",") if c != "ddp"]

    def chosen(spec: str, cell: str) -> bool:
        return spec == "all" or (spec != "none" and cell in spec.split(","))

    args.out.mkdir(parents=True, exist_ok=True)
    rows_file = chat_rows(args.out / "chat.jsonl")
    header = (f"{'family':<10} {'cell':<6} {'wrapper':<24} {'loss first->last':>17} {'vs ddp loss':>11} "
              f"{'adapter':>9} {'resume':>7} {'merged logits':>13} {'s':>5}")
    print(header, flush=True)
    # built in turn, before any family runs: each seeds torch's global generator
    model_dirs = {kind: build_tiny_model(p.fixture, args.out / kind / "model") for kind, p in families.items()}

    def family(item) -> list[dict]:
        kind, p = item
        model_dir = model_dirs[kind]
        rows = []
        for cell in cells:
            out = args.out / kind / cell
            shutil.rmtree(out, ignore_errors=True)
            over = [*(o for o in tiny_overrides(p, model_dir, rows_file, out) if not o.startswith("output_dir=")),
                    "launcher.num_workers=2",
                    f"training.max_steps={args.steps}", "training.save_strategy=steps",
                    f"training.save_steps={args.steps // 2}", *backend_overrides(p, cell)]
            row = {"family": kind, "preset": p.name, "cell": cell, "dir": str(out), "ok": False}
            rows.append(row)
            try:
                s = train(p, over, out)
                applied = s["backend_applied"]
                row.update(seconds=s["seconds"], steps=s["global_step"], first_loss=s["first_loss"],
                           last_loss=s["last_loss"], wrapper=applied.get("wrapper"),
                           zero_stage=applied.get("zero_stage"), total_params=s["total_params"],
                           trainable_params=s["trainable_params"],
                           param_numel_rank0=s["ranks"][0]["param_numel_local"],
                           quantized_linear_layers=s.get("quantized_linear_layers", 0))
                ok = (row["wrapper"], row["zero_stage"]) == WRAPPERS[cell] and s["last_loss"] < s["first_loss"]
                if cell != "ddp" and cell not in NOT_COMPARED:
                    dev = compare(args.out / kind / "ddp", out)
                    row.update(loss_max_rel=dev.loss_max_rel, weights_rel_l2=dev.weights_rel_l2,
                               weights_max_rel=dev.weights_max_rel)
                    ok = ok and dev.loss_max_rel <= args.tol and dev.weights_rel_l2 <= args.weights_tol
                if chosen(args.resume, cell):
                    resumed = args.out / kind / f"{cell}_resume"
                    resume_copy(out, resumed, args.steps)
                    r = train(p, over, resumed)
                    dev = compare(out, resumed)
                    row.update(resumed_step=r.get("resumed_step"), resume_bitwise=dev.bitwise)
                    ok = ok and dev.bitwise and r.get("resumed_step") == args.steps // 2
                if chosen(args.export, cell):
                    row.update(export_merged(out, model_dir, args.out / kind / f"{cell}_merged",
                                             quantized=cell == "qlora"))
                    ok = ok and row["logits_max_abs"] <= args.export_tol
                row["ok"] = bool(ok)
            except RuntimeError as e:
                row["error"] = str(e)
            wrapper = str(row.get("wrapper")) + (f" z{row['zero_stage']}" if row.get("zero_stage") else "")
            with OUTPUT:
                print(f"{kind:<10} {cell:<6} {wrapper:<24} "
                      f"{row.get('first_loss', float('nan')):>8.4f}->{row.get('last_loss', float('nan')):<8.4f} "
                      f"{row.get('loss_max_rel', float('nan')):>11.2e} {row.get('weights_rel_l2', float('nan')):>9.2e} "
                      f"{str(row.get('resume_bitwise', '-')):>7} {row.get('logits_max_abs', float('nan')):>13.2e} "
                      f"{row.get('seconds', 0):>5}  {'ok' if row['ok'] else 'FAILED ' + row.get('error', '')[-400:]}",
                      flush=True)
                done[kind] = rows
                (args.out / "arch_matrix.json").write_text(json.dumps([r for k in families if k in done
                                                                       for r in done[k]], indent=2))
        return rows

    done: dict[str, list[dict]] = {}
    rows = [row for part in run_concurrently(family, list(families.items()), args.jobs) for row in part]
    if args.out == DEFAULT_OUT:  # the repository's record (bench/results/), not a test's private run
        write_results("arch_matrix", {"machine": machine(), "steps": args.steps, "tol": args.tol,
                                      "weights_tol": args.weights_tol, "rows": rows}, markdown(rows))
    bad = [f"{r['family']}/{r['cell']}" for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)} of {len(rows)} cells ok" + (f"; failed: {', '.join(bad)}" if bad else "")
          + f"; JSON: {args.out / 'arch_matrix.json'}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
