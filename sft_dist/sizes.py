"""Byte sizes as people read them: one formatter, in binary units, for every size sft_dist shows."""

from __future__ import annotations

import re

from sft_dist.errors import SftDistError

GIB = 2**30
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
         "tib": 2**40}


def format_bytes(n: float) -> str:
    """Bytes in binary units (KiB = 1024 B, ..., GiB = 2**30 B), the way torch.cuda and nvidia-smi's MiB count."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def parse_size(text: str, *, flag: str) -> int:
    """'1GB' (10^9, as transformers and GPU makers count), '500MiB', or a number of bytes; `flag` names the option
    in the error."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS and m.group(2):
        raise SftDistError(f"{flag}: {text!r} is not a size; use e.g. 1GB, 500MB or 2GiB")
    n = int(float(m.group(1)) * UNITS[m.group(2).lower() or "b"])
    if n <= 0:
        raise SftDistError(f"{flag}: {text!r} must be positive")
    return n
