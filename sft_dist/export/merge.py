"""`--merge`: write base + trained weights as one Hugging Face model, streaming on CPU.

The base's safetensors are read one tensor at a time; each LoRA-targeted weight gets its delta, each
modules_to_save (or fully fine-tuned) weight is swapped for the trained copy, and tensors are written to
shards flushed at `--max-shard-size`. Memory holds one shard plus a few copies of the largest tensor, never
the model, so a 70B model merges on a machine with far less RAM than the model's size.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sft_dist.errors import SftDistError
from sft_dist.export.model import (
    LoraDelta,
    ModelView,
    base_name,
    lora_deltas,
)
from sft_dist.export.quant import RoundTrip
from sft_dist.export.weights import TrainedWeights

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
@dataclass
class MergeResult:
    files: list[str]
    tensors: int
    bytes: int
    untied: list[str] = field(default_factory=list)


@dataclass
class MergePlan:
    deltas: dict[str, LoraDelta]  # base tensor -> the LoRA delta added to it
    replace: dict[str, str]  # base tensor -> the trained tensor that replaces it
    quantized: set[str]  # base tensors that take the quantization round trip first
    round_trip: RoundTrip | None


def plan_merge(view: ModelView, trained: TrainedWeights, *, round_trip: RoundTrip | None = None) -> MergePlan:
    deltas = {d.weight: d for d in lora_deltas(view)} if view.lora else {}
    used = {n for d in deltas.values() for n in (d.a, d.b, d.magnitude) if n}
    replace = {}
    for name in trained.specs:
        if name in used:
            continue
        if ".lora_" in name:
            raise SftDistError(f"{name}: a LoRA tensor this merge does not know how to apply; export the adapter "
                               "instead (without --merge)")
        replace[base_name(name)] = name
    quantized = {f"{m}.weight" for m in view.quantized} if round_trip else set()
    return MergePlan(deltas, replace, quantized, round_trip)


def merge(plan: MergePlan, trained: TrainedWeights, *, base_dir: Path, out_dir: Path, dtype: torch.dtype,
          max_shard_bytes: int, tied: dict[str, str], keep_ties: bool = False) -> MergeResult:
    """`keep_ties`: the trained model shared its tied tensors too (full fine-tuning), so one trained copy is
    written under the name the base stores; otherwise (LoRA) a trained side of a tied pair unties it."""
    index = base_index(base_dir)
    partner = {**tied, **{v: k for k, v in tied.items()}}
    untied = _resolve_ties(plan, index, tied, partner, keep=keep_ties)
    names = list(index) + [n for n in untied if n not in index]
    for name in sorted(set(plan.deltas) | set(plan.replace) | plan.quantized):
        if name not in index and not (name in untied and partner[name] in index):
            raise SftDistError(f"{base_dir}: the base has no tensor {name} (the trained layer it belongs to); "
                               "its safetensors use other names than the model class. Export the adapter instead.")
    writer = ShardWriter(out_dir, max_shard_bytes)
    for name, base in _stream(names, index, partner, skip=plan.replace.keys()):
        t = _merged(name, base, plan, trained)
        writer.add(name, t.to(dtype) if t.is_floating_point() else t)  # integer buffers keep their dtype
    files = writer.finish()
    return MergeResult(files, writer.count, writer.total, untied)


def merge_in_memory(view: ModelView, trained: TrainedWeights, *, base_dir: Path, out_dir: Path, dtype: torch.dtype,
                    max_shard_bytes: int, trust_remote_code: bool, round_trip: RoundTrip | None = None) -> MergeResult:
    """The whole model in memory, merged by peft and written by transformers: for LoRA on fused parameters (MoE
    experts), whose base tensors are stored per expert under other names, in a layout transformers converts on
    load and back on save. Holds the base in float32: about 4 bytes per parameter of RAM. `round_trip`
    (--dequantize): the quantized layers' weights become those the 4/8-bit layers computed with first."""
    import copy
    import warnings

    from peft import get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from sft_dist.export.model import ADAPTER, adapter_tensors

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
        if view.resized:
            model.resize_token_embeddings(view.resized[1], mean_resizing=False)
        if round_trip is not None:
            with torch.no_grad():
                for name in view.quantized:
                    weight = model.get_submodule(name).weight
                    weight.copy_(round_trip(weight.detach()))
        peft_model = get_peft_model(model, copy.deepcopy(view.model.peft_config[ADAPTER]))
        result = set_peft_model_state_dict(peft_model, adapter_tensors(view, trained, dtype=torch.float32))
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise SftDistError(f"{base_dir}: the adapter's {', '.join(unexpected[:3])} ... have no place in the model "
                           "transformers loads from it; export the adapter instead (without --merge)")
    merged = peft_model.merge_and_unload().to(dtype)
    merged.save_pretrained(str(out_dir), max_shard_size=max_shard_bytes)
    shards = sorted(out_dir.glob("*.safetensors"))
    files = [f.name for f in shards] + ([INDEX] if (out_dir / INDEX).is_file() else [])
    from safetensors import safe_open

    tensors = 0
    for f in shards:  # as written: transformers stores fused experts back per expert
        with safe_open(str(f), framework="pt") as sf:
            tensors += len(list(sf.keys()))
    return MergeResult(files, tensors, sum(f.stat().st_size for f in shards))


def _resolve_ties(plan: MergePlan, index: dict, tied: dict[str, str], partner: dict[str, str], *,
                  keep: bool) -> list[str]:
    if keep:
        for name in [n for n in plan.replace if n not in index and partner.get(n) in index]:
            plan.replace.setdefault(partner[name], plan.replace[name])
            del plan.replace[name]
        return []
    # A trained lm_head (or embedding) no longer shares its tensor with the other: write both.
    changed = set(plan.deltas) | set(plan.replace) | plan.quantized
    return sorted({k for a, b in tied.items() if a in changed or b in changed for k in (a, b)})


def _merged(name: str, base: torch.Tensor | None, plan: MergePlan, trained: TrainedWeights) -> torch.Tensor:
    if name in plan.replace:
        return trained.load(plan.replace[name])
    w = plan.round_trip(base) if name in plan.quantized else base
    d = plan.deltas.get(name)
    if d is None:
        return w
    # In float32, as peft computes the delta; the sum is cast to the output dtype by the caller.
    delta = trained.load(d.b).float() @ trained.load(d.a).float()
    delta = (delta.T if d.transpose else delta) * d.scaling
    merged = w.float() + delta
    if d.magnitude is not None:  # DoRA: each output row rescaled to its trained magnitude (peft's merge)
        norm = torch.linalg.norm(merged, dim=1)
        merged = (trained.load(d.magnitude).float() / norm).view(-1, 1) * merged
    return merged


def _stream(names: list[str], index: dict[str, Path], partner: dict[str, str],
            skip) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(name, base tensor) in file order; None where the trained tensor replaces it (not read at all).
    Each file is opened only while its tensors are read, so no more than one tensor of it stays in memory."""
    from safetensors import safe_open

    for name in names:
        if name in skip:
            yield name, None
            continue
        source = name if name in index else partner[name]
        with safe_open(str(index[source]), framework="pt") as f:
            yield name, f.get_tensor(source)


def base_index(base_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, grouped by file."""
    from safetensors import safe_open

    if (base_dir / INDEX).is_file():
        weight_map = json.loads((base_dir / INDEX).read_text())["weight_map"]
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        return {n: base_dir / file for file in sorted(by_file) for n in sorted(by_file[file])}
    if (base_dir / SINGLE).is_file():
        with safe_open(str(base_dir / SINGLE), framework="pt") as f:
            return {n: base_dir / SINGLE for n in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    raise SftDistError(f"{base_dir}: no {SINGLE} or {INDEX}; --merge streams safetensors only. Re-save the base "
                       "with save_pretrained() (safetensors is the default), or export the adapter (without --merge).")


class ShardWriter:
    """Tensors into safetensors files of at most `max_bytes` each (a larger tensor gets a file of its own),
    named as transformers names them, with an index when there is more than one."""

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = self.total = self.count = 0
        self.parts: list[tuple[Path, list[str]]] = []

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + n > self.max_bytes:
            self._flush()
        self.pending[name] = t.contiguous()
        self.pending_bytes += n
        self.total += n
        self.count += 1

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out_dir / f".part-{len(self.parts):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.parts.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        if self.pending:
            self._flush()
        if len(self.parts) == 1:
            self.parts[0][0].rename(self.out_dir / SINGLE)
            return [SINGLE]
        n = len(self.parts)
        weight_map, files = {}, []
        for i, (path, names) in enumerate(self.parts, 1):
            file = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.out_dir / file)
            files.append(file)
            weight_map.update({k: file for k in names})
        (self.out_dir / INDEX).write_text(json.dumps(
            {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        return files + [INDEX]


def write_config(base_dir: Path, out_dir: Path, *, dtype: torch.dtype, untie: bool,
                 vocab_size: int | None = None) -> None:
    """The base's config.json for the merged weights (their dtype, no quantization, untied if needed, the
    vocabulary training resized the embedding to) and its generation_config.json."""
    config = json.loads((base_dir / "config.json").read_text())
    if vocab_size is not None:
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        text["vocab_size"] = vocab_size
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    config.pop("quantization_config", None)
    if untie:
        config["tie_word_embeddings"] = False
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if (base_dir / "generation_config.json").is_file():
        shutil.copy(base_dir / "generation_config.json", out_dir / "generation_config.json")
    if config.get("auto_map"):  # a model with its own code loads (with trust_remote_code) only next to that code
        for code in base_dir.glob("*.py"):
            shutil.copy(code, out_dir / code.name)
