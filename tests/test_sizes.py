"""The one byte formatter (binary units), and the places that show sizes with it."""

from __future__ import annotations

from pathlib import Path

from sft_dist.sizes import GIB, format_bytes


def test_binary_units():
    assert (format_bytes(GIB), format_bytes(1536 * 2**20), format_bytes(2048), format_bytes(100)) == \
        ("1.00 GiB", "1.50 GiB", "2.00 KiB", "100 B")
    assert format_bytes(1023) == "1023 B" and format_bytes(2**40) == "1.00 TiB"


def test_export_summary_in_binary_units():
    from sft_dist.export.run import _summary

    record = {"kind": "merged", "tensors": 3, "bytes": 1_080_000_000, "dtype": "float32",
              "files": ["model.safetensors"], "seconds": 1.0, "peak_rss_bytes": 733_000_000, "base_weights_bytes": 5 * 2**20,
              "source": {"checkpoint": "c", "step": 1, "backend": "ddp", "world_size": 2}}
    text = _summary(record, Path("out"))
    assert "3 tensors, 1.01 GiB (float32)" in text
    assert "peak RSS 699.04 MiB (base weights 5.00 MiB)" in text
