"""The memory estimate against real models built on CPU, and its sharding / checkpointing / optimizer rules."""

from __future__ import annotations

import json

import pytest
import torch

from sft_dist.config.load import load_config
from sft_dist.model.build import build_model, quantize_in_memory, resolve_dtype
from sft_dist.model.lora import apply_lora
from sft_dist.model.tokenizer import build_tokenizer
from sft_dist.plan.memory import estimate_memory
from sft_dist.sizes import format_bytes
from tests.conftest import QUICKSTART, backend

# Big enough that every LoRA / linear tensor passes bitsandbytes' 4096-element minimum for 8-bit optimizer state.
WIDE = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256}


def config(*overrides: str):
    return load_config(QUICKSTART, list(overrides))


def real_model(cfg):
    """The model the run would train (LoRA applied; a random base quantized from memory, as the run does)."""
    tok = build_tokenizer(cfg.model)
    dtype = resolve_dtype(cfg.model.dtype, device="cpu", lora=cfg.lora.enabled)
    model = build_model(cfg.model, quant=cfg.quantization, tokenizer=tok, dtype=dtype, seed=0, device="cpu")
    if cfg.quantization.bits is not None:
        model, _ = quantize_in_memory(model, quant=cfg.quantization, dtype=dtype, device="cpu")
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, quantized=cfg.quantization.bits is not None,
                           upcast=cfg.quantization.upcasts(str(dtype).removeprefix("torch.")))
    return model


def held_bytes(model) -> int:
    """Parameters + buffers + bitsandbytes quantization state, as held in memory."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            parts = [qs.absmax, getattr(qs, "offset", None)]
            if getattr(qs, "state2", None) is not None:
                parts += [qs.state2.absmax, qs.state2.code]
            total += sum(t.numel() * t.element_size() for t in parts if torch.is_tensor(t))
    return total


def test_counts_match_the_real_lora_model():
    cfg = config()
    model = real_model(cfg)
    e = estimate_memory(cfg, world_size=1, device="cpu")
    assert e.detail["total_params"] == sum(p.numel() for p in model.parameters())
    assert e.detail["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert e.weights == held_bytes(model)
    assert e.lora == sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert e.gradients == e.lora
    assert e.optimizer == 2 * e.lora  # adamw: exp_avg and exp_avg_sq, fp32


def test_counts_match_the_real_4bit_model():
    cfg = config("quantization.bits=4", "lora.modules_to_save=null")
    model = real_model(cfg)
    e = estimate_memory(cfg, world_size=1, device="cpu")
    from bitsandbytes.nn import Linear4bit

    layers = [m for m in model.modules() if type(m) is Linear4bit]  # not peft's LoRA wrapper of the same name
    assert layers
    assert e.detail["quantized_params"] == sum(m.in_features * m.out_features for m in layers)
    assert e.detail["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert e.weights == pytest.approx(held_bytes(model), rel=0.02)
    # the LM head and embeddings stay fp32: the 4-bit model is far from 1/8 of the fp32 one
    assert e.detail["param_bytes"] == sum(p.numel() * p.element_size() for p in model.parameters())


def test_local_directory_gives_the_same_counts(tmp_path):
    cfg = config()
    tok = build_tokenizer(cfg.model)
    build_model(cfg.model, quant=cfg.quantization, tokenizer=tok, dtype=torch.float32, seed=0,
                device="cpu").save_pretrained(tmp_path)
    from_dir = estimate_memory(config("model.init_config=null", f"model.name_or_path={tmp_path}"),
                               world_size=1, device="cpu")
    from_init = estimate_memory(cfg, world_size=1, device="cpu")
    assert from_dir.detail["total_params"] == from_init.detail["total_params"]
    assert from_dir.weights == from_init.weights


@pytest.fixture(scope="module")
def full_ft():
    """Full fine-tuning estimates of one model under each backend, 4 workers."""
    base = ["lora.enabled=false", "lora.modules_to_save=null"]
    names = {"ddp": "ddp", "zero1": "zero1", "zero2": "zero2", "zero3": "zero3", "fsdp": "full_shard"}
    return {k: estimate_memory(config(*base, *backend(v)), world_size=4, device="cpu") for k, v in names.items()}


def test_sharding_divides_what_each_backend_shards(full_ft):
    ddp = full_ft["ddp"]
    params = ddp.detail["trainable_params"]
    master = -(-params * 4 // 4)  # DeepSpeed's fp32 copy of its trainable partition
    z1, z2, z3, fsdp = (full_ft[k] for k in ("zero1", "zero2", "zero3", "fsdp"))
    assert (z1.weights, z1.gradients) == (ddp.weights, ddp.gradients)
    assert z1.optimizer == -(-ddp.optimizer // 4) + master
    assert z2.weights == ddp.weights
    assert z2.gradients == -(-ddp.gradients // 4)
    assert z2.optimizer == z1.optimizer
    assert z3.weights == -(-ddp.weights // 4)
    assert (z3.gradients, z3.optimizer) == (z2.gradients, z2.optimizer)
    assert fsdp.weights == z3.weights and fsdp.gradients == z3.gradients
    assert fsdp.optimizer == -(-ddp.optimizer // 4)  # no master copy: FSDP2 steps the fp32 shards themselves
    assert ddp.total > z1.total > z2.total
    held = {k: e.weights + e.gradients + e.optimizer for k, e in full_ft.items()}
    assert held["zero3"] < held["zero2"]  # (z3's total adds a gathered layer, which a tiny model can outweigh)


def test_activation_checkpointing_lowers_activations():
    over = [f"model.init_config={json.dumps(WIDE)}", "training.per_device_train_batch_size=4"]
    plain = estimate_memory(config(*over), world_size=1, device="cpu")
    ckpt = estimate_memory(config(*over, "training.activation_checkpointing=true"), world_size=1, device="cpu")
    assert ckpt.activations < plain.activations / 2
    assert ckpt.total < plain.total
    assert ckpt.weights == plain.weights


def test_8bit_optimizer_holds_a_quarter_of_adamw():
    over = [f"model.init_config={json.dumps(WIDE)}", "lora.enabled=false", "lora.modules_to_save=null"]
    adamw = estimate_memory(config(*over), world_size=1, device="cpu")
    bnb8 = estimate_memory(config(*over, "training.optim=adamw_bnb_8bit"), world_size=1, device="cpu")
    assert adamw.optimizer == 8 * adamw.detail["trainable_params"]
    assert 3.5 < adamw.optimizer / bnb8.optimizer <= 4.0


def test_activations_scale_with_the_micro_batch():
    one = estimate_memory(config("training.per_device_train_batch_size=1"), world_size=1, device="cpu")
    four = estimate_memory(config("training.per_device_train_batch_size=4"), world_size=1, device="cpu")
    assert four.activations == pytest.approx(4 * one.activations, rel=0.1)
    assert four.weights == one.weights


# --- the GPU estimate against a GPU run ----------------------------------------------------------------------

GiB = 2**30
# Measured on one H200 (FIELD-NOTES, 2026-12-04): a 1.51B Llama shape, bf16 base, LoRA r=16 (alpha 32, no dropout)
# on every linear layer, sdpa with the packed rows' block mask, 8 packed rows x 2048 tokens per micro-batch, 1 GPU,
# sft_dist's default of no activation checkpointing. Peak = torch.cuda.max_memory_allocated over the run.
H200_SHAPE = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
              "max_position_embeddings": 131072, "tie_word_embeddings": False}
H200_REFERENCE = [f"model.init_config={json.dumps(H200_SHAPE)}", "model.attn_implementation=sdpa", "lora.r=16",
                  "lora.alpha=32", "lora.dropout=0.0", "lora.modules_to_save=null", "data.packing=true",
                  "data.max_length=2048", "training.per_device_train_batch_size=8", "launcher.num_workers=1"]
H200_PEAK_GIB, H200_LIGER_PEAK_GIB = 35.2, 29.1  # the second with training.use_liger_kernel=true


@pytest.mark.parametrize("liger, measured", [(False, H200_PEAK_GIB), (True, H200_LIGER_PEAK_GIB)],
                         ids=["sdpa", "liger"])
def test_gpu_estimate_is_within_15_percent_of_the_h200_run(liger, measured):
    """Planned from this CPU-only host for `--device cuda`: what the run on the H200 allocated at its peak.
    The parts: the bf16 base (2.83 GiB, not fp32), the fp32 adapter with its gradients and AdamW state, and the
    activations as the GPU run keeps them (autocast saves 16-bit copies of the adapter's fp32 inputs; the packed
    block mask becomes an additive bias per layer; TRL's Triton loss kernels fold logits tiles in place). That
    run's LoRA layers ran peft's own forward (the input cast to fp32, the scaled add unfused): planned as it ran."""
    cfg = config(*H200_REFERENCE, f"training.use_liger_kernel={str(liger).lower()}")
    now = estimate_memory(cfg, world_size=1, device="cuda")
    e = estimate_memory(config(*H200_REFERENCE, f"training.use_liger_kernel={str(liger).lower()}",
                               "lora.fused_forward=false"), world_size=1, device="cuda")  # peft's own forward
    # what skipping the round trip saves: one bf16 copy of 4 x hidden per token and layer
    assert e.activations - now.activations == 4 * 2048 * 2 * 8 * 2048 * 16
    assert e.detail["load_dtype"] == "bfloat16" and e.detail["mixed_precision"] == "autocast"
    assert e.detail["frozen_params"] == 1_498_482_688 and e.detail["trainable_params"] == 11_272_192
    assert e.weights == pytest.approx(2.83 * GiB, rel=0.01)
    peak = e.detail["peak"] / GiB
    print(f"H200 reference ({'liger' if liger else 'sdpa'}): estimate {peak:.2f} GiB, measured {measured} GiB "
          f"({peak / measured - 1:+.1%}); activations {e.activations / GiB:.2f} GiB; with today's LoRA forward "
          f"{now.detail['peak'] / GiB:.2f} GiB")
    assert abs(peak / measured - 1) <= 0.15


def test_an_evaluation_is_planned_as_one_forward_under_no_grad(capsys):
    """training.do_train=false: the weights and one forward of per_device_eval_batch_size rows, nothing else. On a
    GPU the LoRA layers' casts under autocast are cached per weight; the forward under no_grad made short-lived
    views of weights that look like weights to that cache (a stale hit broke the estimate: fixed)."""
    over = [*H200_REFERENCE, "data.eval_files=builtin:data/alpaca_demo_eval.jsonl",
            "training.per_device_eval_batch_size=8"]
    train = estimate_memory(config(*over), world_size=1, device="cuda")
    evaluate = estimate_memory(config(*over, "training.do_train=false"), world_size=1, device="cuda")
    assert (evaluate.gradients, evaluate.optimizer, evaluate.activations) == (0, 0, 0)
    assert evaluate.weights == train.weights and evaluate.detail["evaluation"] is True
    assert train.weights < evaluate.total < train.total / 4  # 4.1 against 32.9 GB
    assert evaluate.detail["forward_peak"] < train.detail["forward_peak"]  # nothing saved for backward
    assert not evaluate.hints
    from sft_dist.cli import main

    assert main(["plan", str(QUICKSTART), "training.do_train=false"]) == 0
    out = capsys.readouterr().out
    assert "(evaluation peak)" in out and "(none kept: evaluation)" in out


def test_weights_are_counted_in_the_dtype_the_setup_names(capsys):
    """model.dtype auto planned for cuda on a host without a GPU: the setup line said bfloat16 while the weights
    were counted in fp32 (the estimate asked this host's torch whether it has bf16)."""
    from sft_dist.cli import main

    rc = main(["plan", str(QUICKSTART), "--device", "cuda", "--json", "lora.modules_to_save=null",
               f"model.init_config={json.dumps(WIDE)}"])
    plan = json.loads(capsys.readouterr().out)
    d = plan["memory_per_rank"]["detail"]
    assert rc == 0 and plan["setup"]["model_dtype"] == d["load_dtype"] == "bfloat16"
    assert plan["setup"]["precision"] == "bf16" and d["compute_dtype"] == "bfloat16"
    frozen_bytes = d["param_bytes"] - 4 * d["trainable_params"]  # the adapter stays fp32
    assert frozen_bytes == 2 * d["frozen_params"]


def test_plan_takes_overrides_before_and_after_options(capsys):
    """argparse ended the overrides at the first option: `plan CONFIG --device cuda training.x=1` was refused."""
    from sft_dist.cli import main

    rc = main(["plan", str(QUICKSTART), "--json", "training.per_device_train_batch_size=2", "--world-size", "3",
               "lora.r=4", "--device", "cpu"])
    plan = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert (plan["geometry"]["micro_batch"], plan["geometry"]["world_size"]) == (2, 3)
    assert plan["config_diff"]["lora.r"] == {"value": 4, "default": 8}


def test_plan_labels_binary_units():
    from sft_dist.plan import make_plan
    from sft_dist.plan.report import render

    text = render(make_plan(config()))
    assert "MiB" in text or "GiB" in text
    assert not any(f" {unit}" in text for unit in ("KB", "MB", "GB", "TB"))


def test_hint_when_activations_dominate():
    """Planned for a GPU (on CPU, TRL's loss tiles are a fixed few hundred MB that a small model's activations do
    not outweigh)."""
    shape = {**WIDE, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
             "num_key_value_heads": 8, "max_position_embeddings": 1024}
    over = [f"model.init_config={json.dumps(shape)}", "lora.modules_to_save=null",
            "training.per_device_train_batch_size=8", "data.max_length=512"]
    e = estimate_memory(config(*over), world_size=1, device="cuda")
    assert e.activations > 0.5 * e.total
    assert e.hints[0].startswith(f"activations are {e.activations / e.total:.0%} of the estimated peak")
    said = " ".join(e.hints)
    assert "training.activation_checkpointing: true" in said
    assert "training.per_device_train_batch_size: 4 with gradient_accumulation_steps: 2" in said
    assert "data.packing: true" in said and "pip install liger-kernel" in said
    # what the hint offers does what it says: checkpointing keeps little more than the layer inputs
    ckpt = estimate_memory(config(*over, "training.activation_checkpointing=true"), world_size=1, device="cuda")
    assert ckpt.activations < e.activations / 4
    # with every switch on there is nothing left to offer
    done = estimate_memory(config(*over, "training.activation_checkpointing=true", "data.packing=true",
                                  "training.per_device_train_batch_size=1", "training.use_liger_kernel=true"),
                           world_size=1, device="cuda")
    assert done.hints == []


@pytest.mark.parametrize("run", ["ddp_lora", "ddp_lora_ckpt", "fsdp_full", "zero3_qlora4"])
def test_cpu_estimate_still_agrees_with_the_measured_bench_runs(run, tmp_path):
    """The GPU calibration leaves the CPU path alone: bench/plan_memory.py's setups, re-predicted now, against the
    RSS growth those runs measured (bench/results/plan_memory.json), as the README states them: at most 4% over,
    and under by no more than the memory that is not a tensor (building the Trainer alone: ~80 MiB)."""
    import sys

    from tests.conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import plan_memory
    finally:
        sys.path.remove(str(ROOT / "bench"))
    rows = {r["run"]: r for r in json.loads((ROOT / "bench/results/plan_memory.json").read_text())["runs"]}
    plan_memory.long_texts(tmp_path)
    predicted = plan_memory.predict(plan_memory.overrides(run, tmp_path, 3))
    measured = rows[run]["measured"]
    assert predicted["peak"] <= 1.04 * measured["rss_delta"]
    assert measured["rss_delta"] - predicted["peak"] <= 160 * 2**20
    assert predicted["params"] == measured["params"] and predicted["gradients"] == measured["gradients"]


def test_the_lora_dropout_hint_names_what_the_masks_cost(monkeypatch):
    """LoRA dropout keeps a 1-byte mask over every adapted layer's input (GPU plan), and under autocast keeps peft's
    fp32 round trip of that input (model/lora_forward.py skips it only for an inert dropout): the profile's difference
    between dropout 0.05 and 0 is the hint's mask figure plus what that skip saves. Offered only while dropout
    is on."""
    shape = {**H200_SHAPE, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 4,
             "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000}
    common = [*H200_REFERENCE, f"model.init_config={json.dumps(shape)}"]
    on, off = (estimate_memory(config(*common, f"lora.dropout={p}"), world_size=1, device="cuda") for p in (0.05, 0))
    hint = next(h for h in on.hints if h.startswith("lora.dropout: 0"))
    masks = 4 * (6 * 512 + 2048) * 8 * 2048  # layers x inputs of q,k,v,o,gate,up (512) and down (2048) x tokens
    assert f"(about {format_bytes(masks)})" in hint and "under autocast" in hint
    monkeypatch.setattr("sft_dist.model.lora_forward.skip_input_casts", lambda model: 0)
    cast = estimate_memory(config(*common, "lora.dropout=0"), world_size=1, device="cuda")
    skipped = cast.activations - off.activations
    assert skipped == 4 * 512 * 2 * 8 * 2048 * 4  # a 16-bit copy of 4 x hidden per token and layer
    assert on.activations - off.activations == pytest.approx(masks + skipped, rel=0.1)  # 0.96 of it here
    assert not any(h.startswith("lora.dropout") for h in off.hints)


def test_a_quantized_random_base_is_counted_once_at_load():
    """init_config + 4-bit on a GPU: the bf16 base is initialised on the GPU one decoder layer at a time into host
    memory (model/layerwise.py), then quantized onto the GPU (model/build.py: quantize_in_memory), so the load peak
    is the larger of the embeddings, head and one layer in bf16 and the quantized model, never the bf16 base."""
    shape = {**H200_SHAPE, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 8,
             "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 8000}
    e = estimate_memory(config(*H200_REFERENCE, f"model.init_config={json.dumps(shape)}", "quantization.bits=4"),
                        world_size=1, device="cuda")
    layer = 2 * 1024 * 1024 + 2 * 1024 * 256 + 3 * 1024 * 4096 + 2 * 1024  # q,o; k,v (2 of 8 heads); MLP; norms
    outside = 2 * 8000 * 1024 + 1024  # embeddings, head, final norm
    quantized = e.detail["param_bytes"] + e.detail["quant_state_bytes"] + e.detail["buffer_bytes"]
    assert e.detail["load_peak"] == max((outside + layer) * 2, quantized + 1024 * 4096 * 2)
    base = outside + 8 * layer
    assert e.detail["load_peak"] < base * 2 / 2
    host = f"in host memory on every rank ({format_bytes(base * 2)} per rank there"
    assert any(host in n and "one decoder layer at a time) and quantized" in n for n in e.notes), e.notes


@pytest.mark.parametrize("backend, where", [
    ([], "device"),  # DDP: built whole on the GPU, where it trains
    (["backend.type=fsdp", "backend.config=configs/fsdp/full_shard.yaml", "launcher.num_workers=2"], "send"),
    (["backend.type=deepspeed", "backend.config=configs/deepspeed/zero3.json", "launcher.num_workers=2"],
     "partitioned"),
])
@pytest.mark.parametrize("save", [True, False])
def test_where_a_random_base_is_built_on_gpus_is_what_its_load_peak_counts(backend, where, save):
    """init_config on GPUs: DDP trains it whole on the GPU, where it is built; FSDP2 shards the model from host
    memory, so the base is initialised there a decoder layer at a time (the GPU holds one), on rank 0 alone, which
    sends the other ranks their shards; ZeRO-3 builds it under zero.Init (the rank's partition, plus the module being
    initialised, gathered whole: a decoder layer at most here), and rank 0 gathers a host copy to write base_model."""
    shape = {**H200_SHAPE, "num_hidden_layers": 4, "vocab_size": 8000}
    cfg = config(*H200_REFERENCE, f"model.init_config={json.dumps(shape)}", f"model.save_init_base={str(save).lower()}",
                 *backend)
    e = estimate_memory(cfg, world_size=cfg.launcher.num_workers, device="cuda")
    layer = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048  # q,o k,v, MLP, norms: no LoRA yet
    outside = 2 * 8000 * 2048 + 2048
    whole = 2 * (outside + 4 * layer)
    assert e.detail["load_peak"] == {"device": whole, "send": 2 * (outside + layer),
                                     "partitioned": whole // 2 + 2 * layer}[where]
    on_host = where == "send" or where == "partitioned" and save  # rank 0's host copy
    assert e.detail["host_load_peak"] == (whole if on_host else 0)
    sent = (f"in host memory on rank 0 ({format_bytes(whole)} there, initialised on the GPU one "
            "decoder layer at a time) and sent from there to every rank's shards by fsdp2 full_shard (the other ranks "
            "build none)")
    assert any(sent in n for n in e.notes) == (where == "send"), e.notes
    partitioned = "init_config: the random base is built under deepspeed.zero.Init, each rank holding its partition"
    assert any(n.startswith(partitioned) for n in e.notes) == (where == "partitioned"), e.notes
    gathered = any(f"rank 0 gathers a host copy ({format_bytes(whole)}) to write base_model" in n for n in e.notes)
    assert gathered == (where == "partitioned" and save)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("bf16", [True, False])
def test_a_zero3_partitioned_base_is_counted_in_the_dtype_deepspeed_trains_in(device, bf16):
    """deepspeed.zero.Init makes the parameters it partitions in the engine's dtype: an fp32 model under bf16
    ZeRO-3 (full fine-tuning's dtype on a GPU) is built, held and gathered for base_model in bf16, half of what
    its fp32 dtype would say; fp32 training keeps fp32."""
    shape = {**H200_SHAPE, "num_hidden_layers": 2, "vocab_size": 8000}
    cfg = config(*H200_REFERENCE, f"model.init_config={json.dumps(shape)}", "model.dtype=float32",
                 f"training.bf16={str(bf16).lower()}", "model.save_init_base=true", "backend.type=deepspeed",
                 "backend.config=configs/deepspeed/zero3.json", "launcher.num_workers=2")
    e = estimate_memory(cfg, world_size=2, device=device)
    size = 2 if bf16 else 4
    layer = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048
    base = 2 * 8000 * 2048 + 2048 + 2 * layer
    partition = size * base // 2 + size * layer
    assert e.detail["load_dtype"] == "float32"
    assert e.detail["load_peak"] == (partition if device == "cuda" else partition + size * base)
    assert e.detail["host_load_peak"] == size * base
    assert any(f"rank 0 gathers a host copy ({format_bytes(size * base)})" in n for n in e.notes), e.notes
    assert any(("deepspeed.zero.Init in bfloat16," in n) == bf16 for n in e.notes if "zero.Init" in n), e.notes


@pytest.mark.parametrize("upcast", ["null", "true"])
def test_counts_match_the_real_bf16_4bit_model_with_and_without_the_upcast(upcast):
    """A bfloat16 QLoRA base keeps its unquantized weights in bfloat16 unless quantization.upcast_unquantized asks
    for peft's fp32 copies; either way the trained head copy is an fp32 master, and the plan counts what is held."""
    cfg = config("quantization.bits=4", "model.dtype=bfloat16", f"quantization.upcast_unquantized={upcast}")
    model = real_model(cfg)
    e = estimate_memory(cfg, world_size=1, device="cpu")
    assert e.detail["param_bytes"] == sum(p.numel() * p.element_size() for p in model.parameters())
    assert e.lora == sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    frozen = {n.rsplit(".", 2)[-2]: p.dtype for n, p in model.named_parameters()
              if not p.requires_grad and p.dtype.is_floating_point}
    want = torch.float32 if upcast == "true" else torch.bfloat16
    assert frozen["embed_tokens"] == frozen["norm"] == frozen["input_layernorm"] == want
    if upcast == "null":  # the bytes the upcast would add: 2 per unquantized frozen element
        up = estimate_memory(config("quantization.bits=4", "model.dtype=bfloat16", "quantization.upcast_unquantized=true"),
                             world_size=1, device="cpu")
        extra = sum(p.numel() * 2 for n, p in model.named_parameters()
                    if not p.requires_grad and p.dtype == torch.bfloat16)
        assert up.detail["param_bytes"] - e.detail["param_bytes"] == extra > 0


def test_a_checkpointing_policy_of_every_n_layers_and_offload_is_planned():
    """`training.activation_checkpointing_kwargs` (transformers' every_n_layers and offload): every second layer
    keeps about half of what no checkpointing keeps beyond full checkpointing; offloading moves the checkpointed
    layers' inputs (layers x tokens x hidden x 2 bytes) to the host. The setup line names the policy."""
    shape = {**H200_SHAPE, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 8,
             "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000}
    common = [*H200_REFERENCE, f"model.init_config={json.dumps(shape)}", "training.per_device_train_batch_size=4"]
    ckpt = "training.activation_checkpointing=true"
    plan = {name: estimate_memory(config(*common, *extra), world_size=1, device="cuda") for name, extra in {
        "none": [], "full": [ckpt], "half": [ckpt, "training.activation_checkpointing_kwargs={every_n_layers: 2}"],
        "offload": [ckpt, "training.activation_checkpointing_kwargs={offload: true}"]}.items()}
    a = {k: v.activations for k, v in plan.items()}
    assert a["half"] == pytest.approx((a["none"] + a["full"]) / 2, rel=0.05)
    inputs = 8 * 4 * 2048 * 1024 * 2
    assert a["full"] - a["offload"] == pytest.approx(inputs, rel=0.15)
    assert "one decoder layer in 2" in plan["half"].notes[0] and "offloaded to the host" in plan["offload"].notes[0]
    hint = next(h for h in plan["none"].hints if h.startswith("training.activation_checkpointing: true"))
    assert "every_n_layers: 2" in hint


def test_the_setup_line_names_the_checkpointing_policy(capsys):
    from sft_dist.cli import main

    rc = main(["plan", str(QUICKSTART), "--json", "training.activation_checkpointing=true",
               "training.activation_checkpointing_kwargs={every_n_layers: 3, offload: true}"])
    plan = json.loads(capsys.readouterr().out)
    assert rc == 0 and plan["setup"]["activation_checkpointing"] == (
        "on, one decoder layer in 3, layer inputs offloaded to the host")
    # the JSON text TrainingArguments also takes, and the older key name
    for kwargs in (r'training.activation_checkpointing_kwargs="{\"every_n_layers\": 2}"',
                   "training.gradient_checkpointing_kwargs={every_n_layers: 2}"):
        rc = main(["plan", str(QUICKSTART), "--json", "training.activation_checkpointing=true", kwargs])
        assert rc == 0 and json.loads(capsys.readouterr().out)["setup"]["activation_checkpointing"] == (
            "on, one decoder layer in 2")
    rc = main(["plan", str(QUICKSTART), "training.activation_checkpointing=true",
               'training.activation_checkpointing_kwargs="{every"'])
    assert rc != 0 and "training.activation_checkpointing_kwargs: '{every' is not JSON" in capsys.readouterr().err


def test_activation_offloading_is_named_as_an_upper_bound():
    from tests.conftest import QUICKSTART

    on = estimate_memory(load_config(QUICKSTART, ["training.activation_offloading=true"]), world_size=1, device="cuda")
    off = estimate_memory(load_config(QUICKSTART, []), world_size=1, device="cuda")
    assert any(n.startswith("training.activation_offloading: TRL moves the saved activations") and "upper bound" in n
               for n in on.notes)
    assert not any("activation_offloading" in n for n in off.notes) and on.activations == off.activations


def test_sequence_parallel_plans_a_slice_of_each_row(capsys):
    """Each worker of a group holds 1/size of every row's tokens: the activations of half the tokens, the whole
    rows' mask on sdpa, and a batch line that counts groups."""
    from sft_dist.plan import make_plan
    from sft_dist.plan.report import render

    whole = estimate_memory(config("data.max_length=512"), world_size=2, device="cpu")
    cfg = config("data.max_length=512", "backend.sequence_parallel_size=2", "launcher.num_workers=4")
    half = estimate_memory(cfg, world_size=4, device="cpu")
    assert half.activations == pytest.approx(whole.activations / 2, rel=0.1)
    assert half.detail["micro_batch"] == [8, 256]
    assert any("the whole rows' mask, 2.00 MiB" in n for n in half.notes)  # 8 rows x 512 x 512 bools
    assert any("for 2 of the 4 query heads" in n and "zero head" not in n for n in half.notes)
    odd = estimate_memory(config("data.max_length=512", "backend.sequence_parallel_size=3", "launcher.num_workers=3"),
                          world_size=3, device="cpu")  # 4 heads over 3 ranks: padded to 6 (model/ulysses.py Heads)
    # 2 zero query heads and 2 zero k/v heads over the whole rows, a third of each on a rank, q/out and k/v kept by
    # both layers: 8 rows x 512 tokens x head_dim 16 x 4 bytes x 2 x (2/3 + 2/3) x 2 layers = 1.33 MiB
    padding = 8 * 512 * 16 * 4 * 2 * (2 / 3 + 2 / 3) * 2
    assert any("for 2 of the 4 query heads" in n and "2 zero heads added (attention costs as for 6 heads: +50%): "
               f"{format_bytes(int(padding))} more of them kept" in n for n in odd.notes), odd.notes
    even = estimate_memory(config("data.max_length=512", "backend.sequence_parallel_size=4", "launcher.num_workers=4"),
                           world_size=4, device="cpu")  # 4 heads over 4: nothing added
    assert not any("more of them kept" in n for n in even.notes)
    checkpointed = estimate_memory(config("data.max_length=512", "backend.sequence_parallel_size=3",
                                          "launcher.num_workers=3", "training.activation_checkpointing=true"),
                                   world_size=3, device="cpu")  # recomputed layers: one layer's at a time
    assert any(f"{format_bytes(int(padding / 2))} more of them kept" in n for n in checkpointed.notes)
    plan = make_plan(cfg, device="cpu", world_size=4)
    assert plan.geometry["global_batch"] == 16 and plan.geometry["sequence_parallel"] == 2
    assert "x 2 data-parallel groups of 2 workers = 16 sequences" in render(plan)


def test_a_longer_row_than_fits_is_hinted_to_split_over_more_workers():
    """Where activations are most of the peak (the H200 reference shape on a GPU), the hints name the next
    sequence-parallel size the workers allow, with the activations it leaves; none where the workers are all in one
    group already."""
    def sp_hints(*overrides, world):
        m = estimate_memory(config(*H200_REFERENCE, f"launcher.num_workers={world}", *overrides), world_size=world,
                            device="cuda")
        return [h for h in m.hints if h.startswith("backend.sequence_parallel_size")], m

    (hint,), m = sp_hints(world=4)
    assert "backend.sequence_parallel_size: 2 splits every row over 2 workers (slices of 1024 tokens)" in hint
    assert f"about {format_bytes(m.activations // 2)} of activations, for 2 data-parallel group(s)" in hint
    (hint,), _ = sp_hints("backend.sequence_parallel_size=2", world=4)
    assert "backend.sequence_parallel_size: 4" in hint and "for 1 data-parallel group(s)" in hint
    assert sp_hints("backend.sequence_parallel_size=2", world=2)[0] == []
    assert sp_hints(world=1)[0] == []


def test_moe_experts_in_fp32_are_profiled():
    """gpt-oss's experts run transformers' grouped_mm, whose meta kernel takes bf16 only: an fp32 run on a CPU was
    'not estimated'. The profile now runs such a call in bf16 and gives the result the caller's dtype."""
    from sft_dist.plan.memory import _meta_op

    a, b = torch.empty(10, 16, device="meta"), torch.empty(2, 16, 8, device="meta")
    offs = torch.empty(2, dtype=torch.int32, device="meta")
    out = _meta_op(torch.ops.aten._grouped_mm.default, (a, b), {"offs": offs})
    assert out.shape == (10, 8) and out.dtype == torch.float32 and out.is_meta
    gpt_oss = {"model_type": "gpt_oss", "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4,
               "num_experts_per_tok": 2, "sliding_window": 32, "max_position_embeddings": 512,
               "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    m = estimate_memory(config(f"model.init_config={json.dumps(gpt_oss)}"), world_size=2, device="cpu")
    assert m.activations > 0 and m.total > m.activations
