"""Checkpoints under real failures: SIGTERM (preemption), kill -9 during a save, an S3 store.

Each interrupted run is resumed by running the same command again (training.resume_from_checkpoint: auto,
the default) and must end exactly where an uninterrupted run ends: same losses, bitwise the same adapter.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from sft_dist.compare import compare
from tests.conftest import BIN, QUICKSTART, cli_env

pytestmark = pytest.mark.slow

STEPS = ["training.max_steps=20", "training.save_strategy=steps", "training.save_steps=10",
         "training.eval_steps=10"]


def train(out: Path, *extra: str, env: dict | None = None, timeout: int = 300):
    return subprocess.run([str(BIN / "sft-dist"), "train", str(QUICKSTART), f"output_dir={out}", *STEPS, *extra],
                          capture_output=True, text=True, timeout=timeout, env=env or cli_env())


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


@pytest.fixture(scope="module")
def reference(checkpointed_run):
    return checkpointed_run  # the same STEPS, uninterrupted (tests/conftest.py)


def assert_same_training(reference: Path, run: Path) -> None:
    dev = compare(reference, run)
    assert dev.steps == 20 and dev.bitwise, dev
    # run-level counters go on from the checkpoint: the same as the uninterrupted run's
    for key in ("loss_tokens", "padding_fraction"):
        assert json.loads((run / "run_summary.json").read_text())[key] == \
            json.loads((reference / "run_summary.json").read_text())[key], key
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line][-1]
    ref_last = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in line][-1]
    assert last["num_tokens"] == ref_last["num_tokens"] and last["tokens_total"] == ref_last["tokens_total"]


def test_sigterm_checkpoints_exits_0_and_resumes_exactly(reference, tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([str(BIN / "sft-dist"), "train", str(QUICKSTART), f"output_dir={out}", *STEPS],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env())
    deadline = time.monotonic() + 240
    while not logged_steps(out) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    log, _ = p.communicate(timeout=240)
    assert p.returncode == 0, log[-3000:]
    stopped = int(log.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert 1 <= stopped < 20
    assert (out / "checkpoints" / f"checkpoint-{stopped}" / "manifest.json").is_file()
    assert not (out / "adapter").exists()  # the run is not finished: no final adapter yet

    r = train(out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / f'checkpoint-{stopped}'} (step {stopped})" in r.stderr
    assert_same_training(reference, out)


def test_kill_9_during_a_save_falls_back_to_the_previous_checkpoint(reference, tmp_path):
    out = tmp_path / "run"
    env = {**cli_env(), "SFT_DIST_KILL_DURING_SAVE": "20:1"}  # SIGKILL rank 1 with its shard of step 20 written
    r = train(out, env=env)
    assert r.returncode == 1 and "worker rank 1 was killed by SIGKILL" in r.stderr
    ckpts = out / "checkpoints"
    assert (ckpts / ".tmp-checkpoint-20").is_dir() and not (ckpts / "checkpoint-20").exists()
    assert (ckpts / "latest").read_text().strip() == "checkpoint-10"

    r = train(out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ignoring" in r.stderr and ".tmp-checkpoint-20" in r.stderr
    assert "(step 10)" in r.stderr
    assert not (ckpts / ".tmp-checkpoint-20").exists() and (ckpts / "checkpoint-20" / "manifest.json").is_file()
    assert_same_training(reference, out)


@pytest.fixture
def s3_server():
    """moto's S3 server on 127.0.0.1, stopped by PID."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        env = {**cli_env(), "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
        endpoint = f"http://127.0.0.1:{port}"
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing")
        fs.mkdir("ckpts")
        yield endpoint, env, fs
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_s3_checkpoints_survive_a_crash_and_resume_exactly(reference, tmp_path, s3_server):
    endpoint, env, fs = s3_server
    out = tmp_path / "run"
    store = ["checkpoint.dir=s3://ckpts/job", f"checkpoint.storage_options={{endpoint_url: '{endpoint}'}}"]
    r = train(out, *store, env={**env, "SFT_DIST_KILL_DURING_SAVE": "20:0"})
    assert r.returncode == 1, r.stderr[-3000:]
    names = {p.rsplit("/", 1)[-1] for p in fs.ls("ckpts/job")}
    assert {"checkpoint-10", "latest"} <= names
    assert fs.exists("ckpts/job/checkpoint-10/manifest.json")
    assert not fs.exists("ckpts/job/checkpoint-20/manifest.json")  # the killed save never committed

    r = train(out, *store, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from s3://ckpts/job/checkpoint-10 (step 10)" in r.stderr
    assert fs.exists("ckpts/job/checkpoint-20/manifest.json")
    assert_same_training(reference, out)
    assert endpoint in (out / "config.yaml").read_text() and "testing" not in (out / "config.yaml").read_text()


def test_retention_keeps_the_last_and_the_best_and_load_best_restores_it(tmp_path):
    """lr 0.05 makes eval loss go up and down; save_total_limit=1 keeps the newest plus the best."""
    out = tmp_path / "run"
    r = subprocess.run([str(BIN / "sft-dist"), "train", str(QUICKSTART), f"output_dir={out}",
                        "training.max_steps=20", "training.save_strategy=steps", "training.save_steps=5",
                        "training.eval_steps=5", "training.save_total_limit=1", "training.learning_rate=0.05",
                        "training.max_grad_norm=0", "training.load_best_model_at_end=true"],
                       capture_output=True, text=True, timeout=300, env=cli_env())
    assert r.returncode == 0, r.stderr[-3000:]
    evals = {row["step"]: row["eval_loss"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "eval_loss" in row}
    best = min(evals, key=evals.get)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert kept == sorted({f"checkpoint-{best}", "checkpoint-20"})
    assert f"loading the best checkpoint {out / 'checkpoints' / f'checkpoint-{best}'}" in r.stderr
    # the final adapter is the best checkpoint's weights
    e = subprocess.run([str(BIN / "sft-dist"), "export", str(out / "checkpoints" / f"checkpoint-{best}"),
                        "--output", str(tmp_path / "best")], capture_output=True, text=True, env=cli_env())
    assert e.returncode == 0, e.stderr
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "best" / "adapter_model.safetensors")
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    assert exported.keys() == final.keys() and all((exported[k] == final[k]).all() for k in final)
