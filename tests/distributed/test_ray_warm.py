"""Warm Ray workers (distributed/ray_warm.py, ray_exec.py): where a run's Ray workers may fork from its template,
which environment differences a Ray worker may have, and the stand-in Python that becomes a cold worker wherever
the template cannot serve it. The runs themselves (forked warm, bitwise like cold, no process left behind) are in
tests/e2e/test_ray.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sft_dist.config.schema import LauncherConfig
from sft_dist.distributed import ray_warm
from sft_dist.distributed.ray_exec import SOCKET_ENV, _wait_ready, template_on_this_node
from sft_dist.distributed.warm import PACKAGE, _refusal, _Template, env_difference
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


def test_workers_of_another_python_a_client_driver_or_gpu_workers_start_cold(monkeypatch):
    monkeypatch.delenv(ray_warm.JOB_CONFIG_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray = LauncherConfig(type="ray")
    assert ray_warm.unusable(ray) is None
    assert ray_warm.unusable(LauncherConfig(type="ray", address="127.0.0.1:6379")) is None
    assert "client" in ray_warm.unusable(LauncherConfig(type="ray", address="ray://head:10001"))
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert "client" in ray_warm.unusable(ray)
    monkeypatch.delenv("RAY_ADDRESS")
    # not yet run forked on a GPU: GPU runs keep Ray's cold workers
    for gpu in (LauncherConfig(type="ray", device="cuda"), LauncherConfig(type="ray", resources_per_worker={"GPU": 1})):
        assert ray_warm.gpu_workers(gpu) and "GPU" in ray_warm.unusable(gpu)
    assert not ray_warm.gpu_workers(LauncherConfig(type="ray", device="cpu", resources_per_worker={"GPU": 1}))
    for field in ("pip", "py_executable", "conda", "uv", "image_uri"):
        monkeypatch.setenv(ray_warm.JOB_CONFIG_ENV, json.dumps({"runtime_env": {field: ["x"]}}))
        assert field in ray_warm.unusable(ray), field
    # uploaded code and environment variables keep this Python: usable
    monkeypatch.setenv(ray_warm.JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip",
                                                                            "env_vars": {"A": "1"}}}))
    assert ray_warm.unusable(ray) is None
    monkeypatch.setenv(ray_warm.JOB_CONFIG_ENV, "{not json")
    assert ray_warm.unusable(ray) is None


def test_no_template_where_the_run_has_no_use_for_one(monkeypatch):
    monkeypatch.delenv(ray_warm.JOB_CONFIG_ENV, raising=False)
    assert ray_warm.start(LauncherConfig(type="local")) is None
    assert ray_warm.start(LauncherConfig(type="ray", warm_workers=False)) is None
    assert ray_warm.start(LauncherConfig(type="ray", address="ray://head:10001")) is None
    assert ray_warm.start(LauncherConfig(type="ray", device="cuda")) is None


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


def test_a_node_template_serves_jobs_that_run_the_installed_code(tmp_path, monkeypatch):
    sock = tmp_path / "warm.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    try:
        monkeypatch.delenv(ray_warm.JOB_CONFIG_ENV, raising=False)
        monkeypatch.setenv("SFT_DIST_WARM", str(sock))
        assert ray_warm.node_template() == sock
        node = ray_warm.start(LauncherConfig(type="ray"))
        assert node.proc is None and str(sock) in node.describe()
        assert node.runtime_env()["env_vars"][SOCKET_ENV] == f"{HOST} 0 {sock}"  # pid 0: the node's, not the run's
        node.stop()  # not this run's to stop
        assert sock.exists()
        # a job that uploads its code runs that copy: the run's own template imports it, not the node's
        for field in ("working_dir", "py_modules"):
            monkeypatch.setenv(ray_warm.JOB_CONFIG_ENV, json.dumps({"runtime_env": {field: "gcs://_ray_pkg_2.zip"}}))
            assert ray_warm.node_template() is None
        monkeypatch.delenv(ray_warm.JOB_CONFIG_ENV)
        monkeypatch.setenv("SFT_DIST_WARM", str(tmp_path / "gone.sock"))
        assert ray_warm.node_template() is None
    finally:
        listener.close()


def test_another_copy_of_sft_dist_is_not_served_from_this_ones_imports():
    t = _Template(listener=None, env={}, env_after={}, mtimes={})
    req = {"python": sys.executable, "package": "/tmp/_ray_pkg_3/sft_dist", "env": {}, "argv": []}
    assert "/tmp/_ray_pkg_3/sft_dist" in _refusal(t, req)
    assert PACKAGE.endswith("sft_dist") and (Path(PACKAGE) / "distributed" / "warm.py").is_file()


def test_the_stand_in_waits_only_for_a_run_template(tmp_path):
    assert not _wait_ready(0, str(tmp_path / "warm.sock"), 5.0)  # pid 0: the node's template is up or not: no wait
    (tmp_path / "warm.sock").touch()
    assert _wait_ready(0, str(tmp_path / "warm.sock"), 5.0)
