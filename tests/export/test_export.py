"""`sft-dist export`: real training checkpoints (DDP, DeepSpeed ZeRO-3, full fine-tuning, 4-bit QLoRA) exported
as adapters and merged models, compared tensor by tensor and logit by logit with what training produced."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sft_dist.errors import SftDistError
from tests.conftest import BIN, QUICKSTART, cli_env

TRAIN = ["training.max_steps=10", "training.save_strategy=steps", "training.save_steps=10",
         "training.eval_strategy=no"]
IDS = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
QLORA_TOL = 1e-5  # measured: 1.2e-6 (logit scale ~3); merging into the full-precision base instead: 0.12


def export(*args) -> tuple[int, str]:
    """`sft-dist export ARGS` -> (exit code, output)."""
    r = subprocess.run([str(BIN / "sft-dist"), "export", *map(str, args)], check=False, capture_output=True,
                       text=True, env=cli_env(), timeout=300)
    return r.returncode, r.stdout + r.stderr


def train(out: Path, *overrides: str) -> Path:
    r = subprocess.run([str(BIN / "sft-dist"), "train", str(QUICKSTART), f"output_dir={out}", *TRAIN, *overrides],
                       check=False, capture_output=True, text=True, env=cli_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def assert_same_tensors(a: dict, b: dict, tol: float = 1e-6) -> float:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= tol
    return worst


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def peft_logits(run: Path, quant=None) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sft_dist.model.build import keep_4bit_layout

    base = AutoModelForCausalLM.from_pretrained(run / "base_model", quantization_config=quant)
    keep_4bit_layout(base)  # the layout (and math) the run trained with, not bitsandbytes' AVX512-BF16 repacking
    return logits(PeftModel.from_pretrained(base, run / "adapter"))


def merged_logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return logits(AutoModelForCausalLM.from_pretrained(path))


# ---- real runs (slow) ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ddp_run(checkpointed_run):
    return checkpointed_run  # 20 steps, checkpoints at 10 and 20 (tests/conftest.py)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("export") / "zero3", "backend.type=deepspeed",
                 "backend.config=configs/deepspeed/zero3.json")


@pytest.mark.slow
def test_ddp_adapter_equals_the_runs_adapter(ddp_run, tmp_path):
    rc, out = export(ddp_run, "--output", tmp_path / "a")
    assert rc == 0, out
    assert "exported PEFT adapter" in out and "checkpoint-20 (step 20, ddp, 2 workers)" in out
    got = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert_same_tensors(got, load_file(ddp_run / "adapter" / "adapter_model.safetensors"), tol=0.0)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(ddp_run / "base_model") and config["r"] == 8
    record = json.loads((tmp_path / "a" / "export.json").read_text())
    assert (record["kind"], record["tensors"], record["source"]["step"]) == ("adapter", 29, 20)
    assert record["peak_rss_bytes"] > 0 and (tmp_path / "a" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_ddp_merge_gives_the_peft_models_logits_in_shards(ddp_run, tmp_path):
    out_dir = tmp_path / "m"
    rc, out = export(ddp_run / "checkpoints" / "checkpoint-20", "--output", out_dir, "--merge",
                     "--max-shard-size", "300KB")
    assert rc == 0, out
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    shards = sorted(out_dir.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and set(index["weight_map"].values()) == {s.name for s in shards}
    per_shard = {s.name: list(index["weight_map"].values()).count(s.name) for s in shards}
    # within the budget (plus the safetensors header), unless one tensor alone is larger
    assert all(s.stat().st_size <= 300_000 + 4096 or per_shard[s.name] == 1 for s in shards)
    diff = (merged_logits(out_dir) - peft_logits(ddp_run)).abs().max().item()
    assert diff <= 1e-5, diff
    record = json.loads((out_dir / "export.json").read_text())
    assert (record["lora_layers_merged"], record["tensors_replaced"], record["tensors"]) == (14, 1, 21)


@pytest.mark.slow
def test_zero3_adapter_is_rebuilt_from_the_optimizer_partitions(zero3_run, tmp_path):
    rc, out = export(zero3_run, "--output", tmp_path / "a")
    assert rc == 0, out
    assert "deepspeed, 2 workers" in out
    got = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert_same_tensors(got, load_file(zero3_run / "adapter" / "adapter_model.safetensors"), tol=1e-6)


@pytest.mark.slow
def test_full_finetuning_exports_the_whole_model(tmp_path_factory, tmp_path):
    run = train(tmp_path_factory.mktemp("export") / "full", "lora.enabled=false")
    rc, out = export(run, "--output", tmp_path / "f")
    assert rc == 0, out
    assert "full fine-tuning run: no adapter" in out
    assert not (tmp_path / "f" / "adapter_config.json").exists()
    assert_same_tensors(load_file(tmp_path / "f" / "model.safetensors"), load_file(run / "model" / "model.safetensors"),
                        tol=0.0)


@pytest.mark.slow
def test_qlora_merge_is_refused_and_dequantize_matches_the_4bit_model(tmp_path_factory, tmp_path):
    from transformers import BitsAndBytesConfig

    run = train(tmp_path_factory.mktemp("export") / "q4", "quantization.bits=4")
    rc, out = export(run, "--output", tmp_path / "refused", "--merge")
    assert rc == 1 and "4-bit quantized base (QLoRA)" in out and "--merge --dequantize" in out
    assert not (tmp_path / "refused").exists()

    rc, out = export(run, "--output", tmp_path / "a")  # the adapter alone exports as usual
    assert rc == 0, out
    assert_same_tensors(load_file(tmp_path / "a" / "adapter_model.safetensors"),
                        load_file(run / "adapter" / "adapter_model.safetensors"), tol=0.0)

    rc, out = export(run, "--output", tmp_path / "m", "--merge", "--dequantize")
    assert rc == 0, out
    record = json.loads((tmp_path / "m" / "export.json").read_text())
    assert record["dequantized"]["layers"] == 14 and "14 4-bit layers dequantized" in out
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    want = peft_logits(run, quant=q)
    diff = (merged_logits(tmp_path / "m") - want).abs().max().item()
    assert diff <= QLORA_TOL, diff


@pytest.mark.slow
def test_incomplete_checkpoint_is_refused_and_a_run_skips_it(ddp_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ddp_run, run)
    for step in (10, 20):
        (run / "checkpoints" / f"checkpoint-{step}" / "manifest.json").unlink()
    rc, out = export(run / "checkpoints" / "checkpoint-10", "--output", tmp_path / "x")
    assert rc == 1 and "not a complete checkpoint: no manifest.json" in out
    # the run finished: its final adapter is the newest complete weights
    rc, out = export(run, "--output", tmp_path / "final")
    assert rc == 0 and "checkpoint-10: no manifest.json" in out
    assert f"from {run / 'adapter'} (the run's final weights, step 20, ddp, 2 workers)" in out
    (run / "run_summary.json").unlink()  # as if the run had stopped before finishing
    rc, out = export(run, "--output", tmp_path / "y")
    assert rc == 1 and "no complete checkpoint" in out and "checkpoint-10: no manifest.json" in out
    assert "no final adapter/ or model/ with run_summary.json: has the run finished?" in out
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """`make demo`'s training command, shortened to 20 steps (still `save_strategy: "no"`: no checkpoint), run
    from a fresh directory so that its output is <cwd>/outputs/quickstart, as in the README."""
    cwd = tmp_path_factory.mktemp("demo")
    r = subprocess.run([str(BIN / "sft-dist"), "train", str(QUICKSTART), "training.max_steps=20",
                        "training.eval_strategy=no"], cwd=cwd, capture_output=True, text=True, env=cli_env(),
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (cwd / "outputs" / "quickstart" / "checkpoints").exists()
    return cwd


def readme_export_commands() -> list[str]:
    """The first bash block of the README's Export section, one command per line."""
    from tests.conftest import ROOT

    section = (ROOT / "README.md").read_text().split("## Export", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_readme_export_commands_run_verbatim_on_the_demo_output(demo_dir):
    import shlex

    commands = readme_export_commands()
    assert commands == ["sft-dist export outputs/quickstart --output exports/adapter",
                        "sft-dist export outputs/quickstart --output exports/merged --merge"]
    for command in commands:
        r = subprocess.run(shlex.split(command), cwd=demo_dir, capture_output=True, text=True, env=cli_env(),
                           timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "(the run's final weights, step 20, ddp, 2 workers)" in r.stdout
    run = demo_dir / "outputs" / "quickstart"
    exports = demo_dir / "exports"
    assert_same_tensors(load_file(exports / "adapter" / "adapter_model.safetensors"),
                        load_file(run / "adapter" / "adapter_model.safetensors"), tol=0.0)
    record = json.loads((exports / "adapter" / "export.json").read_text())
    assert (record["kind"], record["tensors"], record["source"]["final"]) == ("adapter", 29, True)
    diff = (merged_logits(exports / "merged") - peft_logits(run)).abs().max().item()
    assert diff <= 1e-5, diff
    record = json.loads((exports / "merged" / "export.json").read_text())
    assert (record["lora_layers_merged"], record["tensors_replaced"], record["tensors"]) == (14, 1, 21)


@pytest.mark.slow
def test_corrupt_shard_is_refused(ddp_run, tmp_path):
    ck = tmp_path / "checkpoint-10"
    shutil.copytree(ddp_run / "checkpoints" / "checkpoint-10", ck)
    shard = next((ck / "shards").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    rc, out = export(ck, "--output", tmp_path / "x")
    assert rc == 1 and "does not match its sha256" in out


@pytest.mark.slow
def test_non_empty_output_is_refused_unless_overwrite(ddp_run, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    rc, out = export(ddp_run, "--output", target)
    assert rc == 1 and "is not empty" in out and "--overwrite" in out
    assert (target / "keep.txt").read_text() == "mine"
    rc, out = export(ddp_run, "--output", target, "--overwrite")
    assert rc == 0, out
    assert not (target / "keep.txt").exists() and (target / "adapter_model.safetensors").is_file()


# ---- merge math against peft, no training (fast) ---------------------------------------------------------------

class MemoryWeights:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.specs = {k: (v.shape, v.dtype) for k, v in tensors.items()}

    def load(self, name: str) -> torch.Tensor:
        return self.tensors[name].clone()


def tied_base(tmp_path: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                                  tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def perturb_trainable(model) -> MemoryWeights:
    """Give every trainable tensor a real value (lora_B starts at zero) and return them as a checkpoint would."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return MemoryWeights({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def streamed_merge(base_dir: Path, trained: MemoryWeights, lora, out: Path):
    from sft_dist.export.merge import merge, plan_merge, write_config
    from sft_dist.export.model import build_view, check_trained
    from sft_dist.export.source import RunSettings
    from sft_dist.config.schema import ModelConfig, QuantizationConfig

    view = build_view(str(base_dir), RunSettings(ModelConfig(), lora, QuantizationConfig(), ""))
    check_trained(view, trained, "test")
    out.mkdir()
    result = merge(plan_merge(view, trained), trained, base_dir=base_dir, out_dir=out, dtype=torch.float32,
                   max_shard_bytes=10**9, tied=view.tied, keep_ties=not view.lora)
    write_config(base_dir, out, dtype=torch.float32, untie=bool(result.untied))
    return result


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
@pytest.mark.parametrize("dora", [False, True])
def test_streamed_merge_equals_peft_with_rslora_dora_and_tied_embeddings(tmp_path, dora):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from sft_dist.config.schema import LoraConfig
    from sft_dist.model.lora import peft_config

    base_dir = tied_base(tmp_path)
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, use_rslora=True, use_dora=dora, modules_to_save=["lm_head"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), peft_config(lora))
    result = streamed_merge(base_dir, perturb_trainable(model), lora, tmp_path / "merged")
    # the trained lm_head copy no longer shares the (frozen) embedding
    assert result.untied == ["lm_head.weight", "model.embed_tokens.weight"]
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    diff = (merged_logits(tmp_path / "merged") - logits(model)).abs().max().item()
    assert diff <= 1e-5, diff


def test_full_finetuning_keeps_tied_embeddings_tied(tmp_path):
    from transformers import AutoModelForCausalLM

    from sft_dist.config.schema import LoraConfig

    base_dir = tied_base(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    result = streamed_merge(base_dir, perturb_trainable(model), LoraConfig(enabled=False), tmp_path / "full")
    assert result.untied == [] and load_file(tmp_path / "full" / "model.safetensors").keys() == \
        load_file(base_dir / "model.safetensors").keys()
    assert (merged_logits(tmp_path / "full") - logits(model)).abs().max().item() == 0.0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # peft: its rank pattern for the fused gate_up
def test_lora_on_moe_experts_merges_in_memory_as_peft_and_keeps_the_per_expert_layout(tmp_path):
    """Mixtral's experts are one stacked parameter in transformers 5 (per-expert w1/w2/w3 in its safetensors):
    the streamed merge cannot map them and says so; the in-memory merge gives peft's logits in the base's layout."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from sft_dist.export.merge import merge_in_memory, plan_merge
    from sft_dist.export.model import build_view, check_trained, fused_parameter_layers
    from sft_dist.export.source import RunSettings
    from sft_dist.config.schema import LoraConfig, ModelConfig, QuantizationConfig
    from sft_dist.model.lora import peft_config

    config = AutoConfig.for_model("mixtral", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                  num_experts_per_tok=2, vocab_size=1024)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "w1", "w2", "w3"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), peft_config(lora))
    trained = perturb_trainable(model)
    view = build_view(str(tmp_path / "base"), RunSettings(ModelConfig(), lora, QuantizationConfig(), ""))
    check_trained(view, trained, "test")
    assert len(fused_parameter_layers(view)) == 4  # gate_up and down, nested, in each of 2 layers
    with pytest.raises(SftDistError, match="cannot merge LoRA on MixtralExperts"):
        plan_merge(view, trained)
    (tmp_path / "merged").mkdir()
    result = merge_in_memory(view, trained, base_dir=tmp_path / "base", out_dir=tmp_path / "merged",
                             dtype=torch.float32, max_shard_bytes=10**9, trust_remote_code=False)
    assert result.files == ["model.safetensors"]
    assert load_file(tmp_path / "merged" / "model.safetensors").keys() == \
        load_file(tmp_path / "base" / "model.safetensors").keys()  # experts.0.w1.weight, ...
    diff = (merged_logits(tmp_path / "merged") - logits(model)).abs().max().item()
    assert diff <= 1e-5, diff


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_checkpoint_must_hold_exactly_the_trainable_tensors(tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from sft_dist.export.model import build_view, check_trained
    from sft_dist.export.source import RunSettings
    from sft_dist.config.schema import LoraConfig, ModelConfig, QuantizationConfig
    from sft_dist.model.lora import peft_config

    base_dir = tied_base(tmp_path)
    lora = LoraConfig(r=4, alpha=8, dropout=0.0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), peft_config(lora))
    trained = perturb_trainable(model).tensors
    view = build_view(str(base_dir), RunSettings(ModelConfig(), lora, QuantizationConfig(), ""))
    state = model.state_dict()
    # FSDP2's state dict keeps a frozen tied parameter's second name: accepted
    check_trained(view, MemoryWeights({**trained, "base_model.model.lm_head.weight": torch.zeros(1024, 32)}), "ck")
    frozen = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    with pytest.raises(SftDistError, match=rf"ck: .*frozen in the model: {frozen} \(1\)"):
        check_trained(view, MemoryWeights({**trained, frozen: state[frozen]}), "ck")
    absmax = f"{frozen}.absmax"  # bitsandbytes' 4-bit state, which checkpoints no longer hold
    with pytest.raises(SftDistError, match=rf"not in the model: {absmax} \(1\)"):
        check_trained(view, MemoryWeights({**trained, absmax: torch.zeros(16)}), "ck")
    lora_a = next(n for n in trained if ".lora_A." in n)
    with pytest.raises(SftDistError, match=rf"missing: {lora_a} \(1\)"):
        check_trained(view, MemoryWeights({n: t for n, t in trained.items() if n != lora_a}), "ck")


@pytest.mark.parametrize("bits", [4, 8])
def test_quantization_round_trip_gives_the_weights_the_bitsandbytes_layer_uses(tmp_path, bits):
    import bitsandbytes.functional as F
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from sft_dist.export.quant import round_trip
    from sft_dist.config.schema import QuantizationConfig
    from sft_dist.model.build import bnb_config

    quant = QuantizationConfig(bits=bits)
    base_dir = tied_base(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=bnb_config(quant, dtype=torch.float32))
    layer = model.model.layers[1].mlp.down_proj
    with safe_open(str(base_dir / "model.safetensors"), framework="pt") as f:
        w = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    deq = round_trip(quant, load_dtype=torch.float32)(w)
    if bits == 4:  # the weight the layer dequantizes for its matmul (its compute dtype is the CPU's business)
        used = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        assert torch.equal(deq, used)
        x = torch.randn(3, w.shape[1])
        with torch.no_grad():  # and the layer's output agrees with it (bf16 compute on CPUs that have it)
            assert torch.allclose(layer(x), x @ deq.T, atol=1e-2, rtol=1e-2)
    else:  # LLM.int8 also quantizes activations (not part of a weight); the weight itself is identical
        assert torch.equal(deq, F.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB).float())


def test_max_shard_size_parsing():
    from sft_dist.sizes import parse_size

    size = lambda text: parse_size(text, flag="--max-shard-size")  # noqa: E731
    assert size("1GB") == 10**9 and size("500MiB") == 500 * 2**20 and size("1234") == 1234
    with pytest.raises(SftDistError, match="--max-shard-size"):
        size("lots")


def test_dequantize_without_a_quantized_run_is_refused():
    from sft_dist.export.run import _kind
    from sft_dist.export.source import RunSettings
    from sft_dist.config.schema import LoraConfig, ModelConfig, QuantizationConfig

    plain = RunSettings(ModelConfig(), LoraConfig(), QuantizationConfig(), "")
    with pytest.raises(SftDistError, match="was not quantized"):
        _kind(plain, merge=True, dequantize=True)
    assert _kind(plain, merge=False, dequantize=False) == "adapter"
    assert _kind(RunSettings(ModelConfig(), LoraConfig(enabled=False), QuantizationConfig(), ""),
                 merge=False, dequantize=False) == "full"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_a_run_that_resized_the_embedding_exports_generates_and_merges(tmp_path):
    """A pretrained base with 1000 embedding rows, trained with the builtin 1024-token tokenizer: training resizes
    the embedding and head (both trained as modules_to_save); export and generate rebuild the same shapes."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from sft_dist.config.load import builtin_path
    from sft_dist.generate import complete

    tok = AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                                  vocab_size=1000, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    run = tmp_path / "run"
    r = subprocess.run([str(BIN / "sft-dist"), "train", str(QUICKSTART), f"output_dir={run}", "model.init_config=null",
                        f"model.name_or_path={tmp_path / 'base'}", "model.tokenizer=builtin:tokenizer",
                        "lora.modules_to_save=[embed_tokens,lm_head]", "training.max_steps=4",
                        "training.eval_strategy=no"], capture_output=True, text=True, env=cli_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resized the embedding and the output head to 1024 rows; the 24 new rows start at the mean" in r.stderr
    assert "the 24 new embedding rows train with the modules_to_save copies (model.embed_tokens, lm_head)" in r.stderr

    rc, out = export(run, "--output", tmp_path / "a")
    assert rc == 0, out
    assert_same_tensors(load_file(tmp_path / "a" / "adapter_model.safetensors"),
                        load_file(run / "adapter" / "adapter_model.safetensors"), tol=0.0)
    assert json.loads((tmp_path / "a" / "export.json").read_text())["vocab_resized"] == [1000, 1024]
    rc, out = export(run, "--output", tmp_path / "m", "--merge")
    assert rc == 0, out
    assert json.loads((tmp_path / "m" / "config.json").read_text())["vocab_size"] == 1024
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    base.resize_token_embeddings(1024, mean_resizing=False)
    want = logits(PeftModel.from_pretrained(base, run / "adapter"))
    diff = (merged_logits(tmp_path / "m") - want).abs().max().item()
    assert diff <= 1e-5, diff
    [c] = complete(run, ["Qual é a capital de Portugal?"], max_new_tokens=4)  # generate resizes the base too
    assert c.prompt_tokens > 0 and (c.text or c.why_empty)


@pytest.mark.slow
def test_a_run_that_did_not_save_its_random_base_says_so(tmp_path):
    from sft_dist.generate import load_trained

    run = tmp_path / "run"
    r = subprocess.run([str(BIN / "sft-dist"), "train", str(QUICKSTART), f"output_dir={run}", "training.max_steps=2",
                        "training.eval_strategy=no", "launcher.num_workers=1", "model.save_init_base=false"],
                       capture_output=True, text=True, env=cli_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and not (run / "base_model").exists()
    rc, out = export(run, "--output", tmp_path / "a")
    assert rc == 1 and "with model.save_init_base: false, so its base weights were never written" in out
    with pytest.raises(SftDistError, match=r"base_model does not exist \(model.save_init_base was false\)"):
        load_trained(run)
