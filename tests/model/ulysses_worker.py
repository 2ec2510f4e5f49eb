"""One rank of tests/model/test_ulysses.py: a tiny Llama's packed rows split over the ranks (model/ulysses.py);
prints its slice's logits, loss sum and the gradients summed over ranks, as JSON."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from sft_dist.model import ulysses, varlen


def model_and_batch(inner: str, kv_heads: int, window: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=kv_heads, max_position_embeddings=64)
    if inner == "varlen_attention":
        varlen.register()
    if window:
        model = MistralForCausalLM(MistralConfig(**shape, sliding_window=window, attn_implementation=inner))
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation=inner))
    gen = torch.Generator().manual_seed(1)
    # two packed rows of 13 tokens: documents of 5+8 and 3+6+4 tokens, the first token of each without a label
    ids = torch.randint(1, 97, (2, 13), generator=gen)
    pos = torch.tensor([[*range(5), *range(8)], [*range(3), *range(6), *range(4)]])
    labels = ids.masked_fill(pos == 0, -100)
    return model, {"input_ids": ids, "position_ids": pos, "labels": labels}


def run_case(inner: str, kv_heads: int, window: int | None, layout) -> dict:
    model, batch = model_and_batch(inner, kv_heads, window)
    ulysses.enable(model, inner)
    tokens = int(batch["labels"][:, 1:].ne(-100).sum())
    mine, rows = ulysses.split(batch, layout, flat=inner in ulysses.FLASH_LIKE)
    with ulysses.active(rows):
        logits = model(input_ids=mine["input_ids"], position_ids=mine["position_ids"], use_cache=False).logits
        loss_sum = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), mine["shift_labels"].flatten(),
                                                     ignore_index=-100, reduction="sum")
        (loss_sum / tokens).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for g in grads.values():
        dist.all_reduce(g)
    total = loss_sum.detach().clone()
    dist.all_reduce(total)
    return {"case": [inner, kv_heads, window or 0], "logits": logits.detach().tolist(), "loss": float(total) / tokens,
            "grads": {n: g.flatten()[:64].tolist() for n, g in grads.items()},
            "grad_norm": float(torch.stack([g.norm() for g in grads.values()]).norm()),
            "attn": model.config._attn_implementation}


def main() -> None:
    """argv: cases as inner:kv_heads:window, all run in one process group (one start-up for all)."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = ulysses.Layout.of(rank, world, world)
    ulysses.new_groups(layout, world)
    for case in sys.argv[1:]:
        inner, kv_heads, window = case.split(":")
        print(json.dumps({"rank": rank, **run_case(inner, int(kv_heads), int(window) or None, layout)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
