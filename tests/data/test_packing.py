"""Packing: best-fit decreasing bins, the packed rows, and that a packed document's logits and loss are those
of the document alone (sdpa, eager and flex_attention, through the collators the trainer uses)."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from sft_dist.config.load import builtin_path
from sft_dist.config.schema import DataConfig
from sft_dist.data.build import build_datasets
from sft_dist.data.formats import IGNORE
from sft_dist.data.packing import PackedCollator, bfd_bins
from sft_dist.train.callbacks import SampleIdCollator
from tests.conftest import QUICKSTART

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))


def write_text_rows(path, n: int, *, seed: int = 0, longest: int = 60) -> str:
    """`n` text rows of 1 to `longest` words (about as many tokens)."""
    rnd = random.Random(seed)
    words = ["casa", "rio", "sol", "dia", "mar", "luz", "pão", "céu", "flor", "vento"]
    rows = [{"text": " ".join(rnd.choice(words) for _ in range(rnd.randint(1, longest)))} for _ in range(n)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def build(tmp_path, tok, *, n=40, packing=True, **kw):
    f = write_text_rows(tmp_path / "d.jsonl", n)
    return build_datasets(DataConfig(train_files=[f], format="text", max_length=MAX_LENGTH, packing=packing, **kw),
                          tok, seed=0)


def test_bfd_packs_a_hand_computed_case():
    # 6 -> new bin A (2 free); 5 -> new B (3); 4 -> new C (4); 3 -> B (best fit, 0); 2 -> A (0); 2 -> C (2);
    # 1 -> C (best fit, 1). 23 tokens in 3 bins of 8: the fewest possible.
    assert bfd_bins([6, 5, 4, 3, 2, 2, 1], 8) == [[0, 4], [1, 3], [2, 5, 6]]
    assert bfd_bins([8, 8, 1], 8) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="document 1 has 9 tokens, more than the row length 8"):
        bfd_bins([3, 9], 8)


def test_bfd_never_exceeds_the_row_and_keeps_every_index_once():
    rnd = random.Random(1)
    lengths = [rnd.randint(1, 100) for _ in range(500)]
    bins = bfd_bins(lengths, 100)
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert bins == bfd_bins(lengths, 100)  # deterministic
    # best-fit decreasing stays within 11/9 OPT + 1; OPT >= the tokens over the row length
    assert len(bins) <= 11 / 9 * (sum(lengths) / 100) + 1


def test_packed_rows_keep_every_document_with_positions_and_boundary_labels(tmp_path, tok):
    plain, packed = build(tmp_path, tok, packing=False), build(tmp_path, tok)
    docs = {sid: (ids, labels) for sid, ids, labels in
            zip(plain.train["sample_id"], plain.train["input_ids"], plain.train["labels"])}
    flat = [sid for row in packed.train["sample_ids"] for sid in row]
    assert sorted(flat) == sorted(docs) and len(flat) == len(set(flat)) == 40  # nothing lost or duplicated
    for row in packed.train:
        assert len(row["input_ids"]) == sum(row["seq_lengths"]) <= MAX_LENGTH
        start = 0
        for sid, n in zip(row["sample_ids"], row["seq_lengths"]):
            ids, labels = docs[sid]
            assert row["input_ids"][start:start + n] == ids
            assert row["position_ids"][start:start + n] == list(range(n))
            # the first token would be predicted from the previous document: never a label
            assert row["labels"][start:start + n] == [IGNORE] + labels[1:]
            start += n
    st, pst = plain.stats["train"], packed.stats["train"]
    assert (pst.tokens, pst.loss_tokens) == (st.tokens, st.loss_tokens)
    assert sum(1 for row in packed.train["labels"] for t in row[1:] if t != IGNORE) == st.loss_tokens
    assert pst.packed_rows == len(packed.train) < 40 and pst.fill == st.tokens / (pst.packed_rows * MAX_LENGTH)
    assert f"packed into {pst.packed_rows} rows of {MAX_LENGTH} ({100 * pst.fill:.1f}% filled)" in \
        pst.describe("train", MAX_LENGTH)


def tiny_llama(tok, attn: str):
    init = yaml.safe_load(QUICKSTART.read_text())["model"]["init_config"]
    config = AutoConfig.for_model(**{**init, "vocab_size": len(tok)})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()


def collator(tok, *, attn):
    """What sft_dist's trainer collates packed rows with (train/run.py `_build_trainer`)."""
    return SampleIdCollator(PackedCollator(DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id),
                                           attn_implementation=attn))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["rows", "flattened"])
def test_packed_documents_see_only_themselves(tmp_path, tok, attn, layout):
    plain, packed = build(tmp_path, tok, packing=False), build(tmp_path, tok)
    docs = {sid: (ids, labels) for sid, ids, labels in
            zip(plain.train["sample_id"], plain.train["input_ids"], plain.train["labels"])}
    model = tiny_llama(tok, attn)
    # `flattened` is the layout flash attention gets; run here on sdpa/eager it must isolate as well
    collate = collator(tok, attn=attn if layout == "rows" else "flash_attention_2")
    rows = sorted(packed.train, key=lambda r: -len(r["seq_lengths"]))[:4]  # a micro-batch of 4 packed rows
    batch = collate([dict(r) for r in rows])
    ids = batch.pop("sample_ids").tolist()
    assert ids == [s for r in rows for s in r["sample_ids"]] and len(ids) > 4
    assert int(batch.pop("input_tokens")) == sum(len(r["input_ids"]) for r in rows)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == (4 if layout == "rows" else 1)
    with torch.no_grad():
        out = model(**batch)
    logits = out.logits.reshape(-1, out.logits.shape[-1])
    width = batch["input_ids"].shape[1]
    nll, n_loss = 0.0, 0
    for r, row in enumerate(rows):
        start = r * width if layout == "rows" else sum(len(x["input_ids"]) for x in rows[:r])
        for sid, n in zip(row["sample_ids"], row["seq_lengths"]):
            doc_ids, doc_labels = docs[sid]
            with torch.no_grad():
                alone = model(torch.tensor([doc_ids]), labels=torch.tensor([doc_labels]))
            torch.testing.assert_close(logits[start:start + n], alone.logits[0], atol=1e-5, rtol=0)
            k = sum(1 for t in doc_labels[1:] if t != IGNORE)
            nll, n_loss = nll + float(alone.loss) * k, n_loss + k
            start += n
    # the batch's loss is the token-weighted loss of its documents alone: no label crosses a boundary
    assert float(out.loss) == pytest.approx(nll / n_loss, abs=1e-5)


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile.*:UserWarning")
@pytest.mark.parametrize("attn", ["eager", "sdpa", "flex_attention"])
def test_every_cpu_attention_gives_a_packed_row_the_logits_of_its_documents_alone(tmp_path, tok, attn, request):
    """The guard for the GPU paths: each attention implementation that runs on CPU, fed packed rows the way the
    trainer feeds them (PackedCollator: position_ids restarting per document, no attention_mask), gives every
    document the logits sdpa gives it alone, with grouped KV heads (8 query heads on 2 KV heads, as Llama 3)."""
    if attn == "flex_attention":
        request.getfixturevalue("eager_flex")
    plain, packed = build(tmp_path, tok, packing=False), build(tmp_path, tok)
    docs = dict(zip(plain.train["sample_id"], plain.train["input_ids"]))
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                                  vocab_size=len(tok))
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()
    model.load_state_dict(reference.state_dict())
    rows = sorted(packed.train, key=lambda r: -len(r["seq_lengths"]))[:3]
    batch = collator(tok, attn=attn)([dict(r) for r in rows])
    batch.pop("sample_ids"), batch.pop("input_tokens"), batch.pop("labels")
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 3  # one packed row per batch row
    with torch.no_grad():
        logits = model(**batch).logits
    compared = 0
    for r, row in enumerate(rows):
        start = 0
        for sid, n in zip(row["sample_ids"], row["seq_lengths"]):
            with torch.no_grad():
                alone = reference(torch.tensor([docs[sid]]), use_cache=False).logits[0]
            torch.testing.assert_close(logits[r, start:start + n], alone, atol=1e-5, rtol=0)
            start += n
            compared += 1
    assert compared > 6  # several documents per row


@pytest.mark.parametrize("layout", ["rows", "flattened"])
def test_padding_to_a_fixed_width_changes_no_document_and_no_loss(tmp_path, tok, layout):
    """`pad_to` (one batch shape for torch.compile): the padding is inert, in both layouts."""
    packed = build(tmp_path, tok)
    model = tiny_llama(tok, "sdpa")
    attn = "sdpa" if layout == "rows" else "flash_attention_2"
    rows = sorted(packed.train, key=lambda r: len(r["input_ids"]))[:3]  # the shortest rows: padding to come
    width = max(len(r["input_ids"]) for r in rows)
    assert width < MAX_LENGTH
    outs = []
    for pad_to in (None, MAX_LENGTH):
        batch = SampleIdCollator(PackedCollator(DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id),
                                                attn_implementation=attn, pad_to=pad_to))([dict(r) for r in rows])
        batch.pop("sample_ids"), batch.pop("input_tokens")
        with torch.no_grad():
            outs.append((batch["input_ids"].shape, model(**batch)))
    (plain_shape, plain), (padded_shape, padded) = outs
    # one width per micro-batch size: a row's length, or the flattened micro-batch's rows x the row length
    assert padded_shape[-1] == (MAX_LENGTH if layout == "rows" else 3 * MAX_LENGTH) > plain_shape[-1]
    n = plain_shape[-1]
    torch.testing.assert_close(padded.logits[:, :n], plain.logits, atol=1e-5, rtol=0)
    assert float(padded.loss) == pytest.approx(float(plain.loss), abs=1e-6)


@pytest.mark.parametrize("attn, width", [("sdpa", 64), ("flash_attention_2", 3 * 64), ("varlen_attention", 3 * 64)])
def test_under_compile_every_micro_batch_of_n_rows_has_one_width(attn, width):
    """Rows of any fill give the same shape: a row's pad_to, or n x pad_to flattened (not the next multiple of
    pad_to above the batch's total, which changes from batch to batch and would compile the model again)."""
    collate = PackedCollator(DataCollatorForLanguageModeling(pad_token_id=0), attn_implementation=attn, pad_to=64)
    for lengths in ((10, 12, 9), (60, 64, 50), (33, 1, 64)):
        rows = [{"input_ids": list(range(3, 3 + n)), "labels": list(range(3, 3 + n)), "seq_lengths": [n]}
                for n in lengths]
        batch = collate(rows)
        assert batch["input_ids"].shape[-1] == width and batch["position_ids"].shape[-1] == width
        if attn == "varlen_attention":  # the longest document stays the row length, also a constant
            assert batch["max_length_q"] == 64 and int(batch["cu_seq_lens_q"][-1]) == width


@pytest.mark.parametrize("packing, attn, compiled, width", [
    (True, "flex_attention", False, MAX_LENGTH),  # transformers compiles flex: one width, no dynamic recompile
    (True, "sdpa", False, None), (True, "varlen_attention", False, None),  # nothing compiled: no padding
    (False, "flex_attention", False, None),  # unpacked rows padded to the row length would be mostly padding
    (True, "sdpa", True, MAX_LENGTH), (False, "varlen_attention", True, MAX_LENGTH),  # torch.compile: always
])
def test_batches_are_padded_to_one_width_where_something_is_compiled(packing, attn, compiled, width):
    from types import SimpleNamespace

    from sft_dist.train.run import fixed_width

    cfg = SimpleNamespace(data=DataConfig(train_files=["x.jsonl"], max_length=MAX_LENGTH, packing=packing))
    assert fixed_width(cfg, attn, compiled=compiled) == width


def test_a_kv_cache_would_join_the_documents(tmp_path, tok):
    """Why PackedCollator sets use_cache=False: with a cache, transformers ignores the position_ids' boundaries."""
    packed = build(tmp_path, tok)
    model = tiny_llama(tok, "sdpa")
    row = next(r for r in packed.train if len(r["seq_lengths"]) > 1)
    batch = collator(tok, attn="sdpa")([dict(row)])
    batch.pop("sample_ids"), batch.pop("input_tokens")
    with torch.no_grad():
        isolated = model(**batch).logits
        joined = model(**{**batch, "use_cache": True}).logits
    n = row["seq_lengths"][0]
    torch.testing.assert_close(isolated[0, :n], joined[0, :n])  # the first document sees nothing before it
    assert (isolated[0, n:] - joined[0, n:]).abs().max() > 1e-3  # the second one would see the first


def test_truncate_keeps_long_rows_cut_and_drop_leaves_them_out(tmp_path, tok):
    cut = build(tmp_path, tok, packing=False)
    dropped = build(tmp_path, tok, packing=False, truncation="drop")
    rows = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text(encoding="utf-8").splitlines()]
    long = [n for n in (len(tok(r["text"])["input_ids"]) + 1 for r in rows) if n > MAX_LENGTH]  # + eos
    assert long  # the generated rows reach past max_length
    a, b = cut.stats["train"], dropped.stats["train"]
    assert (a.rows, a.truncated, a.dropped_long, len(cut.train)) == (40, len(long), 0, 40)
    assert (b.rows, b.truncated, b.dropped_long, len(dropped.train)) == (40, 0, len(long), 40 - len(long))
    assert max(len(x) for x in cut.train["input_ids"]) == MAX_LENGTH
    assert max(len(x) for x in dropped.train["input_ids"]) <= MAX_LENGTH
    assert f"{len(long)} truncated to data.max_length={MAX_LENGTH}" in a.describe("train", MAX_LENGTH)
    assert f"{len(long)} dropped as longer than data.max_length={MAX_LENGTH}" in b.describe("train", MAX_LENGTH)
    packed = build(tmp_path, tok, truncation="drop")
    assert sorted(s for r in packed.train["sample_ids"] for s in r) == sorted(dropped.train["sample_id"])
