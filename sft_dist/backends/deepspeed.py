"""DeepSpeed ZeRO: read and check a DeepSpeed JSON before any model loads.

`"auto"` values are filled by transformers from `training.*` (batch sizes, clipping, precision,
optimizer hyper-parameters), so one config file serves every model and batch geometry. What cannot
work is refused here with what to change, instead of failing an hour in or saving an empty adapter.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from sft_dist.config.batch import accumulation, micro_batch
from sft_dist.config.schema import Config

# DeepSpeed keys that must agree with training.* (and how sft_dist reads that); "auto" lets transformers fill them.
BATCH_KEYS = {
    "train_micro_batch_size_per_gpu": ("per_device_train_batch_size", micro_batch),
    "gradient_accumulation_steps": ("gradient_accumulation_steps", accumulation),
}


def pin_jit_ninja() -> None:
    """DeepSpeed JIT-builds its CPU ops (shared-memory comm, CPU Adam) with the first `ninja` on PATH, and a
    ninja of another version rewrites the build log and rebuilds everything (~30 s a launch on 2 cores). A
    shell, torchrun and Ray can each find a different one; the environment's own ninja (installed with
    deepspeed) goes first so every launch reuses one build."""
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.isfile(os.path.join(bindir, "ninja")) and path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + os.pathsep + path


def check_deepspeed(cfg: Config, ds: dict[str, Any], path: str) -> list[str]:
    """Every reason this DeepSpeed config cannot train this job, each with the fix."""
    p: list[str] = []
    where = f"backend.config ({path})"
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage")
    if stage not in (0, 1, 2, 3):
        return [f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}"]
    if zero.get("offload_param") and stage != 3:
        p.append(f"{where}: offload_param needs ZeRO stage 3 (got stage {stage}); use zero3_offload.json "
                 "or remove offload_param")
    if zero.get("offload_optimizer") and stage == 0:
        p.append(f"{where}: offload_optimizer needs ZeRO stage 1-3 (got stage 0)")
    for ds_key, (hf_key, read) in BATCH_KEYS.items():
        value = ds.get(ds_key, "auto")
        want = read(cfg.training)
        if value != "auto" and value != want:
            p.append(f"{where}: {ds_key}={value} disagrees with training.{hf_key}={want}; set it to \"auto\"")
    # a fixed train_batch_size and ZeRO-3 + LoRA saving are compatibility rules (sft_dist/plan/rules.py)
    enabled = [k for k in ("fp16", "bf16") if ds.get(k, {}).get("enabled") is True]
    if len(enabled) == 2:
        p.append(f"{where}: fp16 and bf16 are both enabled; enable one, or set both to \"auto\"")
    return p
