"""DeepSpeed ZeRO: read and check a DeepSpeed JSON before any model loads.

`"auto"` values are filled by transformers from `training.*` (batch sizes, clipping, precision,
optimizer hyper-parameters), so one config file serves every model and batch geometry. What cannot
work is refused here with what to change, instead of failing an hour in or saving an empty adapter.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from sft_dist.backends.base import Backend, Sharding
from sft_dist.config.backend_file import backend_file
from sft_dist.config.schema import Config
from sft_dist.errors import ConfigError

# DeepSpeed keys that must agree with training.* (and the Training attribute that reads it); "auto" lets
# transformers fill them.
BATCH_KEYS = {
    "train_micro_batch_size_per_gpu": ("per_device_train_batch_size", "micro_batch"),
    "gradient_accumulation_steps": ("gradient_accumulation_steps", "accumulation"),
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
    for ds_key, (hf_key, attribute) in BATCH_KEYS.items():
        value = ds.get(ds_key, "auto")
        want = getattr(cfg.training, attribute)
        if value != "auto" and value != want:
            p.append(f"{where}: {ds_key}={value} disagrees with training.{hf_key}={want}; set it to \"auto\"")
    # a fixed train_batch_size and ZeRO-3 + LoRA saving are compatibility rules (sft_dist/plan/rules.py)
    enabled = [k for k in ("fp16", "bf16") if ds.get(k, {}).get("enabled") is True]
    if len(enabled) == 2:
        p.append(f"{where}: fp16 and bf16 are both enabled; enable one, or set both to \"auto\"")
    return p


class DeepSpeed(Backend):
    """DeepSpeed ZeRO stage 0-3 (with offload) through transformers' integration; its JSON read once."""

    name = "deepspeed"
    shard_format = "deepspeed"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self._file: dict[str, Any] | None = None

    @property
    def file(self) -> dict[str, Any]:
        """The DeepSpeed JSON with `backend.options` merged over it (read on first use: `check` reports a bad one)."""
        if self._file is None:
            self._file = backend_file(self.cfg, shipped="configs/deepspeed/zero{1,2,3}.json")
        return self._file

    @property
    def zero(self) -> dict[str, Any]:
        return self.file.get("zero_optimization", {})

    def check(self) -> list[str]:
        if self.cfg.backend.config is None:
            return ["backend.config: required with backend.type=deepspeed (e.g. configs/deepspeed/zero2.json)"]
        try:
            return check_deepspeed(self.cfg, self.file, self.cfg.backend.config)
        except ConfigError as e:
            return e.problems

    def training_args(self) -> dict[str, Any]:
        import copy

        return {"deepspeed": copy.deepcopy(self.file)}  # transformers fills its "auto" values in what it is given

    @property
    def zero_stage(self) -> int | None:
        return self.zero.get("stage")

    @property
    def label(self) -> str:
        return f"deepspeed zero{self.zero_stage}"

    def plan_facts(self) -> dict[str, Any]:
        return {"zero_stage": self.zero.get("stage"),
                "zero_gather_on_save": bool(self.zero.get("stage3_gather_16bit_weights_on_model_save", False)),
                "ds_train_batch_size": self.file.get("train_batch_size", "auto")}

    def sharding(self, world_size: int) -> Sharding:
        n, stage = world_size, int(self.zero.get("stage", 0))
        return Sharding(
            weights=n if stage >= 3 else 1,
            gradients=n if stage >= 2 else 1,
            optimizer=n if stage >= 1 else 1,
            master_copy=stage >= 1,
            offload_optimizer=bool(self.zero.get("offload_optimizer")),
            offload_param=bool(self.zero.get("offload_param")),
            gathers_layers=stage >= 3 and n > 1,
            label=f"zero{stage}",
        )

    def casts_parameters(self) -> bool:
        return True

    def gathered_bytes(self, layer_bytes: int, *, weights_bytes: int, numel: int) -> int:
        # ZeRO-3 keeps gathered parameters until stage3_max_live_parameters (default 1e9) are live or
        # stage3_max_reuse_distance passes: measured, with the defaults it holds the whole model in the step.
        live = float(self.zero.get("stage3_max_live_parameters", 1e9))
        return max(layer_bytes * 2, int(weights_bytes * min(1.0, live / max(1, numel))))

    def optimizer_section(self) -> dict[str, Any] | None:
        return self.file.get("optimizer") or None

    def loads_partitioned(self) -> bool:
        return True  # transformers loads under deepspeed.zero.Init (with stage 3)

    def random_base_on_host(self, sharding: Sharding, *, quantized: bool) -> bool:
        return quantized  # the engine moves a module built outside zero.Init whole to the GPU anyway

    def random_base_partitioned(self, sharding: Sharding, *, quantized: bool) -> bool:
        # ZeRO-3 over several ranks builds it under zero.Init, as transformers loads a checkpoint (a quantized base
        # is not: transformers does not quantize under zero.Init)
        return sharding.weights > 1 and not quantized

    def join_process_group(self, env, *, device: str) -> None:
        import deepspeed

        pin_jit_ninja()
        if env.world_size == 1 and "MASTER_PORT" not in os.environ:
            # A single worker still needs a (one-rank) group, else DeepSpeed goes looking for MPI.
            from sft_dist.distributed.local import free_port

            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(free_port("127.0.0.1")))
        # DeepSpeed keeps its own view of the world (zero.Init, batch checks); join the group we made.
        deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl")

    def shards_weights(self, trainer) -> bool:
        return bool(trainer.is_deepspeed_enabled)
