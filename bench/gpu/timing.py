"""Timing for bench/gpu's microbenchmarks: `step` run once to warm up (compiles, autotuning), then `iters` times."""

from __future__ import annotations

import time


def time_steps(step, iters: int, *, cuda: bool) -> tuple[float, int]:
    """(ms per step after the warm-up, bytes allocated when the timed steps began: 0 on a CPU). The CUDA peak is
    reset after the warm-up, so `torch.cuda.max_memory_allocated()` afterwards is the timed steps' own."""
    import torch

    step()
    base = 0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3, base


def write_json(path, data) -> None:
    """Whole or not at all: written beside, then renamed, so a step killed at its timeout leaves no torn JSON."""
    import json
    import os

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
