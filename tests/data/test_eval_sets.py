"""Named eval sets (`data.eval_files: {name: files}`): the config that names them, the eval split that carries
them through tokenization and the cache, the Trainer's dict of eval datasets, and the names of their metrics in the
plan, the best-checkpoint direction, the progress line and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from sft_dist.config.load import builtin_path, load_config
from sft_dist.config.schema import DataConfig
from sft_dist.data.build import EVAL_SET, build_datasets, by_set
from sft_dist.data.cache import load_or_build
from sft_dist.data.precheck import precheck
from sft_dist.errors import ConfigError, DataError
from sft_dist.metrics.report import set_losses
from sft_dist.plan.facts import gather_facts
from sft_dist.plan.rules import evaluate
from sft_dist.train.callbacks import Progress
from sft_dist.train.evaluation import combined, continued_rows, eval_sets, loss_metrics
from tests.conftest import QUICKSTART


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))


def jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def answers(tok, ds) -> list[str]:
    return [tok.decode([t for t in labels if t >= 0], skip_special_tokens=True).strip() for labels in ds["labels"]]


@pytest.fixture
def files(tmp_path):
    train = jsonl(tmp_path / "train.jsonl", [{"instruction": f"q{i}", "output": f"t{i}"} for i in range(8)])
    pt = jsonl(tmp_path / "pt.jsonl", [{"instruction": f"p{i}", "input": "x", "output": f"pt{i}"} for i in range(3)])
    # another file's columns: `input` missing (an empty one) and an extra column the format does not use
    en = jsonl(tmp_path / "en.jsonl", [{"instruction": f"e{i}", "output": f"en{i}", "note": 1} for i in range(5)])
    return train, pt, en


def test_each_set_is_its_own_eval_dataset_in_the_configs_order(tok, files):
    train, pt, en = files
    cfg = DataConfig(train_files=[train], eval_files={"en": [en], "pt": [pt]}, max_length=64, cache=False)
    assert cfg.eval_sets == ("en", "pt")
    data = build_datasets(cfg, tok, seed=0)
    assert data.eval[EVAL_SET] == [0] * 5 + [1] * 3 and data.eval["sample_id"] == [0, 1, 2, 3, 4, 0, 1, 2]
    assert data.stats["eval"].sets == {"en": 5, "pt": 3}
    assert data.stats["eval"].describe("eval", 64).endswith("; sets: en 5, pt 3")
    sets = by_set(data.eval.remove_columns(["sample_id"]), cfg.eval_sets)
    assert list(sets) == ["en", "pt"] and sets["en"].column_names == ["input_ids", "labels"]
    assert answers(tok, sets["en"]) == [f"en{i}" for i in range(5)]
    assert answers(tok, sets["pt"]) == [f"pt{i}" for i in range(3)]
    assert list(eval_sets(sets)) == ["eval_en", "eval_pt"] and list(eval_sets(data.eval)) == ["eval"]
    # without names: one dataset, no set column
    plain = build_datasets(DataConfig(train_files=[train], eval_files=[en, pt], max_length=64, cache=False), tok,
                           seed=0)
    assert EVAL_SET not in plain.eval.column_names and by_set(plain.eval, ()) is plain.eval
    assert answers(tok, plain.eval) == answers(tok, sets["en"]) + answers(tok, sets["pt"])


def test_a_set_with_columns_of_its_own(tok, files, tmp_path):
    train, pt, _ = files
    qa = jsonl(tmp_path / "qa.jsonl", [{"question": f"w{i}", "answer": f"qa{i}"} for i in range(2)])
    cfg = load_config(QUICKSTART, [f"data.train_files={train}", "data.max_length=64", "data.cache=false",
                                   f"data.eval_files={{pt: {pt}, qa: {{files: {qa}, columns: {{instruction: question, "
                                   "output: answer}}}"])
    assert cfg.data.eval_set_files() == {"pt": ([pt], None),
                                         "qa": ([qa], {"instruction": "question", "output": "answer"})}
    sets = by_set(build_datasets(cfg.data, tok, seed=0).eval, cfg.data.eval_sets)
    assert answers(tok, sets["qa"]) == ["qa0", "qa1"] and answers(tok, sets["pt"]) == ["pt0", "pt1", "pt2"]
    assert precheck(cfg.data, seed=0).rows == {"train": 8, "eval pt": 3, "eval qa": 2}
    with pytest.raises(ConfigError, match=r"data\.eval_files\.qa\.files: required"):
        load_config(QUICKSTART, [f"data.eval_files={{qa: {{columns: {{output: answer}}}}}}"])
    with pytest.raises(ConfigError, match=r"data\.eval_files\.qa\.colums: unknown key; allowed: files, columns"):
        load_config(QUICKSTART, [f"data.eval_files={{qa: {{files: {qa}, colums: {{output: answer}}}}}}"])


def test_the_cache_keeps_the_sets(tok, files, tmp_path):
    train, pt, en = files
    cfg = DataConfig(train_files=[train], eval_files={"pt": [pt], "en": [en]}, max_length=64,
                     cache_dir=str(tmp_path / "cache"))
    built, info = load_or_build(cfg, tok, seed=0)
    hit, again = load_or_build(cfg, tok, seed=0)
    assert not info.hit and again.hit
    assert hit.eval[EVAL_SET] == built.eval[EVAL_SET] == [0] * 3 + [1] * 5
    # the same files under other names (or none) are another entry
    _, other = load_or_build(DataConfig(**{**vars(cfg), "eval_files": {"a": [pt], "b": [en]}}), tok, seed=0)
    assert not other.hit and other.path != info.path


def test_a_bad_row_is_named_by_its_sets_file_and_line(tok, files, tmp_path):
    train, pt, _ = files
    bad = jsonl(tmp_path / "bad.jsonl", [{"instruction": "q", "output": "a"}, {"instruction": "q", "output": None}])
    cfg = DataConfig(train_files=[train], eval_files={"pt": [pt], "odd": [bad]}, max_length=64, cache=False)
    for check in (lambda: precheck(cfg, seed=0), lambda: build_datasets(cfg, tok, seed=0)):
        with pytest.raises(DataError, match=rf"{bad}:2 \(eval odd sample_id 1\)"):
            check()


def test_a_set_left_without_loss_carrying_rows_is_refused_by_name(tok, files, tmp_path):
    train, pt, _ = files
    long = jsonl(tmp_path / "long.jsonl", [{"instruction": "word " * 80, "output": "a"}])
    cfg = DataConfig(train_files=[train], eval_files={"pt": [pt], "long": [long]}, max_length=32, cache=False)
    with pytest.raises(DataError, match=r"data.eval_files.long: no row of this eval set is left with a loss-carrying "
                                        r"token within data.max_length=32"):
        build_datasets(cfg, tok, seed=0)


def test_set_names_and_files_are_checked_before_anything_loads(tmp_path, files):
    _, pt, _ = files
    for value, message in (
            ("{}", "data.eval_files: an empty mapping"),
            (f"{{pt-br: {pt}}}", "data.eval_files.pt-br: an eval set's name is letters and digits"),
            (f"{{a__b: {pt}}}", "data.eval_files.a__b: an eval set's name"),
            (f"{{pt: {tmp_path / 'none.jsonl'}}}", "data.eval_files.pt: '" + str(tmp_path / "none.jsonl")
             + "' matches no file"),
            (f"{{pt: {pt}}}", None)):
        overrides = [f"data.eval_files={value}"]
        if message is None:
            assert load_config(QUICKSTART, overrides).data.eval_files == {"pt": [pt]}
            continue
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
            load_config(QUICKSTART, overrides)


def test_a_best_checkpoint_may_be_chosen_by_a_sets_metric(files):
    from sft_dist.train.args import build_sft_config

    _, pt, en = files
    sets = [f"data.eval_files={{pt: {pt}, en: {en}}}"]

    def rules(*overrides):
        return {x.rule: x for x in evaluate(gather_facts(load_config(QUICKSTART, [*sets, *overrides])))}

    assert "best-metric-unknown" not in rules("training.metric_for_best_model=eval_pt_loss")
    assert "best-metric-unknown" not in rules("training.metric_for_best_model=eval_loss")  # all sets together
    unknown = rules("training.metric_for_best_model=eval_es_loss")["best-metric-unknown"]
    assert "pt_loss, pt_perplexity, pt_mean_token_accuracy, en_loss" in unknown.fix
    for metric, better in (("eval_en_perplexity", False), ("en_mean_token_accuracy", True), ("eval_pt_loss", False)):
        args = build_sft_config(load_config(QUICKSTART, [*sets, f"training.metric_for_best_model={metric}"]),
                                device="cpu")
        assert args.greater_is_better is better, metric


def test_all_sets_together_are_their_union():
    totals = {"eval_a": [6.0, 3.0, 2.0], "eval_b": [2.0, 1.0, 1.0]}  # summed loss, loss tokens, correct
    metrics = {**loss_metrics(totals["eval_a"], "eval_a"), **loss_metrics(totals["eval_b"], "eval_b"),
               "eval_a_generated": 3, "eval_a_exact_match": 1 / 3, "eval_a_token_f1": 0.5, "eval_a_rouge_l": 0.5,
               "eval_b_generated": 1, "eval_b_exact_match": 1.0, "eval_b_token_f1": 1.0, "eval_b_rouge_l": 1.0}
    out = combined(metrics, totals, "eval")
    assert out["eval_loss"] == 2.0 and out["eval_tokens"] == 4 and out["eval_mean_token_accuracy"] == 0.75
    assert out["eval_generated"] == 4 and out["eval_exact_match"] == 0.5 and out["eval_rouge_l"] == 0.625
    assert "eval_generated" not in combined({}, totals, "eval")  # no answers asked for: none reported


def test_a_split_rows_windows_continue_within_their_set():
    from datasets import Dataset

    assert continued_rows(Dataset.from_dict({"sample_id": [0, 1, 1, 1, 2, 3, 3]})) == {2, 3, 6}


def test_progress_and_report_show_each_sets_loss(capsys):
    class State:
        is_world_process_zero, global_step = True, 7

    Progress(enabled=True).on_evaluate(None, State(), None, metrics={
        "eval_loss": 2.0, "eval_tokens": 4, "eval_pt_loss": 1.5, "eval_en_loss": 2.25, "eval_en_perplexity": 9.5})
    assert capsys.readouterr().err.strip() == "eval at step 7: loss 2.0000 (pt 1.5000, en 2.2500)"
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "eval_loss": 2.0, "eval_pt_loss": 1.5, "eval_held_out_loss": 2.5}]
    assert set_losses(rows) == ["eval_pt_loss", "eval_held_out_loss"]


def test_a_hub_datasets_splits_as_named_sets(tmp_path, tok, monkeypatch):
    """`data.eval_split: {name: split}`: the splits of `data.dataset` (a local dataset directory goes through
    `load_dataset` like a hub name, offline), each its own set; the cache key follows each split's fingerprint."""
    from sft_dist.data.cache_key import cache_key

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    d = tmp_path / "my_dataset"
    d.mkdir()
    for split, n in (("train", 6), ("validation", 2), ("test", 3)):
        jsonl(d / f"{split}.jsonl", [{"instruction": f"{split}{i}", "output": f"{split[0]}{i}"} for i in range(n)])
    cfg = DataConfig(dataset=str(d), eval_split={"val": "validation", "test": "test"}, max_length=64, cache=False)
    assert cfg.eval_sets == ("val", "test")
    sets = by_set(build_datasets(cfg, tok, seed=0).eval, cfg.eval_sets)
    assert answers(tok, sets["val"]) == ["v0", "v1"] and answers(tok, sets["test"]) == ["t0", "t1", "t2"]
    assert list(cache_key(cfg, tok, seed=0)[1]["data"]["dataset_fingerprints"]) == ["train", "validation", "test"]


def test_eval_split_is_a_datasets_split():
    for overrides, message in (
            (["data.eval_split=test"], "data.eval_split: set it only when no `data.eval_files` is given"),
            (["data.eval_files=null", "data.eval_split={val: validation}"], "data.eval_split: a split of `data.dataset`"),
            (["data.eval_files=null", "data.train_files=null", "data.dataset=org/name", "data.eval_split={}"],
             "data.eval_split: an empty mapping; give {name: split} for each eval set"),
            (["data.eval_files=null", "data.train_files=null", "data.dataset=org/name", "data.eval_split={v-1: val}"],
             "data.eval_split.v-1: an eval set's name")):
        with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}").replace(".", r"\.")):
            load_config(QUICKSTART, overrides)
    cfg = load_config(QUICKSTART, ["data.eval_files=null", "data.train_files=null", "data.dataset=org/name",
                                   "data.eval_split={val: validation, test: test}"])
    assert cfg.data.eval_sets == ("val", "test")
