"""Weighted mixing of several training sources (`data.mixture`): shares, seeded draws, per-source columns,
errors that name the source."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from transformers import AutoTokenizer

from sft_dist.config.load import builtin_path, load_config
from sft_dist.config.schema import DataConfig
from sft_dist.data.build import build_datasets
from sft_dist.data.mixture import draw, shares
from sft_dist.errors import ConfigError, DataError
from tests.conftest import QUICKSTART


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))


def jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_shares_follow_the_weights_and_sum_to_the_epoch():
    assert shares([10, 4], [1, 3], 40) == [10, 30]
    assert shares([10, 10, 10], [1, 1, 1], 10) == [4, 3, 3]  # largest remainder, ties to the first source
    assert sum(shares([7, 3, 5], [0.2, 0.5, 0.3], 101)) == 101


def test_draw_repeats_whole_passes_then_a_seeded_subset():
    idx = draw(4, 10, seed=1, source=0)
    assert Counter(idx) == Counter({i: 2 for i in range(4)}) + Counter(idx[8:])
    assert len(idx) == 10 and len(set(idx[8:])) == 2  # the top-up has no repeats
    assert draw(4, 10, seed=1, source=0) == idx
    assert {tuple(draw(100, 10, seed=s, source=0)) for s in range(5)}.__len__() == 5


def test_mixture_of_two_sources_with_their_own_columns(tmp_path, tok):
    a = jsonl(tmp_path / "a.jsonl", [{"instruction": f"qa{i}", "input": "x", "output": f"a{i}"} for i in range(10)])
    b = jsonl(tmp_path / "b.jsonl", [{"question": f"qb{i}", "answer": f"b{i}"} for i in range(4)])
    cfg = DataConfig(mixture=[{"files": [a], "weight": 1}, {"files": [b], "weight": 3,
                                                             "columns": {"instruction": "question", "output": "answer"}}],
                     mixture_rows=40, max_length=64)
    out = build_datasets(cfg, tok, seed=0)
    assert out.train["sample_id"] == list(range(40))
    answers = Counter(tok.decode([t for t in labels if t >= 0], skip_special_tokens=True).strip()
                      for labels in out.train["labels"])
    assert all(answers[f"a{i}"] == 1 for i in range(10))
    assert sorted(answers[f"b{i}"] for i in range(4)) == [7, 7, 8, 8]  # 30 = 4 x 7 + a seeded 2
    assert out.stats["train"].sources == [
        {"source": a, "rows": 10, "weight": 1.0, "samples": 10},
        {"source": b, "rows": 4, "weight": 3.0, "samples": 30},
    ]
    again = build_datasets(cfg, tok, seed=0)
    assert list(again.train["input_ids"]) == list(out.train["input_ids"])
    # the top-up (2 of b's 4 rows) is drawn from the seed
    assert any(list(build_datasets(cfg, tok, seed=s).train["input_ids"]) != list(out.train["input_ids"])
               for s in (1, 2, 3))


def test_default_epoch_is_the_sources_added_up(tmp_path, tok):
    a = jsonl(tmp_path / "a.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(6)])
    b = jsonl(tmp_path / "b.jsonl", [{"instruction": f"q{i}", "output": f"b{i}"} for i in range(6)])
    out = build_datasets(DataConfig(mixture=[{"files": [a], "weight": 2}, {"files": [b], "weight": 1}]), tok, seed=0)
    assert [s["samples"] for s in out.stats["train"].sources] == [8, 4]


def test_a_bad_row_names_its_source_file_and_line(tmp_path, tok):
    a = jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": "a"}])
    b = jsonl(tmp_path / "b.jsonl", [{"instruction": "q", "output": "b"}, {"instruction": "q", "output": ""}])
    with pytest.raises(DataError, match=rf"{b}:2 .*empty response"):
        build_datasets(DataConfig(mixture=[{"files": [a], "weight": 1}, {"files": [b], "weight": 1}]), tok, seed=0)


@pytest.mark.parametrize("mixture,extra,problem", [
    ([{"files": "builtin:data/alpaca_demo_train.jsonl", "weight": 0}], [], "data.mixture[0].weight: required, a number > 0"),
    ([{"files": "builtin:data/alpaca_demo_train.jsonl", "weigth": 1}], [], "data.mixture[0].weigth: unknown key; did you mean 'weight'?"),
    ([{"files": "nope/*.jsonl", "weight": 1}], [], "data.mixture[0].files: 'nope/*.jsonl' matches no file"),
    ([{"weight": 1}], [], "data.mixture[0].files: required"),
    ([{"files": "builtin:data/alpaca_demo_train.jsonl", "weight": 1}], ["data.eval_split_ratio=0.1"],
     "data.eval_split_ratio: cannot hold out rows of a mixture"),
])
def test_config_errors_name_the_source(mixture, extra, problem):
    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, ["data.train_files=null", "data.eval_files=null", f"data.mixture={json.dumps(mixture)}",
                                 *extra])
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def test_mixture_and_train_files_are_exclusive():
    with pytest.raises(ConfigError, match="set exactly one of"):
        load_config(QUICKSTART, ['data.mixture=[{"files": "builtin:data/alpaca_demo_train.jsonl", "weight": 1}]'])


def test_a_source_holds_rows_out_as_its_own_eval_set_before_mixing(tmp_path, tok):
    from sft_dist.data.build import by_set

    a = jsonl(tmp_path / "a.jsonl", [{"instruction": f"qa{i}", "output": f"a{i}"} for i in range(20)])
    b = jsonl(tmp_path / "b.jsonl", [{"instruction": f"qb{i}", "output": f"b{i}"} for i in range(4)])
    c = jsonl(tmp_path / "c.jsonl", [{"instruction": f"qc{i}", "output": f"c{i}"} for i in range(10)])
    cfg = DataConfig(mixture=[{"files": [a], "weight": 2, "name": "a", "eval_split_ratio": 0.2},
                              {"files": [b], "weight": 3},  # repeated: holding out of the mix would leak
                              {"files": [c], "weight": 1, "name": "c", "eval_split_ratio": 0.3}],
                     mixture_rows=60, max_length=64, cache=False)
    assert cfg.eval_sets == ("a", "c")
    out = build_datasets(cfg, tok, seed=0)

    def answers(ds):
        return [tok.decode([t for t in labels if t >= 0], skip_special_tokens=True).strip() for labels in ds["labels"]]

    sets = by_set(out.eval, cfg.eval_sets)
    held = {name: answers(ds) for name, ds in sets.items()}
    assert len(held["a"]) == 4 and len(held["c"]) == 3
    assert all(x.startswith("a") for x in held["a"]) and all(x.startswith("c") for x in held["c"])
    train = Counter(answers(out.train))
    assert not set(train) & set(held["a"] + held["c"])  # a held-out row is never trained on
    # a's 16 rows left to mix are drawn whole (20 of the 60: weight 2 of 6), and with the 4 held out make the source
    assert {x for x in train if x.startswith("a")} | set(held["a"]) == {f"a{i}" for i in range(20)}
    assert len(out.train) == 60 and out.stats["train"].sources[0]["rows"] == 16  # the source's rows left to mix
    again = build_datasets(cfg, tok, seed=0)
    assert answers(again.eval) == answers(out.eval)  # seeded
    assert answers(build_datasets(cfg, tok, seed=1).eval) != answers(out.eval)


def test_a_sources_eval_set_needs_a_name(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": "a"}] * 4)
    base = ["data.train_files=null", "data.eval_files=null"]
    for source, extra, message in (
            (f"{{files: {a}, weight: 1, eval_split_ratio: 0.1}}", [], r"eval_split_ratio: give the source a `name`"),
            (f"{{files: {a}, weight: 1, name: a-b, eval_split_ratio: 0.1}}", [], r"\.name: 'a-b': a source's name"),
            (f"{{files: {a}, weight: 1, name: a, eval_split_ratio: 1.5}}", [], r"eval_split_ratio: got 1\.5"),
            (f"{{files: {a}, weight: 1, name: a}}, {{files: {a}, weight: 1, name: a}}", [], r"source names .* repeat")):
        with pytest.raises(ConfigError, match=message):
            load_config(QUICKSTART, [*base, f"data.mixture=[{source}]", *extra])
    held = f"data.mixture=[{{files: {a}, weight: 1, name: a, eval_split_ratio: 0.25}}]"
    cfg = load_config(QUICKSTART, [*base, held])
    assert cfg.data.eval_sets == ("a",)
    # given eval data is the eval data (`sft-dist evaluate RUN data.eval_files=...` of such a run)
    assert load_config(QUICKSTART, [*base, held, f"data.eval_files={a}"]).data.eval_sets == ()
    from sft_dist.plan.facts import gather_facts

    assert gather_facts(cfg).has_eval_data


def test_given_eval_files_are_the_eval_data_and_held_out_rows_stay_out_of_training(tmp_path, tok):
    a = jsonl(tmp_path / "a.jsonl", [{"instruction": f"qa{i}", "output": f"a{i}"} for i in range(10)])
    e = jsonl(tmp_path / "e.jsonl", [{"instruction": "qe", "output": "e0"}])
    cfg = DataConfig(mixture=[{"files": [a], "weight": 1, "name": "a", "eval_split_ratio": 0.2}], eval_files=[e],
                     max_length=64, cache=False)
    out = build_datasets(cfg, tok, seed=0)
    assert len(out.eval) == 1 and "eval_set" not in out.eval.column_names
    assert len(out.train) == 8  # the 2 held-out rows are not trained on
