"""The launcher's data precheck: every bad file of the catalog refused with the very message (and type) the
workers' build raises, in well under 5 s on 100k-row files; good files pass; nothing heavy imported."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from sft_dist.config.load import builtin_path
from sft_dist.config.schema import DataConfig
from sft_dist.data.build import build_datasets
from sft_dist.data.precheck import STREAM_ROWS, precheck
from sft_dist.errors import BadRow, ConfigError, DataError

GOOD = {"instruction": "Say hi.", "output": "hi"}
CHAT = {"messages": [{"role": "user", "content": "Oi"}, {"role": "assistant", "content": "Olá"}]}
SHARE = {"conversations": [{"from": "human", "value": "Oi"}, {"from": "gpt", "value": "Olá"}]}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))


def jsonl(path: Path, rows: list, *, raw: dict[int, bytes] | None = None) -> str:
    """Rows as JSON lines; `raw` replaces line i (from 1) with bytes as given."""
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in rows]
    for i, b in (raw or {}).items():
        lines[i - 1] = b
    path.write_bytes(b"".join(x + b"\n" for x in lines))
    return str(path)


def refused(fn) -> BaseException:
    with pytest.raises(DataError) as e:
        fn()
    return e.value


def same_refusal(tok, **data) -> str:
    """Precheck and build refuse `data` with the same error type and message; the message."""
    cfg = dict(cache=False, **data)
    pre = refused(lambda: precheck(DataConfig(**cfg), seed=0))
    built = refused(lambda: build_datasets(DataConfig(**cfg), tok, seed=0))
    assert (type(pre), str(pre)) == (type(built), str(built))
    return str(pre)


def write_catalog(d: Path) -> dict[str, tuple[dict, str]]:
    """name -> (data options, a fragment the message must hold): small files, each bad in one way."""
    d.mkdir(exist_ok=True)
    many = [GOOD] * 9
    cases = {
        "invalid JSON mid-file": (jsonl(d / "cut.jsonl", many, raw={5: b'{"instruction": "x", "outp'}), ":5: invalid JSON"),
        "bad UTF-8": (jsonl(d / "latin1.jsonl", many, raw={4: '{"instruction": "ação", "output": "b"}'.encode("latin-1")}),
                      ":4: not valid UTF-8"),
        "not an object": (jsonl(d / "list.jsonl", many, raw={2: b'["a", "b"]'}), ":2: expected a JSON object per line"),
        "null in a row": (jsonl(d / "null.jsonl", many + [{"instruction": None, "output": "b"}]),
                          ":10 (train sample_id 9): column 'instruction' is missing or null"),
        "missing column in a row": (jsonl(d / "noout.jsonl", many[:3] + [{"instruction": "x"}] + many[:3]),
                                    ":4 (train sample_id 3): column 'output' is missing or null"),
        "missing column": (jsonl(d / "qa.jsonl", [{"question": "q", "answer": "a"}] * 3),
                           "needs column(s) ['instruction', 'output'], found ['question', 'answer']"),
        "wrong type (one row)": (jsonl(d / "num.jsonl", many[:2] + [{"instruction": "2+2", "output": 4}] + many),
                                 ":3: column 'output' is number, other rows have str"),
        "wrong type (every row)": (jsonl(d / "nums.jsonl", [{"instruction": "2+2", "output": 4}] * 3),
                                   ":1 (train sample_id 0): column 'output' must be text, got int 4"),
        "empty response": (jsonl(d / "blank.jsonl", many + [{"instruction": "x", "output": " \n"}]),
                           ":10 (train sample_id 9): empty response (column 'output' is blank)"),
        "empty file": (jsonl(d / "empty.jsonl", []), "empty.jsonl: the file has no rows"),
        "missing file": (str(d / "nope.jsonl"), "nope.jsonl: no such file"),
        "directory": (_mkdir(d / "dir.jsonl"), "dir.jsonl: is a directory, not a file"),
        "unsupported type": (_write(d / "data.txt", "hello\n"), "unsupported file type '.txt'"),
        "json not a list": (_write(d / "obj.json", json.dumps({"a": 1})), "expected a list of objects"),
        "json row not an object": (_write(d / "rows.json", json.dumps([GOOD, 3, GOOD])),
                                   "rows.json row 2: expected a JSON object"),
        "json invalid": (_write(d / "broken.json", '[{"instruction": "a",\n "output": }]'), "broken.json:2: invalid JSON"),
    }
    return {name: ({"train_files": [f]}, frag) for name, (f, frag) in cases.items()}


def _mkdir(path: Path) -> str:
    path.mkdir()
    return str(path)


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_every_bad_file_is_refused_with_the_builds_message(tmp_path, tok):
    for name, (data, fragment) in write_catalog(tmp_path / "bad").items():
        msg = same_refusal(tok, **data)
        assert fragment in msg, (name, msg)
        assert data["train_files"][0] in msg or "needs column" in msg, (name, msg)


def test_chat_formats_refused_like_the_build(tmp_path, tok):
    bad_role = {"messages": [{"role": "bot", "content": "Oi"}, {"role": "assistant", "content": "Olá"}]}
    f = jsonl(tmp_path / "role.jsonl", [CHAT, CHAT, bad_role])
    msg = same_refusal(tok, train_files=[f], format="messages")
    assert f"{f}:3 (train sample_id 2): messages[0] has unknown role 'bot'; allowed: system, user, assistant, tool" in msg
    assert "data.roles.bot=assistant" in msg
    for i, row in enumerate([{"messages": []}, {"messages": [{"role": "user", "content": 5}]},
                             {"messages": [{"role": "user", "content": "Oi"}]}]):
        f = jsonl(tmp_path / f"chat{i}.jsonl", [CHAT, row])
        assert f"{f}:2 (train sample_id 1): " in same_refusal(tok, train_files=[f], format="messages")
    g = jsonl(tmp_path / "share.jsonl", [SHARE, {"conversations": [{"from": "narrator", "value": "x"}]}])
    msg = same_refusal(tok, train_files=[g], format="sharegpt")
    assert f"{g}:2 (train sample_id 1): conversations[0] has unknown role 'narrator'; allowed: system, human, " in msg


def test_csv_and_parquet_refused_like_the_build(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    c = tmp_path / "d.csv"
    c.write_text("prompt,completion\na,b\nc,\n")
    assert f"{c} row 2 (train sample_id 1): empty response (column 'completion' is blank)" in \
        same_refusal(tok, train_files=[str(c)], format="prompt_completion")
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": [1, 2]}), p)
    assert f"{p} row 1 (train sample_id 0): column 'completion' must be text, got int 1" in \
        same_refusal(tok, train_files=[str(p)], format="prompt_completion")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    assert f"{broken}: cannot read parquet file" in same_refusal(tok, train_files=[str(broken)],
                                                                 format="prompt_completion")


def test_options_refused_like_the_build(tmp_path, tok):
    f = jsonl(tmp_path / "qa.jsonl", [{"id": 1, "question": "q", "answer": "a"}, {"id": 1, "question": "r", "answer": "b"}])
    cols = {"instruction": "question", "output": "answer"}
    assert "data.columns.output: " in same_refusal(tok, train_files=[f], columns={"instruction": "question",
                                                                                   "output": "reply"})
    assert f"{f}:2: duplicate id 1 (column 'id'), first at {f}:1" in same_refusal(tok, train_files=[f], columns=cols,
                                                                                  id_column="id")
    assert "data.id_column: " in same_refusal(tok, train_files=[f], columns=cols, id_column="uid")
    # held-out rows: the row is named in the split the seeded hold-out puts it in
    g = jsonl(tmp_path / "ratio.jsonl", [{"instruction": f"i{i}", "output": "" if i == 7 else "o"} for i in range(20)])
    assert ":8 (" in same_refusal(tok, train_files=[g], eval_split_ratio=0.5)


def test_mixture_and_eval_files(tmp_path, tok):
    a = jsonl(tmp_path / "a.jsonl", [GOOD] * 4)
    b = jsonl(tmp_path / "b.jsonl", [GOOD, {"instruction": "x", "output": ""}])
    mixture = [{"files": [a], "weight": 1}, {"files": [b], "weight": 1}]
    # 3 samples each: a (4 rows) a seeded subset, b (2 rows) whole and one more; b follows a's 3
    assert f"{b}:2 (train sample_id 4): empty response" in same_refusal(tok, mixture=mixture)
    assert f"{b}:2 (eval sample_id 1)" in same_refusal(tok, train_files=[a], eval_files=[b])
    # every split is read before any row is checked: the eval file's broken line comes before the train row
    e = jsonl(tmp_path / "e.jsonl", [GOOD, GOOD], raw={2: b"{oops"})
    assert f"{e}:2: invalid JSON" in same_refusal(tok, train_files=[b], eval_files=[e])
    # a source drawn as a seeded subset: its rows are the workers' to check (precheck passes and says so)
    report = precheck(DataConfig(mixture=[{"files": [a], "weight": 1}, {"files": [b], "weight": 1}], mixture_rows=2))
    assert report.rows == {"train": 0} and len(report.notes) == 2 and "left to the workers" in report.notes[1]


def test_streaming_names_the_row_as_the_stream_does(tmp_path):
    f = jsonl(tmp_path / "s.jsonl", [GOOD, GOOD, {"instruction": "x", "output": ""}], raw={})
    e = refused(lambda: precheck(DataConfig(train_files=[f], streaming=True)))
    assert isinstance(e, BadRow) and str(e).startswith(f"{f}:3 (train sample_id 2): empty response")
    empty = jsonl(tmp_path / "e.jsonl", [])
    assert "data.streaming: the training data has no rows" in str(refused(
        lambda: precheck(DataConfig(train_files=[empty], streaming=True))))
    assert STREAM_ROWS == 100_000


def test_glob_matching_nothing_is_refused_like_the_config(tmp_path):
    spec = str(tmp_path / "nothing" / "*.jsonl")
    msg = str(refused(lambda: precheck(DataConfig(train_files=spec))))
    with pytest.raises(ConfigError) as e:
        from sft_dist.config.load import build_config

        build_config({"model": {"name_or_path": "x"}, "data": {"train_files": spec}})
    assert msg == f"data.train_files: {spec!r} matches no file (relative paths are taken from the current directory)"
    assert msg in e.value.problems


def test_skip_counts_what_the_build_skips(tmp_path, tok):
    f = jsonl(tmp_path / "d.jsonl", [GOOD, {"instruction": "x", "output": ""}, GOOD, {"instruction": 3, "output": "y"},
                                     GOOD], raw={3: b"{oops"})
    cfg = DataConfig(train_files=[f], on_bad_row="skip", cache=False)
    report = precheck(cfg)
    built = build_datasets(cfg, tok, seed=0)
    assert report.skipped["train"] == built.stats["train"].skipped_bad == 3
    assert report.rows["train"] == 3  # the invalid line and the clashing row are not rows
    every = jsonl(tmp_path / "all.jsonl", [{"instruction": "x", "output": ""}] * 2)
    assert "every train row is bad: data train: skipped 2 bad row(s)" in same_refusal(tok, train_files=[every],
                                                                                      on_bad_row="skip")


def test_good_files_pass(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    demo = str(builtin_path("data/alpaca_demo_train.jsonl"))
    report = precheck(DataConfig(train_files=[demo], eval_files=[str(builtin_path("data/alpaca_demo_eval.jsonl"))],
                                 cache=False))
    assert report.rows == {"train": 400, "eval": 48} and report.files == 2 and not any(report.skipped.values())
    p = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([SHARE] * 3), p)
    assert precheck(DataConfig(train_files=[str(p)], format="sharegpt")).rows == {"train": 3}


def test_a_built_cache_entry_is_not_read_again(tmp_path, tok):
    from sft_dist.data.cache import load_or_build

    f = jsonl(tmp_path / "d.jsonl", [GOOD] * 5)
    cfg = DataConfig(train_files=[f], cache_dir=str(tmp_path / "cache"))
    assert precheck(cfg).cached is None
    _, info = load_or_build(cfg, tok, seed=42)
    assert precheck(cfg, seed=42).cached == str(info.path)
    assert precheck(cfg, seed=1).cached is None  # another seed, another entry
    jsonl(tmp_path / "d.jsonl", [GOOD] * 4 + [{"instruction": "x", "output": ""}])  # the file changed
    assert ":5 (train sample_id 4): empty response" in str(refused(lambda: precheck(cfg, seed=42)))


def test_precheck_imports_no_torch_transformers_or_datasets(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [GOOD] * 3)
    code = (
        "import sys\n"
        "from sft_dist.config.schema import DataConfig\n"
        "from sft_dist.data.precheck import precheck\n"
        f"precheck(DataConfig(train_files=[{f!r}], eval_split_ratio=0.34, cache=False))\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'trl', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# --- 100k-row files: refused (or passed) in well under 5 s ---

ROWS = 100_000
LIMIT_S = 5.0


def _alpaca(i: int) -> dict:
    return {"instruction": f"Traduza para o inglês a frase número {i}: o gato dorme ao sol da tarde.",
            "input": "" if i % 3 else f"contexto {i}", "output": f"Sentence {i}: the cat sleeps in the afternoon sun."}


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> dict[str, tuple[dict, str]]:
    """name -> (data options, fragment): a good 100k-row file of each kind, and each with one bad row mid-file."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("big")
    mid = ROWS // 2
    lines = [json.dumps(_alpaca(i), ensure_ascii=False).encode() for i in range(ROWS)]

    def variant(name: str, bad: bytes) -> str:
        path = d / f"{name}.jsonl"
        path.write_bytes(b"\n".join(lines[:mid] + [bad] + lines[mid + 1:]) + b"\n")
        return str(path)

    chat = [json.dumps({"messages": [{"role": "user", "content": f"Quanto é {i} + 1?"},
                                     {"role": "assistant", "content": f"{i + 1}"}]}).encode() for i in range(ROWS)]
    chat[mid] = json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode()
    (d / "chat.jsonl").write_bytes(b"\n".join(chat) + b"\n")
    table = pa.table({"prompt": [f"Quanto é {i} + 1?" for i in range(ROWS)],
                      "completion": [f"É {i + 1}." if i != mid else None for i in range(ROWS)]})
    pq.write_table(table, d / "null.parquet")
    pcsv.write_csv(table, d / "null.csv")
    (d / "good.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    where = f":{mid + 1}"
    return {
        "good": ({"train_files": [str(d / "good.jsonl")]}, ""),
        "invalid JSON": ({"train_files": [variant("cut", b'{"instruction": "x", "outp')]}, f"{where}: invalid JSON"),
        "bad UTF-8": ({"train_files": [variant("latin1", '{"instruction": "ação", "output": "b"}'.encode("latin-1"))]},
                      f"{where}: not valid UTF-8"),
        "missing column": ({"train_files": [variant("noout", b'{"instruction": "x"}')]},
                           f"{where} (train sample_id {mid}): column 'output' is missing or null"),
        "wrong type": ({"train_files": [variant("num", b'{"instruction": "x", "output": 4}')]},
                       f"{where}: column 'output' is number, other rows have str"),
        "empty response": ({"train_files": [variant("blank", b'{"instruction": "x", "output": ""}')]},
                           f"{where} (train sample_id {mid}): empty response"),
        "messages bad role": ({"train_files": [str(d / "chat.jsonl")], "format": "messages"},
                              f"{where} (train sample_id {mid}): messages[0] has unknown role 'robot'"),
        "parquet null": ({"train_files": [str(d / "null.parquet")], "format": "prompt_completion"},
                         f" row {mid + 1} (train sample_id {mid}): column 'completion' is missing or null"),
        "csv blank": ({"train_files": [str(d / "null.csv")], "format": "prompt_completion"},
                      f" row {mid + 1} (train sample_id {mid}): empty response"),
    }


@pytest.mark.parametrize("case", ["good", "invalid JSON", "bad UTF-8", "missing column", "wrong type", "empty response",
                                  "messages bad role", "parquet null", "csv blank"])
def test_100k_rows_in_well_under_5_s(big, case, capsys):
    data, fragment = big[case]
    cfg = DataConfig(cache=False, **data)
    t0 = time.monotonic()
    if case == "good":
        report = precheck(cfg)
        assert report.rows == {"train": ROWS}
    else:
        msg = str(refused(lambda: precheck(cfg)))
        assert data["train_files"][0] + fragment in msg, msg
    took = time.monotonic() - t0
    with capsys.disabled():
        print(f"\n  precheck of 100k rows, {case}: {took:.2f} s", end="")
    assert took < LIMIT_S, took
