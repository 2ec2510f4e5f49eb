"""The bad-data catalog: each bad input stops the build with a message naming the file, the line (jsonl) or
row, and the problem; with `data.on_bad_row: skip` row-level problems are skipped and counted instead."""

from __future__ import annotations

import json
import logging

import pytest
from transformers import AutoTokenizer

from sft_dist.config.load import builtin_path
from sft_dist.config.schema import DataConfig
from sft_dist.data.build import build_datasets
from sft_dist.errors import BadRow, DataError

GOOD = {"instruction": "Say hi.", "output": "hi"}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))


def jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def error(tok, **data) -> str:
    with pytest.raises(DataError) as e:
        build_datasets(DataConfig(**data), tok, seed=0)
    return str(e.value)


def test_missing_file(tmp_path, tok):
    msg = error(tok, train_files=[str(tmp_path / "nope.jsonl")])
    assert f"{tmp_path}/nope.jsonl: no such file" in msg


def test_empty_dataset(tmp_path, tok):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n\n")
    assert f"{f}: the file has no rows" in error(tok, train_files=[str(f)])


def test_truncated_jsonl_line(tmp_path, tok):
    f = tmp_path / "cut.jsonl"
    f.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n" + '{"instruction": "Say hi.", "outp')
    msg = error(tok, train_files=[str(f)])
    assert f"{f}:3: invalid JSON" in msg and "truncated" in msg and "data.on_bad_row=skip" in msg


def test_unreadable_file(tmp_path, tok, monkeypatch):
    import sft_dist.data.files

    f = tmp_path / "locked.jsonl"
    jsonl(f, [GOOD])

    def denied(*args, **kwargs):  # what chmod 000 gives, also when the tests run as root
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(sft_dist.data.files, "open", denied, raising=False)
    assert f"{f}: cannot read the file (Permission denied)" in error(tok, train_files=[str(f)])


def test_non_utf8_bytes(tmp_path, tok):
    f = tmp_path / "latin1.jsonl"
    f.write_bytes((json.dumps(GOOD) + "\n").encode() + '{"instruction": "ação", "output": "b"}\n'.encode("latin-1"))
    msg = error(tok, train_files=[str(f)])
    assert f"{f}:2: not valid UTF-8" in msg and "re-save the file as UTF-8" in msg


def test_row_missing_a_required_column(tmp_path, tok):
    f = jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, {"instruction": "no answer here"}])
    assert f"{f}:3 (train sample_id 2): column 'output' is missing or null" in error(tok, train_files=[f])


def test_column_of_the_wrong_type(tmp_path, tok):
    f = jsonl(tmp_path / "d.jsonl", [GOOD, {"instruction": "2+2", "output": 4}, GOOD])
    assert f"{f}:2: column 'output' is number, other rows have str" in error(tok, train_files=[f])


def test_column_of_the_wrong_type_in_parquet(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": [1, 2]}), f)
    msg = error(tok, train_files=[str(f)], format="prompt_completion")
    assert f"{f} row 1 (train sample_id 0): column 'completion' must be text, got int" in msg


def test_null_value(tmp_path, tok):
    f = jsonl(tmp_path / "d.jsonl", [GOOD, {"instruction": None, "output": "b"}])
    assert f"{f}:2 (train sample_id 1): column 'instruction' is missing or null" in error(tok, train_files=[f])


def test_empty_response(tmp_path, tok):
    f = jsonl(tmp_path / "d.jsonl", [GOOD, {"instruction": "Say hi.", "output": "  \n"}])
    assert f"{f}:2 (train sample_id 1): empty response (column 'output' is blank)" in error(tok, train_files=[f])
    f = jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": ""}])
    assert f"{f}:1 (train sample_id 0): empty response" in error(tok, train_files=[f], format="prompt_completion")
    f = jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Oi"},
                                                      {"role": "assistant", "content": " "}]}])
    msg = error(tok, train_files=[f], format="messages")
    assert f"{f}:1 (train sample_id 0): empty response (messages[1], an assistant turn, is blank)" in msg


def test_every_row_longer_than_max_length(tmp_path, tok):
    f = jsonl(tmp_path / "long.jsonl", [{"instruction": "long " * 100, "output": "x"}] * 3)
    msg = error(tok, train_files=[f], max_length=16)
    assert msg.startswith(f"{f}: no train row has a loss-carrying token within data.max_length=16")
    assert "(3 rows, 3 truncated, the longest " in msg and f" tokens, the first at {f}:1); raise data.max_length" in msg


def test_duplicate_ids(tmp_path, tok):
    f = jsonl(tmp_path / "d.jsonl", [{"id": "a", **GOOD}, {"id": "b", **GOOD}, {"id": "a", **GOOD}])
    msg = error(tok, train_files=[f], id_column="id")
    assert f"{f}:3: duplicate id 'a' (column 'id'), first at {f}:1" in msg
    assert "data.id_column: " in error(tok, train_files=[f], id_column="uid")
    assert f in error(tok, train_files=[f], id_column="uid")


def test_chat_turn_with_unknown_role(tmp_path, tok):
    f = jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Oi"},
                                                      {"role": "assistant", "content": "Olá"}]},
                                        {"messages": [{"role": "human", "content": "Oi"},
                                                      {"role": "assistant", "content": "Olá"}]}])
    msg = error(tok, train_files=[f], format="messages")
    assert f"{f}:2 (train sample_id 1): messages[0] has unknown role 'human'; allowed: system, user, assistant, tool" \
        in msg


def test_row_numbers_in_json_and_csv(tmp_path, tok):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([GOOD, {"instruction": "x", "output": None}]))
    assert f"{f} row 2 (train sample_id 1): column 'output' is missing or null" in error(tok, train_files=[str(f)])
    c = tmp_path / "d.csv"
    c.write_text("prompt,completion\na,b\nc,\n")
    msg = error(tok, train_files=[str(c)], format="prompt_completion")
    assert f"{c} row 2 (train sample_id 1): empty response (column 'completion' is blank)" in msg


def test_trainer_dataset_keeps_only_its_columns(tmp_path, tok):
    f = jsonl(tmp_path / "d.jsonl", [{"id": i, **GOOD} for i in range(3)])
    ds = build_datasets(DataConfig(train_files=[f], id_column="id", eval_split_ratio=0.34), tok, seed=0)
    assert ds.train.column_names == ["sample_id", "input_ids", "labels"]  # as before origins were tracked
    assert ds.eval.column_names == ["sample_id", "input_ids", "labels"]


# --- data.on_bad_row: skip ---

def test_skip_counts_each_kind_and_logs_one_line(tmp_path, tok, caplog):
    f = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"id": 1, **GOOD}),
        '{"id": 2, "instruction": "cut',  # invalid JSON
        json.dumps({"id": 3, "instruction": None, "output": "x"}),  # null
        json.dumps({"id": 4, "instruction": "q", "output": ""}),  # empty response
        json.dumps({"id": 1, "instruction": "again", "output": "dup"}),  # duplicate id
        json.dumps({"id": 6, **GOOD}),
    ]
    f.write_bytes("\n".join(lines).encode() + b"\n" + b'{"id": 7, "instruction": "\xe7", "output": "x"}\n')
    caplog.set_level(logging.INFO, logger="sft_dist.data.build")
    ds = build_datasets(DataConfig(train_files=[str(f)], id_column="id", on_bad_row="skip"), tok, seed=0)
    assert len(ds.train) == 2 and ds.stats["train"].skipped_bad == 5
    summary = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(summary) == 1
    line = summary[0]
    assert line.startswith("data train: skipped 5 bad row(s) (data.on_bad_row=skip): ")
    for kind in ("1 invalid JSON", "1 not UTF-8", "1 null value", "1 empty response", "1 duplicate id"):
        assert kind in line
    assert f"at {f}:2, {f}:7, {f}:5, ..." in line  # reading finds lines 2 and 7, the id check 5, then the rows


def test_skip_keeps_the_first_of_duplicate_ids(tmp_path, tok):
    f = jsonl(tmp_path / "d.jsonl", [{"id": "a", "instruction": "first", "output": "1"},
                                     {"id": "a", "instruction": "second", "output": "2"}])
    ds = build_datasets(DataConfig(train_files=[f], id_column="id", on_bad_row="skip"), tok, seed=0)
    assert len(ds.train) == 1 and "first" in tok.decode(ds.train[0]["input_ids"])


def test_skip_with_unknown_role_and_wrong_type(tmp_path, tok):
    f = jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "Oi"}, {"role": "assistant", "content": "Olá"}]},
        {"messages": [{"role": "bot", "content": "Oi"}, {"role": "assistant", "content": "Olá"}]},
        {"messages": [{"role": "user", "content": "Oi"}]},
    ])
    ds = build_datasets(DataConfig(train_files=[f], format="messages", on_bad_row="skip"), tok, seed=0)
    assert len(ds.train) == 1 and ds.stats["train"].skipped_bad == 2
    g = jsonl(tmp_path / "t.jsonl", [GOOD, {"instruction": "2+2", "output": 4}])
    ds = build_datasets(DataConfig(train_files=[g], on_bad_row="skip"), tok, seed=0)
    assert len(ds.train) == 1 and ds.stats["train"].skipped_bad == 1


def test_skip_never_covers_a_bad_file(tmp_path, tok):
    f = tmp_path / "all_bad.jsonl"
    f.write_text("{oops\n{oops\n")
    assert f"{f}: all 2 of its rows were skipped as bad" in error(tok, train_files=[str(f)], on_bad_row="skip")
    assert "no such file" in error(tok, train_files=[str(tmp_path / "x.jsonl")], on_bad_row="skip")
    long = jsonl(tmp_path / "long.jsonl", [{"instruction": "long " * 100, "output": "x"}])
    assert "raise data.max_length" in error(tok, train_files=[long], max_length=16, on_bad_row="skip")


def test_skip_with_num_proc_counts_in_the_main_process(tmp_path, tok):
    f = jsonl(tmp_path / "d.jsonl", [GOOD] * 3 + [{"instruction": "q", "output": ""}] * 2)
    ds = build_datasets(DataConfig(train_files=[f], on_bad_row="skip", num_proc=2), tok, seed=0)
    assert len(ds.train) == 3 and ds.stats["train"].skipped_bad == 2


def test_error_from_a_map_worker_keeps_its_kind():
    import pickle

    e = pickle.loads(pickle.dumps(BadRow("f.jsonl:3: empty response", "empty response")))
    assert (str(e), e.kind) == ("f.jsonl:3: empty response", "empty response")


def test_hub_dataset_rows_are_named_by_split_and_row(tmp_path, tok, monkeypatch):
    # A local dataset directory goes through `load_dataset` like a hub name, offline.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "my_dataset"
    d.mkdir()
    jsonl(d / "train.jsonl", [GOOD, GOOD, {"instruction": "x", "output": " "}])
    msg = error(tok, dataset=str(d))
    assert f"{d} split 'train' row 3 (train sample_id 2): empty response" in msg
