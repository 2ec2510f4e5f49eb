"""The non-weight train state: RNG streams per rank, LR scheduler and grad scaler.

Stored with `torch.save` as plain containers and tensors, and read back with `weights_only=True` (no
pickled objects from a checkpoint ever run code).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    # random.setstate wants tuples; a weights_only load gives them back as saved (tuples), be lenient.
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_pt(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)


def load_pt(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_file(rank: int) -> str:
    return f"rng/rank{rank}.pt"
