"""`data.truncation` on rows longer than `data.max_length`: right (cut the end), left_prompt (cut the prompt from the
left, the answer whole), drop, split (windows of it); the counts, and the warning when many rows lose their answer."""

from __future__ import annotations

import json
import logging

import pytest
from transformers import AutoTokenizer

from sft_dist.config.load import builtin_path, load_config
from sft_dist.config.schema import DataConfig
from sft_dist.data.build import CUT_WARNING_FRACTION, build_datasets, row_tokenizer, split_windows
from sft_dist.errors import ConfigError
from sft_dist.data.formats import IGNORE
from tests.conftest import QUICKSTART

MAX = 64
LONG, SHORT = 14, 6


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def long_prompts(path) -> str:
    """LONG rows whose prompt alone is longer than MAX tokens, then SHORT rows that fit."""
    rows = [{"instruction": "palavra " * 80 + f"número {i}", "output": f"Resposta {i}."} for i in range(LONG)]
    rows += [{"instruction": f"Diga {i}.", "output": f"{i}"} for i in range(SHORT)]
    return write(path, rows)


def build(tok, f, **data):
    return build_datasets(DataConfig(train_files=[f], template="alpaca_pt", max_length=MAX, cache=False, **data), tok,
                          seed=0)


def test_right_cuts_the_answer_and_warns(tmp_path, tok, caplog):
    caplog.set_level(logging.INFO, logger="sft_dist.data.build")
    ds = build(tok, long_prompts(tmp_path / "d.jsonl"))
    st = ds.stats["train"]
    assert (st.rows, st.truncated, st.prompt_cut, st.dropped_no_loss, st.dropped_long) == (20, LONG, 0, LONG, 0)
    assert len(ds.train) == SHORT
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"data train: {LONG} of 20 rows (70.0%) lost their answer to data.max_length={MAX}: {LONG} dropped with no "
        "loss-carrying token left (the prompt fills it); raise data.max_length, or set data.truncation=left_prompt "
        "to cut prompts from the left and keep answers whole"]


def test_left_prompt_keeps_every_answer_whole(tmp_path, tok, caplog):
    caplog.set_level(logging.INFO, logger="sft_dist.data.build")
    ds = build(tok, long_prompts(tmp_path / "d.jsonl"), truncation="left_prompt")
    st = ds.stats["train"]
    assert (st.rows, st.truncated, st.prompt_cut, st.dropped_no_loss, st.dropped_long) == (20, 0, LONG, 0, 0)
    assert len(ds.train) == 20 and not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert f"0 truncated to data.max_length={MAX} ({LONG} more had their prompt cut from the left, the answer kept)" \
        in st.describe("train", MAX)
    head = tok("### Instrução:\n")["input_ids"]  # BOS and the template's text before the instruction
    tail = tok("\n\n### Resposta:\n", add_special_tokens=False)["input_ids"]
    for row in ds.train.select(range(LONG)):
        i = row["sample_id"]
        ids, labels = row["input_ids"], row["labels"]
        answer = tok(f"Resposta {i}.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert len(ids) == MAX and ids[: len(head)] == head
        assert ids[-len(answer):] == answer and ids[-len(answer) - len(tail):-len(answer)] == tail
        assert [t for t in labels if t != IGNORE] == answer  # exactly the answer carries loss
        assert f"número {i}" in tok.decode(ids)  # the prompt's end survives, its start went
    assert st.loss_tokens == sum(sum(t != IGNORE for t in r[1:]) for r in ds.train["labels"])
    assert st.tokens == sum(len(r) for r in ds.train["input_ids"])


def test_drop_leaves_long_rows_out(tmp_path, tok, caplog):
    caplog.set_level(logging.INFO, logger="sft_dist.data.build")
    st = build(tok, long_prompts(tmp_path / "d.jsonl"), truncation="drop").stats["train"]
    assert (st.rows, st.truncated, st.dropped_long, st.dropped_no_loss) == (20, 0, LONG, 0)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING][0].startswith(
        f"data train: {LONG} of 20 rows (70.0%) lost their answer to data.max_length={MAX}: {LONG} dropped as longer")


def test_left_prompt_cuts_the_answer_only_when_it_cannot_fit(tok):
    t = row_tokenizer(DataConfig(format="prompt_completion", max_length=MAX, truncation="left_prompt"), tok)
    out = t({"prompt": "palavra " * 80, "completion": "curta"}, "r")
    assert out["_cut"] == "prompt" and len(out["input_ids"]) == MAX and out["input_ids"][0] == tok.bos_token_id
    assert [x for x in out["labels"] if x != IGNORE] == tok("curta", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id]
    too_long = t({"prompt": "pergunta", "completion": "resposta " * 80}, "r")
    full = row_tokenizer(DataConfig(format="prompt_completion"), tok)({"prompt": "pergunta", "completion": "resposta " * 80},
                                                                         "r")
    assert too_long["_cut"] == "right" and too_long["input_ids"] == full["input_ids"][:MAX]
    assert too_long["_length"] == len(full["input_ids"])


def test_left_prompt_drops_the_earliest_exchanges_of_a_conversation(tok):
    system = {"role": "system", "content": "Seja breve."}
    turns = []
    for i in range(4):
        turns += [{"role": "user", "content": f"Pergunta {i}: " + "palavra " * 6},
                  {"role": "assistant", "content": f"Resposta {i}."}]
    full = row_tokenizer(DataConfig(format="messages"), tok)({"messages": [system] + turns}, "r")
    last_two = row_tokenizer(DataConfig(format="messages"), tok)({"messages": [system] + turns[4:]}, "r")
    limit = len(last_two["input_ids"])
    assert len(full["input_ids"]) > limit
    out = row_tokenizer(DataConfig(format="messages", max_length=limit, truncation="left_prompt"), tok)(
        {"messages": [system] + turns}, "r")
    assert out["_cut"] == "prompt" and out["_length"] == len(full["input_ids"])
    assert (out["input_ids"], out["labels"]) == (last_two["input_ids"], last_two["labels"])
    assert tok.decode([t for t in out["labels"] if t != IGNORE]) == "Resposta 2.<|im_end|>Resposta 3.<|im_end|>"
    assert tok.decode(out["input_ids"]).startswith("<s><|im_start|>system\nSeja breve.<|im_end|>")


@pytest.mark.parametrize("n, overlap", [(10, 0), (10, 1), (10, 2), (8, 0), (8, 2), (3, 2), (17, 5)])
def test_split_windows_cover_every_token_once(n, overlap):
    m = 4 if overlap < 3 else 10
    ids, labels = list(range(100, 100 + n)), [IGNORE, IGNORE] + list(range(102, 100 + n))  # a 2-token prompt
    windows = split_windows(ids, labels, m, overlap)
    assert all(len(w) <= m and len(w) == len(lab) for w, lab in windows)
    rebuilt = windows[0][0] + [t for w, _ in windows[1:] for t in w[overlap:]]
    assert rebuilt == ids  # consecutive: each window goes on where the one before ended, after its context
    for (w, _), (nxt, _) in zip(windows, windows[1:]):
        assert nxt[:overlap] == w[len(w) - overlap:]  # a window's context: the end of the one before
    # every loss-carrying position carries loss in exactly one window
    trained = [t for w, lab in windows for t in lab if t != IGNORE]
    assert trained == [t for t in labels if t != IGNORE] and len(set(trained)) == len(trained)


def test_split_trains_every_token_of_a_long_row(tmp_path, tok, caplog):
    caplog.set_level(logging.INFO, logger="sft_dist.data.build")
    text = "um dois três quatro cinco seis sete oito nove dez " * 6
    f = write(tmp_path / "d.jsonl", [{"text": text}, {"text": "curta"}])
    whole = tok(text)["input_ids"] + [tok.eos_token_id]
    assert len(whole) > 2 * 16
    ds = build_datasets(DataConfig(train_files=[f], format="text", max_length=16, truncation="split", split_overlap=4,
                                   cache=False), tok, seed=0)
    st = ds.stats["train"]
    windows = [r for r in ds.train if r["sample_id"] == 0]
    assert len(windows) == st.windows == 1 + -(-(len(whole) - 16) // 12) and st.split == 1
    assert windows[0]["input_ids"] + [t for r in windows[1:] for t in r["input_ids"][4:]] == whole
    assert all(r["labels"][:4] == [IGNORE] * 4 for r in windows[1:])
    short = len(tok("curta")["input_ids"])  # + EOS - the first token
    assert st.loss_tokens == len(whole) - 1 + short  # every token but a row's first carries loss once, EOS too
    assert st.rows == len(ds.train) == len(windows) + 1 and st.truncated == 0
    assert f"1 longer than data.max_length=16 split into {st.windows} windows" in st.describe("train", 16)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("overrides, message", [
    (["data.truncation=split", "data.split_overlap=65"], "data.split_overlap: got 65; must be in 0..64"),
    (["data.split_overlap=4"], "data.split_overlap: applies to data.truncation=split only"),
    (["data.truncation=split", "data.streaming=true", "training.max_steps=10", "data.eval_files=null"],
     "data.truncation: split is not supported with data.streaming"),
])
def test_split_options_are_checked_with_the_config(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(QUICKSTART, overrides)


def test_warning_threshold(tmp_path, tok, caplog):
    caplog.set_level(logging.INFO, logger="sft_dist.data.build")
    n = 100
    at_limit = int(CUT_WARNING_FRACTION * n)
    for cut, warned in ((at_limit, False), (at_limit + 1, True)):
        rows = [{"instruction": "palavra " * 80, "output": "x"}] * cut + [{"instruction": "q", "output": "a"}] * (n - cut)
        caplog.clear()
        build(tok, write(tmp_path / f"d{cut}.jsonl", rows))
        assert any(r.levelno == logging.WARNING for r in caplog.records) == warned


def test_truncate_is_the_old_name_of_right():
    assert DataConfig(truncation="truncate").truncation == "right"
    assert load_config(QUICKSTART, ["data.truncation=truncate"]).data.truncation == "right"


def test_preprocess_prints_the_train_summary(tmp_path, capsys):
    from sft_dist.cli import main

    f = long_prompts(tmp_path / "d.jsonl")
    args = ["preprocess", str(QUICKSTART), f"data.train_files={f}", "data.eval_files=null", f"data.max_length={MAX}",
            f"data.cache_dir={tmp_path / 'cache'}"]
    for hit in (False, True):
        assert main(args) == 0
        out, err = capsys.readouterr()
        lines = out.splitlines()
        assert lines[0].startswith("cache hit: " if hit else "cached: ")
        # SplitStats.describe, the line `train` logs
        assert lines[1].startswith("  train: 20 rows, ") and lines[1].endswith(
            f"carry loss); {LONG} truncated to data.max_length={MAX}; {LONG} dropped (no loss-carrying token left)")
        assert f"data train: {LONG} of 20 rows (70.0%) lost their answer" in err
