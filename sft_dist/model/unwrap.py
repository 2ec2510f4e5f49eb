"""The transformers model under a peft wrapper. Without imports: the config checks that read a model's class
(model/packed_positions.py) run before torch is imported."""

from __future__ import annotations


def base_model(model):
    """The transformers model a peft wrapper holds (`get_base_model`), or `model` itself when it is not wrapped."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
