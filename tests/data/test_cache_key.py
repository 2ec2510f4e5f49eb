"""The cache key changes with everything the tokenized rows depend on, and with nothing else."""

from __future__ import annotations

import json
import os

import pytest
from transformers import AutoTokenizer

from sft_dist.config.load import builtin_path
from sft_dist.config.schema import DataConfig
from sft_dist.data.cache_key import cache_key

ROWS = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(5)]


@pytest.fixture
def tok():
    return AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))


@pytest.fixture
def data(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return f


def key(tok, f, seed=0, **kw) -> str:
    return cache_key(DataConfig(train_files=[str(f)], **kw), tok, seed=seed)[0]


def test_key_follows_the_options_that_change_rows(tok, data):
    base = key(tok, data)
    assert key(tok, data) == base  # stable
    changed = {
        "max_length": key(tok, data, max_length=256),
        "format": key(tok, data, format="prompt_completion"),
        "template": key(tok, data, template="alpaca_pt"),
        "completion_only_loss": key(tok, data, completion_only_loss=False),
        "eval_split_ratio": key(tok, data, eval_split_ratio=0.2),
        "seed": key(tok, data, seed=1),
        "packing": key(tok, data, packing=True),
        "on_bad_row": key(tok, data, on_bad_row="skip"),
        "id_column": key(tok, data, id_column="id"),
    }
    assert base not in changed.values() and len(set(changed.values())) == len(changed), changed
    # How or where the build runs is not what it builds.
    assert key(tok, data, num_proc=4) == base
    assert key(tok, data, trace_samples=True) == base
    assert key(tok, data, cache_dir="/elsewhere", cache=False) == base


def test_key_follows_the_tokenizer(tok, data):
    base = key(tok, data)
    other = AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))
    assert key(other, data) == base  # the same tokenizer loaded twice
    other.add_tokens(["<brand-new>"])
    assert key(other, data) != base
    templated = AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))
    templated.chat_template = "{{ messages }}"
    assert key(templated, data) != base


def test_key_follows_the_file(tok, data):
    base, base_content = key(tok, data), key(tok, data, cache_fingerprint="content")
    st = data.stat()
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, newer mtime
    assert key(tok, data) != base
    assert key(tok, data, cache_fingerprint="content") == base_content

    # Same size and mtime, other bytes: only the content fingerprint sees it.
    data.write_text(data.read_text().replace("Say 1.", "Say 9."))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert key(tok, data) == base
    assert key(tok, data, cache_fingerprint="content") != base_content

    data.write_text(data.read_text() + json.dumps(ROWS[0]) + "\n")  # a row more: size and mtime change
    assert key(tok, data) != base


def test_key_follows_a_hub_datasets_fingerprint(tmp_path, tok, monkeypatch):
    # A local dataset directory goes through `load_dataset` like a hub name, offline.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    d = tmp_path / "my_dataset"
    d.mkdir()
    f = d / "train.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = DataConfig(dataset=str(d))
    base, identity = cache_key(cfg, tok, seed=0)
    assert list(identity["data"]["dataset_fingerprints"]) == ["train"]
    assert cache_key(cfg, tok, seed=0)[0] == base
    f.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    assert cache_key(cfg, tok, seed=0)[0] != base
    assert cache_key(DataConfig(dataset=str(d), dataset_config=None, train_split="train[:2]"), tok, seed=0)[0] != base
