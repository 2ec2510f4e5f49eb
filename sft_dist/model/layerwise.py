"""Seeded random weights initialised one decoder layer at a time on the device and kept on the host, so the
device never holds more than the embeddings, the head and one layer: for a base that ends on the host anyway
(one FSDP2 shards from there, or one loaded again quantized), whatever its size against the GPU's memory.

The model is built on the meta device; transformers' own `initialize_weights` then walks it in its usual order
(children before their parent), and each module's tensors are allocated on the device just before its
`_init_weights` draws into them. The draws are the same, in the same order and on the same device, as those of
the model built whole there (model/build.py: init_random), so the weights are the same bits.

`weights=False` (the ranks FSDP2 fills from rank 0's weights, model/build.py: RANDOM_BASE "receive"): only the buffers are
made (RoPE's frequencies: FSDP2 does not send buffers); the parameters are left uninitialised on the host
(`torch.empty`: no page is touched, so no memory is used, until FSDP2 moves the model to the meta device and
fills its shards). Not meta tensors: accelerate tells parameters apart by their data pointers, all 0 on meta."""

from __future__ import annotations

import torch
from torch import nn


def init_layerwise(model: nn.Module, *, device: torch.device, host: torch.device, weights: bool = True) -> None:
    """Initialise `model` (built on the meta device) in place with its own `_init_weights`, allocating each
    module's tensors on `device` just before they are drawn, and moving each decoder layer (`_no_split_modules`)
    to `host` once it is initialised; the rest follows at the end. Tied tensors stay one tensor. `weights=False`:
    the buffers are made as above, the parameters are left uninitialised on `host` (their init draws nothing)."""
    from transformers import PreTrainedModel

    from sft_dist.model.layers import decoder_layer_names

    layer_names = decoder_layer_names(model)

    def to_host(module: nn.Module) -> None:
        if weights:
            module.to(host)
            return
        for sub in module.modules():  # meta parameters cannot move: only the buffers do
            for name, t in sub._buffers.items():
                if t is not None and not t.is_meta:
                    sub._buffers[name] = t.to(host)

    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(meta tensor) -> (it, its device tensor)

    def allocate(module: nn.Module) -> None:
        for store in (module._parameters, module._buffers) if weights else (module._buffers,):
            for name, t in store.items():
                if t is None or not t.is_meta:
                    continue
                if id(t) not in made:
                    new = torch.empty_like(t, device=device)
                    if isinstance(t, nn.Parameter):
                        new = nn.Parameter(new, requires_grad=t.requires_grad)
                    made[id(t)] = (t, new)  # the meta tensor is kept alive so that its id is not reused
                store[name] = made[id(t)][1]

    submodels = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    for sub in submodels:
        init_one = sub._initialize_weights  # the bound method transformers' walk calls for this (sub)model

        def wrapped(module, is_custom_code=False, _init_one=init_one):
            allocate(module)
            _init_one(module, is_custom_code)
            if type(module).__name__ in layer_names:
                to_host(module)

        sub._initialize_weights = wrapped
    try:
        model.initialize_weights()
    finally:
        for sub in submodels:
            del sub._initialize_weights
    to_host(model)
    if not weights:
        for module in model.modules():
            for name, t in module._parameters.items():
                if t is not None and t.is_meta:
                    if id(t) not in made:
                        made[id(t)] = (t, nn.Parameter(torch.empty_like(t, device=host), requires_grad=t.requires_grad))
                    module._parameters[name] = made[id(t)][1]
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"layer-wise init left tensors on the meta device: {left[:5]}")
