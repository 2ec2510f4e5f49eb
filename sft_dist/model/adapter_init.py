"""Load a trained LoRA adapter's tensors into the new one (`lora.init_adapter`): train it further, or evaluate it.

peft builds the new adapter from the trained one's own config (model/lora.py: `peft_config`; the config took its
shape in, config/adapter.py); its tensors come from adapter_model.safetensors, and each must land on a trained
parameter of its own shape, none on a frozen base weight, and every trained parameter must get one: a different
base is refused, not half-loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from sft_dist.config.adapter import CONFIG_FILE, KEY, WEIGHTS_FILE, adapter_dir

UNNAMED = "a base its adapter_config.json does not name"


def load_weights(model, value: str) -> str:
    """Load the adapter's tensors into the peft `model` (built from the adapter's config); returns the log line."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from sft_dist.errors import SftDistError

    path = adapter_dir(value)
    state = load_file(str(path / WEIGHTS_FILE))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    # a tensor that lands on a frozen base weight (a head the adapter saved whole, loaded where no modules_to_save
    # copy takes it) bumps that weight's in-place version counter
    frozen = {n: p._version for n, p in model.named_parameters() if not p.requires_grad}
    partitioned = [p for p in model.parameters() if p.requires_grad and hasattr(p, "ds_id")]
    try:
        if partitioned:  # ZeRO-3 params made under zero.Init: whole while loading, every rank loads the same file
            import deepspeed

            with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
                result = set_peft_model_state_dict(model, state)
        else:
            with torch.no_grad():
                result = set_peft_model_state_dict(model, state)
    except RuntimeError as e:  # a size mismatch: the base is not the one the adapter was trained on
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:300])
        raise SftDistError(f"{KEY}={str(path)!r}: its tensors do not fit this model ({first}); is model.* the base "
                           f"it was trained on ({_base(path)})?") from None
    unexpected = list(result.unexpected_keys)
    missing = sorted(trained & set(result.missing_keys))
    overwritten = sorted(n for n, p in model.named_parameters() if n in frozen and p._version != frozen[n])
    if unexpected or missing or overwritten:
        what = []
        if overwritten:
            what.append(f"{len(overwritten)} of its tensors would replace frozen base weights ({overwritten[0]}, ...)")
        if unexpected:
            what.append(f"{len(unexpected)} of its tensors match no parameter here ({unexpected[0]}, ...)")
        if missing:
            what.append(f"{len(missing)} trained parameter(s) got no tensor ({missing[0]}, ...)")
        raise SftDistError(f"{KEY}={str(path)!r}: {'; '.join(what)}; is model.* the base it was trained on "
                           f"({_base(path)})?")
    numel = sum(t.numel() for t in state.values())
    return f"{KEY}: loaded {len(state)} tensors ({numel:,} values) from {path} (trained on {_base(path)})"


def _base(path: Path) -> str:
    try:
        return json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")).get("base_model_name_or_path") or UNNAMED
    except (OSError, ValueError):
        return UNNAMED
