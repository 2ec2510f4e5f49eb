"""Packed rows on decoders that build their attention mask without the position_ids.

transformers keeps a packed row's documents apart on mask-based attention (sdpa, eager, flex attention) by finding
them in the position_ids handed to its mask builders (masking_utils: a document starts where they restart at 0).
Some decoders take position_ids but do not hand them on (in transformers 5.23: gpt-oss, Falcon, OPT, BioGPT, XGLM,
AFMoE, GraniteMoeHybrid): their packed documents would attend to each other, silently. `enable` wraps the mask
builders a model's modeling modules call so that a call without position_ids gets the ones the model's forward was
given; a call with its own (Llama, Qwen, Gemma and most others) is left as it is. A decoder whose forward takes no
position_ids at all (Bloom, MPT) cannot keep packed documents apart: `problem` says so before training; one that
makes up its own all-ones attention mask when given none (BioGPT) is stopped at its first packed forward. `leak`
checks any model as training feeds it (train/packing_check.py: before the first step, or on the ZeRO-3/FSDP2 model
as training begins).
"""

from __future__ import annotations

import inspect
import logging
import sys

from sft_dist.model.unwrap import base_model

BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask", "create_chunked_causal_mask")
_GIVEN: list = []  # (position_ids, an attention_mask given?, class) of the forwards in progress, innermost last
_TOLD: set = set()  # the model classes whose masks got position_ids from here, said once each


def problem(model) -> str | None:
    """Why packed rows cannot stay apart in this model (None where they can): its forward takes no position_ids."""
    top = base_model(model)
    return class_problem(type(top))


def class_problem(cls) -> str | None:
    if "position_ids" not in inspect.signature(cls.forward).parameters:
        return (f"{cls.__name__} takes no position_ids, so its packed documents would attend to each other "
                "(its positions come from the attention mask or ALiBi)")
    return None


def model_type_problem(model_type: str) -> str | None:
    """`class_problem` of the causal-LM class transformers maps `model_type` to (None where it maps none): the
    check before launch. Imports that class's modeling module (a second or two), so only asked with packing."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    return class_problem(cls) if cls is not None else None


def enable(model) -> int:
    """Hand every mask builder of `model`'s modeling modules the position_ids its forward got; returns how many
    modules' forwards now record them. Idempotent."""
    from transformers import PreTrainedModel

    hooked = 0
    for module in model.modules():
        if not isinstance(module, PreTrainedModel) or getattr(module, "_sft_dist_positions", False):
            continue
        if "position_ids" not in inspect.signature(type(module).forward).parameters:
            continue
        _wrap_builders(sys.modules[type(module).__module__])
        module.register_forward_pre_hook(_push, with_kwargs=True)
        module.register_forward_hook(_pop, always_call=True)
        module._sft_dist_positions = True
        hooked += 1
    return hooked


def _push(module, args, kwargs):
    _GIVEN.append((kwargs.get("position_ids"), kwargs.get("attention_mask") is not None, type(module).__name__))


def _pop(module, args, output):
    if _GIVEN:
        _GIVEN.pop()


def _wrap_builders(modeling) -> None:
    for name in BUILDERS:
        builder = getattr(modeling, name, None)
        if builder is None or getattr(builder, "_sft_dist_positions", False):
            continue
        setattr(modeling, name, _with_positions(builder))


def _with_positions(builder):
    names = list(inspect.signature(builder).parameters)  # plain lists: the compiler traces this per forward

    def given(args, kwargs, name):
        return args[names.index(name)] if name in names[:len(args)] else kwargs.get(name)

    def build(*args, **kwargs):
        positions, masked, name = _GIVEN[-1] if _GIVEN else (None, True, "")
        if positions is not None and given(args, kwargs, "position_ids") is None:
            if given(args, kwargs, "attention_mask") is not None and not masked:  # made up inside: all visible
                from sft_dist.errors import ConfigError

                raise ConfigError(f"data.packing: {name} makes its own attention mask when given none, so its packed "
                                  "documents would attend to each other; set data.packing: false")
            kwargs["position_ids"] = positions
            if name not in _TOLD:
                _TOLD.add(name)
                logging.getLogger("sft_dist").info(
                    "packing: %s builds its attention masks without the position_ids; sft_dist hands them over, so "
                    "packed documents stay apart", name)
        return builder(*args, **kwargs)

    build._sft_dist_positions = True
    build.__wrapped__ = builder
    return build


def leak(model, collate, *, device, sharded: bool = False) -> float | None:
    """What the first document of a packed row does to the second's logits, through `collate` and the model as
    training feeds them: two rows that differ only in their first document, run with no_grad in eval mode. 0 where
    documents stay apart (a masked key adds exactly nothing); None where this rank does not hold every weight on
    `device` and `sharded` is not given. Relative to the largest logit. `sharded`: the model is wrapped by ZeRO-3
    or FSDP2, which gather each layer's weights as it runs: every rank calls this, with the same rows."""
    import torch

    device = torch.device(device)
    params = list(model.parameters())
    if not params or not sharded and any(hasattr(p, "ds_id") or p.device.type != device.type or
                                         (device.type != "cpu" and p.device.index != device.index) for p in params):
        return None
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    first, second = (torch.randint(1, vocab, (n,), generator=gen).tolist() for n in (6, 10))
    other = torch.randint(1, vocab, (6,), generator=gen).tolist()
    position_ids = [*range(6), *range(10)]
    rows = [{"input_ids": head + second, "labels": head + second, "position_ids": position_ids,
             "seq_lengths": [6, 10]} for head in (first, other)]
    was_training = model.training
    model.eval()
    try:
        out = []
        for row in rows:
            batch = collate([row])
            batch.pop("labels", None)
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with torch.no_grad():
                logits = model(**batch).logits
            out.append(logits.reshape(-1, logits.shape[-1])[6:16].float())  # the second document
    finally:
        model.train(was_training)
    return float((out[0] - out[1]).abs().max()) / max(float(out[1].abs().max()), 1e-6)
