"""flex_attention where auto would otherwise give eager on a GPU (model/flex.py): the probe's reference is the
models' own eager attention, the probe passes transformers' flex path on CPU (forward: torch has no flex backward
there) and catches a kernel that drops the soft-cap; auto's choice per device and config."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from sft_dist.model import flex, varlen
from sft_dist.model.attention import causal_lm_class, choose

SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16}
LENGTHS = (5, 9)


def _packed_mask(lengths) -> torch.Tensor:
    """The additive block-diagonal causal mask eager attention gets for one packed row."""
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    i = torch.arange(len(doc))
    keep = (i[:, None] >= i[None, :]) & (doc[:, None] == doc[None, :])
    return torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))[None, None]


def _qkv(head_dim=16, groups=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(LENGTHS)
    return (torch.randn(1, h, t, head_dim, generator=g) for h in (2 * groups, 2, 2))


def test_the_reference_is_gemma2s_eager_attention_with_its_soft_cap():
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    q, k, v = _qkv()
    module = torch.nn.Module()
    module.num_key_value_groups, module.head_dim, module.training = 2, 16, False
    want, _ = eager_attention_forward(module, q, k, v, _packed_mask(LENGTHS), scaling=16 ** -0.5, softcap=2.0)
    got = flex.reference(q, k, v, LENGTHS, softcap=2.0)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # the cap is really applied at this scale: without it the output moves
    assert (flex.reference(q, k, v, LENGTHS) - want).abs().max() > 1e-2


def test_the_reference_is_gpt_oss_eager_attention_with_its_sinks():
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    q, k, v = _qkv()
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = 2, False
    module.sinks = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    want, _ = eager_attention_forward(module, q, k, v, _packed_mask(LENGTHS), scaling=16 ** -0.5)
    got = flex.reference(q, k, v, LENGTHS, sinks=module.sinks.detach())
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (flex.reference(q, k, v, LENGTHS) - want).abs().max() > 1e-2


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile.*:UserWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_the_probe_passes_transformers_flex_path_on_cpu(eager_flex, dtype, softcap):
    assert flex.probe(torch.device("cpu"), dtype, 16, 2, softcap=softcap) is None
    assert flex.probe(torch.device("cpu"), dtype, 256, 4, softcap=softcap, shapes=((3, (3, 40, 17)),)) is None


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile.*:UserWarning")
def test_the_probe_runs_batches_of_two_shapes_in_turn(monkeypatch, eager_flex):
    """The second shape is what makes transformers' compiled flex compile again, for dynamic shapes (a run's
    batch of another shape): the probe goes through both, and names the one that failed."""
    import transformers.integrations.flex_attention as fx

    real, widths = fx.compile_friendly_flex_attention, []

    def spy(q, k, v, **kw):
        widths.append(tuple(q.shape[:3]))
        if len(widths) == 2:
            raise RuntimeError("recompile failed")
        return real(q, k, v, **kw)

    monkeypatch.setattr(fx, "compile_friendly_flex_attention", spy)
    why = flex.probe(torch.device("cpu"), torch.float32, 16, 2)
    assert widths == [(rows, 4, sum(x)) for rows, x in flex.SHAPES] == [(1, 4, 19), (2, 4, 31)]
    assert why == "flex attention failed: RuntimeError: recompile failed (2 x 31 tokens)"


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile.*:UserWarning")
def test_the_probe_catches_a_kernel_that_drops_the_soft_cap(monkeypatch, eager_flex):
    import transformers.integrations.flex_attention as fx

    real = fx.compile_friendly_flex_attention
    monkeypatch.setattr(fx, "compile_friendly_flex_attention",
                        lambda q, k, v, score_mod=None, **kw: real(q, k, v, **kw))
    why = flex.probe(torch.device("cpu"), torch.float32, 16, 2, softcap=2.0)
    assert why is not None and why.startswith("flex attention differs from the fp32 reference by ")
    assert flex.probe(torch.device("cpu"), torch.float32, 16, 2) is None  # nothing dropped without a cap


def test_the_probe_reports_a_failing_kernel():
    # transformers refuses sinks on a CPU: the failure becomes a reason, not an exception
    why = flex.probe(torch.device("cpu"), torch.float32, 16, 2, sinks=True)
    assert why.startswith("flex attention failed: ValueError: Attention sinks cannot be run on CPU")


def _gemma2(**extra):
    config = AutoConfig.for_model("gemma2", **SHAPE, **extra)
    return config, causal_lm_class(config)


def test_auto_on_a_gpu_plans_flex_for_gemma2_and_keeps_eager_where_flex_cannot_run():
    config, cls = _gemma2()
    assert varlen.traits(config) == (50.0, False, 0.0)
    assert varlen.traits(AutoConfig.for_model("gpt_oss")) == (None, True, 0.0)
    # the planner (no probe): flex on CUDA, the memory of a fused kernel
    c = choose("auto", cls, model_type="gemma2", device="cuda", dtype=torch.bfloat16, config=config, probe=False)
    assert c.name == "flex_attention" and c.reason.startswith("auto: Gemma2ForCausalLM has no sdpa; no flash "
                                                               "attention: flash-attn is not installed")
    # a run probes first: with no GPU visible it keeps eager and says why
    if not torch.cuda.is_available():
        c = choose("auto", cls, model_type="gemma2", device="cuda", dtype=torch.bfloat16, config=config)
        assert c.name == "eager"
        assert c.reason.endswith("no flex_attention: no CUDA device visible here to check torch's flex attention "
                                 "on)")
    # attention dropout: flex has none
    config, cls = _gemma2(attention_dropout=0.1)
    c = choose("auto", cls, model_type="gemma2", device="cuda", dtype=torch.bfloat16, config=config, probe=False)
    assert c.name == "eager"
    assert "no flex_attention: attention_dropout is 0.1 (flex attention has no dropout)" in c.reason
    # on a CPU nothing changes: eager (torch has no flex backward there)
    config, cls = _gemma2()
    assert choose("auto", cls, model_type="gemma2", device="cpu", dtype=torch.float32, config=config).name == "eager"
    # a class with sdpa keeps it
    llama = AutoConfig.for_model("llama", **SHAPE)
    assert choose("auto", causal_lm_class(llama), model_type="llama", device="cuda", dtype=torch.bfloat16,
                  config=llama, probe=False).name != "flex_attention"


def test_the_probe_resets_compiled_state_and_is_asked_once_per_layout(monkeypatch):
    calls, resets = [], []
    monkeypatch.setattr(flex, "probe", lambda *a, **k: calls.append((a, k)) or None)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    flex.kernel_problem.cache_clear()
    try:
        for _ in range(3):
            assert flex.kernel_problem(0, torch.bfloat16, 256, 2, 50.0, False) is None
        assert len(calls) == 1 and len(resets) == 1
        assert calls[0][1] == {"softcap": 50.0, "sinks": False} and calls[0][0][1:] == (torch.bfloat16, 256, 2)
    finally:
        flex.kernel_problem.cache_clear()


def test_the_plan_counts_flex_for_gemma2_on_a_gpu_and_less_than_eager():
    from sft_dist.plan.memory import estimate_memory
    from sft_dist.validate import load_config
    from tests.conftest import QUICKSTART

    base = ["data.packing=true", "launcher.num_workers=1", "model.init_config.model_type=gemma2",
            "data.max_length=1024"]
    auto = estimate_memory(load_config(QUICKSTART, base), world_size=1, device="cuda")
    eager = estimate_memory(load_config(QUICKSTART, [*base, "model.attn_implementation=eager"]), world_size=1,
                            device="cuda")
    assert (auto.detail["attention"], eager.detail["attention"]) == ("flex", "eager")
    assert any("attention flex attention (fused, a block mask)" in n for n in auto.notes)
    # eager keeps at least two (tokens x tokens) tensors per row, head and layer (2 layers, 8 rows, 4 heads)
    assert eager.activations - auto.activations > 2 * 8 * 4 * 1024 ** 2 * 2 * 2
