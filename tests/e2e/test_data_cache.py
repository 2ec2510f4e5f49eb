"""End to end: `sft-dist preprocess` fills the cache that `sft-dist train` then hits, and a bad row that only
rank 1 tokenizes stops a 2-worker run at once with one message naming its line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import QUICKSTART
from tests.e2e.test_train_local import sft_dist

pytestmark = pytest.mark.slow


def rows(path: Path, n: int, bad_line: int | None = None) -> Path:
    lines = [{"instruction": f"Diga {i}.", "output": f"{i}"} for i in range(n)]
    if bad_line is not None:
        lines[bad_line - 1] = {"instruction": "x", "output": ""}
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_train_hits_what_preprocess_built(tmp_path):
    cache = tmp_path / "cache"
    data = rows(tmp_path / "d.jsonl", 64)
    common = [f"data.train_files={data}", "data.eval_files=null", f"data.cache_dir={cache}"]
    pre = sft_dist("preprocess", QUICKSTART, *common, timeout=120)
    assert pre.returncode == 0, pre.stderr[-3000:]
    entry = next(line.split(": ", 1)[1] for line in pre.stdout.splitlines() if line.startswith("cached: "))
    assert "  train: 64 rows, " in pre.stdout

    r = sft_dist("train", QUICKSTART, *common, "training.max_steps=1", "training.eval_strategy=no",
                 f"output_dir={tmp_path / 'run'}", timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"data: cache hit {entry} (64 train rows, built " in r.stderr
    assert "data: tokenized" not in r.stderr
    assert sorted(p.name for p in cache.iterdir()) == [Path(entry).name]
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["data"]["train"]["rows"] == 64


def test_bad_row_is_refused_by_the_launcher_before_any_cache_build(tmp_path):
    """The launcher's data precheck finds the row rank 1 would have tokenized: refused in seconds, with the same
    message, before any worker or cache build starts. (The rank-1 protocol itself, for what only the tokenizer
    can find: tests/data/test_cache.py::test_bad_row_on_rank_1_stops_both_ranks_with_its_line.)"""
    data = rows(tmp_path / "bad.jsonl", 40, bad_line=31)  # rank 1 would tokenize rows 21..40
    t0 = time.monotonic()
    r = sft_dist("train", QUICKSTART, "launcher.num_workers=2", f"data.train_files={data}", "data.eval_files=null",
                 f"data.cache_dir={tmp_path / 'cache'}", "training.max_steps=2", f"output_dir={tmp_path / 'run'}",
                 timeout=120)
    took = time.monotonic() - t0
    assert r.returncode != 0 and took < 30, (took, r.stderr[-3000:])
    where = f"{data}:31 (train sample_id 30): empty response (column 'output' is blank)"
    assert r.stderr.count(where) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "worker rank" not in r.stderr
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []  # nothing built
    assert not (tmp_path / "run").exists()
