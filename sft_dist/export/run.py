"""`sft-dist export`: a sharded training checkpoint (or a finished run's final adapter/ or model/) -> a Hugging
Face adapter or merged model, on CPU.

    sft-dist export RUN_OR_CHECKPOINT --output DIR [--merge [--dequantize]] [--dtype auto] [--max-shard-size 1GB]

Default: the PEFT adapter (`PeftModel.from_pretrained(base, DIR)`); a full fine-tuning run has no adapter and
writes the whole model. `--merge`: base + adapter as one model (`AutoModelForCausalLM.from_pretrained(DIR)`),
streamed tensor by tensor. Any backend's checkpoint (DDP, FSDP2, DeepSpeed ZeRO-1/2/3), verified first.
Everything is written into a temporary directory next to DIR and renamed at the end: a failed export leaves
nothing behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sft_dist.errors import SftDistError
from sft_dist.sizes import format_bytes

if TYPE_CHECKING:  # building the parser (`sft-dist --help`) imports no torch; the export imports it when run
    import torch

    from sft_dist.export.source import ExportSource, RunSettings

FORMAT = "sft_dist-export/1"
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_SHARD = "1GB"


def add_export_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        help="export a training checkpoint as a Hugging Face adapter or merged model (CPU, streaming)",
        description=(
            "Export the newest weights of a run (its newest complete checkpoint, or its final adapter/ or model/ "
            "when no checkpoint is as new) or the checkpoint given, as a PEFT adapter, or with "
            "--merge as a full model in safetensors. Runs on CPU and streams tensor by tensor: memory stays near "
            "one shard plus the largest tensor, whatever the model's size."),
        epilog=("examples:\n  sft-dist export outputs/quickstart --output exports/adapter\n"
                "  sft-dist export outputs/quickstart --output exports/merged --merge\n"
                "  sft-dist export outputs/run/checkpoints/checkpoint-200 --output exports/step200 --merge\n"
                "  sft-dist export outputs/qlora --output exports/merged --merge --dequantize --dtype bfloat16"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="a run's output_dir (its newest complete checkpoint, or its final adapter/ or model/ when "
                        "newer) or a checkpoint-<step> dir/URL")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="directory to write (must be new or empty)")
    p.add_argument("--merge", action="store_true", help="write base + adapter as one model instead of the adapter")
    p.add_argument("--dequantize", action="store_true",
                   help="with --merge for a 4/8-bit (QLoRA) run: merge into the dequantized base training saw, "
                        "written unquantized in the compute dtype")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="tensor dtype written; auto: the adapter as trained, a merged model in the base's dtype "
                        "(the compute dtype with --dequantize)")
    p.add_argument("--max-shard-size", default=DEFAULT_SHARD, metavar="SIZE",
                   help=f"largest safetensors file of a merged model, e.g. 500MB, 2GiB (default {DEFAULT_SHARD})")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a base model that needs code from its repository to run it (never taken from the "
                        "run's config.yaml)")
    p.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="then upload --output to this Hugging Face Hub repo (created if missing; token: HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    return p


def run_export(args: argparse.Namespace) -> int:
    """Export as `args` asks; print a summary. Raises SftDistError for anything the user can fix."""
    from sft_dist.sizes import parse_size
    from sft_dist.export.source import locate

    t0 = time.perf_counter()
    if getattr(args, "private", False) and not getattr(args, "push_to_hub", None):
        raise SftDistError("--private applies to the repo --push-to-hub creates: give --push-to-hub REPO with it")
    out = Path(args.output).expanduser().resolve()
    _check_output(out, overwrite=args.overwrite)
    max_shard = parse_size(args.max_shard_size, flag="--max-shard-size")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        src = locate(args.source, staging=work / "staging")
        # A run directory (or checkpoint) may come from anyone: only this command line turns remote code on.
        src.settings.model = dataclasses.replace(src.settings.model,
                                                 trust_remote_code=bool(getattr(args, "trust_remote_code", False)))
        _check_not_inside(out, src)
        kind = _kind(src.settings, merge=args.merge, dequantize=args.dequantize)
        content = work / "export"
        content.mkdir()
        record = _export(src, kind, content, dtype=args.dtype, max_shard=max_shard)
        record.update(seconds=round(time.perf_counter() - t0, 2), peak_rss_bytes=peak_rss())
        (content / "export.json").write_text(json.dumps(record, indent=2) + "\n")
        _publish(content, out, trash=work / "replaced")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(_summary(record, out))
    if getattr(args, "push_to_hub", None):
        from sft_dist.hub import HubPush

        push = HubPush(repo_id=args.push_to_hub, private=True if args.private else None, revision=None)
        print(f"pushed: {push.upload(out, message=f'sft_dist export: {kind} of {args.source}', key='--push-to-hub')}")
    return 0


def _export(src: ExportSource, kind: str, content: Path, *, dtype: str, max_shard: int) -> dict:
    from sft_dist.export.model import build_view, check_trained
    from sft_dist.export.source import (
        FinalWeights,
        base_model_path,
        local_model_dir,
        tokenizer_source,
    )
    from sft_dist.export.weights import open_trained
    from sft_dist.quiet import quiet_libraries

    quiet_libraries()
    base = base_model_path(src)
    base_dir = local_model_dir(base, revision=src.settings.model.revision) if kind != "adapter" else None
    tok = tokenizer_source(src, base)
    tokenizer = _load_tokenizer(tok, src.settings)
    view = build_view(str(base_dir or base), src.settings, merging=kind != "adapter", vocab_size=len(tokenizer))
    trained = FinalWeights(view, src.local_dir) if src.final else open_trained(src.local_dir, src.manifest)
    check_trained(view, trained, src.display)
    m = src.manifest
    record = {
        "format": FORMAT,
        "kind": kind,
        "source": {"checkpoint": src.display, "final": src.final, "step": src.step, "backend": m.get("backend"),
                   "shard_format": m.get("shard_format"), "zero_stage": m.get("zero_stage"),
                   "world_size": m.get("world_size")},
        "base_model": base,
        "trained_tensors": len(trained.specs),
        "trained_bytes": trained.nbytes(),
    }
    if kind == "adapter":
        record.update(_write_adapter(view, trained, content, base=base, dtype=dtype))
    else:
        record.update(_write_merged(src, view, trained, content, base_dir=base_dir, dtype=dtype,
                                    max_shard=max_shard, dequantize=kind == "merged-dequantized"))
    tokenizer.save_pretrained(str(content))
    record["tokenizer"] = tok
    if view.resized:
        record["vocab_resized"] = list(view.resized)
    return record


def _write_adapter(view, trained, content: Path, *, base: str, dtype: str) -> dict:
    from safetensors.torch import save_file

    from sft_dist.export.model import adapter_tensors, save_adapter_config

    tensors = adapter_tensors(view, trained, dtype=_dtype(dtype) if dtype != "auto" else None)
    save_file(tensors, str(content / "adapter_model.safetensors"), metadata={"format": "pt"})
    save_adapter_config(view, content, base_ref=base)
    return {"files": ["adapter_model.safetensors", "adapter_config.json"], "tensors": len(tensors),
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "dtype": dtype if dtype != "auto" else "as trained"}


def _write_merged(src: ExportSource, view, trained, content: Path, *, base_dir: Path, dtype: str,
                  max_shard: int, dequantize: bool) -> dict:
    from sft_dist.export.merge import merge, plan_merge, write_config
    from sft_dist.export.model import fused_parameter_layers

    round_trip, quant_note = None, None
    if dequantize:
        from sft_dist.export.quant import round_trip as make_round_trip

        q, load_dtype, assumed = src.settings.quant, *_load_dtype(src)
        round_trip = make_round_trip(q, load_dtype=load_dtype)
        quant_note = {"bits": q.bits, "quant_type": q.quant_type if q.bits == 4 else "llm_int8",
                      "double_quant": q.double_quant if q.bits == 4 else None,
                      "load_dtype": str(load_dtype).removeprefix("torch."), "load_dtype_assumed": assumed,
                      "layers": len(view.quantized)}
    out_dtype = _dtype(dtype) if dtype != "auto" else _auto_dtype(src, view, dequantize=dequantize)
    fused = fused_parameter_layers(view) if view.lora else []
    if fused:
        return _write_merged_in_memory(src, view, trained, content, base_dir=base_dir, dtype=out_dtype,
                                       max_shard=max_shard, fused=fused, round_trip=round_trip) | (
            {"dequantized": quant_note} if quant_note else {})
    plan = plan_merge(view, trained, round_trip=round_trip)
    result = merge(plan, trained, base_dir=base_dir, out_dir=content, dtype=out_dtype, max_shard_bytes=max_shard,
                   tied=view.tied, keep_ties=not view.lora)
    write_config(base_dir, content, dtype=out_dtype, untie=bool(result.untied),
                 vocab_size=view.resized[1] if view.resized else None)
    base_bytes = sum(f.stat().st_size for f in base_dir.glob("*.safetensors"))
    return {"files": result.files + ["config.json"], "tensors": result.tensors, "bytes": result.bytes,
            "dtype": str(out_dtype).removeprefix("torch."), "max_shard_size": max_shard,
            "lora_layers_merged": len(plan.deltas), "tensors_replaced": len(plan.replace),
            "untied": result.untied, "dequantized": quant_note, "base_weights_bytes": base_bytes}


def _write_merged_in_memory(src: ExportSource, view, trained, content: Path, *, base_dir: Path, dtype: torch.dtype,
                            max_shard: int, fused: list[str], round_trip) -> dict:
    from sft_dist.export.merge import merge_in_memory

    print(f"sft-dist export: LoRA on {len(fused)} fused parameter layer(s) ({fused[0]}, ...): merging in memory "
          "with peft (the streamed merge maps Linear layers only); this holds the base in float32", flush=True)
    result = merge_in_memory(view, trained, base_dir=base_dir, out_dir=content, dtype=dtype, max_shard_bytes=max_shard,
                             trust_remote_code=src.settings.model.trust_remote_code, round_trip=round_trip)
    from peft.tuners.lora import LoraLayer

    layers = sum(1 for m in view.model.modules() if isinstance(m, LoraLayer))
    return {"files": result.files + ["config.json"], "tensors": result.tensors, "bytes": result.bytes,
            "dtype": str(dtype).removeprefix("torch."), "max_shard_size": max_shard, "lora_layers_merged": layers,
            "merge": "in memory (peft merge_and_unload): LoRA on fused parameters", "fused_parameter_layers": fused,
            "base_weights_bytes": sum(f.stat().st_size for f in base_dir.glob("*.safetensors"))}


def _kind(s: RunSettings, *, merge: bool, dequantize: bool) -> str:
    bits = s.quant.bits
    if dequantize and bits is None:
        raise SftDistError("--dequantize: this run's base was not quantized (quantization.bits is null); "
                           "use --merge alone")
    if dequantize and not merge:
        raise SftDistError("--dequantize only applies with --merge (add --merge, or leave out --dequantize to "
                           "export the adapter)")
    if not s.lora.enabled:
        return "full"
    if merge and bits is not None and not dequantize:
        raise SftDistError(
            f"this run trained its adapter on a {bits}-bit quantized base (QLoRA). Merging into a {bits}-bit base "
            "would re-quantize the merged weights and round away most of the adapter's small update. Use --merge "
            "--dequantize to merge into the dequantized base weights training saw (written unquantized in the "
            "compute dtype), or leave out --merge to export the adapter.")
    if merge:
        return "merged-dequantized" if dequantize else "merged"
    return "adapter"


def _dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)


def _load_dtype(src: ExportSource) -> tuple[torch.dtype, bool]:
    """The dtype the run loaded its base in before quantizing it (sft_dist.model.build.resolve_dtype), and
    whether the device it trained on had to be assumed (no run_summary.json yet)."""
    m = src.settings.model
    if m.dtype != "auto":
        return _dtype(m.dtype), False
    device, assumed = src.settings.device, True
    summary = src.run_dir / "run_summary.json" if src.run_dir else None
    if summary is not None and summary.is_file():
        device, assumed = json.loads(summary.read_text()).get("device", device), False
    elif device != "auto":
        assumed = False
    # auto: bf16 for a LoRA base on a (bf16-capable) GPU, fp32 on CPU.
    return _dtype("bfloat16" if device == "cuda" and src.settings.lora.enabled else "float32"), assumed


def _auto_dtype(src: ExportSource, view, *, dequantize: bool) -> torch.dtype:
    if dequantize:  # the dtype the quantized layers computed in
        q = src.settings.quant
        return _dtype(q.compute_dtype) if q.compute_dtype != "auto" else _load_dtype(src)[0]
    d = getattr(view.config, "dtype", None) or getattr(view.config, "torch_dtype", None) or "float32"
    return _dtype(d if d in DTYPES else "float32") if isinstance(d, str) else d


def _load_tokenizer(source: str, s: RunSettings):
    from sft_dist.config.schema import ModelConfig
    from sft_dist.model.tokenizer import build_tokenizer

    revision = None if Path(source).is_dir() else s.model.revision
    return build_tokenizer(ModelConfig(name_or_path=source, trust_remote_code=s.model.trust_remote_code,
                                       revision=revision))


def _check_output(out: Path, *, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SftDistError(f"--output {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SftDistError(f"--output {out} is not empty; choose a new directory, or pass --overwrite to replace it")


def _check_not_inside(out: Path, src: ExportSource) -> None:
    """--overwrite must never delete what is being exported."""
    for p in (src.local_dir, src.run_dir):
        if p is not None and (p.resolve() == out or out in p.resolve().parents):
            raise SftDistError(f"--output {out} contains the run or checkpoint being exported; choose another")


def _publish(content: Path, out: Path, *, trash: Path) -> None:
    if out.exists():
        out.rename(trash)  # an empty dir, or --overwrite: removed with the work dir
    content.rename(out)


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _files(files: list[str]) -> str:
    shards = [f for f in files if f.startswith("model-")]
    if len(shards) > 1:
        files = [f"{len(shards)} shards ({shards[0]} ...)", *(f for f in files if f not in shards)]
    return ", ".join(files)


def _summary(r: dict, out: Path) -> str:
    s = r["source"]
    what = {"adapter": "PEFT adapter", "merged": "merged model", "merged-dequantized": "merged model (dequantized "
            "base)", "full": "full model (full fine-tuning run: no adapter)"}[r["kind"]]
    final = "the run's final weights, " if s.get("final") else ""
    lines = [f"exported {what} -> {out}",
             f"  from {s['checkpoint']} ({final}step {s['step']}, {s['backend']}, {s['world_size']} workers)",
             f"  {r['tensors']} tensors, {format_bytes(r['bytes'])} ({r['dtype']}) in {_files(r['files'])}"]
    q = r.get("dequantized")
    if q:
        lines.append(f"  {q['layers']} {q['bits']}-bit layers dequantized as training saw them ({q['quant_type']})")
    if r.get("untied"):
        lines.append(f"  untied {', '.join(r['untied'])} (a trained copy no longer shares the base tensor)")
    base = f" (base weights {format_bytes(r['base_weights_bytes'])})" if "base_weights_bytes" in r else ""
    lines.append(f"  {r['seconds']:.1f} s, peak RSS {format_bytes(r['peak_rss_bytes'])}{base}")
    return "\n".join(lines)
