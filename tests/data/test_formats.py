"""Tokenization with loss masks, token by token, on real examples with the shipped tokenizer."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from sft_dist.config.load import builtin_path
from sft_dist.config.schema import DataConfig
from sft_dist.data.build import build_datasets
from sft_dist.data.formats import IGNORE, Tokenizer
from sft_dist.data.templates import resolve_template
from sft_dist.errors import DataError


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))


def loss_text(tok, out):
    """The text of the tokens that carry loss."""
    return tok.decode([t for t, l in zip(out["input_ids"], out["labels"]) if l != IGNORE])


def test_alpaca_masks_prompt_and_trains_on_response_plus_eos(tok):
    t = Tokenizer(tok, fmt="alpaca", template=resolve_template("alpaca_pt"), completion_only_loss=True)
    row = {"instruction": "Qual é a capital de Portugal?", "input": "", "output": "A capital de Portugal é Lisboa."}
    out = t(row, "row 0")
    prompt_ids = tok("### Instrução:\nQual é a capital de Portugal?\n\n### Resposta:\n")["input_ids"]
    n = len(prompt_ids)
    assert out["input_ids"][:n] == prompt_ids and prompt_ids[0] == tok.bos_token_id
    assert out["labels"][:n] == [IGNORE] * n
    assert out["labels"][n:] == out["input_ids"][n:]
    assert out["input_ids"][-1] == tok.eos_token_id
    assert loss_text(tok, out) == "A capital de Portugal é Lisboa.</s>"


def test_completion_only_off_trains_on_everything(tok):
    t = Tokenizer(tok, fmt="alpaca", template=resolve_template("alpaca"), completion_only_loss=False)
    out = t({"instruction": "Say hi.", "output": "hi"}, "row 0")
    assert out["labels"] == out["input_ids"]


def test_prompt_completion_and_text(tok):
    pc = Tokenizer(tok, fmt="prompt_completion", template="", completion_only_loss=True)
    out = pc({"prompt": "2+2=", "completion": "4"}, "row 0")
    assert loss_text(tok, out) == "4</s>"
    text = Tokenizer(tok, fmt="text", template="", completion_only_loss=False)
    out = text({"text": "Olá mundo"}, "row 0")
    assert out["labels"] == out["input_ids"] and tok.decode(out["input_ids"]) == "<s>Olá mundo</s>"


def test_messages_assistant_only_multi_turn(tok):
    t = Tokenizer(tok, fmt="messages", template="", completion_only_loss=True)
    msgs = [
        {"role": "system", "content": "Seja breve."},
        {"role": "user", "content": "Oi"},
        {"role": "assistant", "content": "Olá!"},
        {"role": "user", "content": "Tudo bem?"},
        {"role": "assistant", "content": "Sim."},
    ]
    out = t({"messages": msgs}, "row 0")
    assert loss_text(tok, out) == "Olá!<|im_end|>Sim.<|im_end|>"


def test_messages_without_generation_markers_use_prefix_rendering(tok):
    # Same ChatML template with the {% generation %} markers removed: the mask must come out identical.
    plain = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    tok2 = AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))
    tok2.chat_template = plain
    msgs = [{"role": "user", "content": "Oi"}, {"role": "assistant", "content": "Olá!"},
            {"role": "user", "content": "E aí?"}, {"role": "assistant", "content": "Bem."}]
    a = Tokenizer(tok, fmt="messages", template="", completion_only_loss=True)({"messages": msgs}, "r")
    b = Tokenizer(tok2, fmt="messages", template="", completion_only_loss=True)({"messages": msgs}, "r")
    assert a["input_ids"] == b["input_ids"]
    # the prefix method also counts the newline after <|im_end|> as part of the turn
    assert loss_text(tok2, b).startswith("Olá!<|im_end|>")
    assert "Oi" not in loss_text(tok2, b) and "E aí?" not in loss_text(tok2, b)


def test_messages_errors_name_the_row(tok):
    t = Tokenizer(tok, fmt="messages", template="", completion_only_loss=True)
    with pytest.raises(DataError, match="train row 3: the conversation has no assistant turn"):
        t({"messages": [{"role": "user", "content": "Oi"}]}, "train row 3")
    with pytest.raises(DataError, match=r"train row 4: messages\[0\] must be an object"):
        t({"messages": [{"role": "user"}]}, "train row 4")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_build_datasets_counts_truncation_and_drops(tmp_path, tok):
    rows = [{"instruction": "short", "output": "ok"},
            {"instruction": "long " * 200, "output": "never seen"},  # prompt alone exceeds max_length
            {"instruction": "mid", "output": "word " * 100}]  # response truncated, still has loss
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = build_datasets(DataConfig(train_files=[f], max_length=32), tok, seed=0)
    st = ds.stats["train"]
    assert (st.rows, st.truncated, st.dropped_no_loss) == (3, 2, 1)
    assert sorted(ds.train["sample_id"]) == [0, 2]
    assert max(len(x) for x in ds.train["input_ids"]) == 32


def test_column_mapping_and_missing_column(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    ds = build_datasets(DataConfig(train_files=[f], columns={"instruction": "question", "output": "answer"}), tok,
                        seed=0)
    assert len(ds.train) == 1
    with pytest.raises(DataError, match=r"needs column\(s\) \['instruction', 'output'\].*data.columns"):
        build_datasets(DataConfig(train_files=[f]), tok, seed=0)


def test_bad_rows_are_reported_by_file_line_or_row(tmp_path, tok):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        build_datasets(DataConfig(train_files=[str(bad_json)]), tok, seed=0)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"instruction": "ação", "output": "b"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl:1: not valid UTF-8"):
        build_datasets(DataConfig(train_files=[str(latin1)]), tok, seed=0)
    null = write_jsonl(tmp_path / "null.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": None, "output": "b"}])
    with pytest.raises(DataError, match=r"null.jsonl:2 \(train sample_id 1\): column 'instruction' is missing or null"):
        build_datasets(DataConfig(train_files=[null]), tok, seed=0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="has no rows"):
        build_datasets(DataConfig(train_files=[str(empty)]), tok, seed=0)


def test_eval_split_ratio_is_seeded_and_disjoint(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"i{i}", "output": f"o{i}"} for i in range(50)])
    a = build_datasets(DataConfig(train_files=[f], eval_split_ratio=0.2), tok, seed=3)
    b = build_datasets(DataConfig(train_files=[f], eval_split_ratio=0.2), tok, seed=3)
    assert len(a.eval) == 10 and len(a.train) == 40
    assert a.eval["sample_id"] == b.eval["sample_id"]
    assert not set(a.eval["sample_id"]) & set(a.train["sample_id"])


def test_parquet_and_csv(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    table = pa.table({"prompt": ["a", "b"], "completion": ["x", "y"]})
    pq.write_table(table, tmp_path / "d.parquet")
    pcsv.write_csv(table, tmp_path / "d.csv")
    for name in ("d.parquet", "d.csv"):
        ds = build_datasets(DataConfig(train_files=[str(tmp_path / name)], format="prompt_completion"), tok, seed=0)
        assert len(ds.train) == 2


def test_data_dataset_goes_through_load_dataset(tmp_path, tok, monkeypatch):
    # `data.dataset` takes a hub name; a local dataset directory exercises the same `load_dataset` path offline.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "my_dataset"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"instruction": f"i{i}", "output": f"o{i}"} for i in range(6)])
    write_jsonl(d / "test.jsonl", [{"instruction": "e", "output": "f"}])
    ds = build_datasets(DataConfig(dataset=str(d), eval_split="test"), tok, seed=0)
    assert len(ds.train) == 6 and len(ds.eval) == 1
    with pytest.raises(DataError, match="data.dataset .* cannot load"):
        build_datasets(DataConfig(dataset=str(d), train_split="nope"), tok, seed=0)


@pytest.mark.parametrize("fmt, completion_only", [("alpaca", True), ("alpaca", False), ("prompt_completion", True),
                                                  ("text", True), ("messages", True)])
def test_batched_tokenization_gives_the_ids_of_one_row_at_a_time(tok, fmt, completion_only):
    """The build tokenizes 1000 rows per tokenizer call; every row's ids and labels, and which rows are bad, are
    those of tokenizing each segment of each row alone (the demo data, every 7th row broken)."""
    from sft_dist.errors import BadRow

    rows = [json.loads(line) for line in (builtin_path("data") / "alpaca_demo_train.jsonl").read_text().splitlines()]
    if fmt == "prompt_completion":
        rows = [{"prompt": r["instruction"] + r["input"], "completion": r["output"]} for r in rows]
    elif fmt == "text":
        rows = [{"text": r["instruction"] + "\n" + r["output"]} for r in rows]
    elif fmt == "messages":
        rows = [{"messages": [{"role": "user", "content": r["instruction"]},
                              {"role": "assistant", "content": r["output"]}]} for r in rows]
    for i in range(3, len(rows), 7):
        rows[i] = {k: None for k in rows[i]}
    t = Tokenizer(tok, fmt=fmt, template=resolve_template("alpaca_pt"), completion_only_loss=completion_only)

    def alone(row, where):
        """One tokenizer call per segment (BOS on the first), EOS appended: what batching must reproduce."""
        if fmt == "messages":
            return t(row, where)
        ids, labels = [], []
        for i, (text, carries) in enumerate(t._segments(row, where)):
            part = tok(text, add_special_tokens=(i == 0))["input_ids"]
            ids += part
            labels += part if carries or not completion_only else [IGNORE] * len(part)
        return {"input_ids": ids + [tok.eos_token_id], "labels": labels + [tok.eos_token_id]}

    wheres = [f"row {i}" for i in range(len(rows))]
    batched = t.batch(rows, wheres)
    assert len(batched) == len(rows) > 300
    for row, where, got in zip(rows, wheres, batched):
        try:
            want = alone(row, where)
        except BadRow as e:
            assert isinstance(got, BadRow) and str(got) == str(e)
        else:
            assert got == want and t(row, where) == want
    assert sum(isinstance(b, BadRow) for b in batched) == len(range(3, len(rows), 7))


SHAREGPT = {"conversations": [{"from": "system", "value": "Seja breve."}, {"from": "human", "value": "Oi"},
                              {"from": "gpt", "value": "Olá!"}, {"from": "human", "value": "Tudo bem?"},
                              {"from": "gpt", "value": "Sim."}]}
AS_MESSAGES = {"messages": [{"role": "system", "content": "Seja breve."}, {"role": "user", "content": "Oi"},
                            {"role": "assistant", "content": "Olá!"}, {"role": "user", "content": "Tudo bem?"},
                            {"role": "assistant", "content": "Sim."}]}


def chat_tokenizer(tok, **data):
    from sft_dist.data.build import row_tokenizer

    return row_tokenizer(DataConfig(**data), tok)


def test_sharegpt_is_token_exact_with_messages(tok):
    a = chat_tokenizer(tok, format="messages")(AS_MESSAGES, "r")
    b = chat_tokenizer(tok, format="sharegpt")(SHAREGPT, "r")
    assert a == b and loss_text(tok, b) == "Olá!<|im_end|>Sim.<|im_end|>"
    assert sum(label != IGNORE for label in b["labels"]) == len(tok("Olá!<|im_end|>Sim.<|im_end|>",
                                                                    add_special_tokens=False)["input_ids"])


def test_sharegpt_tool_roles(tok):
    row = {"conversations": [{"from": "human", "value": "Tempo?"}, {"from": "function_call", "value": '{"f": "t"}'},
                             {"from": "observation", "value": "22 C"}, {"from": "gpt", "value": "22 graus."}]}
    out = chat_tokenizer(tok, format="sharegpt")(row, "r")
    # the tool call is the assistant's (loss), the observation the tool's (no loss)
    assert loss_text(tok, out) == '{"f": "t"}<|im_end|>22 graus.<|im_end|>'
    assert "<|im_start|>tool\n22 C<|im_end|>" in tok.decode(out["input_ids"])


def test_role_and_content_keys_and_role_names_on_messages(tok):
    row = {"dialog": [{"speaker": "system", "text": "Seja breve."}, {"speaker": "cliente", "text": "Oi"},
                      {"speaker": "bot", "text": "Olá!"}, {"speaker": "cliente", "text": "Tudo bem?"},
                      {"speaker": "bot", "text": "Sim."}]}
    t = chat_tokenizer(tok, format="messages", role_key="speaker", content_key="text",
                       roles={"cliente": "user", "bot": "assistant"})
    assert t({"messages": row["dialog"]}, "r") == chat_tokenizer(tok, format="messages")(AS_MESSAGES, "r")


def test_sharegpt_bad_rows_are_named_by_file_and_line(tmp_path, tok):
    rows = [SHAREGPT,
            {"conversations": [{"from": "human", "value": "Oi"}, {"from": "bot", "value": "Olá"}]},
            {"conversations": []},
            {"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
            {"conversations": [{"from": "human", "value": "Oi"}, {"from": "gpt", "value": "  "}]},
            {"chat": []}]
    want = [
        "conversations[1] has unknown role 'bot'; allowed: system, human, user, gpt, assistant, model, function_call, "
        "observation, tool (map others to system, user, assistant, tool with data.roles, e.g. data.roles.bot=assistant)",
        "column 'conversations' must be a non-empty list of {from, value} objects",
        "conversations[0] must be an object with text 'from' and 'value'",
        "empty response (conversations[1], an assistant turn, is blank)",
        "column 'conversations' is missing or null",
    ]
    for i, (row, msg) in enumerate(zip(rows[1:], want), start=2):
        f = write_jsonl(tmp_path / f"s{i}.jsonl", [SHAREGPT, row])
        with pytest.raises(DataError) as e:
            build_datasets(DataConfig(train_files=[f], format="sharegpt", cache=False), tok, seed=0)
        assert str(e.value).startswith(f"{f}:2 (train sample_id 1): {msg}"), str(e.value)
    f = write_jsonl(tmp_path / "skip.jsonl", rows)
    ds = build_datasets(DataConfig(train_files=[f], format="sharegpt", on_bad_row="skip"), tok, seed=0)
    assert len(ds.train) == 1 and ds.stats["train"].skipped_bad == 5


def test_chat_options_are_validated():
    from sft_dist.errors import ConfigError
    from sft_dist.validate import load_config
    from tests.conftest import QUICKSTART

    cfg = load_config(QUICKSTART, ["data.format=sharegpt", "data.roles={bot: assistant}"])
    assert cfg.data.roles == {"bot": "assistant"}
    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, ["data.format=sharegpt", "data.roles={bot: robot}"])
    assert "data.roles.bot: got 'robot'; map each role name to one of system, user, assistant, tool" in str(e.value)
    with pytest.raises(ConfigError, match="data.role_key: only for data.format messages or sharegpt"):
        load_config(QUICKSTART, ["data.role_key=speaker"])


def test_keys_missing_from_the_first_row_are_columns_too(tmp_path, tok):
    # `input` only in the second row: it must reach the prompt (Dataset.from_list keeps the first row's keys only)
    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"},
                                          {"instruction": "Some.", "input": "2 e 3", "output": "5"}])
    ds = build_datasets(DataConfig(train_files=[f], template="alpaca_pt", cache=False), tok, seed=0)
    assert "### Entrada:\n2 e 3" in tok.decode(ds.train[1]["input_ids"])


def test_eval_hold_out_is_the_datasets_split(tmp_path):
    from datasets import Dataset

    from sft_dist.data.rows import holdout

    for n, ratio, seed in [(50, 0.2, 3), (7, 0.3, 0), (1000, 0.05, 42)]:
        parts = Dataset.from_dict({"i": list(range(n))}).train_test_split(test_size=ratio, seed=seed, shuffle=True)
        assert holdout(n, ratio, seed=seed) == (parts["train"]["i"], parts["test"]["i"])
