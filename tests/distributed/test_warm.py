"""Warm worker start (distributed/warm.py): which environments a template may serve, and, with the session's template
(tests/conftest.py), that a worker forked warm trains bitwise like a cold one, that a launch it cannot serve starts
cold and names the variable (never its value), that a killed launcher takes its warm workers with it, and that a
one-process command (a one-worker train, export) runs whole in a forked child, ending as a cold one would."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import psutil
import pytest

from sft_dist.distributed.warm import _changed, env_difference, worker_environ
from tests.conftest import BIN, QUICKSTART, cli_env, cold_env

BEFORE = {"HOME": "/root", "HF_HOME": "/data/hf", "SHLVL": "1"}
AFTER = {**BEFORE, "SOMELIB_CACHE": "/tmp/somelib"}  # set by an import in the template


def test_per_worker_and_shell_keys_may_differ():
    worker = {**BEFORE, "SHLVL": "3", "RANK": "1", "MASTER_PORT": "2", "OMP_NUM_THREADS": "1", "PATH": "/x",
              "SFT_DIST_CACHE": "/c", "TERM": "xterm", "SSH_TTY": "/dev/pts/1"}
    assert env_difference(BEFORE, AFTER, worker) == []


def test_a_key_an_import_may_read_must_match_and_is_named_without_its_value():
    assert env_difference(BEFORE, AFTER, {**BEFORE, "HF_HOME": "/other"}) == ["HF_HOME"]
    assert env_difference(BEFORE, AFTER, {**BEFORE, "HF_TOKEN": "hf_secret"}) == ["HF_TOKEN"]
    assert env_difference(BEFORE, AFTER, {k: v for k, v in BEFORE.items() if k != "HF_HOME"}) == ["HF_HOME"]


def test_what_the_imports_set_is_accepted_either_way_and_given_to_the_worker():
    assert env_difference(BEFORE, AFTER, dict(AFTER)) == []  # the launcher's own imports set it too
    assert env_difference(BEFORE, AFTER, dict(BEFORE)) == []
    assert env_difference(BEFORE, AFTER, {**BEFORE, "SOMELIB_CACHE": "/elsewhere"}) == [
        "SOMELIB_CACHE"]
    assert worker_environ(BEFORE, AFTER, {**BEFORE, "RANK": "0"}) == {**AFTER, "RANK": "0"}
    # set by an import the launcher made and the template did not (tensorboardX): passed on as is
    assert env_difference(BEFORE, AFTER, {**BEFORE, "CRC32C_SW_MODE": "auto"}) == []
    # each process's own value (the template imported mlflow too, with its own session id)
    assert env_difference(BEFORE, {**AFTER, "_MLFLOW_TELEMETRY_SESSION_ID": "c3d4"},
                          {**BEFORE, "_MLFLOW_TELEMETRY_SESSION_ID": "a1b2"}) == []


def test_a_changed_file_makes_the_template_stale(tmp_path):
    f = tmp_path / "mod.py"
    f.write_text("x = 1\n")
    mtimes = {str(f): os.stat(f).st_mtime}
    assert _changed(mtimes) is None
    os.utime(f, (time.time() + 5, time.time() + 5))
    assert _changed(mtimes) == str(f)
    f.unlink()
    assert _changed(mtimes) == str(f)


STEPS = ["training.max_steps=6", "training.save_strategy=steps", "training.save_steps=3", "training.eval_steps=3"]


def train(out, env, *extra):
    return subprocess.run([str(BIN / "sft-dist"), "train", str(QUICKSTART), f"output_dir={out}", *STEPS, *extra],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_a_warm_worker_trains_bitwise_like_a_cold_one(tmp_path, warm_template):
    if warm_template is None:
        pytest.skip("the suite runs cold (SFT_DIST_TEST_COLD=1)")
    warm, cold = train(tmp_path / "warm", cli_env()), train(tmp_path / "cold", cold_env())
    assert warm.returncode == 0 and cold.returncode == 0, warm.stderr[-3000:] + cold.stderr[-3000:]
    assert "2 worker(s) (local, forked warm)" in warm.stderr and "warm start unavailable" not in warm.stderr
    assert "2 worker(s) (local)," in cold.stderr
    r = subprocess.run([str(BIN / "sft-dist"), "compare", str(tmp_path / "cold"), str(tmp_path / "warm"),
                        "--tol", "0"], capture_output=True, text=True, env=cli_env())
    assert r.returncode == 0 and "0.00e+00        0.00e+00" in r.stdout, r.stdout
    ck = tmp_path / "cold" / "checkpoints" / "checkpoint-3"
    names = ["adapter/adapter_model.safetensors",
             *(str(f.relative_to(tmp_path / "cold")) for f in sorted((ck / "shards").glob("*.distcp")))]
    assert len(names) == 3  # the adapter and the 2 ranks' shards of checkpoint-3
    for name in names:
        assert (tmp_path / "warm" / name).read_bytes() == (tmp_path / "cold" / name).read_bytes(), name


@pytest.mark.slow
def test_a_launch_the_template_cannot_serve_starts_cold_and_says_why(tmp_path, warm_template):
    if warm_template is None:
        pytest.skip("the suite runs cold (SFT_DIST_TEST_COLD=1)")
    r = train(tmp_path / "run", {**cli_env(), "HF_TOKEN": "hf_do_not_print_me"}, "training.max_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warm start unavailable (the environment differs from the template's in HF_TOKEN" in r.stderr
    assert r.stderr.count("warm start unavailable") == 1  # said by the command; its launcher does not ask again
    assert "2 worker(s) (local)," in r.stderr and "hf_do_not_print_me" not in r.stderr + r.stdout


@pytest.mark.slow
def test_kill_9_of_a_warm_launcher_takes_its_workers_and_the_template_serves_on(tmp_path, warm_template):
    if warm_template is None:
        pytest.skip("the suite runs cold (SFT_DIST_TEST_COLD=1)")
    template = psutil.Process(int(warm_template.pid))
    out = tmp_path / "run"
    p = subprocess.Popen([str(BIN / "sft-dist"), "train", str(QUICKSTART), f"output_dir={out}",
                          "training.max_steps=100000", "training.eval_strategy=no"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size > 0):
            assert p.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.1)
        forked = template.children()
        assert len(forked) == 3  # the launcher and its 2 workers, all forked by the template
        assert not psutil.Process(p.pid).children()  # the command itself only relays
        p.send_signal(signal.SIGKILL)
        p.wait()
        gone, alive = psutil.wait_procs(forked, timeout=10)
        assert not alive, [w.pid for w in alive]
    finally:
        p.kill()
    assert template.is_running() and template.status() != psutil.STATUS_ZOMBIE
    r = train(tmp_path / "again", cli_env(), "training.max_steps=2")
    assert r.returncode == 0 and "(local, forked warm)" in r.stderr, r.stderr[-3000:]


@pytest.mark.slow
def test_a_one_process_command_runs_forked_and_ends_as_a_cold_one_would(tmp_path, warm_template):
    if warm_template is None:
        pytest.skip("the suite runs cold (SFT_DIST_TEST_COLD=1)")
    one = ("launcher.num_workers=1", "training.max_steps=2")
    warm, cold = train(tmp_path / "warm", cli_env(), *one), train(tmp_path / "cold", cold_env(), *one)
    assert warm.returncode == 0 and cold.returncode == 0, warm.stderr[-3000:] + cold.stderr[-3000:]
    assert "1 worker(s) (none, forked warm)" in warm.stderr and "1 worker(s) (none)," in cold.stderr
    # the same thread count: the template's own OMP_NUM_THREADS=1 is not the forked command's
    threads = [re.search(r"(\d+) thread\(s\) each", r.stderr).group(1) for r in (warm, cold)]
    assert threads[0] == threads[1], threads
    name = "adapter/adapter_model.safetensors"
    assert (tmp_path / "warm" / name).read_bytes() == (tmp_path / "cold" / name).read_bytes()
    # a command that fails: its message reaches the caller's stderr, its exit status the caller
    r = subprocess.run([str(BIN / "sft-dist"), "export", str(tmp_path / "warm"), "--output", str(tmp_path / "cold")],
                       capture_output=True, text=True, timeout=120, env=cli_env())
    assert r.returncode == 1 and "is not empty" in r.stderr, r.stderr[-2000:]
    # the forked process killed: the command ends by the same signal
    template = psutil.Process(int(warm_template.pid))
    before = {c.pid for c in template.children()}
    p = subprocess.Popen([str(BIN / "sft-dist"), "train", str(QUICKSTART), f"output_dir={tmp_path / 'long'}",
                          "launcher.num_workers=1", "training.max_steps=100000"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
    try:
        deadline = time.monotonic() + 60
        while not (forked := [c for c in template.children() if c.pid not in before]):
            assert p.poll() is None and time.monotonic() < deadline, "the command was not forked"
            time.sleep(0.1)
        forked[0].kill()
        assert p.wait(timeout=30) == -signal.SIGKILL
    finally:
        p.kill()
