"""`sft-dist evaluate TARGET`: what config and overrides each kind of target becomes (train/evaluate_only.py), and
the output_dir it will not write over. No process starts; the end-to-end runs are in tests/e2e/test_evaluate.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sft_dist.config.load import load_config
from sft_dist.errors import SftDistError
from sft_dist.train.evaluate_only import refuse_training_dir, target
from tests.conftest import QUICKSTART


def run_dir(tmp_path: Path, *, lora: bool = True, base: bool = True, remote: bool = False) -> Path:
    """A finished run's directory as training leaves it (the files `target` reads; weights are not loaded)."""
    run = tmp_path / "run"
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["output_dir"] = str(run)
    raw["lora"]["enabled"] = lora
    if remote:
        raw["model"]["trust_remote_code"] = True
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    (run / ("adapter" if lora else "model")).mkdir()
    (run / "run_summary.json").write_text("{}")
    if base:
        (run / "base_model").mkdir()
    return run


def test_a_config_is_evaluated_as_it_is(tmp_path):
    config, over = target(str(QUICKSTART), ["data.eval_files=x.jsonl"])
    assert (config, over) == (str(QUICKSTART), ["training.do_train=false", "data.eval_files=x.jsonl"])


def test_a_run_directory_gives_its_adapter_its_base_and_its_own_eval_dir(tmp_path):
    run = run_dir(tmp_path)
    config, over = target(str(run), ["output_dir=/elsewhere"])
    assert config == str(run / "config.yaml")
    assert over == ["training.do_train=false", f"output_dir={run / 'eval'}", "model.trust_remote_code=false",
                    f"lora.init_adapter={run / 'adapter'}", f"model.name_or_path={run / 'base_model'}",
                    "model.init_config=null", "output_dir=/elsewhere"]
    # without a saved base the seeded init_config builds it again; a full fine-tune's model/ is the model
    assert "model.init_config=null" not in target(str(run_dir(tmp_path / "a", base=False)), [])[1]
    full = target(str(run_dir(tmp_path / "b", lora=False)), [])[1]
    assert f"model.name_or_path={tmp_path / 'b' / 'run' / 'model'}" in full and not any("init_adapter" in o for o in full)


def test_a_run_directory_never_turns_remote_code_on(tmp_path):
    run = run_dir(tmp_path, lora=False, remote=True)
    cfg = load_config(*target(str(run), []))
    assert cfg.model.trust_remote_code is False and cfg.training.eval_only
    # the command line may
    assert load_config(*target(str(run), ["model.trust_remote_code=true"])).model.trust_remote_code is True


def test_unusable_targets_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SftDistError, match="not a sft_dist run or checkpoint directory"):
        target(str(tmp_path / "empty"), [])
    run = run_dir(tmp_path)
    (run / "adapter").rmdir()
    with pytest.raises(SftDistError, match="no adapter/ yet, so its training has not finished"):
        target(str(run), [])


def test_a_training_runs_output_dir_is_not_written_over(tmp_path):
    run = run_dir(tmp_path)
    with pytest.raises(SftDistError, match=r"holds a training run \(run_summary.json, adapter\)"):
        refuse_training_dir(run)
    refuse_training_dir(run / "eval")  # new: fine
    (run / "eval").mkdir()
    (run / "eval" / "eval_results.json").write_text("{}")
    refuse_training_dir(run / "eval")  # an earlier evaluation's: evaluated again


def test_named_eval_sets_are_tabled_side_by_side():
    from sft_dist.train.evaluate_only import set_table
    from sft_dist.train.evaluation import combined, loss_metrics

    totals = {"eval_pt": [6.0, 3.0, 2.0], "eval_en": [2.0, 1.0, 1.0]}
    metrics = {**loss_metrics(totals["eval_pt"], "eval_pt"), **loss_metrics(totals["eval_en"], "eval_en")}
    metrics = {**combined(metrics, totals, "eval"), **metrics}
    assert set_table(metrics, {"eval_pt": 2, "eval_en": 1}).splitlines() == [
        "eval set  rows  tokens  loss    perplexity  accuracy",
        "all       3     4       2.0000  7.39        0.7500",
        "pt        2     3       2.0000  7.39        0.6667",
        "en        1     1       2.0000  7.39        1.0000"]
