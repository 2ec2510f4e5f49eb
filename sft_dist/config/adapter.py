"""The shape of a trained LoRA adapter to start from (`lora.init_adapter`), taken into the `lora` section.

Read before anything loads, from the adapter's adapter_config.json (plain JSON): rank, alpha, target modules, DoRA,
rsLoRA, bias and modules_to_save, the fields the adapter's tensors and their scaling depend on, replace the
section's. A field the config sets itself to something else is refused (the adapter would load into the wrong
shapes, or scale differently); `lora.dropout`, a training choice, stays the config's. peft builds the new adapter
from the adapter's own config (model/lora.py: `peft_config`), so what peft derived for it and the section does not
show (fused MoE experts as `target_parameters` with their `rank_pattern`, GPT-2's `fan_in_fan_out`) is rebuilt the
same; its tensors are loaded into it (model/adapter_init.py). Only adapter_model.safetensors is read: a peft
adapter_model.bin is a pickle, as is the training_args.bin beside it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

KEY = "lora.init_adapter"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Our LoraConfig field -> peft's adapter_config.json key, for what the tensors or their scaling depend on.
SHAPE = {"r": "r", "alpha": "lora_alpha", "target_modules": "target_modules", "use_dora": "use_dora",
         "use_rslora": "use_rslora", "bias": "bias", "modules_to_save": "modules_to_save",
         "exclude_modules": "exclude_modules"}


def adapter_dir(value: str) -> Path:
    """The directory holding the adapter: `value` itself, or a sft_dist run's adapter/ (a run directory)."""
    path = Path(value).expanduser().resolve()
    if (path / CONFIG_FILE).is_file():
        return path
    if (path / "adapter" / CONFIG_FILE).is_file():
        return path / "adapter"
    return path


def read_adapter_config(value: str) -> tuple[Path, dict, list[str]]:
    """The adapter's directory, its adapter_config.json and the problems found (each naming KEY)."""
    path = adapter_dir(value)
    if not path.exists():
        return path, {}, [f"{KEY}: {value!r} does not exist (a local directory with {CONFIG_FILE} and {WEIGHTS_FILE}, "
                          f"or a sft_dist run directory; a hub adapter: download it first, e.g. `huggingface-cli "
                          f"download ORG/NAME --local-dir DIR`)"]
    if not (path / CONFIG_FILE).is_file():
        return path, {}, [f"{KEY}: {str(path)!r} has no {CONFIG_FILE}: pass a peft adapter directory or a sft_dist "
                          f"run directory (its adapter/); a checkpoint: export its adapter first (`sft-dist export "
                          f"CHECKPOINT --output DIR`)"]
    if not (path / WEIGHTS_FILE).is_file():
        pickled = " (its adapter_model.bin is a pickle, which sft_dist does not load: convert it once with peft, " \
                  "`PeftModel.from_pretrained(...).save_pretrained(DIR)` saves safetensors)" \
            if (path / "adapter_model.bin").is_file() else ""
        return path, {}, [f"{KEY}: {str(path)!r} has no {WEIGHTS_FILE}{pickled}"]
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return path, {}, [f"{KEY}: {path / CONFIG_FILE}: not readable JSON ({e})"]
    if not isinstance(cfg, dict):
        return path, {}, [f"{KEY}: {path / CONFIG_FILE}: expected a JSON object"]
    if cfg.get("peft_type", "LORA") != "LORA":
        return path, cfg, [f"{KEY}: {path} is a {cfg.get('peft_type')} adapter; sft_dist trains LoRA (and DoRA) "
                           "adapters"]
    return path, cfg, []


def take_shape(lora, given: set[str]) -> tuple[object, list[str]]:
    """`lora` (our LoraConfig) with the adapter's shape taken in; `given`: the lora keys the config set itself.
    Returns the new section and the problems (a missing or unusable adapter, a contradicting field)."""
    if not lora.init_adapter:
        return lora, []
    if not lora.enabled:
        return lora, [f"{KEY}: needs `lora.enabled: true` (it loads a LoRA adapter onto the base)"]
    path, cfg, problems = read_adapter_config(lora.init_adapter)
    if problems:
        return lora, problems
    taken = {}
    for ours, theirs in SHAPE.items():
        value = _ours(ours, cfg.get(theirs))
        if ours in given and not _agrees(ours, getattr(lora, ours), value):
            problems.append(f"lora.{ours}: {getattr(lora, ours)!r} here, {value!r} in the adapter {KEY}="
                            f"{str(path)!r}: drop lora.{ours} (the adapter's is taken) or start a new adapter")
        taken[ours] = value
    return dataclasses.replace(lora, **taken, init_adapter=str(path)), problems


def _ours(field: str, value):
    if field in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(value, str) or value is None:
            return value
        return sorted(value)  # peft writes a set as a list in any order: sorted, the same config twice is equal
    if field == "alpha" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _agrees(field: str, mine, theirs) -> bool:
    """Whether the config's own value says what the adapter's does. `all-linear` agrees with any list (peft
    writes the modules it resolved); a list of names agrees where it names every adapter module (by its last
    part). It may name more: peft files the projections of fused MoE experts under `target_parameters`."""
    if field == "target_modules":
        if mine == "all-linear" or mine == theirs:
            return True
        if isinstance(mine, list) and isinstance(theirs, list):
            return {t.rsplit(".", 1)[-1] for t in theirs} <= set(mine) or sorted(mine) == sorted(theirs)
        return False
    if field in ("modules_to_save", "exclude_modules"):
        return sorted(mine or []) == sorted(theirs or [])
    return mine == theirs
