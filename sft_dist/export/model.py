"""The model a checkpoint's tensor names refer to, built on the meta device (no weights, no memory).

It checks a checkpoint against the config that wrote it, names adapter keys exactly as peft does
(`get_peft_model_state_dict`), and says how each LoRA layer merges: scaling (alpha/r, or alpha/sqrt(r) with
rslora, as peft computed it), layout (Conv1D and embeddings store the weight transposed) and DoRA.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from sft_dist.errors import ConfigError, SftDistError
from sft_dist.export.source import RunSettings
from sft_dist.export.weights import TrainedWeights

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"


@dataclass
class LoraDelta:
    """W += scaling * B @ A (transposed for (in, out) layouts); DoRA then rescales each row to `magnitude`."""

    weight: str  # the base tensor, e.g. model.layers.0.self_attn.q_proj.weight
    a: str  # trained tensor names
    b: str
    scaling: float
    transpose: bool
    magnitude: str | None = None


@dataclass
class ModelView:
    model: nn.Module  # the peft model (LoRA runs) or the plain model, on the meta device
    config: object  # the base's transformers config
    lora: bool
    quantized: set[str] = field(default_factory=set)  # modules the run loaded in 4/8 bit
    tied: dict[str, str] = field(default_factory=dict)  # tied weight -> the weight it shares
    resized: tuple[int, int] | None = None  # (base rows, rows trained): the embedding grew for the tokenizer


def build_view(base: str, settings: RunSettings, *, merging: bool = False, vocab_size: int | None = None) -> ModelView:
    """`vocab_size`: the run's tokenizer length; a base with fewer embedding rows was resized to it in training
    (model/build.py `fit_vocab`), and so is the view."""
    from transformers import AutoConfig, AutoModelForCausalLM

    m = settings.model
    try:
        config = AutoConfig.from_pretrained(base, trust_remote_code=m.trust_remote_code, revision=m.revision)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e) and not m.trust_remote_code:
            from sft_dist.generate import remote_code_refused

            raise remote_code_refused(f"base model {base!r}") from None
        raise SftDistError(f"base model {base!r}: cannot read its config: {e}") from None
    if getattr(config, "quantization_config", None):
        if merging:
            raise SftDistError(f"base model {base!r} is stored quantized: a merge needs its full-precision weights "
                               "(export the adapter without --merge, or train on a full-precision base)")
        del config.quantization_config  # only the names matter for an adapter
    resized = None
    rows = getattr(config.get_text_config(), "vocab_size", None)
    if vocab_size is not None and isinstance(rows, int) and vocab_size > rows:
        config.get_text_config().vocab_size = vocab_size
        resized = (rows, vocab_size)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=m.trust_remote_code)
    view = ModelView(model, config, settings.lora.enabled, tied=dict(getattr(model, "all_tied_weights_keys", {})),
                     resized=resized)
    if settings.quant.bits is not None:
        from sft_dist.export.quant import quantized_modules

        view.quantized = quantized_modules(model)  # before peft wraps the layers
    if settings.lora.enabled:
        from peft import get_peft_model

        from sft_dist.model.lora import peft_config

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                view.model = get_peft_model(model, peft_config(settings.lora))
        except ValueError as e:
            raise ConfigError(f"lora: {e}") from None
    return view


def check_trained(view: ModelView, trained: TrainedWeights, where: str) -> None:
    """Raise unless the checkpoint holds exactly the trainable tensors of the model its config describes."""
    params = dict(view.model.named_parameters())  # a tied parameter under its first name only
    state = view.model.state_dict()
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in trained.specs)
    # Other state-dict names may appear: FSDP2's get_model_state_dict(ignore_frozen_params=True) keeps the
    # persistent buffers and a frozen tied parameter's other names (it drops the first name only).
    frozen = sorted(n for n in trained.specs if n in params and not params[n].requires_grad)
    unknown = sorted(n for n in trained.specs if n not in state)
    wrong = sorted(f"{n} {tuple(s)} (model: {tuple(state[n].shape)})" for n, (s, _) in trained.specs.items()
                   if n in state and tuple(state[n].shape) != tuple(s))
    problems = [f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} ({len(names)})"
                for what, names in (("missing", missing), ("frozen in the model", frozen),
                                    ("not in the model", unknown), ("shape", wrong)) if names]
    if problems:
        raise SftDistError(f"{where}: the trained tensors do not match the model its config.yaml describes "
                           f"({'; '.join(problems)}). Was the base model changed since training?")


def fused_parameter_layers(view: ModelView) -> list[str]:
    """LoRA layers on a parameter rather than a Linear (peft's ParamWrapper: the stacked experts of a
    transformers 5 MoE, stored per expert in the base's safetensors): the streamed merge cannot map them."""
    from peft.tuners.lora import LoraLayer

    return [name.removeprefix(PEFT_PREFIX) for name, mod in view.model.named_modules()
            if isinstance(mod, LoraLayer) and ADAPTER in mod.scaling and type(mod).__name__ == "ParamWrapper"]


def lora_deltas(view: ModelView) -> list[LoraDelta]:
    from peft.tuners.lora import LoraLayer
    from transformers.pytorch_utils import Conv1D

    out = []
    for name, mod in view.model.named_modules():
        if not isinstance(mod, LoraLayer) or ADAPTER not in mod.scaling:
            continue
        base = mod.get_base_layer()
        weight = f"{name.removeprefix(PEFT_PREFIX)}.weight"
        if isinstance(base, nn.Embedding):
            a, b, transpose = f"{name}.lora_embedding_A.{ADAPTER}", f"{name}.lora_embedding_B.{ADAPTER}", True
        elif isinstance(base, (nn.Linear, Conv1D)):
            a, b = f"{name}.lora_A.{ADAPTER}.weight", f"{name}.lora_B.{ADAPTER}.weight"
            transpose = bool(mod.fan_in_fan_out)
        else:
            raise SftDistError(f"cannot merge LoRA on {type(base).__name__} layer {weight}; export the adapter "
                               "instead (without --merge)")
        magnitude = None
        if mod.use_dora.get(ADAPTER):
            if transpose:
                raise SftDistError(f"cannot merge DoRA on {type(base).__name__} layer {weight}; export the adapter")
            magnitude = f"{name}.lora_magnitude_vector.{ADAPTER}.weight"
        out.append(LoraDelta(weight, a, b, float(mod.scaling[ADAPTER]), transpose, magnitude))
    return out


def base_name(trained_name: str) -> str:
    """The base model's tensor a trained (non-LoRA) tensor replaces: modules_to_save copies, trained biases,
    every weight of a full fine-tuning."""
    name = trained_name.removeprefix(PEFT_PREFIX)
    return name.replace(f".modules_to_save.{ADAPTER}.", ".").replace(".base_layer.", ".")


def adapter_tensors(view: ModelView, trained: TrainedWeights, *, dtype: torch.dtype | None) -> dict:
    """The adapter as `PeftModel.save_pretrained` writes it (adapter name removed from the keys)."""
    from peft import get_peft_model_state_dict

    state = {n: trained.load(n) for n in trained.specs}  # an adapter is small: only trainable tensors
    # A run's final adapter/ with a resized vocabulary also holds the frozen embedding layers peft saved with it.
    state.update({name: trained.load(name) for name in getattr(trained, "frozen", [])})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = get_peft_model_state_dict(view.model, state_dict=state)
    # With a resized vocabulary peft names a modules_to_save copy twice; safetensors refuses aliases, so each
    # further name gets its own copy (as PeftModel.save_pretrained does).
    seen: set[int] = set()
    for k, v in out.items():
        if id(v) in seen:
            out[k] = v.clone()
        seen.add(id(v))
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return out


def save_adapter_config(view: ModelView, out_dir, *, base_ref: str) -> None:
    import copy

    cfg = copy.copy(view.model.peft_config[ADAPTER])
    cfg.base_model_name_or_path = base_ref
    cfg.inference_mode = True  # as PeftModel.save_pretrained writes it
    cfg.save_pretrained(str(out_dir))
