"""Sequence parallelism (model/ulysses.py) against the unsplit model: real ranks over gloo on 127.0.0.1, each
holding a slice of two packed rows. The slices' logits put together, the loss and the gradients summed over ranks
are the unsplit forward's, for each attention implementation that runs on a CPU, with k/v heads split or
repeated, a sliding window, and rows that need padding to split evenly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sft_dist.distributed.local import free_port
from sft_dist.errors import ConfigError
from sft_dist.model import ulysses
from tests.model.ulysses_worker import model_and_batch

WORKER = Path(__file__).with_name("ulysses_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def run_ranks(world: int, cases: list[tuple[str, int, int]], tmp: Path) -> dict[tuple, list[dict]]:
    """Every case on `world` ranks started once: {case: [each rank's result]}. Output goes to files: a rank blocked
    on a full pipe would hold the others in a collective."""
    port = free_port("127.0.0.1")
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        with open(tmp / f"out{r}", "w") as out, open(tmp / f"err{r}", "w") as err:
            procs.append(subprocess.Popen([sys.executable, str(WORKER), *(":".join(map(str, c)) for c in cases)],
                                          env=env, stdout=out, stderr=err))
    results: dict[tuple, list[dict]] = {}
    for r, p in enumerate(procs):
        assert p.wait(timeout=300) == 0, (tmp / f"err{r}").read_text()[-3000:]
        for line in (tmp / f"out{r}").read_text().splitlines():
            if line.startswith("{"):
                result = json.loads(line)
                results.setdefault(tuple(result["case"]), []).append(result)
    return results


CASES = [  # inner attention, query heads, k/v heads, sliding window, family
    ("sdpa", 4, 2, 0, "llama"),  # k/v heads split 2 ways
    ("sdpa", 4, 1, 0, "llama"),  # one k/v head: repeated to split
    ("eager", 4, 2, 0, "llama"),
    ("varlen_attention", 4, 2, 0, "llama"),  # flattened rows and their boundaries (the per-document sdpa on a CPU)
    ("sdpa", 4, 2, 4, "mistral"),  # a sliding window of 4 tokens
    ("sdpa", 3, 3, 0, "llama"),  # 3 heads over 2 ranks: a zero k/v head and its zero query head added
    ("varlen_attention", 3, 1, 0, "llama"),  # 3 query heads of one k/v head: one zero query head, k/v repeated
    ("eager", 3, 1, 4, "gpt_oss"),  # learned sinks (each rank its heads' share), sliding and full layers, padding
    ("flex_attention", 4, 2, 0, "llama"),  # the whole rows' BlockMask (forward only: no flex backward on a CPU)
    ("flex_attention", 3, 1, 4, "gemma2"),  # soft-capping, sliding and full layers, padded heads
]


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory):
    return run_ranks(2, CASES, tmp_path_factory.mktemp("ulysses"))


def reference(heads: int, kv_heads: int, window: int, family: str) -> dict:
    """The unsplit model: transformers' own packed-row mask (sdpa; eager for gpt-oss, which has no sdpa, with the
    position_ids handed to its mask builders: model/packed_positions.py, and for Gemma 2's soft-capping), the CPU
    reference of every path."""
    from sft_dist.model import packed_positions

    eager = family in ("gpt_oss", "gemma2")  # no sdpa (sinks), or soft-capping sdpa cannot do
    model, batch = model_and_batch("eager" if eager else "sdpa", heads, kv_heads, window or None, family)
    packed_positions.enable(model)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    tokens = int(labels.ne(-100).sum())
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100,
                                             reduction="sum") / tokens
    loss.backward()
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    return {"logits": logits.detach(), "loss": float(loss.detach()), "grads": {n: g.flatten()[:64] for n, g in grads.items()},
            "grad_norm": float(torch.stack([g.norm() for g in grads.values()]).norm())}


@pytest.mark.parametrize("inner,heads,kv_heads,window,family", CASES)
def test_split_equals_unsplit(split_runs, inner, heads, kv_heads, window, family):
    ranks = sorted(split_runs[(inner, heads, kv_heads, window, family)], key=lambda r: r["rank"])
    assert len(ranks) == 2
    ref = reference(heads, kv_heads, window, family)
    assert all(r["attn"] == ulysses.NAME for r in ranks)
    got = torch.cat([torch.tensor(r["logits"]) for r in ranks], dim=1)  # (rows, 14 with padding, vocab)
    if inner in ulysses.FLASH_LIKE:  # one flattened row of 2 x 13 tokens
        got = got.reshape(1, -1, got.shape[-1])[:, :26].reshape(2, 13, -1)
    else:
        got = got[:, :13]  # 13 tokens padded to 14 to split in 2
    assert torch.allclose(got, ref["logits"], atol=1e-5), (got - ref["logits"]).abs().max()
    assert ranks[0]["loss"] == ranks[1]["loss"]
    assert abs(ranks[0]["loss"] - ref["loss"]) < 1e-6
    if inner == "flex_attention":
        return  # forward only on a CPU
    assert abs(ranks[0]["grad_norm"] - ref["grad_norm"]) < 1e-5 * ref["grad_norm"]
    for name, g in ranks[0]["grads"].items():
        assert torch.allclose(torch.tensor(g), ref["grads"][name], atol=1e-6), name


def test_split_rows():
    """The slices: padded to a multiple of the group, labels shifted across the slice boundary, padding a
    document of its own with no label."""
    batch = {"input_ids": torch.arange(1, 8)[None], "labels": torch.tensor([[-100, 2, 3, 4, 5, -100, 7]]),
             "position_ids": torch.tensor([[0, 1, 2, 3, 4, 0, 1]])}
    layouts = [ulysses.Layout.of(r, 6, 3) for r in range(3)]
    pieces = [ulysses.split(batch, lay, flat=False) for lay in layouts]
    assert [p["input_ids"].tolist() for p, _ in pieces] == [[[1, 2, 3]], [[4, 5, 6]], [[7, 0, 0]]]
    assert [p["shift_labels"].tolist() for p, _ in pieces] == [[[2, 3, 4]], [[5, -100, 7]], [[-100, -100, -100]]]
    assert [p["position_ids"].tolist() for p, _ in pieces] == [[[0, 1, 2]], [[3, 4, 0]], [[1, 0, 0]]]
    rows = pieces[0][1]
    allowed = rows.mask("sdpa", torch.float32, None)[0, 0]
    assert allowed.shape == (9, 9)
    assert allowed[4, :5].all() and not allowed[5, 4] and allowed[6, 5] and not allowed[7, 6] and allowed[8, 8]
    flat, rows = ulysses.split(dict(batch, input_ids=batch["input_ids"].repeat(2, 1),
                                    labels=batch["labels"].repeat(2, 1),
                                    position_ids=batch["position_ids"].repeat(2, 1)), layouts[1], flat=True)
    assert flat["input_ids"].shape == (1, 5)  # 2 x 7 = 14 tokens padded to 15, in 3 slices
    assert rows.boundaries["cu_seq_lens_q"].tolist() == [0, 5, 7, 12, 14, 15]
    assert [ulysses.Layout.of(r, 4, 2) for r in (0, 3)] == [ulysses.Layout(2, 0, 0, 2), ulysses.Layout(2, 1, 1, 2)]
    with pytest.raises(ConfigError, match="2 does not divide the 3 workers"):
        ulysses.Layout.of(0, 3, 2)
    with pytest.raises(ConfigError, match="'kernels-community/flash-attn3' cannot be split"):
        ulysses.enable(None, "kernels-community/flash-attn3")  # a hub kernel: its mask and boundaries unknown


@pytest.mark.parametrize("heads,kv,size,per_rank,repeat", [
    (32, 8, 8, 4, 1),  # Llama 3 8B: even
    (28, 4, 8, 4, 2),  # Qwen2.5 7B over 8: 4 zero heads, each k/v head on 2 ranks
    (40, 8, 16, 3, 2),  # Qwen2.5 14B over 16
    (3, 3, 2, 2, 1),  # an odd count of plain heads: a zero k/v head and its query head
    (12, 2, 8, 2, 4),
    (4, 1, 2, 2, 2),
])
def test_heads_split_any_number_of_ways(heads, kv, size, per_rank, repeat):
    """Every rank gets whole k/v heads with their own query heads; the padding round trips; per-head values
    (sinks) land with their heads."""
    lay = ulysses.Heads.of(heads, kv, size)
    assert (lay.padded // size, lay.repeat) == (per_rank, repeat) and lay.padded % size == 0
    assert lay.padded >= heads and lay.plain == (lay.padded == heads and repeat == 1)
    q = torch.randn(2, heads, 5, 3)
    k = torch.randn(2, kv, 5, 3)
    padded_q, padded_k = lay.query(q), lay.key_value(k)
    assert padded_q.shape[1] == lay.padded and padded_k.shape[1] % size == 0
    assert torch.equal(lay.output(padded_q.transpose(1, 2)), q.transpose(1, 2))
    share_q, share_k = lay.padded // size, padded_k.shape[1] // size
    groups = lay.group_padded // lay.repeat  # query heads per repeated k/v head, as the inner attention reads them
    found = 0
    for h in range(heads):  # query head h's k/v head is kv head h // (heads // kv), on the rank that holds it
        p = int((padded_q[0, :, 0, 0] == q[0, h, 0, 0]).nonzero()[0])
        rank, local = divmod(p, share_q)
        k_local = rank * share_k + local // groups
        assert torch.equal(padded_k[:, k_local], k[:, h // (heads // kv)])
        assert torch.equal(lay.per_head(torch.arange(heads).float(), rank)[local], torch.tensor(float(h)))
        found += 1
    assert found == heads
    for p in set(range(lay.padded)) - {int((padded_q[0, :, 0, 0] == q[0, h, 0, 0]).nonzero()[0]) for h in range(heads)}:
        assert not padded_q[:, p].any()  # the added heads are zero


def test_unsplit_puts_the_attention_inside_back_for_a_block():
    """The packing check runs whole rows through a model split for sequence parallelism: inside `unsplit` its
    attention is the implementation inside again, and after it the split one (train/packing_check.py)."""
    import transformers as T

    model = T.AutoModelForCausalLM.from_config(T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32,
                                                             num_hidden_layers=1, num_attention_heads=2),
                                               attn_implementation="sdpa")
    ulysses.enable(model, "sdpa")
    assert model.config._attn_implementation == ulysses.NAME
    with ulysses.unsplit(model):
        assert model.config._attn_implementation == "sdpa"
        model(input_ids=torch.tensor([[1, 2, 3]]))  # a plain forward, no process group needed
    assert model.config._attn_implementation == ulysses.NAME
