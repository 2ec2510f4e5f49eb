"""The model's config read as plain JSON (model/config.py), without importing transformers: from `init_config`,
a local directory, or a hub id already in the Hugging Face cache."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sft_dist.config.schema import ModelConfig
from sft_dist.model.config import max_positions, model_type, raw_config
from tests.conftest import FSDP, ROOT

LLAMA = ROOT / "tests" / "presets" / "fixtures" / "llama-3.1-8b-instruct" / "config.json"
REPO = "meta-llama/Llama-3.1-8B-Instruct"


def hub_cache(root, snapshots: dict[str, dict], main: str):
    """A Hugging Face hub cache as `from_pretrained` leaves it: snapshots by commit, refs/main naming one."""
    repo = root / "hub" / f"models--{REPO.replace('/', '--')}"
    for commit, config in snapshots.items():
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text(json.dumps(config))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(main)
    return root / "hub"


def test_a_hub_id_in_the_cache_is_read_at_the_revision_asked(tmp_path, monkeypatch):
    import huggingface_hub.constants

    base = json.loads(LLAMA.read_text())
    cache = hub_cache(tmp_path, {"c0ffee": base, "beef42": {**base, "max_position_embeddings": 4096}}, main="c0ffee")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    m = ModelConfig(name_or_path=REPO)
    assert model_type(m) == "llama" and max_positions(m) == base["max_position_embeddings"] == 131072
    assert max_positions(ModelConfig(name_or_path=REPO, revision="beef42")) == 4096
    assert raw_config(ModelConfig(name_or_path=REPO, revision="v9")) is None  # a revision never downloaded
    assert raw_config(ModelConfig(name_or_path="other/model")) is None
    # a local path is never looked up in the hub cache, existing or not
    assert raw_config(ModelConfig(name_or_path=str(tmp_path))) is None
    assert raw_config(ModelConfig(name_or_path=str(tmp_path / "no" / "such" / "dir"))) is None
    assert raw_config(ModelConfig(name_or_path=str(LLAMA.parent)))["model_type"] == "llama"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_the_launchers_check_of_a_cached_hub_model_imports_no_transformers(tmp_path, write_config, backend):
    """What `sft-dist train` checks before any worker starts (the config and the plan's rules) reads a downloaded
    hub model's config.json as JSON: no transformers import (~4 s on 2 cores), under FSDP2 (its decoder-layer
    class cached by model type, config/fields_cache.py) too."""
    cache = hub_cache(tmp_path / "hf", {"c0ffee": json.loads(LLAMA.read_text())}, main="c0ffee")
    more = {"backend.type": "fsdp", "backend.config": str(FSDP / "full_shard.yaml")} if backend == "fsdp" else {}
    path = write_config({"model.init_config": None, "model.name_or_path": REPO, **more})
    code = ("import sys; from sft_dist.validate import load_config; from sft_dist.plan import check; "
            "check(load_config(sys.argv[1], [])); print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'transformers', 'trl', 'peft'}))")
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "PATH": "/usr/bin:/bin"}
    runs = [subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env,
                           timeout=120) for _ in range(2)]
    # the first check fills the caches: TRL's config fields (config/fields_cache.py), FSDP's decoder-layer class
    assert [(r.returncode, r.stdout.strip()) for r in runs][-1] == (0, "[]"), runs[-1].stderr[-2000:]
