"""flex_attention for the models `auto` would otherwise run on eager on a GPU: those whose attention sdpa cannot
compute (Gemma 2's logit soft-capping, gpt-oss's learned sinks, ...) when flash-attn is not installed.

Eager attention materialises every layer's (batch, heads, tokens, tokens) scores and probabilities and keeps
them for backward: for Gemma 2 2B (8 heads) at 8 x 2048 tokens, 1 GiB per layer for the fp32 softmax alone. transformers' flex path
applies the soft-cap in a score_mod, the sinks through the log-sum-exp, and packed documents as a block mask
built from the position_ids, so nothing of that size exists and the blocks across documents are skipped.

It is picked only once torch's compiled kernel ran right on this GPU with the model's head dim, k/v grouping,
soft-cap and sinks, on packed batches of two shapes (`kernel_problem`, forward and backward against an fp32
per-document reference; the second shape is the recompile for dynamic shapes a batch of another shape makes); else
auto keeps eager and says why. Packed rows on flex attention are padded to data.max_length (train/run.py), so
a run compiles the kernel for one width.
"""

from __future__ import annotations

import functools

import torch

def available() -> bool:
    """Whether this torch has flex attention at all."""
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def config_problem(config) -> str | None:
    """What transformers' flex path cannot do for this config; None when it can."""
    from sft_dist.model.varlen import traits

    _, _, dropout = traits(config)
    if dropout > 0:
        return f"attention_dropout is {dropout} (flex attention has no dropout)"
    return None


@functools.lru_cache(maxsize=None)
def kernel_problem(device_index: int, dtype: torch.dtype, head_dim: int, groups: int, softcap: float | None,
                   sinks: bool) -> str | None:
    """Run transformers' flex attention on this GPU (compiled, as the model will), forward and backward, on packed
    batches of two shapes; None when it agrees with the fp32 reference, else why not."""
    why = probe(torch.device("cuda", device_index), dtype, head_dim, groups, softcap=softcap, sinks=sinks)
    # The probe's shapes are not the run's: without this, torch.compile would take the run's first micro-batch
    # for a second shape and compile the kernel for dynamic shapes instead of the run's own.
    torch._dynamo.reset()
    return f"{why} on this GPU (head dim {head_dim})" if why else None


class _Layer(torch.nn.Module):
    """What transformers' attention function reads from the module that calls it."""

    def __init__(self, heads: int, sinks: bool):
        super().__init__()
        self.sinks = torch.nn.Parameter(torch.randn(heads) * 0.5) if sinks else None


# Two packed batches of other shapes, one after the other (rows, the document lengths of each row):
# transformers compiles flex attention without fixing its shapes, so the second compiles it again for dynamic
# shapes, as a run's batch of another shape would (an epoch's last, smaller batch; on this torch's CPU backend
# that second compile fails: the probe is there to find out before the run does).
SHAPES = ((1, (7, 12)), (2, (5, 9, 17)))


def probe(device: torch.device, dtype: torch.dtype, head_dim: int, groups: int, *, softcap: float | None = None,
          sinks: bool = False, shapes: tuple[tuple[int, tuple[int, ...]], ...] = SHAPES) -> str | None:
    """transformers' `flex_attention_forward` on `device` against the per-document fp32 reference, for each
    batch in `shapes` in turn; None when they agree (each tensor's largest error under 3% of its largest
    value), else why not. On a CPU, forward only (torch has no flex backward there; transformers has no sinks
    there)."""
    for rows, lengths in shapes:
        why = _agreement(device, dtype, head_dim, groups, softcap=softcap, sinks=sinks, rows=rows, lengths=lengths)
        if why:
            return why if len(shapes) == 1 else f"{why} ({rows} x {sum(lengths)} tokens)"
    return None


def _agreement(device, dtype, head_dim: int, groups: int, *, softcap, sinks: bool, rows: int,
               lengths) -> str | None:
    from torch.nn.attention.flex_attention import create_block_mask
    from transformers.integrations.flex_attention import flex_attention_forward

    backward = device.type != "cpu"
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        t, kv = sum(lengths), 2
        q, k, v = (torch.randn(rows, h, t, head_dim, generator=gen).to(device, dtype).requires_grad_(backward)
                   for h in (kv * groups, kv, kv))
        doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)

        def same_document_causal(b, h, qi, ki):
            return (qi >= ki) & (doc[qi] == doc[ki])

        mask = create_block_mask(same_document_causal, rows, None, t, t, device=device.type)
        layer = _Layer(kv * groups, sinks).to(device).train()
        s_aux = layer.sinks.to(dtype) if sinks else None
        got, _ = flex_attention_forward(layer, q, k, v, mask, scaling=head_dim ** -0.5, softcap=softcap,
                                        s_aux=s_aux)
        ref = reference(q.float(), k.float(), v.float(), lengths, softcap=softcap,
                        sinks=layer.sinks.float() if sinks else None)
        pairs = [(got, ref)]
        if backward:
            grads = torch.autograd.grad(got.float().square().sum(), (q, k, v))
            ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
            pairs += list(zip(grads, ref_grads))
        worst = max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
                    for a, b in pairs)
    except Exception as e:  # noqa: BLE001 - any failure means: do not pick it
        return f"flex attention failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    if not worst < 0.03:
        return f"flex attention differs from the fp32 reference by {worst:.1%}"
    return None


def reference(q, k, v, lengths, *, softcap: float | None = None, sinks=None):
    """Each document alone, causal, as the eager path computes it: (B, H, T, D) in, (B, T, H, D) out; every row
    holds documents of `lengths`."""
    groups = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))
    out, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        scores = q[:, :, sl] @ k[:, :, sl].transpose(-1, -2) * q.shape[-1] ** -0.5
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        if sinks is not None:  # one extra logit per head that takes probability and gives no value
            scores = torch.cat([scores, sinks.view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)], dim=-1)
            probs = scores.softmax(-1)[..., :-1]
        else:
            probs = scores.softmax(-1)
        out.append(probs @ v[:, :, sl])
        start += n
    return torch.cat(out, dim=2).transpose(1, 2)
