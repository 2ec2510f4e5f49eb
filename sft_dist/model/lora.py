"""Wrap the model with a peft LoRA (or DoRA) adapter from the `lora` config."""

from __future__ import annotations

import logging

from sft_dist.config.schema import LoraConfig
from sft_dist.errors import ConfigError
from sft_dist.model import lora_forward

log = logging.getLogger(__name__)


def peft_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType

    if cfg.init_adapter:
        # the trained adapter's own config (JSON): peft rebuilds the same adapter, including what it derived and the
        # lora section does not show (config/adapter.py); the dropout is this run's
        own = PeftLoraConfig.from_pretrained(cfg.init_adapter)
        own.lora_dropout, own.inference_mode = cfg.dropout, False
        return own
    return PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        exclude_modules=cfg.exclude_modules,
        modules_to_save=cfg.modules_to_save,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        bias=cfg.bias,
    )


def apply_lora(model, cfg: LoraConfig, *, quantized: bool = False, upcast: bool = False,
               gradient_checkpointing: bool = False, separate_tied: bool = False):
    """The peft model. Refuses an embedding `fit_vocab` resized whose new rows LoRA would leave frozen; with
    `separate_tied` (FSDP2) gives a frozen tied original inside a modules_to_save wrapper its own tensor.
    `quantized`: a bitsandbytes base, prepared for training; `upcast`: its unquantized weights cast to fp32
    (`QuantizationConfig.upcasts`)."""
    from peft import get_peft_model

    _check_new_rows_train(model, cfg)
    if quantized:
        model = prepare_quantized(model, upcast=upcast, gradient_checkpointing=gradient_checkpointing)
    routers = moe_routers(model) if cfg.target_modules == "all-linear" else []
    if routers:
        # peft maps "all-linear" on transformers 5 MoE models to what it matched on v4, the router's Linear included
        log.info("lora: all-linear also adapts the %d MoE router(s) (%s, ...); to keep routing frozen, list the "
                 "projections instead, e.g. lora.target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                 "down_proj] (the experts' pre-fusion names)", len(routers), routers[0])
    try:
        model = get_peft_model(model, peft_config(cfg))
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
        raise ConfigError(f"lora.target_modules={cfg.target_modules!r}: {e}. Module names in this model: {names}") from None
    if cfg.fused_forward:
        lora_forward.speed_up(model)
    masters = fp32_masters(model)
    if masters:
        log.info("lora: %d trained 16-bit tensor(s) (%s, ...) kept in fp32, as the LoRA matrices are: the optimizer "
                 "updates fp32 masters and computes in 16 bit under autocast", len(masters), masters[0])
    if separate_tied:
        untied = untie_saved_originals(model)
        if untied:
            log.info("fsdp: %s shared a tied weight with a module outside its modules_to_save wrapper; it got its "
                     "own frozen copy, so FSDP2 sees each weight in one group", ", ".join(untied))
    return model


def prepare_quantized(model, *, upcast: bool, gradient_checkpointing: bool):
    """A bitsandbytes model made ready for an adapter: every weight frozen; with `upcast`, peft's
    prepare_model_for_kbit_training (the unquantized weights cast to fp32). Without it those weights stay in the
    model's 16-bit dtype: the embedding's output, so the residual stream and every decoder layer's input, stays
    16-bit too (an fp32 norm or head would promote it). The Trainer enables activation checkpointing itself."""
    if upcast:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        model.enable_input_require_grads()  # as peft's does: reentrant checkpointing needs an input that requires grad
    return model


def fp32_masters(model) -> list[str]:
    """Cast the trained parameters peft leaves in 16 bit (modules_to_save copies, trained biases) to fp32, and
    name them. peft makes its LoRA matrices fp32 but copies modules_to_save in the base's dtype: AdamW on a bf16
    head rounds small updates away, and accelerate's FSDP2 upcasts them anyway, so DDP and ZeRO would train a
    different head from FSDP2's."""
    import torch

    names = []
    for name, p in model.named_parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
            names.append(name)
    return names


def moe_routers(model) -> list[str]:
    """The names of the MoE routers: the modules that score experts per token (transformers' *TopKRouter classes,
    or a `gate`/`router`/`shared_expert_gate` inside a sparse-MoE block)."""
    names = []
    for name, module in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        kind = type(module).__name__
        in_moe = any(k in type(model.get_submodule(parent)).__name__.lower() for k in ("moe", "sparse")) if parent else False
        if "router" in kind.lower() or (in_moe and leaf in ("gate", "router", "shared_expert_gate")):
            names.append(name)
    return names


def untie_saved_originals(model) -> list[str]:
    """Give each frozen original inside a peft modules_to_save wrapper its own copy of a weight it shares.

    With tied embeddings and `modules_to_save: [lm_head]`, peft's wrapper holds a trainable copy of the head and
    the original head, whose weight is still the input embedding's. accelerate's FSDP2 wrapping asks
    `get_output_embeddings().weight` (the wrapper's: the trainable copy) whether the head is tied, finds it is
    not, and puts the embedding and the head in different groups: FSDP2 then refuses the original's weight
    ("shared with a parameter already managed by another FSDP group"). The original is not used while the
    adapter is active, so a frozen copy changes no number; it costs vocab x hidden more frozen elements,
    sharded 1/N per rank like the rest. Returns the names of the originals' weights that were untied."""
    from peft.utils.other import ModulesToSaveWrapper
    from torch import nn

    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    untied = []
    for name, wrapper in model.named_modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        original = wrapper.original_module
        for module_name, module in original.named_modules():
            for pname, p in list(module.named_parameters(recurse=False)):
                if owners.get(id(p), 0) > 1:
                    setattr(module, pname, nn.Parameter(p.detach().clone(), requires_grad=False))
                    untied.append(".".join(x for x in (name, "original_module", module_name, pname) if x))
    return untied


def _check_new_rows_train(model, cfg: LoraConfig) -> None:
    """After `fit_vocab` grew the embedding for a larger tokenizer: under LoRA the new rows train only when
    both the embedding and the output head are in modules_to_save; else they would stay at their initial
    values and the model could neither read nor write those tokens."""
    resized = getattr(model, "sft_dist_resized", None)
    if resized is None:
        return
    old, new = resized
    names = dict(model.named_modules())
    modules = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    paths = [next(n for n, m in names.items() if m is mod) for mod in modules]
    saved = set(cfg.modules_to_save or [])
    missing = [p for p in paths if not any(p == s or p.endswith("." + s) for s in saved)]
    if missing:
        leaves = [p.rsplit(".", 1)[-1] for p in paths]
        raise ConfigError(
            f"lora.modules_to_save: the tokenizer has {new} tokens and the model's embedding had {old} rows; the "
            f"embedding was resized, but under LoRA its {new - old} new rows would stay frozen at their initial "
            f"values ({', '.join(missing)} not trained). Set lora.modules_to_save: [{', '.join(leaves)}] to train "
            "them, or use the model's own tokenizer")
    log.info("model: the %d new embedding rows train with the modules_to_save copies (%s)", new - old,
             ", ".join(paths))
