"""Wrap the model with a peft LoRA (or DoRA) adapter from the `lora` config."""

from __future__ import annotations

from sft_dist.config.schema import LoraConfig
from sft_dist.errors import ConfigError


def peft_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType

    return PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        modules_to_save=cfg.modules_to_save,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        bias=cfg.bias,
    )


def apply_lora(model, cfg: LoraConfig, *, quantized: bool = False, gradient_checkpointing: bool = False):
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    try:
        return get_peft_model(model, peft_config(cfg))
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
        raise ConfigError(f"lora.target_modules={cfg.target_modules!r}: {e}. Module names in this model: {names}") from None
