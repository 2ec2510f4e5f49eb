"""`training.train_sampling_strategy: batch_rebalance`: the samples of one optimizer step re-divided among the ranks
and their micro-batches so that every rank has about the same work, and each micro-batch holds samples of like
length (little padding).

The step's samples are those of the random order (`GlobalBatchSampler`): only which rank and micro-batch hold them
changes, so the step's gradient is the same (the loss is normalised by the step's loss-carrying tokens; up to the
order of floating-point sums), and a resume, on any number of workers, is as exact as without it. A rank that drew
the long samples no longer keeps the others waiting at the gradient all-reduce, and a micro-batch of short samples
holds more of them, one of long samples fewer.

A micro-batch of n rows padded to L tokens costs n*c(L), c(L) = L + q*L^2: the matmuls over its tokens, and
attention's quadratic part, q by the FLOP count MFU uses (metrics/flops.py: attention's 12 x layers x hidden FLOPs
per token pair over the matmuls' FLOPs per token, about 1 / (6 * hidden) for LoRA on a Llama). The step's samples, longest first, are cut into world x accum consecutive
groups that keep the largest cost as low as possible (for this cost, the best partition: a group's cost is set by
its longest row), none over `micro * max_length` padded tokens (what a micro-batch of the random order may hold, and
what `sft-dist plan` counts). The groups then go, dearest first, each to the least loaded rank that has a
micro-batch left (LPT), so every rank's total is about the same, and each rank runs its dearest first, at the same
accumulation step as the others (under FSDP2 and ZeRO-3 each micro-batch's forward gathers weights: a collective
per layer). Where the rows do not fit (a row longer than max_length), the step keeps the random order's
micro-batches.

HF's `BatchRebalanceSampler` (transformers' own `batch_rebalance`) does the like with an iterative search and a
fixed q of 0.001; this one keeps sft_dist's order and cursor (the same samples in each step for any world size,
every sample once per epoch).
"""

from __future__ import annotations

from collections.abc import Sequence


def sample_cost(length: int, q: float) -> float:
    return length * (1.0 + q * length)


def cost(n: int, longest: int, q: float) -> float:
    """A micro-batch of `n` rows padded to `longest`."""
    return n * sample_cost(longest, q)


def assign(samples: Sequence[int], lengths: Sequence[int], *, world: int, accum: int, q: float,
           max_tokens: int) -> list[list[int]] | None:
    """The step's `samples` as micro-batches by slot (slot = accumulation step * world + rank, the order
    GlobalBatchSampler gives them out in; an empty list where there are fewer samples than micro-batches), or None
    where they do not fit the micro-batches within `max_tokens` padded tokens each."""
    ranked = sorted(samples, key=lambda i: (-lengths[i], i))  # longest first; ties by id: the same on every rank
    cuts = _cuts(ranked, lengths, world * accum, q, max_tokens)
    if cuts is None:
        return None
    parts = [ranked[a:b] for a, b in zip([0, *cuts], [*cuts, len(ranked)])] if ranked else []
    parts += [[] for _ in range(world * accum - len(parts))]
    price = [cost(len(p), lengths[p[0]], q) if p else 0.0 for p in parts]
    per_rank: list[list[list[int]]] = [[] for _ in range(world)]
    load = [0.0] * world
    for k in sorted(range(len(parts)), key=lambda k: (-price[k], k)):  # dearest first, to the least loaded rank
        r = min((r for r in range(world) if len(per_rank[r]) < accum), key=lambda r: (load[r], r))
        per_rank[r].append(parts[k])  # so each rank's micro-batches run dearest first
        load[r] += price[k]
    return [per_rank[r][m] for m in range(accum) for r in range(world)]


def _cuts(ranked: list[int], lengths: Sequence[int], groups: int, q: float, max_tokens: int) -> list[int] | None:
    """Where to cut `ranked` (longest first) into at most `groups` consecutive groups of the least largest cost
    (bisection on that cost; each trial fills groups greedily), then the groups with the most rows split until there
    are `groups` (or one per row); None where no cut keeps every group within `max_tokens`."""
    n = len(ranked)
    if n <= groups:
        return list(range(1, n))
    lo, hi = 0.0, cost(n, lengths[ranked[0]], q)
    best = _greedy(ranked, lengths, hi, q, max_tokens)  # at `hi` only the token cap cuts: the fewest groups
    if best is None or len(best) >= groups:
        return None
    while hi - lo > 1e-6 * hi:
        mid = (lo + hi) / 2
        trial = _greedy(ranked, lengths, mid, q, max_tokens)
        if trial is not None and len(trial) < groups:
            best, hi = trial, mid
        else:
            lo = mid
    bounds = [0, *best, n]
    while len(bounds) - 1 < groups:  # split the group with the most rows (splitting never raises a cost)
        k = max(range(len(bounds) - 1), key=lambda j: (bounds[j + 1] - bounds[j], -j))
        bounds.insert(k + 1, (bounds[k] + bounds[k + 1]) // 2)
    return bounds[1:-1]


def _greedy(ranked: list[int], lengths: Sequence[int], limit: float, q: float, max_tokens: int) -> list[int] | None:
    """Cut points of the greedy fill: each group takes rows while its cost stays within `limit` and its padded tokens
    within `max_tokens`; None when a group of one row is already over the limit."""
    cuts, start = [], 0
    for i in range(1, len(ranked)):
        size, longest = i - start + 1, lengths[ranked[start]]
        if cost(size, longest, q) > limit or size * longest > max_tokens:
            cuts.append(i)
            start = i
    bounds = [0, *cuts, len(ranked)]
    if any(cost(b - a, lengths[ranked[a]], q) > limit for a, b in zip(bounds, bounds[1:])):
        return None
    return cuts
