"""The tokenized-data cache: a parallel build equals a single-process one row for row, a hit tokenizes
nothing, and a killed or failed build leaves nothing a later run trusts."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from sft_dist.config.load import builtin_path, load_config
from sft_dist.config.schema import DataConfig
from sft_dist.data.build import build_datasets
from sft_dist.data.cache import load_or_build
from sft_dist.distributed.local import free_port
from tests.conftest import cli_env, cold_env

WORKER = Path(__file__).with_name("cache_worker.py")
GOOD = {"instruction": "Diga oi.", "output": "oi"}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))


def alpaca(path: Path, n: int, bad: dict[int, dict] | None = None) -> Path:
    """n rows, line i (from 1) replaced by bad[i]."""
    rows = [{"instruction": f"Quanto é {i} mais {i}?", "input": "", "output": f"{2 * i}"} for i in range(n)]
    for line, row in (bad or {}).items():
        rows[line - 1] = row
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def rows(ds) -> list[tuple]:
    return list(zip(ds["sample_id"], ds["input_ids"], ds["labels"]))


def same_data(a, b) -> None:
    assert rows(a.train) == rows(b.train)
    assert (a.eval is None) == (b.eval is None)
    if a.eval is not None:
        assert rows(a.eval) == rows(b.eval)
    assert {k: vars(v) for k, v in a.stats.items()} == {k: vars(v) for k, v in b.stats.items()}


def run_world(cfg: dict, tmp_path: Path, *, world: int = 2, limit_s: float = 60) -> dict[int, dict]:
    """`world` cache_worker ranks over gloo; per rank: return code and its JSON line."""
    spec = tmp_path / "data.json"
    spec.write_text(json.dumps(cfg))
    port = free_port("127.0.0.1")
    procs = {}
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs[r] = subprocess.Popen([sys.executable, str(WORKER), str(spec)], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
    out = {}
    for r, p in procs.items():
        stdout, stderr = p.communicate(timeout=limit_s)
        lines = [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]
        out[r] = {"rc": p.returncode, "line": lines[-1] if lines else None, "stderr": stderr}
    return out


@pytest.mark.slow
def test_parallel_build_equals_single_process_build(tmp_path, tok, caplog):
    # Bad rows in both ranks' halves, skipped and counted; eval rows held out by seed.
    bad = {5: {"instruction": "x", "output": ""}, 90: {"instruction": None, "output": "y"}}
    f = alpaca(tmp_path / "d.jsonl", 120, bad)
    fields = {"train_files": [str(f)], "on_bad_row": "skip", "eval_split_ratio": 0.1,
              "cache_dir": str(tmp_path / "cache")}
    out = run_world(fields, tmp_path)
    assert all(o["rc"] == 0 for o in out.values()), {r: o["stderr"][-2000:] for r, o in out.items()}
    # Each rank tokenized its own half of each split, not the whole.
    assert [out[r]["line"]["tokenized"] for r in (0, 1)] == [54 + 6, 54 + 6]
    assert all(not o["line"]["hit"] for o in out.values())

    caplog.set_level(logging.INFO, logger="sft_dist.data.build")
    single = build_datasets(DataConfig(**{**fields, "cache": False}), tok, seed=0)
    skipped_lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    cached, info = load_or_build(DataConfig(**fields), tok, seed=0)
    assert info.hit and info.tokenized_rows == 0 and info.meta["built_by_ranks"] == 2
    same_data(cached, single)
    assert single.stats["train"].skipped_bad + single.stats["eval"].skipped_bad == 2
    assert info.meta["skipped"] == skipped_lines and skipped_lines  # logged the same way on a hit
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [info.path.name]  # no build dir left


@pytest.mark.slow
def test_bad_row_on_rank_1_stops_both_ranks_with_its_line(tmp_path):
    f = alpaca(tmp_path / "d.jsonl", 40, {31: {"instruction": "x", "output": " "}})
    t0 = time.monotonic()
    out = run_world({"train_files": [str(f)], "cache_dir": str(tmp_path / "cache")}, tmp_path)
    took = time.monotonic() - t0
    where = f"{f}:31 (train sample_id 30): empty response"
    for r in (0, 1):
        assert out[r]["rc"] == 1 and out[r]["line"]["error"] == "BadRow", out[r]["stderr"][-2000:]
        assert out[r]["line"]["message"].startswith(where)
    assert took < 30, took
    entries = [p.name for p in (tmp_path / "cache").iterdir() if ".building-" not in p.name]
    assert entries == []  # nothing published


@pytest.mark.slow
def test_hit_in_another_process_tokenizes_nothing(tmp_path, tok, write_config, caplog):
    f = alpaca(tmp_path / "d.jsonl", 50)
    cfg_path = write_config({"data.train_files": str(f), "data.eval_files": None,
                             "data.cache_dir": str(tmp_path / "cache")})
    cfg = load_config(cfg_path)
    caplog.set_level(logging.INFO, logger="sft_dist.data.cache")
    built, info = load_or_build(cfg.data, tok, seed=42)
    assert not info.hit and info.tokenized_rows == 50
    assert "data: tokenized 50 rows in " in caplog.text and f"on 1 rank(s); cached at {info.path}" in caplog.text
    meta = (info.path / "meta.json").read_bytes()

    # "Another node": a new process with the same cache directory.
    r = subprocess.run([sys.executable, "-m", "sft_dist", "preprocess", str(cfg_path), "data.num_proc=2"],
                       capture_output=True, text=True, timeout=120, env=cli_env(), check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"cache hit: {info.path}\n" in r.stdout and "tokenized 0 rows here" in r.stdout, r.stdout
    assert f"data: cache hit {info.path} (50 train rows, built " in r.stderr
    assert "  train: 50 rows, " in r.stdout
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [info.path.name]  # no build started
    assert (info.path / "meta.json").read_bytes() == meta

    again, info2 = load_or_build(cfg.data, tok, seed=42)
    assert info2.hit and info2.tokenized_rows == 0
    same_data(again, built)


def test_an_incomplete_entry_is_never_trusted(tmp_path, tok):
    f = alpaca(tmp_path / "d.jsonl", 10)
    cfg = DataConfig(train_files=[str(f)], cache_dir=str(tmp_path / "cache"))
    _, info = load_or_build(cfg, tok, seed=0)
    (info.path / "meta.json").unlink()  # as if a copy of the cache lost it
    data, info2 = load_or_build(cfg, tok, seed=0)
    assert not info2.hit and info2.tokenized_rows == 10 and len(data.train) == 10
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [info.path.name]


@pytest.mark.slow
def test_killed_builder_leaves_nothing_a_later_run_trusts(tmp_path, tok, write_config):
    f = alpaca(tmp_path / "big.jsonl", 6000)
    cache = tmp_path / "cache"
    cfg_path = write_config({"data.train_files": str(f), "data.eval_files": None, "data.cache_dir": str(cache)})
    # cold: the process started here is the builder (forked warm, the build is done within the 0.5 s below)
    p = subprocess.Popen([sys.executable, "-m", "sft_dist", "preprocess", str(cfg_path)], env=cold_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(cache.glob("*.building-*")) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.01)
    time.sleep(0.05)  # mid-build (6000 rows take ~1 s here; 0.5 s let a fast build finish first under load)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    stale = list(cache.glob("*.building-*"))
    assert len(stale) == 1 and not [d for d in cache.iterdir() if ".building-" not in d.name]

    cfg = load_config(cfg_path)
    data, info = load_or_build(cfg.data, tok, seed=42)
    assert not info.hit and info.tokenized_rows == 6000
    assert not stale[0].exists()  # its builder is gone: swept
    clean = build_datasets(dataclasses.replace(cfg.data, cache=False), tok, seed=42)
    same_data(data, clean)


def test_waits_poll_files_and_time_out_naming_what_is_missing(tmp_path):
    from sft_dist.data.cache import _wait_parts, _wait_published
    from sft_dist.errors import SftDistError

    build = tmp_path / "k.building-x"
    build.mkdir()
    (build / "part-r1.json").write_text("{}")  # rank 1 is done, ranks 2 and 3 never come
    t0 = time.monotonic()
    with pytest.raises(SftDistError, match=r"rank\(s\) \[2, 3\] did not finish tokenizing .*timeout_s=0.3 s"):
        _wait_parts(build, [], {}, world_size=4, timeout_s=0.3)
    with pytest.raises(SftDistError, match=r"rank 0 did not publish the tokenized data at .* within"):
        _wait_published(tmp_path / "k", build, timeout_s=0.3)
    assert time.monotonic() - t0 < 3


@pytest.mark.slow
def test_preprocess_stops_at_bad_data_with_one_line(tmp_path, write_config):
    f = alpaca(tmp_path / "d.jsonl", 5, {4: {"instruction": "x", "output": ""}})
    cfg_path = write_config({"data.train_files": str(f), "data.eval_files": None,
                             "data.cache_dir": str(tmp_path / "cache")})
    r = subprocess.run([sys.executable, "-m", "sft_dist", "preprocess", str(cfg_path)], capture_output=True,
                       text=True, timeout=120, env=cli_env(), check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"sft-dist: error: {f}:4 (train sample_id 3): empty response" in r.stderr
    assert [p for p in (tmp_path / "cache").iterdir() if ".building-" not in p.name] == []
