"""The architecture x backend matrix (bench/arch_matrix.py), run once per session and read by the matrix and preset
tests: every family's tiny model under every backend, with the resumes and merged exports the suite checks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, cli_env

# ZeRO-2 holds the whole weights on every rank, as DDP does, and shards only the optimizer state: the bench runs it
# for every family, the suite for the quickstart's Llama (tests/e2e/test_backends.py), not here again (4 runs).
CELLS = ("ddp", "zero3", "fsdp", "qlora")
# The families whose architecture differs from the quickstart's Llama, which tests/e2e/test_backends.py runs under
# every backend with resumes: Gemma 2 (tied head, soft-capping, sliding window), Phi-3 (fused qkv and gate_up,
# sliding window), Qwen2 (qkv bias, 7:1 head grouping), Qwen3-MoE (routed experts, qk-norm). The bench runs all.
SUITE_FAMILIES = ("gemma2", "phi3", "qwen2", "qwen3_moe")
# Resume and merged export per cell in the suite (the bench checks every cell): the sharded states, where the
# architecture decides what is gathered and saved (ZeRO-3's partitions, FSDP2's per-layer shards), and the 4-bit
# base's dequantized merge; DDP's and ZeRO-2's whole-model states (and QLoRA's resume) are resumed and exported in
# tests/e2e and tests/checkpoint.
SUITE_RESUME = ("zero3", "fsdp")
SUITE_EXPORT = ("zero3", "fsdp", "qlora")
STEPS = 8


@pytest.fixture(scope="session")
def arch_matrix(tmp_path_factory):
    """{(family, cell): row} and the bench's completed process. Two families at a time (the same numbers: 103 s ->
    65 s here)."""
    out = tmp_path_factory.mktemp("arch_matrix")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "arch_matrix.py"), "--out", str(out),
                        "--steps", str(STEPS), "--families", ",".join(SUITE_FAMILIES), "--backends", ",".join(CELLS), "--resume", ",".join(SUITE_RESUME),
                        "--export", ",".join(SUITE_EXPORT), "--jobs", "2"],
                       capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=2400)
    print(r.stdout)
    path = out / "arch_matrix.json"
    assert path.is_file(), r.stdout[-3000:] + r.stderr[-3000:]
    return {(row["family"], row["cell"]): row for row in json.loads(path.read_text())}, r
