"""`varlen_attention` (model/varlen.py): everything around torch's CUDA kernel, run here with the per-document
sdpa reference in its place: the boundaries the collator sends, the fallbacks when they are missing, padded rows,
sliding windows, a KV cache, gradients, and what `auto` picks for which model on which device."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from sft_dist.config.load import builtin_path
from sft_dist.config.schema import DataConfig
from sft_dist.data.build import build_datasets
from sft_dist.data.packing import PackedCollator, boundaries
from sft_dist.errors import ConfigError
from sft_dist.model import varlen
from sft_dist.model.attention import causal_lm_class, choose
from sft_dist.train.callbacks import SampleIdCollator
from tests.data.test_packing import write_text_rows

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))


@pytest.fixture(scope="module")
def packed(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("varlen")
    f = write_text_rows(d / "d.jsonl", 40)
    def data(packing):
        return build_datasets(DataConfig(train_files=[f], format="text", max_length=64, packing=packing), tok,
                              seed=0).train

    plain = data(False)
    return {s: ids for s, ids in zip(plain["sample_id"], plain["input_ids"])}, data(True)


def pair(tok, model_type: str = "llama", **extra):
    """The sdpa reference and the same weights on varlen_attention."""
    varlen.register()
    config = AutoConfig.for_model(model_type, **SHAPE, **extra, vocab_size=len(tok))
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_config(config, attn_implementation=varlen.NAME, dtype=torch.float32).eval()
    model.load_state_dict(reference.state_dict())
    return reference, model


def collate(tok, rows, attn=varlen.NAME):
    batch = SampleIdCollator(PackedCollator(DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id),
                                            attn_implementation=attn))([dict(r) for r in rows])
    batch.pop("sample_ids"), batch.pop("input_tokens")
    return batch


def test_the_collator_sends_the_documents_boundaries(tok, packed):
    _, rows = packed
    rows = sorted(rows, key=lambda r: -len(r["seq_lengths"]))[:3]
    batch = collate(tok, rows)
    lengths = [n for r in rows for n in r["seq_lengths"]]
    assert batch["input_ids"].shape == (1, sum(lengths))  # flattened, no mask
    assert "attention_mask" not in batch
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["cu_seq_lens_q"].tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert batch["cu_seq_lens_k"] is batch["cu_seq_lens_q"] and batch["max_length_q"] == max(lengths)
    assert len(lengths) > 6
    # TRL's padding-free collator sends flash attention the same boundaries, from the rows' seq_lengths
    assert collate(tok, rows, attn="flash_attention_2")["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_q"].tolist()
    # a first token that does not start at position 0 still opens a document
    assert boundaries(torch.tensor([[3, 4, 0, 1, 2, 0]]))["cu_seq_lens_q"].tolist() == [0, 2, 5, 6]
    # under torch.compile the row length stands for the longest document: one int for every batch
    padded = SampleIdCollator(PackedCollator(DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id),
                                             attn_implementation=varlen.NAME, pad_to=64))([dict(r) for r in rows])
    assert padded["max_length_q"] == 64 and padded["input_ids"].shape[1] % 64 == 0


@pytest.mark.parametrize("source", ["batch", "position_ids"])
def test_packed_documents_get_their_logits_alone(tok, packed, source):
    """With the boundaries from the collator, or found from position_ids when a caller drops them."""
    docs, rows = packed
    reference, model = pair(tok)
    rows = sorted(rows, key=lambda r: -len(r["seq_lengths"]))[:3]
    batch = collate(tok, rows)
    batch.pop("labels")
    if source == "position_ids":
        for key in varlen.BATCH_KEYS:
            batch.pop(key)
    with torch.no_grad():
        logits = model(**batch).logits[0]
    start, compared = 0, 0
    for row in rows:
        for sid, n in zip(row["sample_ids"], row["seq_lengths"]):
            with torch.no_grad():
                alone = reference(torch.tensor([docs[sid]]), use_cache=False).logits[0]
            torch.testing.assert_close(logits[start:start + n], alone, atol=1e-5, rtol=0)
            start, compared = start + n, compared + 1
    assert compared > 6 and start == logits.shape[0]


def test_gradients_equal_the_block_mask_path(tok, packed):
    """One training step's loss and LoRA-free gradients: varlen vs sdpa given the same packed rows as rows."""
    _, rows = packed
    reference, model = pair(tok)
    rows = sorted(rows, key=lambda r: -len(r["seq_lengths"]))[:2]
    losses = []
    for m, attn in ((reference, "sdpa"), (model, varlen.NAME)):
        m.train()
        loss = m(**collate(tok, rows, attn=attn)).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    grads = dict(reference.named_parameters())
    worst = max((p.grad - grads[n].grad).abs().max().item() for n, p in model.named_parameters())
    assert worst < 1e-5


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_rows_are_unpadded(tok, side):
    """Unpacked batches come with a padding mask: each row's real tokens attend to themselves only."""
    reference, model = pair(tok)
    seqs = [[5, 9, 13, 2, 7, 30, 31], [4, 8, 15], [16, 23, 42, 11, 12]]
    width = max(map(len, seqs))
    pad = [[0] * (width - len(s)) for s in seqs]
    ids = [s + p if side == "right" else p + s for s, p in zip(seqs, pad)]
    mask = [[1] * len(s) + p if side == "right" else p + [1] * len(s) for s, p in zip(seqs, pad)]
    with torch.no_grad():
        got = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
        for r, s in enumerate(seqs):
            alone = reference(torch.tensor([s])).logits[0]
            where = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
            torch.testing.assert_close(got[r, where], alone, atol=1e-5, rtol=0)


def test_sliding_window_matches_sdpa(tok):
    reference, model = pair(tok, "mistral", sliding_window=5)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9]])
    with torch.no_grad():
        windowed = model(ids).logits
        torch.testing.assert_close(windowed, reference(ids).logits, atol=1e-5, rtol=0)
        reference.config.sliding_window = None  # the window is really applied: without it the logits differ
        assert (reference(ids).logits - windowed).abs().max() > 1e-3


def test_generation_with_a_kv_cache_equals_sdpa(tok):
    """Evaluation samples generate with a KV cache: the new token attends to everything before it."""
    reference, model = pair(tok)
    prompt = torch.tensor([[5, 9, 13, 2, 7, 30]])
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert model.generate(prompt, **kw).tolist() == reference.generate(prompt, **kw).tolist()


def test_decoding_past_a_sliding_window_attends_to_the_window_only(tok):
    """A new token whose cache holds more than the layer's window (a cache that does not trim) reads the last
    `window` positions, as the window trained it to; generation agrees with sdpa's past the window."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 1, 16), torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    got, _ = varlen.attention_forward(None, q, k, v, None, scaling=0.25, sliding_window=5)
    want = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, -5:], v[:, :, -5:], scale=0.25,
                                                            enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    everything, _ = varlen.attention_forward(None, q, k, v, None, scaling=0.25)
    assert (everything - got).abs().max() > 1e-3
    reference, model = pair(tok, "mistral", sliding_window=5)
    prompt = torch.tensor([[5, 9, 13, 2, 7, 30, 4, 8]])
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        mine, theirs = model.generate(prompt, **kw), reference.generate(prompt, **kw)
    assert mine.sequences.tolist() == theirs.sequences.tolist()
    torch.testing.assert_close(torch.stack(mine.logits), torch.stack(theirs.logits), atol=1e-5, rtol=0)


def test_a_saved_model_does_not_name_the_attention_it_trained_with(tok, tmp_path):
    """The attention choice is the run's, not the checkpoint's: a base or merged model loads where sft_dist's
    registration does not exist."""
    _, model = pair(tok)
    model.save_pretrained(tmp_path)
    assert varlen.NAME not in (tmp_path / "config.json").read_text()


def test_auto_picks_it_on_a_gpu_for_flash_style_models_only():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here: auto picks it first")
    llama_cfg = AutoConfig.for_model("llama", **SHAPE)
    llama = causal_lm_class(llama_cfg)
    # the planner (probe=False) predicts what a GPU will run
    c = choose("auto", llama, model_type="llama", device="cuda", dtype=torch.bfloat16, config=llama_cfg, probe=False)
    assert c.name == varlen.NAME and "torch's varlen flash kernel" in c.reason
    # building on a GPU probes the kernel first; with no CUDA here it falls back to sdpa and says why
    c = choose("auto", llama, model_type="llama", device="cuda", dtype=torch.bfloat16, config=llama_cfg)
    assert c.name == "sdpa" and "no CUDA device visible here" in c.reason
    assert choose("auto", llama, model_type="llama", device="cpu", dtype=torch.float32, config=llama_cfg,
                  probe=False).name == "sdpa"  # the CPU path is unchanged
    assert choose("auto", llama, model_type="llama", device="cuda", dtype=torch.float32, config=llama_cfg,
                  probe=False).name == "sdpa"  # fp32 weights: as for flash attention
    gemma_cfg = AutoConfig.for_model("gemma2", **SHAPE)
    gemma = causal_lm_class(gemma_cfg)
    c = choose("auto", gemma, model_type="gemma2", device="cuda", dtype=torch.bfloat16, config=gemma_cfg, probe=False)
    assert c.name == "flex_attention" and "no varlen_attention: its attention uses logit soft-capping" in c.reason
    with pytest.raises(ConfigError, match=r"varlen_attention cannot run Gemma2ForCausalLM \(model_type gemma2\): "
                                          "its attention uses logit soft-capping"):
        choose(varlen.NAME, gemma, model_type="gemma2", device="cuda", dtype=torch.bfloat16, config=gemma_cfg)
    # asked for by name on a GPU, the kernel is checked too: a clear error before any step, not at the first
    with pytest.raises(ConfigError, match="varlen_attention cannot run here: no CUDA device visible"):
        choose(varlen.NAME, llama, model_type="llama", device="cuda", dtype=torch.bfloat16, config=llama_cfg)
    bloom = causal_lm_class(AutoConfig.for_model("bloom"))  # no flash-style attention: no varlen either
    with pytest.raises(ConfigError, match="'varlen_attention' is not supported by BloomForCausalLM"):
        choose(varlen.NAME, bloom, model_type="bloom", device="cuda", dtype=torch.bfloat16)


@pytest.mark.parametrize("overrides, kind", [
    ([], "flash"),  # a bf16 LoRA base
    (["lora.enabled=false", "training.bf16=true"], "flash"),  # fp32 masters computing in bf16 (autocast)
    (["lora.enabled=false", "training.bf16=false"], "sdpa"),  # fp32 compute: no 16-bit kernel
])
def test_the_plan_predicts_the_attention_a_gpu_run_picks(overrides, kind):
    from sft_dist.plan.memory import estimate_memory
    from sft_dist.validate import load_config
    from tests.conftest import QUICKSTART

    cfg = load_config(QUICKSTART, ["data.packing=true", "launcher.num_workers=1", *overrides])
    assert estimate_memory(cfg, world_size=1, device="cuda").detail["attention"] == kind


def test_the_config_check_refuses_it_for_soft_capping_from_the_class_defaults():
    """Gemma 2's init_config need not spell out attn_logit_softcapping: the class default has it."""
    from sft_dist.validate import load_config
    from tests.conftest import QUICKSTART

    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, ["model.attn_implementation=varlen_attention", "model.init_config.model_type=gemma2"])
    assert e.value.problems == ["model.attn_implementation: varlen_attention cannot run Gemma2ForCausalLM "
                                "(model_type gemma2): its attention uses logit soft-capping; use auto, sdpa or eager"]
    load_config(QUICKSTART, ["model.attn_implementation=varlen_attention"])  # Llama: fine


def _old_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.9's signature (no scale, no enable_gqa, no window), computing what its flash kernel computes."""
    assert is_causal and query.shape[1] == key.shape[1], "that kernel: causal, as many k/v heads as q heads"
    return varlen._per_document(query.float(), key.float(), value.float(), cu_seq_q, scale=None,
                                window=None).to(query.dtype)


def _mid_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1)):
    """The signature between them (torch docs, late 2025): scale and window, as many k/v heads as q heads."""
    assert query.shape[1] == key.shape[1] and window_size[1] == 0
    window = window_size[0] + 1 if window_size[0] >= 0 else None
    return varlen._per_document(query.float(), key.float(), value.float(), cu_seq_q, scale=scale,
                                window=window).to(query.dtype)


def _new_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch 2.12's signature, computing what its flash kernel computes."""
    assert enable_gqa == (query.shape[1] != key.shape[1]) and window_size[1] == 0
    window = window_size[0] + 1 if window_size[0] >= 0 else None
    return varlen._per_document(query.float(), key.float(), value.float(), cu_seq_q, scale=scale,
                                window=window).to(query.dtype)


@pytest.mark.parametrize("kernel", [_old_kernel, _mid_kernel, _new_kernel],
                         ids=["torch-2.9-signature", "late-2025-signature", "torch-2.12-signature"])
def test_each_kernel_signature_gets_the_same_attention(monkeypatch, kernel):
    """The kernel's arguments are adapted to the torch it comes from: k/v heads repeated where it has no
    enable_gqa, a non-default softmax scale folded into q where it takes no scale. Stand-ins with each
    signature and the flash kernel's maths check the adaptation; the kernel itself runs only on a GPU."""
    import inspect

    monkeypatch.setitem(varlen._KERNEL, "kernel", kernel)
    monkeypatch.setitem(varlen._KERNEL, "params", frozenset(inspect.signature(kernel).parameters))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(23, h, 16, generator=gen, dtype=torch.bfloat16) for h in (8, 2, 2))
    cu = torch.tensor([0, 5, 17, 23], dtype=torch.int32)
    for scale in (None, 16 ** -0.5, 0.05):  # default, the same given explicitly, another (e.g. Gemma's)
        got = varlen._on_cuda(q, k, v, cu, 12, scale=scale, window=None)
        ref = varlen._per_document(q.float(), k.float(), v.float(), cu, scale=scale, window=None)
        assert got.dtype == torch.bfloat16 and (got.float() - ref).abs().max() < 0.02, scale
    if kernel is _old_kernel:
        with pytest.raises(RuntimeError, match="no sliding window"):
            varlen._on_cuda(q, k, v, cu, 12, scale=None, window=4)
    else:
        got = varlen._on_cuda(q, k, v, cu, 12, scale=None, window=4)
        ref = varlen._per_document(q.float(), k.float(), v.float(), cu, scale=None, window=4)
        assert (got.float() - ref).abs().max() < 0.02


def test_models_whose_heads_flash_kernels_cannot_take_are_refused():
    llama = AutoConfig.for_model("llama", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8)
    assert varlen.head_layout(llama) == (128, 4) and varlen.config_problem(llama) is None
    # multi-head latent attention: value heads narrower than query/key heads
    assert varlen.config_problem(AutoConfig.for_model("deepseek_v3")) == \
        "its query/key heads (192) and value heads (128) differ in size"
    big = AutoConfig.for_model("llama", hidden_size=1024, num_attention_heads=2)
    assert varlen.config_problem(big) == "its head dim 512 is over the flash kernels' 256"
    c = choose("auto", causal_lm_class(big), model_type="llama", device="cuda", dtype=torch.bfloat16, config=big,
               probe=False)
    assert c.name == "sdpa" and "head dim 512" in c.reason


def _mid_gqa_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1)):
    """torch 2.11's signature over a flash kernel that takes fewer k/v heads as they are (as ATen's does)."""
    assert window_size == (-1, 0)
    return varlen._per_document(query.float(), key.float(), value.float(), cu_seq_q, scale=scale,
                                window=None).to(query.dtype)


def _wrong_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                  window_size=(-1, -1)):
    """A kernel that attends across documents (no boundaries): what the probe is there to catch."""
    return torch.nn.functional.scaled_dot_product_attention(
        query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), is_causal=True,
        enable_gqa=query.shape[1] != key.shape[1]).transpose(0, 1)


@pytest.mark.parametrize("kernel, native, problem", [
    (_new_kernel, False, None),  # enable_gqa: passed as such
    (_mid_gqa_kernel, True, None),  # no enable_gqa, fewer k/v heads taken as they are: nothing repeated
    (_mid_kernel, False, None),  # no enable_gqa, equal heads needed: k/v repeated
    (_wrong_kernel, False, "torch's varlen_attn differs from the fp32 reference by"),
])
def test_the_probe_settles_how_grouped_kv_heads_are_passed(monkeypatch, kernel, native, problem):
    """The start-up check run on the CPU with stand-ins of each kernel (the real one runs only on a GPU):
    it decides whether k/v heads are repeated, and refuses a kernel whose output or gradients are wrong."""
    import inspect

    monkeypatch.setitem(varlen._KERNEL, "kernel", kernel)
    monkeypatch.setitem(varlen._KERNEL, "params", frozenset(inspect.signature(kernel).parameters))
    monkeypatch.setitem(varlen._KERNEL, "native_gqa", False)
    why = varlen.probe(torch.device("cpu"), torch.bfloat16, head_dim=32, groups=4)
    assert why is None if problem is None else why.startswith(problem), why
    assert varlen._KERNEL["native_gqa"] is native
