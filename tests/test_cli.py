"""CLI error reporting: one message, and the error file torchrun's failure summary reads."""

from __future__ import annotations

import json

from sft_dist.cli import main
from tests.conftest import QUICKSTART


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
