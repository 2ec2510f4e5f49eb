"""QLoRA merges (`--dequantize`): the base weights the adapter was trained against are the quantized ones.

Merging a LoRA delta into the full-precision base would give a model that training never saw; re-quantizing
the merged weights would round the (small) delta away. So each quantized layer's weight goes through the same
bitsandbytes quantize -> dequantize round trip as at training time (4-bit: blockwise, blocksize 64, the run's
quant_type and double quantization; 8-bit: LLM.int8 row-wise absmax of the fp16 weight), then gets the delta,
and the model is written unquantized in the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sft_dist.config.schema import QuantizationConfig

BLOCKSIZE = 64  # bitsandbytes' Params4bit default, which transformers' loader uses
RoundTrip = Callable[[torch.Tensor], torch.Tensor]


def quantized_modules(model: nn.Module) -> set[str]:
    """The linear layers transformers' bitsandbytes loader replaces (with its own skip rules: the output
    head, tied and fp32-kept modules)."""
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = HfQuantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))
    return {name for name, mod in model.named_modules()
            if should_convert_module(name, skip) and (isinstance(mod, Conv1D) or type(mod) is nn.Linear)}


def round_trip(quant: QuantizationConfig, *, load_dtype: torch.dtype) -> RoundTrip:
    """weight -> the weight a quantized layer computes with, in float32. `load_dtype`: the dtype the base was
    loaded in before quantization (model.dtype at training time)."""
    import bitsandbytes.functional as F

    if quant.bits == 8:
        def int8(w: torch.Tensor) -> torch.Tensor:
            cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16).contiguous())
            return F.int8_vectorwise_dequant(cb, scb).float()

        return int8

    # the packing dtype does not change the quantized values
    storage = {"auto": torch.uint8, "uint8": torch.uint8, "float32": torch.float32, "bfloat16": torch.bfloat16,
               "float16": torch.float16}[quant.quant_storage]

    def four_bit(w: torch.Tensor) -> torch.Tensor:
        q, state = F.quantize_4bit(w.to(load_dtype).contiguous(), blocksize=BLOCKSIZE,
                                   compress_statistics=quant.double_quant, quant_type=quant.quant_type,
                                   quant_storage=storage)
        return F.dequantize_4bit(q, state).float()

    return four_bit
