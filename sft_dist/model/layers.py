"""A model's decoder layers: the modules of the classes it names in `_no_split_modules` (what FSDP2 wraps, what
ZeRO-3 and FSDP2 gather one at a time, what a layer-wise random init holds one at a time)."""

from __future__ import annotations

from torch import nn

from sft_dist.model.unwrap import base_model


def decoder_layer_names(model: nn.Module) -> set[str]:
    """The decoder-layer class names of `model`, or of the base model a peft wrapper holds."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    base = base_model(model)
    return names | set(getattr(base, "_no_split_modules", None) or [])


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    names = decoder_layer_names(model)
    return [m for m in model.modules() if type(m).__name__ in names]
