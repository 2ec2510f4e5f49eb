"""Experiment trackers through `training.report_to`, all offline: TensorBoard event files, a W&B offline
run and an MLflow file store hold the logged scalars; a secret given on the command line reaches none."""

from __future__ import annotations

import glob
import json
import struct
from pathlib import Path

import pytest

from tests.conftest import QUICKSTART, cli_env
from tests.e2e.test_train_local import train_losses

pytestmark = pytest.mark.slow

SECRET = "hf_notARealToken0123456789"


def tensorboard_scalars(run) -> dict[str, list[tuple[int, float]]]:
    """Parse the TFRecord event file (length, crc, Event proto, crc) with tensorboardX's protos."""
    from tensorboardX.proto import event_pb2

    (path,) = glob.glob(str(run / "runs" / "*" / "events.out.tfevents.*"))
    data, i, tags = Path(path).read_bytes(), 0, {}
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
        i += 12 + n + 4
        for v in event.summary.value:
            tags.setdefault(v.tag, []).append((event.step, v.simple_value))
    return tags


def test_tensorboard_wandb_mlflow_offline(tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    import subprocess

    from tests.conftest import BIN

    out = tmp_path / "run"
    env = {**cli_env(), "WANDB_MODE": "offline"}
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run([str(BIN / "sft-dist"), "train", str(QUICKSTART), f"output_dir={out}", "training.max_steps=4",
                        "launcher.num_workers=1", "training.report_to=[tensorboard,wandb,mlflow]",
                        "training.eval_steps=2", f"training.hub_token={SECRET}"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = train_losses(out)
    assert [s for s, _ in losses] == [1, 2, 3, 4]

    tb = tensorboard_scalars(out)
    assert [s for s, _ in tb["train/loss"]] == [1, 2, 3, 4]
    assert all(abs(v - loss) <= 1e-6 * abs(loss) for (_, v), (_, loss) in zip(tb["train/loss"], losses))
    assert {"train/tokens_per_s", "train/grad_norm", "eval/loss"} <= tb.keys()
    assert len(tb["eval/loss"]) == 2

    (mlflow_loss,) = glob.glob(str(out / "mlruns" / "*" / "*" / "metrics" / "loss"))
    logged = [line.split() for line in Path(mlflow_loss).read_text().splitlines()]
    assert [(int(step), float(v)) for _, v, step in logged] == losses
    assert glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))  # in output_dir, not the cwd
    assert not (tmp_path / "wandb").exists()

    leaked = [p for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []
    assert json.loads((out / "run_summary.json").read_text())["global_step"] == 4


def test_a_tracker_that_is_not_installed_is_refused_before_launch(tmp_path):
    import subprocess

    from tests.conftest import BIN

    r = subprocess.run([str(BIN / "sft-dist"), "train", str(QUICKSTART), f"output_dir={tmp_path / 'run'}",
                        "training.report_to=[clearml]"], capture_output=True, text=True, timeout=120, env=cli_env())
    assert r.returncode != 0
    assert "training.report_to: clearml is not installed in this environment; pip install clearml" in r.stderr
    assert not (tmp_path / "run").exists()
