"""Warm Ray workers (distributed/ray_warm.py, ray_exec.py): where a run's Ray workers may fork from its template,
which environment differences a Ray worker may have, and the stand-in Python that becomes a cold worker wherever
the template cannot serve it. The runs themselves (forked warm, bitwise like cold, no process left behind) are in
tests/e2e/test_ray.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from sft_dist.config.schema import LauncherConfig
from sft_dist.distributed import ray_warm
from sft_dist.distributed.ray_exec import SOCKET_ENV, template_on_this_node
from sft_dist.distributed.warm import env_difference
from tests.conftest import cli_env

HOST = socket.gethostname()


def test_the_template_is_used_on_its_own_host_only():
    assert template_on_this_node(f"{HOST} 4242 /tmp/d/warm.sock") == (4242, "/tmp/d/warm.sock")
    assert template_on_this_node(f"{HOST} 4242 /tmp/a dir/warm.sock") == (4242, "/tmp/a dir/warm.sock")
    assert template_on_this_node("another-node-7 4242 /tmp/d/warm.sock") is None  # a worker on another node
    for bad in (None, "", f"{HOST} 4242", f"{HOST} pid /tmp/s"):
        assert template_on_this_node(bad) is None


def test_a_ray_worker_may_differ_in_what_the_raylet_sets_per_worker_only():
    before = {"HOME": "/root", "HF_HOME": "/hf"}
    worker = {**before, "RAY_JOB_ID": "02000000", "RAY_RAYLET_PID": "77", "RAY_NODE_ID": "n",
              "SPT_NOENV": "1", "PYTHONBREAKPOINT": "ray.util.rpdb.set_trace"}
    assert env_difference(before, before, worker, ray_free=True) == []
    # the same keys from an `sft-dist` launch: a library may read them at import
    assert env_difference(before, before, worker) == ["PYTHONBREAKPOINT", "RAY_JOB_ID", "RAY_NODE_ID",
                                                      "RAY_RAYLET_PID", "SPT_NOENV"]
    assert env_difference(before, before, {**worker, "HF_HOME": "/other"}, ray_free=True) == ["HF_HOME"]


def test_workers_of_another_python_or_a_client_driver_start_cold(monkeypatch):
    monkeypatch.delenv(ray_warm.JOB_CONFIG_ENV, raising=False)
    assert ray_warm.unusable(None) is None
    assert ray_warm.unusable("127.0.0.1:6379") is None
    assert "client" in ray_warm.unusable("ray://head:10001")
    for field in ("pip", "py_executable", "conda", "uv", "image_uri"):
        monkeypatch.setenv(ray_warm.JOB_CONFIG_ENV, json.dumps({"runtime_env": {field: ["x"]}}))
        assert field in ray_warm.unusable(None), field
    # uploaded code and environment variables keep this Python: usable
    monkeypatch.setenv(ray_warm.JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip",
                                                                            "env_vars": {"A": "1"}}}))
    assert ray_warm.unusable(None) is None
    monkeypatch.setenv(ray_warm.JOB_CONFIG_ENV, "{not json")
    assert ray_warm.unusable(None) is None


def test_no_template_where_the_run_has_no_use_for_one(monkeypatch):
    monkeypatch.delenv(ray_warm.JOB_CONFIG_ENV, raising=False)
    assert ray_warm.start(LauncherConfig(type="local")) is None
    assert ray_warm.start(LauncherConfig(type="ray", warm_workers=False)) is None
    assert ray_warm.start(LauncherConfig(type="ray", address="ray://head:10001")) is None


@pytest.mark.slow  # starts a process
def test_the_stand_in_becomes_the_cold_worker_where_no_template_serves(tmp_path):
    script = tmp_path / "default_worker.py"
    script.write_text("import os, sys\nprint(sys.argv[1:], os.getpid())\n")
    gone = subprocess.Popen(["true"])
    gone.wait()
    for value, says in ((None, ""), (f"another-node 1 {tmp_path}/warm.sock", ""),
                        (f"{HOST} {gone.pid} {tmp_path}/warm.sock", "starts cold: the warm template")):
        env = cli_env()
        env.pop(SOCKET_ENV, None)
        if value:
            env[SOCKET_ENV] = value
        proc = subprocess.Popen([sys.executable, "-m", "sft_dist.distributed.ray_exec", str(script), "--a", "b c"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        argv, pid = out.rsplit(" ", 1)
        assert argv == "['--a', 'b c']" and int(pid) == proc.pid  # the raylet's own child became the worker
        assert says in err
