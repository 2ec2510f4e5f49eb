"""The start-up check that packing keeps a packed row's documents apart, on the run's own model and collator
(model/packed_positions.py: leak): before training where a rank holds every weight, else on the ZeRO-3 or FSDP2
model by every rank as training begins."""

from __future__ import annotations

import contextlib
import logging

import torch
from transformers import TrainerCallback

from sft_dist.errors import ConfigError
from sft_dist.model import ulysses
from sft_dist.model.unwrap import base_model

log = logging.getLogger("sft_dist")


def on_the_wrapped_model(model, sharding) -> bool:
    """Whether the check waits for the wrapped model: where a rank holds no whole model until ZeRO-3 or FSDP2 wrap
    it (sharded or offloaded weights; ZeRO-3's partitions on a single rank too). The same answer on every rank."""
    return sharding.weights > 1 or sharding.offload_param or any(hasattr(p, "ds_id") for p in model.parameters())


def check_documents_apart(model, collator, *, device, sharded: bool = False) -> None:
    """Two packed rows that differ only in their first document, through the collator and the model as training
    feeds them: the second document's logits must not move (remote code and architectures sft_dist has not seen
    included). `sharded`: on the ZeRO-3 or FSDP2 model, by every rank (DocumentsApartAtStart)."""
    from sft_dist.model import packed_positions

    moved = packed_positions.leak(model, collator, device=device, sharded=sharded)
    if getattr(base_model(model).config, "_attn_implementation", None) == "flex_attention":
        # transformers compiles flex attention: the check's rows are not the run's, and without a reset the first
        # training batch would count as a second shape and compile the kernel again for dynamic shapes.
        torch._dynamo.reset()
    if moved is None:
        return
    name = _class_name(base_model(model))
    if moved > 1e-4:
        raise ConfigError(f"data.packing: {name} lets a packed row's documents attend to each other (checked at start: "
                          f"the first document moved the second's logits by {moved:.1e} of their scale); set "
                          "data.packing: false")
    log.info("packing: checked at start%s, %s keeps a packed row's documents apart",
             " on the sharded model" if sharded else "", name)


def _class_name(model) -> str:
    """The model's class as the user knows it (FSDP2 makes a subclass named FSDP<class>)."""
    from torch.distributed.fsdp import FSDPModule

    name = type(model).__name__
    return name.removeprefix("FSDP") if isinstance(model, FSDPModule) else name


class DocumentsApartAtStart(TrainerCallback):
    """The packing check where ZeRO-3 or FSDP2 shard the weights: on the wrapped model, which gathers each layer as
    it runs, by every rank with the same rows, before the first step (the same outcome on every rank). `split`:
    under sequence parallelism, whose attention expects each rank's slice, it runs on whole rows with the attention
    inside (`ulysses.unsplit`)."""

    def __init__(self, trainer, collator, *, device, split: bool = False):
        self.trainer, self.collator, self.device, self.split = trainer, collator, device, split

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        coordinator = _zero3_coordinator(self.trainer.model_wrapped)
        if coordinator is not None and not hasattr(coordinator, "_invalidate_trace"):
            log.info("packing: not checked at start (this DeepSpeed's ZeRO-3 cannot be told to forget the check's "
                     "forward, which it would prefetch by)")
            return
        with ulysses.unsplit(model) if self.split else contextlib.nullcontext():  # whole rows on every rank
            check_documents_apart(model, self.collator, device=self.device, sharded=True)
        if coordinator is not None:
            # ZeRO-3 records the order its layers run in during the first forward and backward, and prefetches by
            # it from then on. The check's forwards (logits through the head module; training gathers the head
            # inside its chunked loss, and runs a backward) must not be that record: every gathered weight is
            # released and the record dropped, so training records its own, as without the check.
            self.trainer.model_wrapped.empty_partition_cache()
            if not coordinator.is_invalid_trace():
                coordinator._invalidate_trace()  # DeepSpeed's own reset when a forward leaves its record


def _zero3_coordinator(engine):
    """ZeRO-3's parameter coordinator (what fetches and prefetches the partitions), or None (not ZeRO-3)."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    return offload.get_param_coordinator() if offload is not None else None
