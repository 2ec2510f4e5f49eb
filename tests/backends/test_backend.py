"""The Backend object: one per strategy, built once from the config, its settings file read once."""

from __future__ import annotations

import pytest

from sft_dist.backends import Backend, get_backend
from sft_dist.backends.deepspeed import DeepSpeed
from sft_dist.backends.fsdp import FSDP2
from sft_dist.validate import load_config
from tests.conftest import QUICKSTART, ROOT

DS = ROOT / "configs" / "deepspeed"
FSDP = ROOT / "configs" / "fsdp"


def backend(*overrides) -> Backend:
    return get_backend(load_config(QUICKSTART, ["launcher.num_workers=4", *overrides]))


def test_each_strategy_is_its_own_class():
    assert type(backend()) is Backend and backend().name == "ddp"
    assert type(backend("backend.type=deepspeed", f"backend.config={DS / 'zero3.json'}")) is DeepSpeed
    assert type(backend("backend.type=fsdp", f"backend.config={FSDP / 'full_shard.yaml'}")) is FSDP2


@pytest.mark.parametrize("stage, divisors, label", [
    (1, (1, 1, 4), "zero1"), (2, (1, 4, 4), "zero2"), (3, (4, 4, 4), "zero3"),
])
def test_deepspeed_shards_by_its_stage(stage, divisors, label):
    b = backend("backend.type=deepspeed", f"backend.config={DS / f'zero{stage}.json'}")
    s = b.sharding(4)
    assert (s.weights, s.gradients, s.optimizer) == divisors
    assert s.label == label and s.master_copy and b.zero_stage == stage
    assert b.label == f"deepspeed zero{stage}" and b.shard_format == "deepspeed"
    assert b.training_args()["deepspeed"]["zero_optimization"]["stage"] == stage
    assert b.plan_facts()["zero_stage"] == stage


def test_fsdp_shards_everything_and_hybrid_within_a_group(tmp_path):
    full = backend("backend.type=fsdp", f"backend.config={FSDP / 'full_shard.yaml'}")
    s = full.sharding(4)
    assert (s.weights, s.gradients, s.optimizer, s.gathers_layers) == (4, 4, 4, True)
    assert full.shard_format == "dcp" and full.zero_stage is None and full.separates_tied_weights
    assert full.quant_storage("bfloat16") == "bfloat16"  # FSDP2 shards floating tensors only
    hybrid = tmp_path / "hybrid.yaml"
    hybrid.write_text("sharding: hybrid_shard\nshard_size: 2\n")
    h = backend("backend.type=fsdp", f"backend.config={hybrid}")
    assert h.sharding(4).weights == 2 and h.label == "fsdp2 hybrid_shard"


def test_ddp_shards_nothing():
    b = backend()
    s = b.sharding(4)
    assert (s.weights, s.gradients, s.optimizer, s.ddp_buckets) == (1, 1, 1, True)
    assert b.training_args() == {} and b.quant_storage("bfloat16") == "uint8" and not b.separates_tied_weights


@pytest.mark.parametrize("overrides", [
    ("backend.type=deepspeed", f"backend.config={DS / 'zero3.json'}"),
    ("backend.type=fsdp", f"backend.config={FSDP / 'full_shard.yaml'}"),
])
def test_the_settings_file_is_read_once_per_backend(monkeypatch, overrides):
    import sft_dist.config.backend_file as bf

    b = backend(*overrides)
    reads = []
    real = bf.read_mapping
    monkeypatch.setattr(bf, "read_mapping", lambda *a, **k: reads.append(a) or real(*a, **k))
    assert b.check() == []
    b.training_args(), b.sharding(4), b.plan_facts(), b.label, b.own_activation_checkpointing
    assert len(reads) == 1


TIED = "model.init_config={model_type: qwen2, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, " \
       "num_attention_heads: 4, num_key_value_heads: 2, tie_word_embeddings: true}"


@pytest.mark.parametrize("overrides, world, quantized, expected", [
    ([], 4, False, True),  # the quickstart: untied head, trained (modules_to_save)
    ([TIED, "lora.modules_to_save=null"], 4, False, True),  # tied, nothing trained besides LoRA
    ([TIED], 4, False, False),  # tied and the head trained: the load from rank 0 would tie them again
    ([], 4, True, False),  # a 4-bit base is quantized on every rank
    ([], 1, False, False),  # nothing to send
])
def test_fsdp2_sends_a_random_base_from_rank_0_where_its_load_can_take_it(overrides, world, quantized, expected):
    b = backend("backend.type=fsdp", f"backend.config={FSDP / 'full_shard.yaml'}", *overrides)
    assert b.random_base_from_rank0(b.sharding(world), quantized=quantized) is expected
    placements = {b.random_base(b.sharding(world), quantized=quantized, is_main=main) for main in (True, False)}
    assert placements == ({"send", "receive"} if expected else {"host"} if quantized or world > 1 else {"device"})
    ddp = backend(*overrides)
    assert ddp.random_base(ddp.sharding(world), quantized=quantized, is_main=False) == ("host" if quantized else "device")


def test_zero3_builds_a_random_base_partitioned_over_several_ranks_only():
    b = backend("backend.type=deepspeed", f"backend.config={DS / 'zero3.json'}")
    assert b.random_base(b.sharding(2), quantized=False, is_main=False) == "partitioned"
    assert b.random_base(b.sharding(1), quantized=False, is_main=True) == "device"  # one rank: nothing to partition
    assert b.random_base(b.sharding(2), quantized=True, is_main=True) == "host"  # quantized from host memory
    z2 = backend("backend.type=deepspeed", f"backend.config={DS / 'zero2.json'}")
    assert z2.random_base(z2.sharding(2), quantized=False, is_main=True) == "device"


def test_the_backend_check_looks_through_a_compiled_wrapper(tmp_path):
    """training.torch_compile: accelerate compiles the DDP-wrapped model; the check that DDP applied must see DDP
    inside the compiled module (before, every multi-worker compiled run was refused at start)."""
    import types

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from sft_dist.backends.verify import wrapper_info
    from sft_dist.errors import SftDistError

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(torch.nn.Linear(4, 4))
        info = wrapper_info(types.SimpleNamespace(model_wrapped=torch.compile(ddp)), requested="ddp", world_size=2)
        assert info["wrapper"] == "DistributedDataParallel" and info["compiled"] is True
        with pytest.raises(SftDistError, match="wrapped in Linear, not DDP"):
            wrapper_info(types.SimpleNamespace(model_wrapped=torch.compile(torch.nn.Linear(4, 4))), requested="ddp",
                         world_size=2)
    finally:
        dist.destroy_process_group()
