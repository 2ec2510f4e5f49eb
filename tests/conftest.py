"""Shared fixtures: the repo paths and a helper to write small configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "examples" / "quickstart.yaml"
BIN = Path(sys.executable).parent
DS, FSDP = ROOT / "configs" / "deepspeed", ROOT / "configs" / "fsdp"


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
    """Environment for a `sft-dist` subprocess: not inside any launcher, the venv's tools first."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SFT_DIST_ERROR_FILE")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
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
