"""Shared fixtures: the repo paths and a helper to write small configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "examples" / "quickstart.yaml"
BIN = Path(sys.executable).parent
DS, FSDP = ROOT / "configs" / "deepspeed", ROOT / "configs" / "fsdp"
# DeepSpeed's compiled CPU ops live with the venv (the Makefile builds them there with the venv): a build embeds the
# venv's paths, and checkouts sharing ~/.cache/torch_extensions would rebuild each other's (~100 s).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def load_quantized(path, *, dtype, bits: int = 4, compute_dtype=None):
    """A saved model loaded quantized on the CPU, the way a run loads `model.name_or_path` with
    `quantization.bits` (model/build.py: build_model)."""
    from sft_dist.config.schema import ModelConfig, QuantizationConfig
    from sft_dist.model.build import build_model

    return build_model(ModelConfig(name_or_path=str(path), attn_implementation="sdpa"),
                       quant=QuantizationConfig(bits=bits), tokenizer=None, dtype=dtype, seed=0, device="cpu",
                       compute_dtype=compute_dtype)


def backend(name: str) -> list[str]:
    """Overrides selecting a shipped backend: `ddp`, a DeepSpeed file (`zero3`) or an FSDP file (`full_shard`)."""
    if name == "ddp":
        return []
    if (DS / f"{name}.json").is_file():
        return ["backend.type=deepspeed", f"backend.config={DS / name}.json"]
    return ["backend.type=fsdp", f"backend.config={FSDP / name}.yaml"]


@pytest.fixture
def write_config(tmp_path):
    """Write a config dict (merged over the quickstart) to a YAML file; returns its path."""

    def _write(overrides: dict | None = None, *, base: Path | None = QUICKSTART, name: str = "cfg.yaml") -> Path:
        data = yaml.safe_load(base.read_text()) if base else {}
        for key, value in (overrides or {}).items():
            node = data
            *parents, last = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, allow_unicode=True))
        return path

    return _write


def cli_env() -> dict[str, str]:
    """Environment for a `sft-dist` subprocess: not inside any launcher (nor pytest's current test: the same
    environment for every test, which the session's warm template requires), the venv's tools first."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SFT_DIST_ERROR_FILE",
                        "PYTEST_CURRENT_TEST")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def cold_env() -> dict[str, str]:
    """cli_env() without the session's warm template: for the tests that find the workers as the launcher's child
    processes, by their environment (forked warm, they are the template's children, and /proc shows the template's
    environment)."""
    env = cli_env()
    env.pop("SFT_DIST_WARM", None)
    return env


@pytest.fixture(scope="session")
def checkpointed_run(tmp_path_factory):
    """The quickstart, 2 workers, 20 steps with checkpoints at 10 and 20 and eval at 10 and 20: shared by
    the checkpoint and export tests (a finished run is only read, or copied before it is changed)."""
    import subprocess

    out = tmp_path_factory.mktemp("checkpointed") / "run"
    r = subprocess.run([str(BIN / "sft-dist"), "train", str(QUICKSTART), f"output_dir={out}",
                        "training.max_steps=20", "training.save_strategy=steps", "training.save_steps=10",
                        "training.eval_steps=10"], capture_output=True, text=True, timeout=600, env=cli_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """Every test (and the `sft-dist` subprocesses it starts) caches tokenized data in a per-session directory,
    never in ~/.cache."""
    path = tmp_path_factory.mktemp("sft_dist_cache")
    old = os.environ.get("SFT_DIST_CACHE")
    os.environ["SFT_DIST_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("SFT_DIST_CACHE", None)
    else:
        os.environ["SFT_DIST_CACHE"] = old


@pytest.fixture(autouse=True)
def _own_environment():
    """Each test gets the session's environment back afterwards: what one sets (a config's secrets exported for
    the libraries, an import's own keys) reaches neither the next test's subprocesses nor the warm template's
    comparison."""
    before = dict(os.environ)
    yield
    if dict(os.environ) != before:
        os.environ.clear()
        os.environ.update(before)


@pytest.fixture(scope="session", autouse=True)
def warm_template(data_cache, tmp_path_factory, request):
    """One `sft-dist warm` template for the session: the local launches of every test fork their workers from it
    (~1 s to the first step instead of ~10 s of imports per launch on 2 cores). A launch whose environment differs
    from the session's starts cold, as a user's would. tests/distributed/test_warm.py checks that a warm and a cold
    worker train bitwise the same and that a killed launcher takes its warm workers with it; SFT_DIST_TEST_COLD=1
    runs the whole suite cold. Stopped by PID at the end of the session."""
    import subprocess

    launches = any(item.get_closest_marker("slow") for item in request.session.items)
    if os.environ.get("SFT_DIST_TEST_COLD") == "1" or not launches:  # make test-fast starts no process
        yield None
        return
    import time

    home = tmp_path_factory.mktemp("warm")
    sock, log = home / "warm.sock", home / "warm.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "sft-dist"), "warm", "--socket", str(sock)], env=cli_env(),
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while "export SFT_DIST_WARM=" not in log.read_text():  # once everything is imported (~10 s)
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    old = os.environ.get("SFT_DIST_WARM")
    os.environ["SFT_DIST_WARM"] = str(sock)
    yield SimpleNamespace(socket=sock, pid=proc.pid)
    if old is None:
        os.environ.pop("SFT_DIST_WARM", None)
    else:
        os.environ["SFT_DIST_WARM"] = old
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    # In the terminal summary: how many workers started warm, and why any launch could not
    lines = log.read_text().splitlines()
    WARM_SUMMARY.extend(sorted({x for x in lines if "refused a worker" in x}) + [x for x in lines if "stopped;" in x])


WARM_SUMMARY: list[str] = []


def pytest_terminal_summary(terminalreporter):
    if WARM_SUMMARY:
        terminalreporter.write_sep("-", "sft-dist warm template")
        for line in WARM_SUMMARY:
            terminalreporter.write_line(line[:300])


@pytest.fixture
def eager_flex(monkeypatch):
    """flex_attention without torch.compile: transformers compiles the kernel and the block mask, which costs
    20-70 s of inductor C++ builds on this CPU. The mask, built from the position_ids, is what keeps documents
    apart, and it is the same compiled or not; the compiled kernel (Triton on a GPU) is torch's, and
    bench/gpu.py checks it there (its `isolation` step)."""
    import transformers.integrations.flex_attention as flex
    import transformers.masking_utils as masking
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    monkeypatch.setattr(flex.WrappedFlexAttention, "__call__", lambda self: flex_attention)
    monkeypatch.setattr(masking, "create_block_mask", lambda *a, **k: create_block_mask(*a, **{**k, "_compile": False}))
