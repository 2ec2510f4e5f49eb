"""Every architecture under every backend (issue 16): the tiny model of each preset family (same model type, head
grouping, tied or untied head, windows, soft-capping, qk-norm, MoE routing) trains under DDP, ZeRO-3, FSDP2 and
4-bit QLoRA on 2 CPU gloo workers (ZeRO-2: tests/presets/conftest.py), matches DDP, resumes bitwise and exports a merged model that gives the
trained model's logits. One bench run (bench/arch_matrix.py) serves every test here and the presets' tiny runs."""

from __future__ import annotations

import pytest

from tests.presets.conftest import CELLS, STEPS, SUITE_EXPORT, SUITE_FAMILIES, SUITE_RESUME
from tests.presets.presets import family_presets

pytestmark = pytest.mark.slow

FAMILIES = sorted(SUITE_FAMILIES)
TOL = 1e-5  # the equivalence suite's (tests/e2e/test_backends.py), on every step's loss
# the adapter's relative L2 distance: ZeRO-3's reduce-scatter order, magnified by Adam on near-zero gradients
WEIGHTS_TOL = 1e-4  # measured <= 1.4e-5 (bench/arch_matrix.py)
EXPORT_TOL = 1e-4  # |merged logits - base with the adapter under peft|; measured <= 1e-6 at logit scale ~1
EXPECT = {"ddp": ("DistributedDataParallel", None), "zero2": ("DeepSpeedEngine", 2),
          "zero3": ("DeepSpeedEngine", 3), "fsdp": ("FSDP2 (fully_shard)", None),
          "qlora": ("DistributedDataParallel", None)}


def cell(arch_matrix, family, name):
    row = arch_matrix[0].get((family, name))
    assert row is not None, arch_matrix[1].stdout[-3000:] + arch_matrix[1].stderr[-3000:]
    assert "error" not in row, row["error"]
    return row


def test_the_matrix_covers_every_family_and_backend(arch_matrix):
    assert set(family_presets()) == {"llama", "qwen2", "qwen3_moe", "mistral", "gemma2", "phi3"}
    assert set(arch_matrix[0]) == {(f, c) for f in FAMILIES for c in CELLS}, sorted(arch_matrix[0])
    assert arch_matrix[1].returncode == 0, arch_matrix[1].stdout[-4000:]


@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_trains_under_the_backend(arch_matrix, family, name):
    row = cell(arch_matrix, family, name)
    assert (row["wrapper"], row["zero_stage"]) == EXPECT[name]
    assert row["steps"] == STEPS and row["last_loss"] < row["first_loss"]
    if name in ("zero3", "fsdp"):  # each of the 2 ranks holds half of the model
        assert row["param_numel_rank0"] == pytest.approx(row["total_params"] / 2, rel=0.05)
    assert (row["quantized_linear_layers"] > 0) == (name == "qlora")


@pytest.mark.parametrize("name", [c for c in CELLS if c not in ("ddp", "qlora")])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_ddp(arch_matrix, family, name):
    row = cell(arch_matrix, family, name)
    assert row["loss_max_rel"] <= TOL and row["weights_rel_l2"] <= WEIGHTS_TOL, row


@pytest.mark.parametrize("name", SUITE_RESUME)
@pytest.mark.parametrize("family", FAMILIES)
def test_resume_is_bitwise(arch_matrix, family, name):
    row = cell(arch_matrix, family, name)
    assert row["resumed_step"] == STEPS // 2 and row["resume_bitwise"] is True


@pytest.mark.parametrize("name", SUITE_EXPORT)
@pytest.mark.parametrize("family", FAMILIES)
def test_merged_export_gives_the_trained_logits(arch_matrix, family, name):
    row = cell(arch_matrix, family, name)
    assert row["lora_layers_merged"] > 0
    assert row["logits_max_abs"] <= EXPORT_TOL, row
