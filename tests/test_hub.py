"""training.push_to_hub and `sft-dist export --push-to-hub`: the Trainer's own push is off (it would upload the whole output_dir: checkpoints, base
model, data trace); rank 0 uploads the final directory once the run is saved, and a failed upload leaves the run
whole and says how to finish it by hand. No Hub here: the failure path runs for real (huggingface_hub offline)."""

from __future__ import annotations

import json
import subprocess

import pytest

from sft_dist.config.load import load_config
from sft_dist.train.args import build_sft_config
from sft_dist.hub import HubPush, hub_push
from tests.conftest import BIN, QUICKSTART, cli_env


def test_the_trainer_never_pushes_and_the_repo_is_named_as_the_trainer_would():
    cfg = load_config(QUICKSTART, ["output_dir=outputs/my-run", "training.push_to_hub=true"])
    assert build_sft_config(cfg, device="cpu").push_to_hub is False
    assert hub_push(cfg.training, cfg.output_dir) == HubPush(repo_id="my-run", private=None, revision=None)
    cfg = load_config(QUICKSTART, ["training.push_to_hub=true", "training.hub_model_id=org/sft-model",
                                   "training.hub_private_repo=true", "training.hub_revision=v1"])
    assert hub_push(cfg.training, cfg.output_dir) == HubPush(repo_id="org/sft-model", private=True, revision="v1")
    assert hub_push(load_config(QUICKSTART, []).training, "x") is None


def test_private_without_a_repo_is_refused_before_anything_is_written(tmp_path, capsys):
    from sft_dist.cli import main

    assert main(["export", str(tmp_path / "run"), "--output", str(tmp_path / "x"), "--private"]) == 1
    assert "--private applies to the repo --push-to-hub creates" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_failed_push_leaves_the_run_saved_and_says_how_to_upload_it(tmp_path):
    out = tmp_path / "run"
    env = {**cli_env(), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([str(BIN / "sft-dist"), "train", str(QUICKSTART), f"output_dir={out}", "launcher.num_workers=1",
                        "training.max_steps=2", "training.eval_strategy=no", "training.push_to_hub=true",
                        "training.hub_model_id=someone/sft-dist-test"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert (f"training.push_to_hub: {out / 'adapter'} is written, but uploading it to the Hub "
            "repo 'someone/sft-dist-test' failed (OfflineModeIsEnabled") in r.stderr
    assert f"huggingface-cli upload someone/sft-dist-test {out / 'adapter'} ." in r.stderr
    assert "Traceback" not in r.stderr
    # the run is whole: adapter, tokenizer, summary; and the Trainer wrote nothing of its own push
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "adapter" / "tokenizer.json").is_file()
    assert json.loads((out / "run_summary.json").read_text())["global_step"] == 2
    assert not (out / "adapter_model.safetensors").exists() and not (out / "training_args.bin").exists()
    # sft-dist export --push-to-hub: the export is written, then the same upload fails the same way
    exported = tmp_path / "exported"
    r = subprocess.run([str(BIN / "sft-dist"), "export", str(out), "--output", str(exported), "--push-to-hub",
                        "someone/sft-dist-export", "--private"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert (f"--push-to-hub: {exported} is written, but uploading it to the Hub repo 'someone/sft-dist-export' "
            "failed (OfflineModeIsEnabled") in r.stderr
    assert (exported / "adapter_model.safetensors").is_file() and (exported / "export.json").is_file()
