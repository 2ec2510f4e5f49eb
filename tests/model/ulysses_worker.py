"""One rank of tests/model/test_ulysses.py: a tiny model's packed rows split over the ranks (model/ulysses.py);
prints its slice's logits, loss sum and the gradients summed over ranks, as JSON."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from sft_dist.model import ulysses, varlen


def model_and_batch(inner: str, heads: int, kv_heads: int, window: int | None = None, family: str = "llama"):
    """A tiny model (Llama; Mistral with a sliding window; Gemma 2: soft-capping; gpt-oss: learned sinks; the last
    two with sliding and full layers) and two packed rows."""
    import transformers

    torch.manual_seed(0)
    shape = dict(vocab_size=97, hidden_size=16 * heads, intermediate_size=96, num_hidden_layers=2, num_attention_heads=heads,
                 num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=64, attn_implementation=inner)
    if inner == "varlen_attention":
        varlen.register()
    if family == "gemma2":  # logit soft-capping, sliding and full layers
        config = transformers.Gemma2Config(**shape, sliding_window=window, attn_logit_softcapping=5.0,
                                           query_pre_attn_scalar=16)
    elif family == "gpt_oss":
        config = transformers.GptOssConfig(**shape, sliding_window=window, num_local_experts=4, num_experts_per_tok=2,
                                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    elif window:
        config = transformers.MistralConfig(**shape, sliding_window=window)
    else:
        config = transformers.LlamaConfig(**shape)
    model = transformers.AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(1)
    # two packed rows of 13 tokens: documents of 5+8 and 3+6+4 tokens, the first token of each without a label
    ids = torch.randint(1, 97, (2, 13), generator=gen)
    pos = torch.tensor([[*range(5), *range(8)], [*range(3), *range(6), *range(4)]])
    labels = ids.masked_fill(pos == 0, -100)
    return model, {"input_ids": ids, "position_ids": pos, "labels": labels}


def run_case(case: tuple, layout) -> dict:
    inner, heads, kv_heads, window, family = case
    model, batch = model_and_batch(inner, heads, kv_heads, window or None, family)
    ulysses.enable(model, inner)
    tokens = int(batch["labels"][:, 1:].ne(-100).sum())
    mine, rows = ulysses.split(batch, layout, flat=inner in ulysses.FLASH_LIKE)
    # torch has no flex attention backward on a CPU (it refuses inputs that require grad): forward only
    with ulysses.active(rows), torch.set_grad_enabled(inner != "flex_attention"):
        logits = model(input_ids=mine["input_ids"], position_ids=mine["position_ids"], use_cache=False).logits
        loss_sum = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), mine["shift_labels"].flatten(),
                                                     ignore_index=-100, reduction="sum")
        if inner != "flex_attention":
            (loss_sum / tokens).backward()
    # every parameter, in one order on every rank (a parameter no token of this rank's slice reached has no grad)
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)
    total = loss_sum.detach().clone()
    dist.all_reduce(total)
    return {"case": list(case), "logits": logits.detach().tolist(), "loss": float(total) / tokens,
            "grads": {n: g.flatten()[:64].tolist() for n, g in grads.items()},
            "grad_norm": float(torch.stack([g.norm() for g in grads.values()]).norm()),
            "attn": model.config._attn_implementation}


def main() -> None:
    """argv: cases as inner:heads:kv_heads:window:family, all run in one process group (one start-up for all)."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = ulysses.Layout.of(rank, world, world)
    ulysses.new_groups(layout, world)
    for case in sys.argv[1:]:
        inner, heads, kv_heads, window, family = case.split(":")
        if inner == "flex_attention":  # uncompiled on a CPU (tests/conftest.py eager_flex: the same kernel)
            import transformers.integrations.flex_attention as flex
            from torch.nn.attention.flex_attention import flex_attention

            flex.WrappedFlexAttention.__call__ = lambda self: flex_attention
        case = (inner, int(heads), int(kv_heads), int(window), family)
        print(json.dumps({"rank": rank, **run_case(case, layout)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
