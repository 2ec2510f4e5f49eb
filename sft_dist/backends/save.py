"""Write the final model or adapter in Hugging Face / PEFT format, whatever shards it."""

from __future__ import annotations

from pathlib import Path


def save_final(trainer, final_dir: Path) -> None:
    """Collective: every rank calls it. Under FSDP2 the shards are gathered and rank 0 writes them
    (`Trainer.save_model` writes nothing with a sharded state-dict type). DeepSpeed ZeRO-3 gathers inside
    `save_model` (stage3_gather_16bit_weights_on_model_save)."""
    if trainer.is_fsdp_enabled:
        state_dict = _gather_full(trainer.model)
        if trainer.args.should_save:
            trainer._save(str(final_dir), state_dict=state_dict)
        return
    trainer.save_model(str(final_dir))


def _gather_full(model) -> dict:
    """Full tensors of an FSDP2 model, on CPU. For a PEFT model only the trainable (adapter) weights,
    so the frozen base is never materialised whole on any rank."""
    from peft import PeftModel

    keep = None
    if isinstance(model, PeftModel):
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
    out = {}
    for name, tensor in model.state_dict().items():
        if keep is not None and name not in keep:
            continue
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()  # all-gather of this DTensor; same order on every rank
        out[name] = tensor.detach().cpu().clone()
    return out
