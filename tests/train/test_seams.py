"""The private parts of HF's Trainer / TRL's SFTTrainer sft_dist relies on: all listed, all still there."""

from __future__ import annotations

import re

import pytest

from sft_dist.errors import SftDistError
from sft_dist.train import seams
from tests.conftest import ROOT

# Where sft_dist touches the trainer: its subclass and hooks, the state it resumes, the backend's final save.
FILES = [*sorted((ROOT / "sft_dist" / "train").glob("*.py")), ROOT / "sft_dist" / "backends" / "save.py",
         *sorted((ROOT / "sft_dist" / "checkpoint").glob("*.py"))]


def test_the_installed_versions_offer_every_seam():
    assert seams.moved_seams() == []
    seams.check_private_seams()


def test_every_private_name_of_the_bases_that_sft_dist_uses_is_listed():
    from transformers import Trainer
    from trl import SFTTrainer

    source = seams._module_source(seams.TRAINER) + seams._module_source(seams.SFT)
    used = set()
    for path in FILES:
        if path.name == "seams.py":
            continue
        for m in re.finditer(r"(?:self|trainer)\.(_[a-z]\w*)|def (_[a-z]\w*)", path.read_text(encoding="utf-8")):
            name = m.group(1) or m.group(2)
            if hasattr(Trainer, name) or hasattr(SFTTrainer, name) or re.search(rf"self\.{name}\b", source):
                used.add(name)
    assert sorted(used - set(seams.PRIVATE_SEAMS)) == []
    assert sorted(set(seams.PRIVATE_SEAMS) - used) == []  # a seam no longer used leaves the list


def test_a_moved_seam_fails_loudly(monkeypatch):
    monkeypatch.setitem(seams.PRIVATE_SEAMS, "_load_rng_state_v2", (seams.TRAINER, "override", "per-rank RNG"))
    monkeypatch.setitem(seams.PRIVATE_SEAMS, "_never_called", (seams.TRAINER, "attribute", "a counter"))
    assert seams.moved_seams() == ["transformers.Trainer._load_rng_state_v2 is gone (per-rank RNG)",
                                   "transformers.Trainer no longer has self._never_called (a counter)"]
    seams.check_private_seams.cache_clear()
    try:
        with pytest.raises(SftDistError, match=r"transformers \S+ / trl \S+ moved .*_load_rng_state_v2 is gone"):
            seams.check_private_seams()
    finally:
        seams.check_private_seams.cache_clear()
