"""End to end: bad training data stops `sft-dist train` with 2 workers quickly, with one message (file and
line, no traceback), and leaves an earlier run's checkpoints as they were."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from tests.conftest import QUICKSTART
from tests.e2e.test_train_local import sft_dist

pytestmark = pytest.mark.slow

GOOD = {"instruction": "Diga oi.", "output": "oi"}


def bad_file(tmp_path: Path) -> Path:
    f = tmp_path / "bad.jsonl"
    f.write_text("".join(json.dumps(GOOD) + "\n" for _ in range(20)) + json.dumps({"instruction": "x", "output": ""})
                 + "\n")
    return f


def train_bad(out: Path, data: Path):
    t0 = time.monotonic()
    r = sft_dist("train", QUICKSTART, "launcher.num_workers=2", f"data.train_files={data}", "training.max_steps=2",
                 f"output_dir={out}", timeout=120)
    return r, time.monotonic() - t0


def test_bad_row_stops_both_workers_with_one_message(tmp_path):
    data = bad_file(tmp_path)
    r, took = train_bad(tmp_path / "run", data)
    assert r.returncode != 0 and took < 60, (took, r.stderr[-3000:])
    where = f"{data}:21 (train sample_id 20): empty response (column 'output' is blank)"
    assert r.stderr.count(where) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "worker rank" not in r.stderr  # the same data on every rank: no rank to name


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_bad_data_rerun_leaves_checkpoints_untouched(tmp_path):
    # The same command as a good run, after its data file was corrupted: the rerun resumes, then stops at the
    # data, before it writes any checkpoint.
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(GOOD) + "\n" for _ in range(40)))
    out = tmp_path / "run"
    args = ["train", QUICKSTART, "launcher.num_workers=2", f"data.train_files={data}", "training.max_steps=2",
            "training.save_strategy=steps", "training.save_steps=2", "training.eval_strategy=no",
            f"output_dir={out}"]
    good = sft_dist(*args, timeout=300)
    assert good.returncode == 0, good.stderr[-3000:]
    ckpts = [p for p in out.iterdir() if p.is_dir() and "checkpoint" in p.name]
    assert ckpts, sorted(p.name for p in out.iterdir())
    before = {str(c): digests(c) for c in ckpts}
    assert all(before.values())

    with data.open("a") as f:
        f.write('{"instruction": "cut off mid-wri')
    t0 = time.monotonic()
    r = sft_dist(*args, timeout=120)
    assert r.returncode != 0 and time.monotonic() - t0 < 60, r.stderr[-3000:]
    assert f"{data}:41: invalid JSON" in r.stderr and "Traceback" not in r.stderr
    assert {str(c): digests(c) for c in ckpts} == before
