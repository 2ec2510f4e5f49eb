"""The model presets under configs/models/, read the way their tests need them: the command and hardware on each
file's first line, the family's published config.json (tests/presets/fixtures/, no hub here), and a tiny model of
the same architecture built from it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.conftest import ROOT

PRESETS = sorted((ROOT / "configs" / "models").glob("*.yaml"))
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# "# <command>  # hardware: [N nodes x ]G x M GB GPU (...)"
HARDWARE = re.compile(r"#\s*hardware:\s*(?:(\d+) nodes? x )?(\d+) x (\d+) GB\b")
# A budget per GPU: 90% of its memory (GB = 1e9 bytes, as GPUs are sold; an "80 GB" H100 reports 79.6 GiB), leaving
# room for the CUDA context, the allocator's fragmentation and the estimate's error (calibrated within 15% of a
# measured H200 peak: tests/plan/test_memory.py).
USABLE = 0.9

# Shrunk dimensions per model type: 2 layers, hidden ~64, with each family's head grouping (GQA ratio), head
# dimension relations, windows and routing kept: Llama 3.1 8B 32/8 heads and 70B 64/8, Qwen2.5 28/4, Qwen3-MoE
# 32/4 with 128 experts top-8, Mistral 32/8, Gemma 2 16/8 with query_pre_attn_scalar = head_dim, Phi-3 32/32.
# Sliding windows shrink below the tests' 128-token rows, so that they bite.
TINY: dict[str, dict] = {
    "llama": {"hidden_size": 64, "intermediate_size": 224, "num_hidden_layers": 2, "head_dim": 8},
    "qwen2": {"hidden_size": 112, "intermediate_size": 592, "num_hidden_layers": 2, "max_window_layers": 2},
    "qwen3_moe": {"hidden_size": 64, "intermediate_size": 192, "moe_intermediate_size": 24, "num_hidden_layers": 2,
                  "head_dim": 16, "max_window_layers": 2},
    "mistral": {"hidden_size": 64, "intermediate_size": 224, "num_hidden_layers": 2, "head_dim": 8},
    "gemma2": {"hidden_size": 48, "intermediate_size": 192, "num_hidden_layers": 2, "head_dim": 16,
               "query_pre_attn_scalar": 16, "sliding_window": 32, "sliding_window_size": 32},
    "phi3": {"hidden_size": 64, "intermediate_size": 168, "num_hidden_layers": 2, "sliding_window": 31},
}
TINY_HEADS = 8  # query heads of the tiny models (Qwen2: 7, its 28/4 grouping; Gemma 2: 4, 16/8 -> 4/2)


@dataclass(frozen=True)
class Preset:
    path: Path
    command: str
    nodes: int
    gpus_per_node: int
    gpu_gb: int
    raw: dict

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def budget_bytes(self) -> float:
        return USABLE * self.gpu_gb * 1e9

    @property
    def fixture(self) -> Path:
        """The family's published config.json: named after the hub id's repository, lower case."""
        return FIXTURES / self.raw["model"]["name_or_path"].split("/")[-1].lower()


def read_preset(path: Path) -> Preset:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    m = HARDWARE.search(first)
    if not first.startswith("# ") or m is None:
        raise ValueError(f"{path}: the first line must be `# <command>  # hardware: N x M GB GPU ...`, got {first!r}")
    command = first[2:m.start()].strip()
    return Preset(path, command, int(m[1] or 1), int(m[2]), int(m[3]), yaml.safe_load(path.read_text()))


def tiny_config(fixture: Path, *, vocab_size: int, special_ids: dict[str, int]) -> dict:
    """The family's config.json with its dimensions shrunk (TINY) and the vocabulary and special ids of the test
    tokenizer; everything else (model type, rope, head grouping, tying, windows, soft-capping, norms, routing)
    stays as published."""
    config = json.loads((fixture / "config.json").read_text())
    kind = config["model_type"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    group = heads // kv
    q_heads = 4 if kind == "gemma2" else 7 if group == 7 else TINY_HEADS
    shrunk = {**TINY[kind], "num_attention_heads": q_heads, "num_key_value_heads": max(1, q_heads // group),
              "vocab_size": vocab_size, **special_ids}
    config.update(shrunk)
    config.pop("auto_map", None)  # transformers' own Phi3 class, not the repository's remote code
    return config


def build_tiny_model(fixture: Path, out: Path, *, seed: int = 0) -> Path:
    """Random weights for the tiny config, saved as a model directory (what `model.name_or_path` loads). Its
    tokenizer is the bundled one (`model.tokenizer=builtin:tokenizer`): saved next to a Qwen2 config, transformers
    would reload it as a Qwen2Tokenizer with one more token than the embedding has rows."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from sft_dist.config.load import builtin_path

    tok = AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))
    raw = tiny_config(fixture, vocab_size=len(tok), special_ids={
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id})
    raw.pop("torch_dtype", None)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    return out


def chat_rows(out: Path, *, limit: int = 200) -> Path:
    """The bundled demo data as chat rows ({role, content} lists), the presets' `format: messages`."""
    from sft_dist.config.load import builtin_path

    rows = []
    for line in builtin_path("data/alpaca_demo_train.jsonl").read_text(encoding="utf-8").splitlines()[:limit]:
        r = json.loads(line)
        prompt = r["instruction"] + (f"\n{r['input']}" if r.get("input") else "")
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": r["output"]}]})
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return out


STEPS = 6


def tiny_overrides(p, model_dir, rows, out) -> list[str]:
    """What changes from the preset: the tiny model, the bundled tokenizer (its ChatML template renders the chat
    rows) and the demo data as chat rows, a few steps, CPU (no bf16, no Liger:
    its kernels are Triton), no eval or checkpoints; everything else (backend, LoRA, quantization, packing,
    optimizer, checkpointing, attention) is the preset's; sequence parallelism in one group of the 2 workers."""
    workers = 1 if p.world_size == 1 else 2
    over = [f"output_dir={out}", f"model.name_or_path={model_dir}", "model.tokenizer=builtin:tokenizer",
            "data.dataset=null", f"data.train_files={rows}",
            "data.eval_split_ratio=0", "data.max_length=128", f"training.max_steps={STEPS}",
            "training.gradient_accumulation_steps=1", "training.eval_strategy=no", "training.save_strategy=no",
            "training.logging_steps=1", "training.learning_rate=5e-3", "training.warmup_steps=0", "training.bf16=false",
            "training.use_liger_kernel=false", "launcher.device=cpu"]
    if p.raw["launcher"]["type"] != "torchrun":
        over.append(f"launcher.num_workers={workers}")
    if p.raw["backend"].get("sequence_parallel_size", 1) > workers:  # one group of the workers there are
        over.append(f"backend.sequence_parallel_size={workers}")
    if p.raw["launcher"]["type"] == "ray":
        over.append("launcher.resources_per_worker={CPU: 1}")
    return over


def family_presets() -> dict[str, Preset]:
    """model_type -> the family's first LoRA preset without quantization (its base config here)."""
    out = {}
    for path in PRESETS:
        p = read_preset(path)
        lora = p.raw.get("lora", {}).get("enabled", True)
        if lora and not p.raw.get("quantization", {}).get("bits"):
            kind = json.loads((p.fixture / "config.json").read_text())["model_type"]
            out.setdefault(kind, p)
    return out
