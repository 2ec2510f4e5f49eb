"""Write the final model or adapter in Hugging Face / PEFT format, whatever shards it."""

from __future__ import annotations

from pathlib import Path


def save_final(trainer, final_dir: Path) -> None:
    """Collective: every rank calls it. Under FSDP2 the shards are gathered and rank 0 writes them
    (`Trainer.save_model` writes nothing with a sharded state-dict type). DeepSpeed ZeRO-3 gathers inside
    `save_model` (stage3_gather_16bit_weights_on_model_save)."""
    if not trainer.is_fsdp_enabled:
        trainer.save_model(str(final_dir))
        return
    from peft import PeftModel

    if isinstance(trainer.model, PeftModel):
        _save_fsdp_adapter(trainer, final_dir)
        return
    state_dict = {}
    for name, tensor in trainer.model.state_dict().items():
        state_dict[name] = _full(tensor)
    if trainer.args.should_save:
        trainer._save(str(final_dir), state_dict=state_dict)


def _full(tensor):
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()  # all-gather of this DTensor; called in the same order on every rank
    return tensor.detach().cpu().clone()


def _save_fsdp_adapter(trainer, final_dir: Path) -> None:
    """Only the trainable (adapter) weights are gathered, so no rank ever holds the whole frozen base.
    Names come from named_parameters(), which match peft's module names even inside FSDP's activation-
    checkpoint wrappers; the wrapper's prefix is then dropped from the saved keys."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        _CHECKPOINT_PREFIX,
    )

    model = trainer.model
    gathered = {name: _full(p) for name, p in model.named_parameters() if p.requires_grad}
    # Every rank selects the adapter entries (peft may touch the sharded modules); rank 0 writes them.
    adapter = get_peft_model_state_dict(model, state_dict=gathered)
    adapter = {k.replace(_CHECKPOINT_PREFIX, ""): v.contiguous() for k, v in adapter.items()}
    if not trainer.args.should_save:
        return
    final_dir.mkdir(parents=True, exist_ok=True)
    save_file(adapter, str(final_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    model.peft_config["default"].save_pretrained(str(final_dir))
