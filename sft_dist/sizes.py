"""Byte sizes as people read them: one formatter, in binary units, for every size sft_dist shows."""

from __future__ import annotations

GIB = 2**30


def format_bytes(n: float) -> str:
    """Bytes in binary units (KiB = 1024 B, ..., GiB = 2**30 B), the way torch.cuda and nvidia-smi's MiB count."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
