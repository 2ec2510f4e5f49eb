"""CLI error reporting: one message, and the error file torchrun's failure summary reads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sft_dist.cli import main
from tests.conftest import BIN, QUICKSTART, cold_env


def test_bad_config_under_torchrun_fills_the_elastic_error_file(tmp_path, monkeypatch, capsys):
    err = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(err))
    monkeypatch.delenv("SFT_DIST_ERROR_FILE", raising=False)
    assert main(["train", str(QUICKSTART), "lora.rank=8"]) == 1
    data = json.loads(err.read_text())
    assert data["message"]["message"].startswith("ConfigError: invalid config")
    assert "lora.rank: unknown key; did you mean `lora.r`?" in data["message"]["extraInfo"]["py_callstack"]
    out = capsys.readouterr().err
    assert out.count("invalid config") == 1 and "Traceback" not in out


@pytest.mark.slow
def test_bitsandbytes_cpu_kernel_warning_does_not_open_every_log():
    """bitsandbytes, imported with peft, warns on AVX512-BF16 CPUs that it could not fetch an optional kernel from
    the Hub; sft_dist's entry points keep it out of the log (here the CLI's, started cold: `sft-dist plan` builds the
    LoRA model on the meta device, so it imports peft)."""
    said = "Failed to load CPU gemm_4bit_forward"
    alone = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True, timeout=120)
    if said not in alone.stderr:
        pytest.skip("this machine's bitsandbytes does not warn (no AVX512-BF16, or its kernel package is installed)")
    r = subprocess.run([str(BIN / "sft-dist"), "plan", str(QUICKSTART)], capture_output=True, text=True,
                       timeout=300, env=cold_env())
    assert r.returncode == 0 and "memory per rank" in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]
    assert said not in r.stdout + r.stderr
