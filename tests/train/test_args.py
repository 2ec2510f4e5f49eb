"""train/args.py: the SFTConfig sft_dist builds, and the fused-kernel choice (Liger) on and off.

Liger's kernels are Triton (CUDA only), so on CPU the tests cover the decision and the call into Liger's API,
with a stand-in for liger-kernel where the patching itself would run."""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch

from sft_dist.config.load import load_config
from sft_dist.errors import ConfigError
from sft_dist.train import args as train_args
from sft_dist.train.args import LIGER_DEFAULTS, apply_liger, build_sft_config, liger_choice
from tests.conftest import QUICKSTART


def cfg(tmp_path, *overrides: str):
    return load_config(QUICKSTART, [f"output_dir={tmp_path / 'run'}", *overrides])


@pytest.fixture
def liger_installed(monkeypatch):
    """Pretend liger-kernel and triton are importable (they are not on a CPU-only machine)."""
    real = train_args.importlib.util.find_spec
    monkeypatch.setattr(train_args.importlib.util, "find_spec",
                        lambda name, *a: object() if name in ("liger_kernel", "triton") else real(name, *a))


def test_cpu_default_leaves_liger_off_and_trl_never_sees_the_deprecated_flag(tmp_path):
    c = cfg(tmp_path)
    choice = liger_choice(c.training, device="cpu")
    assert choice.kwargs is None and "the device is cpu" in choice.reason
    assert apply_liger(object(), choice) == "kernels: Liger off (auto: its kernels are Triton kernels for CUDA, and " \
                                            "the device is cpu)"
    args = build_sft_config(cfg(tmp_path, "training.use_liger_kernel=false",
                                "training.liger_kernel_config={swiglu: false}"), device="cpu")
    assert args.use_liger_kernel is False and args.liger_kernel_config is None


def test_liger_asked_for_where_it_cannot_run_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"training.use_liger_kernel: true, but its kernels are Triton kernels for "
                                          r"CUDA, and the device is cpu; leave it unset"):
        build_sft_config(cfg(tmp_path, "training.use_liger_kernel=true"), device="cpu")
    assert liger_choice({"use_liger_kernel": False}, device="cuda").reason == "training.use_liger_kernel: false"


def test_liger_not_installed_on_cuda_is_off_when_unset_and_an_error_when_asked(monkeypatch):
    monkeypatch.setattr(train_args.importlib.util, "find_spec", lambda name, *a: None)
    assert liger_choice({}, device="cuda").reason == "auto: liger-kernel is not installed (pip install liger-kernel)"
    with pytest.raises(ConfigError, match=r"liger-kernel is not installed \(pip install liger-kernel\)"):
        liger_choice({"use_liger_kernel": True}, device="cuda")


def test_on_cuda_with_liger_installed_it_is_on_by_default_with_a_switch_per_kernel(liger_installed):
    auto = liger_choice({}, device="cuda")
    assert auto.kwargs == LIGER_DEFAULTS and not auto.explicit
    assert auto.describe() == ("kernels: Liger rope, rms_norm, swiglu, geglu, layer_norm (auto: CUDA, liger-kernel "
                               "installed); loss: TRL's fused chunked LM head")
    some = liger_choice({"use_liger_kernel": True, "liger_kernel_config": {"rope": False}}, device="cuda")
    assert some.kwargs == {**LIGER_DEFAULTS, "rope": False} and some.explicit
    assert liger_choice({"use_liger_kernel": False}, device="cuda").kwargs is None


def test_liger_loss_kernels_and_unknown_keys_are_refused_naming_each():
    with pytest.raises(ConfigError) as e:
        liger_choice({"liger_kernel_config": {"fused_linear_cross_entropy": True, "cross_entropy": True, "swigl": True,
                                              "rope": "yes"}}, device="cpu")
    text = str(e.value)
    assert "training.liger_kernel_config.fused_linear_cross_entropy: true is not supported: TRL's SFTTrainer" in text
    assert "training.liger_kernel_config.cross_entropy: true is not supported" in text
    assert "unknown key 'swigl'; allowed: rope, rms_norm, swiglu, geglu, layer_norm" in text
    assert "training.liger_kernel_config.rope: got 'yes'; expected true or false" in text
    # switching the loss kernels off explicitly is what sft_dist does anyway
    assert liger_choice({"liger_kernel_config": {"fused_linear_cross_entropy": False}}, device="cpu").kwargs is None


@pytest.fixture
def fake_liger(monkeypatch):
    """A stand-in for liger_kernel.transformers.monkey_patch that records the call sft_dist makes."""
    calls = []
    mod = types.ModuleType("liger_kernel.transformers.monkey_patch")
    mod.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": lambda rope=True, cross_entropy=False, fused_linear_cross_entropy=True,
                                        rms_norm=True, swiglu=True, model=None: None}  # Liger's signature
    mod._apply_liger_kernel_to_instance = lambda model, **kw: calls.append((model, kw))
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", mod)
    return calls


def tiny(model_type: str = "llama"):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=2, vocab_size=64)
    return AutoModelForCausalLM.from_config(config)


def test_apply_liger_patches_the_base_model_with_the_loss_kernels_off(liger_installed, fake_liger):
    from peft import LoraConfig, get_peft_model

    base = tiny()
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    choice = liger_choice({"liger_kernel_config": {"swiglu": False}}, device="cuda")
    line = apply_liger(model, choice)
    assert line == "kernels: Liger rope, rms_norm (llama, auto: CUDA, liger-kernel installed); loss: TRL's fused " \
                   "chunked LM head"  # what applies to a Llama: geglu and layer_norm are other architectures' kernels
    [(patched, kw)] = fake_liger
    assert patched is base  # not the peft wrapper: Liger looks up model_type and the decoder layers on it
    assert kw == {**LIGER_DEFAULTS, "swiglu": False, "cross_entropy": False, "fused_linear_cross_entropy": False}


def test_apply_liger_to_an_architecture_liger_does_not_know(liger_installed, fake_liger):
    model = tiny("qwen2")
    assert apply_liger(model, liger_choice({}, device="cuda")) == \
        "kernels: Liger off (auto: liger-kernel has no kernels for model_type 'qwen2')"
    with pytest.raises(ConfigError, match="liger-kernel has no kernels for model_type 'qwen2'; set it to false"):
        apply_liger(model, liger_choice({"use_liger_kernel": True}, device="cuda"))
    assert fake_liger == []


def test_torch_compile_passes_through_to_the_trainer_arguments(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # nothing deprecated on the way
        args = build_sft_config(cfg(tmp_path, "training.torch_compile=true"), device="cpu")
    assert args.torch_compile is True and args.use_liger_kernel is False
    assert torch.device(args.device).type == "cpu"


def test_one_worker_on_a_machine_with_several_gpus_trains_on_its_own(tmp_path, monkeypatch):
    """One worker, 4 visible GPUs, no process group: the Trainer's arguments count 4 GPUs (it would wrap the model in
    nn.DataParallel, which TRL's SFTTrainer refuses); sft_dist's worker keeps it on its own GPU."""
    from accelerate.state import AcceleratorState, PartialState

    from sft_dist.train.args import one_gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    try:
        args = build_sft_config(cfg(tmp_path, "training.bf16=false"), device="cuda")
        assert args.device == torch.device("cuda", 0) and args.n_gpu == 4  # what the Trainer would replicate over
        one_gpu(args)
        assert args.device == torch.device("cuda", 0) and args.n_gpu == 1
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
