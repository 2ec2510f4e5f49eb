"""Model FLOPs per trained token, and the device peak MFU is measured against.

Counted from the model's matmuls (every Linear, including the output head and LoRA's A/B; embeddings are
lookups and count nothing), so it holds for any architecture, quantized or not, before sharding:
- a trainable matmul weight costs 6 FLOPs per parameter per token (forward 2, input and weight grads 4);
- a frozen one 4 (forward 2 and the input gradient 2, which the layers below still need): LoRA's
  "4N + 6N_lora" falls out of the same count;
- attention scores and values add 12 * layers * hidden * T per token (T = the sequence length the
  token attends over: PaLM's estimate, forward and backward, no causal halving).
Activation recomputation is not counted: this is MFU, not hardware utilisation.
"""

from __future__ import annotations

from dataclasses import dataclass

# Dense bf16/fp16 tensor peak per device, TFLOP/s (vendor datasheets). Matched on the CUDA device name.
PEAK_TFLOPS_BF16 = {
    "H200 NVL": 835.0,  # before "H200" (the longest key is tried first): the NVL card's lower clocks
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
}


@dataclass
class ModelFlops:
    trainable_matmul: int  # parameters of trainable matmul weights
    frozen_matmul: int
    layers: int | None
    hidden: int | None

    def per_token(self, seq_len: float) -> float:
        attention = 12 * self.layers * self.hidden * seq_len if self.layers and self.hidden else 0
        return 6 * self.trainable_matmul + 4 * self.frozen_matmul + attention


def model_flops(model) -> ModelFlops:
    """Matmul parameter counts of a built (not yet sharded) model."""
    trainable = frozen = 0
    for name, module in model.named_modules():
        # peft: a LoRA layer wraps its base layer (counted itself); the head that modules_to_save copies
        # keeps its original, which no longer computes.
        if hasattr(module, "base_layer") or hasattr(module, "original_module") or ".original_module" in f".{name}":
            continue
        weight = getattr(module, "weight", None)
        shape = _matmul_shape(module)
        if shape is None or weight is None:
            continue
        n = shape[0] * shape[1]
        if weight.requires_grad:
            trainable += n
        else:
            frozen += n
    cfg = getattr(model, "config", None)
    return ModelFlops(trainable, frozen, getattr(cfg, "num_hidden_layers", None), getattr(cfg, "hidden_size", None))


def _matmul_shape(module) -> tuple[int, int] | None:
    # nn.Linear and its bitsandbytes subclasses keep the logical in/out features even when the weight is
    # packed 4-bit or a ZeRO-3 placeholder; Conv1D (GPT-2) keeps nf and the weight's first dim (a ZeRO-3
    # placeholder's full shape is in ds_shape).
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return getattr(module.weight, "ds_shape", module.weight.shape)[0], module.nf
    return None


def device_peak_tflops(device: str, *, given: float | None, half_precision: bool) -> tuple[float | None, str]:
    """(peak TFLOP/s per device, where it came from). None: unknown, MFU is reported as n/a."""
    if given is not None:
        return given, "metrics.peak_tflops"
    if device != "cuda":
        return None, "no known peak for a CPU; set metrics.peak_tflops to get MFU"
    import torch

    name = torch.cuda.get_device_name()
    if not half_precision:
        return None, f"{name} in fp32: set metrics.peak_tflops (the table holds bf16/fp16 tensor peaks)"
    for key in sorted(PEAK_TFLOPS_BF16, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS_BF16[key], f"{name}: dense bf16 peak {PEAK_TFLOPS_BF16[key]} TFLOP/s"
    return None, f"{name}: not in sft_dist's peak table; set metrics.peak_tflops"
