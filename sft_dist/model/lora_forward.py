"""peft's LoRA Linear forward, as a GPU runs it fastest: the same adapter maths with fewer elementwise passes.

peft computes `result + lora_B(lora_A(dropout(x.to(fp32)))) * scaling` for each adapted layer. Where the step
computes in 16 bit, two parts of that are pure overhead:

- The input cast (`skip_input_casts`). Under autocast (DDP and one process, bf16/fp16) `lora_A` casts peft's fp32
  copy of the input straight back to 16 bit: two elementwise copies per adapted layer, and a 16-bit copy saved for
  backward per layer (q, k and v each keep their own). A 16-bit value survives the round trip exactly, so skipping
  it gives the matmul the same operands: bitwise the same loss and gradients (tests/model/test_lora_forward.py).
  It stays outside autocast (generation, export, no mixed precision), before a live dropout (which then scales in
  fp32, as before) and for DoRA (its weight norm computes in the input's dtype). peft's bitsandbytes layers already
  skip it under autocast.
- The scaled add (`fuse_scaled_add`). `lora_B`'s output, its product with `scaling` and the sum with the base
  output are three tensors of the layer's output size, each written and read again (for gate/up projections,
  4 x hidden per token). One `addmm(result, h, lora_B.T, alpha=scaling)` does the same in the matmul's epilogue,
  and its backward passes the gradient to `result` without a copy (Unsloth's LoRA does the same). In 16 bit it
  rounds once where peft rounds three times: not bitwise, closer to the fp32 result (tested). In fp32 (the CPU
  default) peft's forward runs unchanged, so CPU runs keep their numbers; so it does where `lora_B`'s weight is
  only whole inside its module's call (ZeRO-3, an FSDP2 unit of its own). peft's 4-bit QLoRA layers get it too,
  which also spares their defensive clone of the base output (peft's comment: backprop failed on a manipulated
  view; the out-of-place addmm manipulates none).

Both are per-instance overrides of the layers' methods (no peft class is changed), applied by `apply_lora` and by
the memory planner to its meta model, so `sft-dist plan` counts what the run keeps.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn
from torch.distributed.tensor import DTensor

HALF = (torch.bfloat16, torch.float16)


def speed_up(model) -> int:
    """Both overrides on every peft LoRA Linear layer of `model`; the number of layers."""
    skip_input_casts(model)
    return fuse_scaled_add(model)


def _lora_linears(model, *, four_bit: bool = False):
    """peft's LoRA Linear layers; with `four_bit`, also its bitsandbytes 4-bit ones (QLoRA)."""
    from peft.tuners.lora.layer import Linear

    kinds = (Linear, *(_four_bit_class() if four_bit else ()))
    return [m for m in model.modules() if isinstance(m, kinds)]


@functools.cache
def _four_bit_class() -> tuple:
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # bitsandbytes not installed: peft defines no such class
        return ()
    return (Linear4bit,)


def skip_input_casts(model) -> int:
    layers = _lora_linears(model)  # the 4-bit layers skip it under autocast themselves
    for layer in layers:
        layer._cast_input_dtype = types.MethodType(_cast_input_dtype_unless_autocast, layer)
    return len(layers)


def fuse_scaled_add(model) -> int:
    layers = _lora_linears(model, four_bit=True)
    for layer in layers:
        layer.forward = types.MethodType(_forward_fused, layer)
        # a plain attribute, read in the forward: torch.compile traces it as a constant, where the cached class
        # lookup (an import inside) would break the graph in every adapted layer
        layer._sft_dist_four_bit = isinstance(layer, _four_bit_class())
    return len(layers)


def _cast_input_dtype_unless_autocast(self, x, dtype):
    if (x is not None and x.dtype != dtype and x.is_floating_point() and torch.is_autocast_enabled(x.device.type)
            and _plain_and_inert(self)):
        return x
    return type(self)._cast_input_dtype(self, x, dtype)


def _plain_and_inert(layer) -> bool:
    """Whether every active adapter is plain LoRA (no DoRA or other variant) whose dropout passes its input through
    (p = 0, or evaluation)."""
    for name in layer.active_adapters:
        if name in getattr(layer, "lora_variant", {}):
            return False
        dropout = layer.lora_dropout[name] if name in layer.lora_dropout else None
        if (dropout is not None and not isinstance(dropout, nn.Identity) and dropout.training
                and getattr(dropout, "p", 1.0) > 0):
            return False
    return True


def _forward_fused(self, x, *args, **kwargs):
    name = _fusable(self, x, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    lora_A, lora_B = self.lora_A[name], self.lora_B[name]
    if not (self._sft_dist_four_bit and torch.is_autocast_enabled(x.device.type)):
        x = self._cast_input_dtype(x, lora_A.weight.dtype)  # (peft's 4-bit layers: only outside autocast)
    h = lora_A(self.lora_dropout[name](x))
    if result.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        # An fp32 base output (a 4-bit layer reading the fp32 hidden states of upcast norms and embeddings): autocast
        # would round it to 16 bits inside addmm, and fp16 could overflow; peft keeps it fp32, and so does this add.
        return result + lora_B(h) * self.scaling[name]
    flat = result.reshape(-1, result.shape[-1])
    out = torch.addmm(flat, h.reshape(-1, h.shape[-1]), lora_B.weight.t(), alpha=self.scaling[name])
    return out.view(result.shape).to(result.dtype)


def _fusable(layer, x, args, kwargs) -> str | None:
    """The one active plain adapter whose scaled add can run as addmm here, or None (peft's forward then runs)."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    lora_B = layer.lora_B[name]
    if name in getattr(layer, "lora_variant", {}) or type(lora_B) is not nn.Linear or lora_B.bias is not None:
        return None
    if not _gathered(lora_B.weight):
        return None
    sixteen = torch.is_autocast_enabled(x.device.type) or (x.dtype in HALF and lora_B.weight.dtype == x.dtype)
    return name if sixteen else None


def _gathered(weight) -> bool:
    """Whether the weight is whole here without calling its module. ZeRO-3 gathers a partitioned weight (`ds_id`)
    in the hooks of the module that owns it, and FSDP2 leaves a module that is its own unit sharded (a DTensor)
    until it is called: both need `lora_B(...)`, so peft's forward runs there."""
    return not hasattr(weight, "ds_id") and not isinstance(weight, DTensor)
