"""Packed rows on decoders that build their attention mask without the position_ids (model/packed_positions.py):
fed as the trainer feeds them (position_ids restarting per document, no attention_mask), each document gets the
logits it gets alone once `enable` ran, where without it the documents attend to each other."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from sft_dist.model import packed_positions

VOCAB = 97
LENGTHS = (5, 8, 3)  # three documents packed in one row


def tiny(family: str, attn: str):
    shapes = {
        "gpt_oss": lambda: T.GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                          num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        "falcon": lambda: T.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2),
        "opt": lambda: T.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                   num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32),
        "xglm": lambda: T.XGLMConfig(vocab_size=VOCAB, d_model=32, num_layers=2, attention_heads=2, ffn_dim=64),
        "llama": lambda: T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, max_position_embeddings=64),
    }
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(shapes[family](), attn_implementation=attn, dtype=torch.float32).eval()


def packed_row():
    ids = torch.randint(1, VOCAB, (1, sum(LENGTHS)), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    return ids, pos


def largest_leak(model) -> float:
    """The largest difference between a document's logits in the packed row and alone."""
    ids, pos = packed_row()
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        worst, start = 0.0, 0
        for n in LENGTHS:
            alone = model(input_ids=ids[:, start:start + n], use_cache=False).logits[0]
            worst = max(worst, float((packed[start:start + n] - alone).abs().max()))
            start += n
    return worst


@pytest.mark.parametrize("family,attn", [("gpt_oss", "eager"), ("falcon", "sdpa"), ("falcon", "eager"),
                                         ("opt", "sdpa"), ("xglm", "eager")])
def test_documents_stay_apart_where_the_decoder_drops_the_position_ids(family, attn):
    model = tiny(family, attn)
    assert packed_positions.problem(model) is None
    assert largest_leak(model) > 1e-3  # what transformers does alone: the documents see each other
    assert packed_positions.enable(model) >= 1
    assert largest_leak(model) < 1e-5
    assert packed_positions.enable(model) == 0  # once only
    assert packed_positions._GIVEN == []


def test_a_decoder_that_passes_its_own_is_unchanged():
    """Llama hands its mask builders the position_ids itself: the same logits, bitwise, with or without."""
    model = tiny("llama", "sdpa")
    ids, pos = packed_row()
    with torch.no_grad():
        before = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        packed_positions.enable(model)
        after = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    assert torch.equal(before, after) and largest_leak(model) < 1e-5


def test_a_failed_forward_leaves_no_positions_behind():
    model = tiny("gpt_oss", "eager")
    packed_positions.enable(model)
    ids, pos = packed_row()
    with pytest.raises(Exception):
        model(input_ids=ids, position_ids=pos[:, :3], use_cache=False)  # the wrong length: fails inside
    assert packed_positions._GIVEN == []


def test_a_decoder_without_position_ids_is_refused_for_packing():
    model = T.AutoModelForCausalLM.from_config(T.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=2))
    assert "BloomForCausalLM takes no position_ids" in packed_positions.problem(model)
    assert packed_positions.model_type_problem("mpt").startswith("MptForCausalLM takes no position_ids")
    assert packed_positions.model_type_problem("gpt_oss") is None  # handed over instead (above)
    assert packed_positions.model_type_problem("no-such-type") is None


def test_a_decoder_that_makes_its_own_mask_is_stopped_at_its_first_packed_forward():
    """BioGPT turns a missing attention_mask into an all-ones one before its mask builder sees it: packed documents
    would attend to each other whatever the position_ids say."""
    from sft_dist.errors import ConfigError

    model = T.AutoModelForCausalLM.from_config(T.BioGptConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                                              num_attention_heads=2, intermediate_size=64))
    assert packed_positions.problem(model) is None and largest_leak(model) > 1e-3
    packed_positions.enable(model)
    ids, pos = packed_row()
    with pytest.raises(ConfigError, match="BioGptModel makes its own attention mask when given none"):
        model(input_ids=ids, position_ids=pos, use_cache=False)
    assert packed_positions._GIVEN == []
    mask = torch.ones_like(ids)  # a caller's own mask (generation): left to the model
    assert model(input_ids=ids, attention_mask=mask, use_cache=False).logits.shape == (1, sum(LENGTHS), VOCAB)


@pytest.mark.parametrize("attn", ["sdpa", "varlen_attention"])
def test_the_start_up_check_measures_what_a_document_does_to_the_next(attn):
    """`leak` runs two packed rows that differ only in their first document through the trainer's collator (rows,
    or one flattened row with boundaries for varlen): nothing moves where documents stay apart, and a decoder that
    drops its position_ids shows its leak until `enable`."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from sft_dist.data.packing import PackedCollator
    from sft_dist.model import varlen

    varlen.register()
    collate = PackedCollator(DataCollatorForLanguageModeling(pad_token_id=0), attn_implementation=attn)
    assert packed_positions.leak(tiny("llama", attn), collate, device="cpu") < 1e-6
    eager = PackedCollator(DataCollatorForLanguageModeling(pad_token_id=0), attn_implementation="eager")
    model = tiny("gpt_oss", "eager").train()
    assert packed_positions.leak(model, eager, device="cpu") > 1e-3
    packed_positions.enable(model)
    assert packed_positions.leak(model, eager, device="cpu") < 1e-6  # (the experts' matmuls: float order only)
    assert model.training  # put back as it was
    assert packed_positions.leak(model.to("meta"), eager, device="cpu") is None  # not every weight here


def test_the_start_up_check_runs_on_a_sharded_model(tmp_path):
    """Under FSDP2 (and ZeRO-3) no rank holds every weight until the wrap: the check runs on the wrapped model, which
    gathers each layer as it runs (train/packing_check.py, every rank alike; one rank here). It sees the leak of a
    decoder that drops its position_ids, and refuses the run with the model's name, until `enable`."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from sft_dist.data.packing import PackedCollator
    from sft_dist.errors import ConfigError
    from sft_dist.train.packing_check import check_documents_apart

    eager = PackedCollator(DataCollatorForLanguageModeling(pad_token_id=0), attn_implementation="eager")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = tiny("gpt_oss", "eager")
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        assert packed_positions.leak(model, eager, device="cpu", sharded=True) > 1e-3
        with pytest.raises(ConfigError, match="data.packing: GptOssForCausalLM lets a packed row's documents attend"):
            check_documents_apart(model, eager, device="cpu", sharded=True)
        packed_positions.enable(model)
        assert packed_positions.leak(model, eager, device="cpu", sharded=True) < 1e-6
        check_documents_apart(model, eager, device="cpu", sharded=True)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_after_the_start_up_check_a_compiled_attention_starts_afresh(attn, eager_flex, monkeypatch):
    """transformers compiles flex attention for the shapes it meets: the check's rows are not the run's, so what the
    check compiled is dropped (torch._dynamo.reset) and training compiles for its own shape, not again for dynamic
    shapes. Other attentions compile nothing there: nothing is reset."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from sft_dist.data.packing import PackedCollator
    from sft_dist.train.packing_check import check_documents_apart

    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(attn))
    collate = PackedCollator(DataCollatorForLanguageModeling(pad_token_id=0), attn_implementation=attn)
    check_documents_apart(tiny("llama", attn), collate, device="cpu")
    assert resets == ([attn] if attn == "flex_attention" else [])
