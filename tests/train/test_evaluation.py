"""The eval loss scores through TRL's fused LM head, as training does: the same loss, accuracy and token count as
the model's own forward, without ever building the (rows, tokens, vocabulary) logits; a batch of placeholders
(a rank with fewer eval rows) adds nothing, and a NaN loss still shows; each rank scores its rows longest first."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from trl.trainer.utils import add_fused_lm_head

from sft_dist.data.sampler import PLACEHOLDER
from sft_dist.train import evaluation
from sft_dist.train.evaluation import eval_totals, loss_metrics
from tests.data.test_packing import build, collator, tiny_llama, tok  # noqa: F401 - tok is a fixture


def eval_loss(trainer, dataset) -> dict[str, float]:
    """The eval metrics of `dataset`, as the trainer's evaluate computes them for one set."""
    return loss_metrics(eval_totals(trainer, dataset), "eval")


def trainer(model, tok, *, plain: bool):
    args = SimpleNamespace(world_size=1, process_index=0, per_device_eval_batch_size=3, device=torch.device("cpu"))
    return SimpleNamespace(args=args, model=model, data_collator=collator(tok, attn="sdpa"), _plain_lm_head_loss=plain,
                           sequence=None, data_parallel=(1, 0))


@pytest.fixture
def model(tok):
    m = tiny_llama(tok, "sdpa")
    add_fused_lm_head(m, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
    with torch.no_grad():  # a trained-looking head: some top-1 hits to count
        m.lm_head.weight.mul_(20)
    return m


def test_the_fused_head_scores_like_the_models_own_loss_without_the_logits(tmp_path, tok, model):
    built = build(tmp_path, tok)
    data = built.train
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    fused = eval_loss(trainer(model, tok, plain=False), data)
    assert calls == []  # the head's weight is read in tiles; the module (and its full logits) never runs
    plain = eval_loss(trainer(model, tok, plain=True), data)
    assert len(calls) == -(-len(data) // 3)  # one full-logits forward per eval batch
    assert fused["eval_tokens"] == plain["eval_tokens"] == built.stats["train"].loss_tokens
    assert fused["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-6)
    assert fused["eval_mean_token_accuracy"] == pytest.approx(plain["eval_mean_token_accuracy"], abs=1e-9)
    assert 0 < fused["eval_mean_token_accuracy"] < 1


def test_placeholder_rows_add_nothing_on_either_path_and_nan_still_shows(tmp_path, tok, model, monkeypatch):
    data = build(tmp_path, tok).train
    monkeypatch.setattr(evaluation, "shard", lambda n, world, rank, lengths: list(range(n)))  # the rows in order
    want = {plain: eval_loss(trainer(model, tok, plain=plain), data) for plain in (False, True)}
    # a rank with fewer rows than the others: its shard padded with placeholders, whole batches of them
    monkeypatch.setattr(evaluation, "shard", lambda n, world, rank, lengths: list(range(n)) + [PLACEHOLDER] * 7)
    for plain in (False, True):
        got = eval_loss(trainer(model, tok, plain=plain), data)
        assert got == pytest.approx(want[plain], rel=1e-8)  # the last real batch is padded wider: float noise
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    for plain in (False, True):
        assert eval_loss(trainer(model, tok, plain=plain), data)["eval_loss"] != eval_loss(
            trainer(model, tok, plain=plain), data)["eval_loss"]  # NaN is not equal to itself


def test_ranks_score_rows_sorted_by_length_each_once_with_like_tokens(tmp_path, tok, model, monkeypatch):
    from sft_dist.train.evaluation import shard

    lengths = [5, 90, 12, 64, 33, 7, 128, 50, 2, 71, 19]
    parts = [shard(len(lengths), 3, r, lengths) for r in range(3)]
    assert {len(p) for p in parts} == {4}  # the same count on every rank: the same forward passes
    real = sorted(i for p in parts for i in p if i != PLACEHOLDER)
    assert real == list(range(len(lengths)))
    assert all([lengths[i] for i in p if i != PLACEHOLDER] == sorted((lengths[i] for i in p if i != PLACEHOLDER),
                                                                     reverse=True) for p in parts)
    tokens = [sum(lengths[i] for i in p if i != PLACEHOLDER) for p in parts]
    assert max(tokens) - min(tokens) <= max(lengths)  # every world-th row: 164, 111, 216 tokens
    # the loss does not depend on which batch a row is scored in
    data = build(tmp_path, tok).train
    sorted_loss = eval_loss(trainer(model, tok, plain=False), data)
    monkeypatch.setattr(evaluation, "shard", lambda n, world, rank, lengths: shard(n, world, rank))
    assert eval_loss(trainer(model, tok, plain=False), data) == pytest.approx(sorted_loss, rel=1e-7)
