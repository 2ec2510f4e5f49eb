"""`sft-dist plan`: the preflight of a config, before any GPU is booked or any model byte is loaded.

It resolves the config the way training will, and reports what the run changes from the defaults, its
batch geometry, every compatibility rule that fires (`plan/rules.py`), and a per-rank memory estimate
(`plan/memory.py`). `sft-dist train` runs the same rules first and refuses on any error.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from sft_dist.config.schema import Config
from sft_dist.errors import ConfigError
from sft_dist.plan.facts import Facts, gather_facts
from sft_dist.plan.rules import Finding, evaluate

log = logging.getLogger(__name__)


@dataclass
class Plan:
    facts: Facts
    findings: list[Finding]
    diff: dict[str, dict[str, Any]] = field(default_factory=dict)
    memory: Any = None  # plan.memory.MemoryEstimate
    memory_error: str | None = None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def geometry(self) -> dict[str, Any]:
        f = self.facts
        return {"micro_batch": f.micro_batch, "gradient_accumulation_steps": f.grad_accum,
                "world_size": f.world_size, "sequence_parallel": f.sequence_parallel, "global_batch": f.global_batch,
                "max_length": f.max_length,
                # packed rows are full; unpacked ones are padded to the longest row of their micro-batch
                "tokens_per_step_max": f.global_batch * f.max_length, "packing": f.packing,
                "sampling": f.sampling}

    def as_dict(self) -> dict[str, Any]:
        m = self.memory
        return {"verdict": "refused" if self.errors else "ok", "geometry": self.geometry,
                "setup": setup(self.facts), "rules": [x.as_dict() for x in self.findings],
                "memory_per_rank": dataclasses.asdict(m) if m is not None else None,
                "memory_error": self.memory_error, "config_diff": self.diff}


def setup(f: Facts) -> dict[str, Any]:
    precision = "bf16" if f.bf16 else "fp16" if f.fp16 else "fp32"
    backend = f"deepspeed zero{f.zero_stage}" if f.backend == "deepspeed" else (
        f"fsdp2 {f.fsdp_sharding}" if f.backend == "fsdp" else "ddp")
    quant = (f"{f.bits}-bit bitsandbytes (storage {f.quant_storage}, compute {f.compute_dtype}, unquantized weights "
             f"{f.unquantized_dtype})"
             if f.bits else "none")
    adapter = ("DoRA" if f.dora else "LoRA") if f.lora else "full fine-tuning"
    return {"device": f.device, "backend": backend, "precision": precision, "model_dtype": f.model_dtype,
            "quantization": quant, "adapter": adapter, "optimizer": f.optim,
            "activation_checkpointing": _checkpointing(f)}


def _checkpointing(f) -> str:
    if not f.activation_checkpointing:
        return "off"
    every = f", one decoder layer in {f.checkpoint_every}" if f.checkpoint_every > 1 else ""
    return "on" + every + (", layer inputs offloaded to the host" if f.checkpoint_offload else "")


def check(cfg: Config, *, device: str | None = None, world_size: int | None = None) -> list[Finding]:
    """Evaluate the rules; raise ConfigError naming every error (with its fix). Returns the warnings."""
    findings = evaluate(gather_facts(cfg, device=device, world_size=world_size))
    errors = [f.describe() for f in findings if f.severity == "error"]
    if errors:
        raise ConfigError(errors)
    return findings


def make_plan(cfg: Config, *, device: str | None = None, world_size: int | None = None,
              memory: bool = True) -> Plan:
    from sft_dist.plan.diff import config_diff

    facts = gather_facts(cfg, device=device, world_size=world_size, classes=True)
    plan = Plan(facts, evaluate(facts), config_diff(cfg))
    if memory:
        try:
            from sft_dist.model.build import without_zero3_init
            from sft_dist.plan.memory import estimate_memory

            # on a rank whose ZeRO-3 config is live, transformers would build even the meta model under
            # zero.Init, whose collectives the other ranks never join
            with without_zero3_init():
                plan.memory = estimate_memory(cfg, world_size=facts.world_size, device=facts.device, facts=facts)
        except Exception as e:
            log.debug("memory estimate failed", exc_info=True)
            plan.memory_error = f"{type(e).__name__}: {e}"
    return plan
