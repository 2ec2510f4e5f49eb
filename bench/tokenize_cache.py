"""The tokenized-data cache: a cold build, a warm hit, and plain `datasets.map` tokenizing the same rows.

Generates N alpaca rows (deterministic), then measures, median over --repeats, in this process (1 rank):
  cold      `load_or_build` into an empty cache directory: read, tokenize, mask, finalize, write, publish
  warm      `load_or_build` again: the cache hit (memory-mapped load, no tokenization)
  memory    `build_datasets` (data.cache=false): what every rank did on every run before the cache
  map       `datasets.map` of the tokenizer alone over the rendered prompt+response text, unbatched and batched
            (no loss mask, no EOS, no truncation, no checks): a floor for tokenizing these rows at all

    python bench/tokenize_cache.py [--rows 100000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORDS = ["capital", "Portugal", "Lisboa", "rio", "cidade", "ponte", "mar", "livro", "escola", "dados", "modelo",
         "the", "river", "bridge", "city", "book", "school", "data", "model", "answer", "question", "why", "how"]


def make_rows(path: Path, n: int) -> Path:
    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            row = {"instruction": text(5, 30) + "?", "input": text(0, 10) if i % 3 == 0 else "", "output": text(3, 60)}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


WHAT = {"cold": "cold build (`load_or_build`, empty cache): read, tokenize, mask, finalize, write, fsync, publish",
        "warm": "cache hit (`load_or_build` again): memory-mapped load, nothing tokenized",
        "memory": "`build_datasets` in memory (`data.cache: false`, every rank before the cache)",
        "map": "floor: `datasets.map` of the tokenizer alone over the rendered text, one row per call",
        "map_batched": "floor: the same, batched (1000 rows per call)"}


def render(setup: dict, rows: list[dict]) -> str:
    title = (f"### Tokenized-data cache ({setup['rows']:,} alpaca rows, builtin tokenizer, 1 process, "
             f"median of {setup['repeats']})")
    lines = [title, "", "| case | seconds | rows/s | tokens/s | all runs (s) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {WHAT[r['case']]} | {r['seconds']:.3f} | {r['rows_per_s']:,} | {r['tokens_per_s']:,} | "
                     + ", ".join(f"{t:.2f}" for t in r["all_seconds"]) + " |")
    note = (f"Entry on disk: {setup['entry_bytes'] / 2**20:.1f} MiB. The floors count the tokenizer's tokens "
            "(no EOS, no truncation).")
    lines += ["", note, "", "```", "python bench/tokenize_cache.py [--rows N] [--repeats N]", "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "tokenize_cache")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "tokenize_cache.json")
    args = ap.parse_args()

    import datasets
    from transformers import AutoTokenizer

    from sft_dist.config.load import builtin_path
    from sft_dist.config.schema import DataConfig
    from sft_dist.data.build import build_datasets
    from sft_dist.data.cache import load_or_build
    from sft_dist.data.templates import (
        render_completion,
        render_prompt,
        resolve_template,
    )

    datasets.disable_progress_bars()
    data = make_rows(args.out / f"alpaca_{args.rows}.jsonl", args.rows)
    tok = AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))
    cache = args.out / "cache"
    cfg = DataConfig(train_files=[str(data)], template="alpaca_pt", max_length=512, cache_dir=str(cache))
    times: dict[str, list[float]] = {}
    tokens: dict[str, int] = {}

    for _ in range(args.repeats):
        shutil.rmtree(cache, ignore_errors=True)
        s, (ds, info) = timed(lambda: load_or_build(cfg, tok, seed=42))
        assert not info.hit
        times.setdefault("cold", []).append(s)
        tokens["cold"] = ds.stats["train"].tokens
    for _ in range(args.repeats):
        s, (ds, info) = timed(lambda: load_or_build(cfg, tok, seed=42))
        assert info.hit and info.tokenized_rows == 0
        times.setdefault("warm", []).append(s)
        tokens["warm"] = ds.stats["train"].tokens
    for _ in range(args.repeats):
        s, ds = timed(lambda: build_datasets(cfg, tok, seed=42))
        times.setdefault("memory", []).append(s)
        tokens["memory"] = ds.stats["train"].tokens

    template = resolve_template("alpaca_pt")
    with data.open(encoding="utf-8") as f:
        texts = datasets.Dataset.from_list([
            {"text": render_prompt(template, instruction=r["instruction"], input=r["input"])
             + render_completion(template, r["output"])} for r in map(json.loads, f)])
    # In memory and never from datasets' cache of an earlier identical map: each repeat tokenizes.
    fresh = {"remove_columns": ["text"], "keep_in_memory": True, "load_from_cache_file": False}
    for name, kw in (("map", {}), ("map_batched", {"batched": True, "batch_size": 1000})):
        for _ in range(args.repeats):
            s, out = timed(lambda kw=kw: texts.map(lambda r: tok(r["text"]), **fresh, **kw))
            times.setdefault(name, []).append(s)
        tokens[name] = sum(len(x) for x in out["input_ids"])

    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"case": name, "seconds": round(med, 4), "all_seconds": [round(t, 4) for t in ts],
                     "rows_per_s": round(args.rows / med), "tokens": tokens[name],
                     "tokens_per_s": round(tokens[name] / med)})
    setup = {"rows": args.rows, "repeats": args.repeats, "tokenizer": "builtin:tokenizer", "format": "alpaca",
             "template": "alpaca_pt", "max_length": 512, "ranks": 1, "num_proc": None,
             "entry_bytes": sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())}
    text = render(setup, rows)
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"setup": setup, "results": rows}, indent=2))
    args.json.with_suffix(".md").write_text(text)
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
