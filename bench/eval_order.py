"""Evaluation with each rank's rows sorted longest first (sft_dist's order) against the file order (before it),
side by side.

One worker with 1 thread on CPU evaluates (`training.do_train: false`, what `sft-dist evaluate` sets) the quickstart
model, a random Llama of hidden 64 and 2 layers, on 800 generated alpaca rows whose responses have a long tail of
lengths (`bench/rebalance.py`'s rows), data.max_length 512, 16 rows per eval batch. Each order runs `--repeats`
times, the two alternated, each in a fresh process through `sft_dist.train.run.run`; the file order is the same code
with `train/evaluation.shard` given no lengths. Reported: eval seconds (eval_results.json; median of the runs) and the
eval loss of each, which must agree (the loss is a sum over rows).

    python bench/eval_order.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from common import ROOT, machine, write_results
from rebalance import long_tailed_rows

QUICKSTART = ROOT / "configs" / "examples" / "quickstart.yaml"
ORDERS = ("file", "sorted")


def worker(out: Path, data: Path, order: str) -> None:
    """One evaluation in this process (the local launcher's single-worker path)."""
    sys.path.insert(0, str(ROOT))
    from sft_dist.config.load import load_config
    from sft_dist.train import evaluation
    from sft_dist.train.run import run

    if order == "file":
        plain = evaluation.shard
        evaluation.shard = lambda n, world, rank, lengths=None: plain(n, world, rank)
    cfg = load_config(QUICKSTART, [
        f"output_dir={out}", "training.do_train=false", f"data.eval_files={data}", "data.max_length=512",
        "training.per_device_eval_batch_size=16", "launcher.num_workers=1", "launcher.threads_per_worker=1",
        "model.save_init_base=false"])
    run(cfg)


def evaluate(out: Path, data: Path, order: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--worker", str(out), str(data), order], check=False,
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"order={order} failed:\n{r.stderr[-3000:]}")
    res = json.loads((out / "eval_results.json").read_text())
    return {"eval_seconds": res["eval_seconds"], "eval_loss": res["metrics"]["eval_loss"], "rows": res["eval_rows"]}


def main() -> int:
    if sys.argv[1:2] == ["--worker"]:
        worker(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_eval_order")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = long_tailed_rows(args.out / "all.jsonl")
    data = args.out / "eval.jsonl"
    data.write_text("".join(rows.read_text(encoding="utf-8").splitlines(keepends=True)[:800]), encoding="utf-8")
    runs: dict[str, list[dict]] = {o: [] for o in ORDERS}
    for i in range(args.repeats):
        for order in ORDERS:  # alternated, so a busy machine slows both alike
            r = evaluate(args.out / f"{order}-{i}", data, order)
            runs[order].append(r)
            print(f"{order} run {i}: {r['eval_seconds']:.2f} s, eval loss {r['eval_loss']:.10f}", flush=True)
    med = {o: statistics.median(r["eval_seconds"] for r in rs) for o, rs in runs.items()}
    loss_diff = abs(runs["sorted"][0]["eval_loss"] - runs["file"][0]["eval_loss"]) / runs["file"][0]["eval_loss"]
    lines = ["| eval rows order | eval seconds (runs) | eval loss |", "|---|---|---|"]
    for o, rs in runs.items():
        each = ", ".join(f"{r['eval_seconds']:.2f}" for r in rs)
        lines.append(f"| {o} | {med[o]:.2f} ({each}) | {rs[0]['eval_loss']:.10f} |")
    speedup = med["file"] / med["sorted"]
    summary = f"sorted: {speedup:.2f}x faster; eval loss relative difference {loss_diff:.1e}"
    print("\n".join(lines) + "\n" + summary)
    setup = {"machine": machine(), "model": "quickstart (llama hidden 64, 2 layers, random), no adapter trained",
             "workers": 1, "threads": 1, "rows": 800, "max_length": 512, "per_device_eval_batch_size": 16,
             "repeats": args.repeats}
    write_results("eval_order", {"setup": setup, "median_s": med, "speedup": speedup, "loss_rel_diff": loss_diff,
                                 "runs": runs}, "\n".join([json.dumps(setup), "", *lines, "", summary, ""]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
