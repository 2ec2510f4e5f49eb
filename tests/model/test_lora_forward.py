"""peft's LoRA Linear forward with fewer elementwise passes where the step computes in 16 bit
(sft_dist/model/lora_forward.py): the input cast skipped under autocast (bitwise the same numbers), the scaled add
fused into one addmm (one rounding instead of three), and peft's own forward everywhere else."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import sft_dist.model.lora_forward as lora_forward
from sft_dist.config.schema import LoraConfig
from sft_dist.model.lora import apply_lora

LLAMA = dict(model_type="llama", hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)
TOKENS = 2 * 64


def lora_llama(*, fast: tuple[str, ...], dtype=torch.bfloat16, dropout: float = 0.0, dora: bool = False,
               monkeypatch: pytest.MonkeyPatch):
    """A Llama in `dtype` with an fp32 LoRA (lora_B non-zero, so the adapter changes the numbers), with the
    forward overrides named in `fast` ("skip", "fuse") and without the others."""
    with monkeypatch.context() as m:
        if "skip" not in fast:
            m.setattr(lora_forward, "skip_input_casts", lambda model: 0)
        if "fuse" not in fast:
            m.setattr(lora_forward, "fuse_scaled_add", lambda model: 0)
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**LLAMA), dtype=dtype)
        model = apply_lora(base, LoraConfig(r=8, alpha=16, dropout=dropout, use_dora=dora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return model.train()


def step(model, *, autocast: bool = True):
    """Loss, trained gradients and the bytes of what autograd saved for backward (beyond the weights)."""
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(1))
    saved = []  # held until counted, so no storage address is reused meanwhile

    def pack(t):
        saved.append(t)
        return t

    torch.manual_seed(2)  # the dropout masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, sum(b for ptr, b in storages.items() if ptr not in weights)


def same(a, b) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][n], b[1][n]) for n in a[1])


def test_under_autocast_the_adapter_reads_its_16_bit_input_for_the_same_numbers(monkeypatch):
    """peft casts each adapted layer's bf16 input to the adapter's fp32 and autocast casts it back to bf16: the
    same operands, so skipping the round trip gives bitwise the same loss and gradients, and autograd no longer
    keeps a bf16 copy of the input per adapted layer: 4 x hidden per token and layer here (q, k, v share one)."""
    peft = step(lora_llama(fast=(), monkeypatch=monkeypatch))
    skip = step(lora_llama(fast=("skip",), monkeypatch=monkeypatch))
    assert same(skip, peft) and len(skip[1]) == 2 * 7 * LLAMA["num_hidden_layers"]  # A and B of 7 layers each
    assert peft[2] - skip[2] == 4 * LLAMA["hidden_size"] * TOKENS * 2 * LLAMA["num_hidden_layers"]


@pytest.mark.parametrize("setting", [{"dropout": 0.1}, {"dora": True}], ids=["dropout", "dora"])
def test_the_cast_stays_before_a_live_dropout_for_dora_and_outside_autocast(setting, monkeypatch):
    """A live dropout scales its input: on the fp32 copy, as peft does; DoRA's weight norm computes in the input's
    dtype (fp32 with peft's cast). Both keep peft's numbers and bytes. Without autocast the fp32 adapter needs
    the fp32 input (generation, export)."""
    peft = step(lora_llama(fast=(), monkeypatch=monkeypatch, **setting))
    skip = step(lora_llama(fast=("skip",), monkeypatch=monkeypatch, **setting))
    assert same(skip, peft) and skip[2] == peft[2]
    model = lora_llama(fast=("skip", "fuse"), monkeypatch=monkeypatch).eval()
    with torch.no_grad():
        ids = torch.tensor([[1, 5, 9, 12]])
        logits = model(input_ids=ids).logits  # no autocast: the adapter's fp32 matmul needs the cast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(input_ids=ids).logits.shape == logits.shape


def layer_outputs(layer, x, *, autocast: bool):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return layer(x)


def test_the_fused_scaled_add_rounds_once_and_trains_the_same_adapter(monkeypatch):
    """One addmm for `result + lora_B(h) * scaling`: in bf16 it rounds once where peft rounds three times, so each
    layer's output is at least as close to the fp32 maths as peft's, and a step's loss and gradients agree within
    bf16 noise."""
    peft = lora_llama(fast=("skip",), monkeypatch=monkeypatch)
    fused = lora_llama(fast=("skip", "fuse"), monkeypatch=monkeypatch)
    layer, ref_layer = fused.base_model.model.model.layers[0].mlp.up_proj, peft.base_model.model.model.layers[0].mlp.up_proj
    x = torch.randn(TOKENS, LLAMA["hidden_size"], generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    exact = ref_layer.base_layer.weight.float()
    a, b = ref_layer.lora_A["default"].weight, ref_layer.lora_B["default"].weight
    # the fp32 maths on the bf16 operands autocast gives both
    want = x.float() @ exact.T + (x.float() @ a.bfloat16().float().T).bfloat16().float() @ b.bfloat16().float().T * 2.0
    got, ref = layer_outputs(layer, x, autocast=True), layer_outputs(ref_layer, x, autocast=True)
    assert got.dtype == ref.dtype == torch.bfloat16 and not torch.equal(got, ref)
    assert (got.float() - want).abs().mean() < (ref.float() - want).abs().mean()
    f, p = step(fused), step(peft)
    assert f[0] == pytest.approx(p[0], abs=2e-3)
    gaps = {n: float((f[1][n] - p[1][n]).norm() / p[1][n].norm()) for n in p[1]}
    print(f"largest relative gradient difference: {max(gaps.values()):.4f}")
    assert max(gaps.values()) < 0.02, gaps


def test_fp32_runs_and_16_bit_weights_without_autocast(monkeypatch):
    """fp32 without autocast (the CPU default): peft's forward, bitwise. bf16 weights and adapter without autocast
    (FSDP2's and DeepSpeed's cast): the fused add, the same maths as autocast's."""
    fp32 = lambda fast: step(lora_llama(fast=fast, dtype=torch.float32, monkeypatch=monkeypatch), autocast=False)
    assert same(fp32(("skip", "fuse")), fp32(()))
    layer = lora_llama(fast=("skip", "fuse"), monkeypatch=monkeypatch).base_model.model.model.layers[0].mlp.up_proj
    x = torch.randn(4, LLAMA["hidden_size"], generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    auto = layer_outputs(layer, x, autocast=True)
    layer.to(torch.bfloat16)
    assert torch.equal(layer_outputs(layer, x, autocast=False), auto)


def test_peft_forward_where_lora_b_is_only_whole_inside_its_call(monkeypatch):
    """ZeRO-3 gathers a partitioned weight (`ds_id`) in its module's hooks, FSDP2 an own-unit module's DTensor: the
    fused add would read them without calling lora_B, so peft's forward runs; so it does for a merged adapter."""
    layer = lora_llama(fast=("skip", "fuse"), monkeypatch=monkeypatch).base_model.model.model.layers[0].mlp.up_proj
    x = torch.randn(4, LLAMA["hidden_size"], generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    assert lora_forward._fusable(layer, x, (), {}) is None  # no autocast, fp32 adapter on a bf16 input
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lora_forward._fusable(layer, x, (), {}) == "default"
        layer.lora_B["default"].weight.ds_id = 7
        assert lora_forward._fusable(layer, x, (), {}) is None
        del layer.lora_B["default"].weight.ds_id
        layer.merge()
        assert lora_forward._fusable(layer, x, (), {}) is None


def test_lora_fused_forward_false_keeps_peft_forward():
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**LLAMA), dtype=torch.bfloat16)
    model = apply_lora(base, LoraConfig(r=8, alpha=16, dropout=0.0, fused_forward=False))
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    assert "forward" not in vars(layer) and "_cast_input_dtype" not in vars(layer)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**LLAMA), dtype=torch.bfloat16)
    layer = apply_lora(base, LoraConfig(r=8, alpha=16, dropout=0.0)).base_model.model.model.layers[0].mlp.up_proj
    assert "forward" in vars(layer) and "_cast_input_dtype" in vars(layer)


def qlora_pair(tmp_path, monkeypatch):
    """The same 4-bit QLoRA Llama twice (bf16 compute, lora_B non-zero): with sft_dist's forward, and with peft's."""
    from tests.conftest import load_quantized

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**LLAMA)).to(torch.bfloat16).save_pretrained(tmp_path)

    def qlora(fast: bool):
        with monkeypatch.context() as m:
            if not fast:
                m.setattr(lora_forward, "speed_up", lambda model: 0)
            base = load_quantized(tmp_path, dtype=torch.bfloat16, compute_dtype=torch.bfloat16)
            torch.manual_seed(4)  # lora_A's init
            model = apply_lora(base, LoraConfig(r=8, alpha=16, dropout=0.0), quantized=True)
        with torch.no_grad():
            torch.manual_seed(5)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.02)
        return model.train()

    return qlora(True), qlora(False)


def test_a_4bit_qlora_layer_fuses_its_scaled_add_too(tmp_path, monkeypatch):
    """peft's bitsandbytes 4-bit LoRA layers (QLoRA): under autocast the fused add replaces peft's clone, product
    and sum; the adapter's loss and gradients agree with peft's within bf16 noise. Without autocast (a bf16 base
    with the fp32 adapter) peft's forward runs."""
    fused, peft = qlora_pair(tmp_path, monkeypatch)
    layer = fused.base_model.model.model.layers[0].mlp.up_proj
    assert type(layer).__name__ == "Linear4bit" and "forward" in vars(layer)
    x = torch.randn(4, LLAMA["hidden_size"], generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    assert lora_forward._fusable(layer, x, (), {}) is None  # no autocast: peft's forward
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lora_forward._fusable(layer, x, (), {}) == "default"
    f, p = step(fused), step(peft)
    assert f[0] == pytest.approx(p[0], abs=2e-3) and f[1].keys() == p[1].keys() and len(f[1]) == 28
    gaps = {n: float((f[1][n] - p[1][n]).norm() / p[1][n].norm()) for n in p[1]}
    assert max(gaps.values()) < 0.03, gaps


def test_an_fp32_base_output_under_autocast_stays_fp32_as_peft_keeps_it(tmp_path, monkeypatch):
    """A 4-bit layer reading fp32 hidden states (norms and embeddings upcast, the default for an fp16 base) returns
    fp32 under autocast. addmm would round it to 16 bits there (fp16 could overflow); the layer adds the adapter's
    product to the fp32 output instead, as peft does: bitwise peft's output."""
    fused, peft = qlora_pair(tmp_path, monkeypatch)
    f_layer, p_layer = (m.base_model.model.model.layers[0].mlp.down_proj for m in (fused, peft))
    x = torch.randn(4, LLAMA["intermediate_size"], generator=torch.Generator().manual_seed(3)) * 50
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert lora_forward._fusable(f_layer, x, (), {}) == "default"
        got, want = f_layer(x), p_layer(x)
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want)
    assert not torch.equal(want, want.to(torch.bfloat16).float())  # what a 16-bit add would have rounded
