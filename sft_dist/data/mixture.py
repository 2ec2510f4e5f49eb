"""Several training sources mixed by weight (`data.mixture`).

Each source's share of an epoch is its weight over the sum of weights; the epoch has `data.mixture_rows`
samples (default: the sources' rows added up). A source asked for more rows than it has is repeated
whole and topped up with a seeded subset; one asked for fewer gives a seeded subset. The mixture is drawn
once per run from the training seed, so it is the same on every rank and on resume, and the log prints
what each source contributes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datasets import Dataset

# torch and datasets are imported where used: the launcher's precheck (precheck.py) needs `shares` alone.


@dataclass
class SourceShare:
    source: str
    rows: int
    weight: float
    samples: int  # rows of the epoch drawn from this source

    def describe(self) -> str:
        return f"{self.source}: {self.rows} rows x {self.samples / self.rows:.2f} = {self.samples} (weight {self.weight:g})"


def shares(sizes: list[int], weights: list[float], total: int) -> list[int]:
    """Samples per source: proportional to weight, summing to `total` (largest remainders round up)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def draw(rows: int, samples: int, *, seed: int, source: int) -> list[int]:
    """Row indices of one source: whole passes, then a seeded subset without replacement."""
    import torch

    whole, rest = divmod(samples, rows)
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + 7_919 * (source + 1))
    return list(range(rows)) * whole + sorted(torch.randperm(rows, generator=g)[:rest].tolist())


def mix(parts: list[Dataset], names: list[str], weights: list[float], *, total: int | None,
        seed: int) -> tuple[Dataset, list[SourceShare]]:
    from datasets import concatenate_datasets

    sizes = [len(p) for p in parts]
    counts = shares(sizes, weights, total if total is not None else sum(sizes))
    picked = [p.select(draw(len(p), n, seed=seed, source=i)) for i, (p, n) in enumerate(zip(parts, counts))]
    report = [SourceShare(name, size, w, n) for name, size, w, n in zip(names, sizes, weights, counts)]
    return concatenate_datasets([p for p in picked if len(p)]), report
