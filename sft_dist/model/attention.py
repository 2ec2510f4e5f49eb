"""`model.attn_implementation`: `auto` picks the fastest implementation the architecture and device support;
a value the model class rejects is a one-line ConfigError, raised from the model's config (no weight loaded).

What each choice does to packed rows (sft_dist/data/packing.py): sdpa, eager and flex_attention get one packed
row per batch row and build a block-diagonal mask from the position_ids; flash attention and `varlen_attention`
(model/varlen.py: torch's own varlen flash kernel on CUDA) get the micro-batch flattened into one row with
cu_seq_lens, and no mask. Every choice keeps packed documents apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from sft_dist.errors import ConfigError

FLASH = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
VARLEN = "varlen_attention"
CHOICES = ("auto", "eager", "sdpa", "flex_attention", VARLEN, *FLASH)
KEY = "model.attn_implementation"


@dataclass(frozen=True)
class Choice:
    name: str  # what transformers is given
    reason: str  # why, for the log line

    def describe(self) -> str:
        return f"attention: {self.name} ({self.reason})"


def check_value(value: str | None) -> list[str]:
    """The value itself: one of CHOICES, or a hub kernel (`org/repo`, passed to transformers as is)."""
    if value is None or value in CHOICES or "/" in value:
        return []
    return [f"{KEY}: got {value!r}; expected one of {', '.join(CHOICES)} (or a hub kernel `org/repo`)"]


def supported(cls) -> list[str]:
    """The implementations a transformers model class declares (eager always works)."""
    out = ["eager"]
    if getattr(cls, "_supports_sdpa", False):
        out.append("sdpa")
    if getattr(cls, "_supports_flex_attn", False):
        out.append("flex_attention")
    if getattr(cls, "_supports_flash_attn", False):
        out += list(FLASH)
    return out


def causal_lm_class(config):
    """The AutoModelForCausalLM class of a transformers config, or None (remote code, or no causal LM)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, ValueError):
        return None


def class_for_model_type(model_type: str):
    """The causal LM class of a `model_type`, importing only its modeling module (no config, no weights)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    return getattr(transformers, name, None) if name else None


def check_requested(value: str | None, cls, *, model_type: str | None, config=None) -> None:
    """Raise a one-line ConfigError when the model class `cls` (or, for varlen_attention, its `config`) rejects
    a value the user set."""
    if value in (None, "auto", "eager") or "/" in value or cls is None:
        return
    from sft_dist.model import varlen

    allowed = supported(cls)
    if "flash_attention_2" in allowed:  # flash-style attention, unless the config asks what varlen cannot do
        why = varlen.config_problem(config) if config is not None else None
        if value == VARLEN and why:
            raise ConfigError(f"{KEY}: {VARLEN} cannot run {cls.__name__} (model_type {model_type}): {why}; "
                              "use auto, sdpa or eager")
        if why is None:
            allowed.append(VARLEN)
    if value not in allowed:
        why = " (its attention uses logit soft-capping, which sdpa cannot do)" if model_type == "gemma2" else ""
        raise ConfigError(f"{KEY}: {value!r} is not supported by {cls.__name__} (model_type {model_type}){why}; "
                          f"allowed: {', '.join(['auto', *allowed])}")


def check_config(m, *, device: str = "auto") -> list[str]:
    """Config-time check of a set value against the model class, from `init_config` or a local or cached
    config.json (a hub id not downloaded yet is checked where the model loads), and of flash attention against
    `launcher.device`. Imports the model's modeling module only for a value other than auto/eager."""
    problems = check_value(m.attn_implementation)
    if not problems and m.attn_implementation in FLASH and device == "cpu":
        problems.append(f"{KEY}: {m.attn_implementation} needs a CUDA device, and launcher.device is cpu; use auto "
                        "or sdpa")
    if not problems and m.attn_implementation == "flex_attention" and device == "cpu":
        # torch 2.13: "FlexAttention does not support backward on CPU", at the first backward pass
        problems.append(f"{KEY}: flex_attention cannot train on a CPU (torch has no FlexAttention backward there); "
                        "use auto or sdpa")
    if problems or m.attn_implementation in (None, "auto", "eager") or "/" in m.attn_implementation:
        return problems
    from sft_dist.model.config import raw_config

    raw = raw_config(m)
    if not isinstance(raw, dict) or not raw.get("model_type") or raw.get("auto_map"):
        return []  # remote code: its class is known only once its code runs, where the model loads
    try:
        check_requested(m.attn_implementation, class_for_model_type(raw["model_type"]),
                        model_type=raw["model_type"], config=_config_or_none(raw))
    except ConfigError as e:
        return e.problems
    return []


def _config_or_none(raw: dict):
    """The transformers config of a config dict, with its class defaults (None where it does not build: the
    model build names that)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(raw["model_type"], **{k: v for k, v in raw.items() if k != "model_type"})
    except (TypeError, ValueError):
        return None


def choose(requested: str | None, cls, *, model_type: str | None, device: str, dtype, config=None,
           probe: bool = True) -> Choice:
    """The implementation to build the model with. `auto`: flash attention (3, then 2) when its package is
    installed, the device is CUDA, the weights are 16-bit and the class supports it; else, on the same terms,
    torch's varlen flash kernel (`varlen_attention`) once it ran right on this GPU (`probe`; the planner,
    which may have no GPU, passes False) and the model's attention has nothing it cannot do (soft-capping,
    sinks, dropout); else sdpa where the class supports it; else, on CUDA, flex attention where the class
    supports it and torch's compiled kernel ran right on this GPU with the model's attention (model/flex.py:
    Gemma 2, gpt-oss: soft-capping and sinks that sdpa cannot do); else eager."""
    from sft_dist.model import varlen

    if requested not in (None, "auto"):
        check_requested(requested, cls, model_type=model_type, config=config)
        if requested in FLASH:
            _check_flash(requested, device=device)
        if requested == VARLEN:
            why = _varlen_kernel_problem(dtype, config, probe=probe) if device == "cuda" else None  # as auto does
            if why:
                raise ConfigError(f"{KEY}: {VARLEN} cannot run here: {why}; use auto, sdpa or eager")
            varlen.register()
        return Choice(requested, "as configured")
    if cls is None:  # remote code: transformers' own default (sdpa if the class supports it, else eager)
        return Choice("sdpa", "auto: remote-code model; transformers falls back to eager if it lacks sdpa")
    allowed = supported(cls)
    name = cls.__name__
    why_not_flash = _why_not_flash(device=device, dtype=dtype)
    if "flash_attention_2" in allowed and why_not_flash is None:
        for fa in ("flash_attention_3", "flash_attention_2"):
            if _flash_installed(fa):
                return Choice(fa, f"auto: {name} supports it, {fa.replace('_attention_', '-attn ')} is installed, "
                                  f"CUDA, {str(dtype).removeprefix('torch.')}")
        why_not_flash = "flash-attn is not installed"
        why_not_varlen = varlen.config_problem(config) if config is not None else "the model's config is not known"
        if why_not_varlen is None:
            why_not_varlen = _varlen_kernel_problem(dtype, config, probe=probe)
        if why_not_varlen is None:
            varlen.register()
            return Choice(VARLEN, f"auto: {name} supports flash-style attention, flash-attn is not installed: torch's "
                                  f"varlen flash kernel, CUDA, {str(dtype).removeprefix('torch.')}")
        why_not_flash += f"; no varlen_attention: {why_not_varlen}"
    elif "flash_attention_2" not in allowed:
        why_not_flash = f"{name} has no flash attention"
    if "sdpa" in allowed:
        return Choice("sdpa", f"auto: {name} supports sdpa; no flash attention: {why_not_flash}")
    if "flex_attention" in allowed and device == "cuda":
        why_not_flex = _flex_problem(dtype, config, probe=probe)
        if why_not_flex is None:
            checked = " ran right on this GPU" if probe else ""
            return Choice("flex_attention", f"auto: {name} has no sdpa; no flash attention: {why_not_flash}; torch's "
                                            f"flex attention{checked}, CUDA, {str(dtype).removeprefix('torch.')}")
        why_not_flash += f"; no flex_attention: {why_not_flex}"
    return Choice("eager", f"auto: {name} supports neither sdpa nor flash attention here ({why_not_flash})")


def _flex_problem(dtype, config, *, probe: bool) -> str | None:
    import torch

    from sft_dist.model import flex, varlen

    if not flex.available():
        return f"torch {torch.__version__} has no flex attention"
    if config is None:
        return "the model's config is not known"
    why = flex.config_problem(config)
    if why or not probe:
        return why
    if not torch.cuda.is_available():
        return "no CUDA device visible here to check torch's flex attention on"
    softcap, sinks, _ = varlen.traits(config)
    return flex.kernel_problem(torch.cuda.current_device(), dtype, *varlen.head_layout(config), softcap, sinks)


def _varlen_kernel_problem(dtype, config, *, probe: bool) -> str | None:
    import torch

    from sft_dist.model import varlen

    if not probe:
        return None if varlen.torch_kernel() is not None else "this torch has no torch.nn.attention.varlen"
    if not torch.cuda.is_available():
        return "no CUDA device visible here to check torch's varlen kernel on"
    layout = varlen.head_layout(config) if config is not None else (64, 2)
    return varlen.kernel_problem(torch.cuda.current_device(), dtype, *layout)


def _why_not_flash(*, device: str, dtype) -> str | None:
    import torch

    if device != "cuda":
        return f"the device is {device}"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"the weights are {str(dtype).removeprefix('torch.')} (flash attention computes in 16 bit)"
    return None


def _flash_installed(name: str) -> bool:
    from transformers.utils import import_utils

    if name == "flash_attention_3":
        import torch

        # flash-attn 3's kernels are Hopper's (sm90); transformers' check looks at the package and CUDA only
        return bool(import_utils.is_flash_attn_3_available()) and torch.cuda.get_device_capability()[0] == 9
    return bool(import_utils.is_flash_attn_2_available())


def _check_flash(name: str, *, device: str) -> None:
    if device != "cuda":
        raise ConfigError(f"{KEY}: {name} needs a CUDA device, and the workers train on {device}; use auto or sdpa")
    from transformers.utils import import_utils

    check = {"flash_attention_2": import_utils.is_flash_attn_2_available,
             "flash_attention_3": import_utils.is_flash_attn_3_available,
             "flash_attention_4": import_utils.is_flash_attn_4_available}[name]
    if not check():
        package = {"flash_attention_2": "flash-attn", "flash_attention_3": "flash-attn-3",
                   "flash_attention_4": "flash-attn-4"}[name]
        raise ConfigError(f"{KEY}: {name} needs the {package} package, which is not installed here; install it, "
                          "or use auto (picks sdpa) or sdpa")
