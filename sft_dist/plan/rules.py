"""The compatibility rules: one table, one entry per known way a setup fails (or wastes the cluster).

Each rule is data: an id, a severity, the config keys it concerns, a predicate over `Facts`, and the
message and fix as templates filled from the facts. `sft-dist plan` and `sft-dist train` evaluate the
same table before any model byte is loaded; an `error` refuses the run, a `warning` is printed.
What was measured with this stack (README "QLoRA across backends") decides which side a setup is on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sft_dist.metrics.eval_names import bare, choices, greater_is_better
from sft_dist.plan.facts import Facts

FLOATS = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Rule:
    id: str
    severity: str  # "error" refuses the run; "warning" is printed
    keys: tuple[str, ...]  # the config keys involved, named in the message
    when: Callable[[Facts], bool]
    message: str  # str.format(f=facts, ...) template: what goes wrong, and why
    fix: str  # what to set instead

    def fire(self, f: Facts) -> Finding | None:
        if not self.when(f):
            return None
        values = {**_derived(f), "f": f}
        return Finding(self.id, self.severity, self.keys, self.message.format(**values), self.fix.format(**values))


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str
    keys: tuple[str, ...]
    message: str
    fix: str

    def describe(self) -> str:
        return f"[{self.rule}] {', '.join(self.keys)}: {self.message}. Fix: {self.fix}"

    def as_dict(self) -> dict:
        return {"rule": self.rule, "severity": self.severity, "keys": list(self.keys), "message": self.message,
                "fix": self.fix}


def _derived(f: Facts) -> dict:
    per_step = f.micro_batch * f.world_size
    return {"global_batch": f.global_batch, "per_step": per_step,
            "reason": ("training.eval_strategy is 'no': no eval ever runs" if f.eval_strategy == "no" and not f.eval_only
                       else "there is no eval data (data.eval_files, data.eval_split or data.eval_split_ratio)"),
            "best_choices": ", ".join(choices(f.generate_eval_rows, f.eval_sets)),
            "text_hint": ("" if f.generate_eval_rows > 0 else
                          " (exact_match, token_f1 and rouge_l need metrics.generate_eval_rows > 0)"),
            "worst": "highest" if f.greater_is_better else "lowest",
            "right": str(not f.greater_is_better).lower(),
            "saved": f" and the modules_to_save copies ({', '.join(f.modules_to_save)})" if f.modules_to_save else "",
            "accum_fix": (f"gradient_accumulation_steps: {f.ds_train_batch_size // per_step}"
                          if isinstance(f.ds_train_batch_size, int) and f.ds_train_batch_size % per_step == 0
                          else f"a train_batch_size that is a multiple of {per_step}")}


def _zero3(f: Facts) -> bool:
    return f.backend == "deepspeed" and f.zero_stage == 3


RULES: tuple[Rule, ...] = (
    Rule("qlora-fsdp-quant-storage", "error", ("quantization.quant_storage", "backend.type"),
         lambda f: f.backend == "fsdp" and f.bits == 4 and f.quant_storage not in FLOATS,
         "4-bit weights packed as {f.quant_storage} cannot be sharded by FSDP2, which shards floating-point tensors "
         "only: every rank would keep the whole quantized base (FSDP1 fails outright with \"Cannot flatten integer "
         "dtype tensors\")",
         "set quantization.quant_storage: {f.model_dtype} (the model's dtype; `auto` does this under FSDP)"),
    Rule("int8-fsdp", "error", ("quantization.bits", "backend.type"),
         lambda f: f.backend == "fsdp" and f.bits == 8,
         "bitsandbytes 8-bit weights (Int8Params) lose their int8 state when FSDP2 shards them (the first forward "
         "fails with \"'Parameter' object has no attribute 'CB'\")",
         "use quantization.bits: 4 under FSDP (the 4-bit weights shard), or keep 8-bit with backend.type: ddp or "
         "deepspeed (ZeRO-2/3 train 8-bit)"),
    Rule("qlora-zero3-init", "warning", ("quantization.bits", "backend.config"),
         lambda f: _zero3(f) and f.bits is not None,
         "ZeRO-3 with a {f.bits}-bit base: transformers does not load a quantized model under zero.Init, so every "
         "rank loads the whole quantized base before DeepSpeed partitions it (see the memory estimate's load peak)",
         "make sure one rank's memory holds the whole {f.bits}-bit base; if not, use backend.type: fsdp, whose "
         "ranks hold 1/N of it after wrapping"),
    Rule("reentrant-checkpointing-lora", "error",
         ("training.activation_checkpointing_kwargs.use_reentrant", "training.ddp_find_unused_parameters",
          "backend.type"),
         lambda f: f.lora and f.activation_checkpointing and f.use_reentrant is True and f.backend == "ddp"
         and f.world_size > 1 and f.ddp_find_unused,
         "reentrant activation checkpointing reruns each block's forward inside backward, so DDP searching for "
         "unused parameters marks the LoRA weights ready twice and the first backward fails (\"Expected to mark "
         "a variable ready only once\")",
         "set training.activation_checkpointing_kwargs: {{use_reentrant: false}} (the default), or "
         "training.ddp_find_unused_parameters: false (sft_dist's default)"),
    Rule("dora-int8", "error", ("lora.use_dora", "quantization.bits"),
         lambda f: f.dora and f.bits == 8,
         "DoRA on bitsandbytes 8-bit layers fails in training with this stack: computing the weight norm "
         "dequantizes the int8 weight and drops its scale state (\"'NoneType' object has no attribute "
         "'unsqueeze'\" in the next forward)",
         "use quantization.bits: 4 with DoRA (trains under DDP, ZeRO and FSDP2), or plain LoRA (lora.use_dora: "
         "false) on the 8-bit base"),
    Rule("dora-quantized-zero3", "error", ("lora.use_dora", "quantization.bits", "backend.config"),
         lambda f: f.dora and f.bits is not None and _zero3(f),
         "DoRA on a quantized base under ZeRO-3 fails at the first step: DoRA reads the whole quantized weight "
         "for its norm, outside the gather ZeRO-3 does around each module (\"'Params4bit' object has no attribute "
         "'ds_status'\")",
         "use backend.type: fsdp (DoRA + 4-bit trains under FSDP2) or ZeRO-2, or plain LoRA under ZeRO-3"),
    Rule("dora-quantized-cost", "warning", ("lora.use_dora", "quantization.bits"),
         lambda f: f.dora and f.bits == 4,
         "DoRA on a 4-bit base dequantizes every adapted weight in each forward to take its column norms: expect "
         "a slower step and a transient full-precision copy of one weight at a time",
         "none needed; plain LoRA (lora.use_dora: false) avoids the cost"),
    Rule("fp16-on-cpu", "error", ("training.fp16", "launcher.device"),
         lambda f: f.fp16 and f.device == "cpu",
         "fp16 mixed precision needs a CUDA GPU (its loss scaling and fp16 autocast are GPU-only in the Trainer); "
         "the workers train on CPU",
         "set training.bf16: true (CPU autocast supports bf16) or neither, for fp32"),
    Rule("activation-offloading-on-cpu", "error", ("training.activation_offloading", "launcher.device"),
         lambda f: f.activation_offloading and f.device == "cpu",
         "training.activation_offloading moves the activations saved for backward from the GPU to host memory (TRL's "
         "OffloadActivations); the workers train on CPU, where there is no accelerator to move them from (TRL "
         "fails at start)",
         "remove training.activation_offloading on CPU (or use activation_checkpointing to save memory)"),
    Rule("bf16-without-hardware", "error", ("training.bf16", "model.dtype", "quantization.compute_dtype"),
         lambda f: f.device == "cuda" and f.bf16_hardware is False
         and (f.bf16 or "bfloat16" in (f.model_dtype, f.compute_dtype)),
         "bf16 is requested but this GPU has no native bf16 (compute capability < 8.0, e.g. V100 / T4): it would "
         "be emulated (slow) or fail in the kernels",
         "set training.fp16: true with model.dtype: float16 (or float32), and quantization.compute_dtype: "
         "float16 for QLoRA"),
    Rule("bnb-optimizer-device", "error", ("training.optim", "launcher.device"),
         lambda f: f.bnb_optimizer and f.bnb_optimizer_kernels is False,
         "training.optim={f.optim} runs on bitsandbytes kernels, and the installed bitsandbytes has none for "
         "{f.device} (or is not installed)",
         "set training.optim: adamw_torch, or install a bitsandbytes build for {f.device}"),
    Rule("paged-optimizer-on-cpu", "warning", ("training.optim", "launcher.device"),
         lambda f: f.optim.startswith("paged_") and f.device == "cpu" and f.bnb_optimizer_kernels is not False,
         "training.optim={f.optim} pages optimizer state through CUDA unified memory; on CPU nothing is paged "
         "(it trains as the plain 8-bit optimizer)",
         "none needed on CPU; the paging takes effect on GPUs"),
    Rule("best-model-without-eval", "error", ("training.load_best_model_at_end", "training.eval_strategy",
                                              "data.eval_files"),
         lambda f: f.load_best and (f.eval_strategy == "no" or not f.has_eval_data),
         "load_best_model_at_end picks the best checkpoint by its eval metric, but "
         "{reason}",
         "set training.eval_strategy (steps or epoch, like save_strategy) and data.eval_files / "
         "data.eval_split_ratio, or remove training.load_best_model_at_end"),
    Rule("early-stopping-without-eval", "error", ("training.early_stopping_patience", "training.eval_strategy",
                                                  "data.eval_files"),
         lambda f: f.early_stopping_patience is not None and not f.eval_only
         and (f.eval_strategy == "no" or not f.has_eval_data),
         "training.early_stopping_patience stops training when the eval metric stops improving, but {reason}",
         "set training.eval_strategy (steps or epoch) and data.eval_files / data.eval_split_ratio, or remove "
         "training.early_stopping_patience"),
    Rule("early-stopping-keeps-last", "warning", ("training.early_stopping_patience",
                                                  "training.load_best_model_at_end"),
         lambda f: f.early_stopping_patience is not None and not f.eval_only and f.eval_strategy != "no"
         and f.has_eval_data and not f.load_best,
         "training.early_stopping_patience={f.early_stopping_patience} stops {f.early_stopping_patience} "
         "evaluations after the best one, and without training.load_best_model_at_end the saved adapter (or model) "
         "is the last step's, not the best's",
         "set training.load_best_model_at_end: true (with save_strategy and save_steps matching the evaluations), "
         "or keep the last step's weights knowingly"),
    Rule("evaluate-without-eval-data", "error", ("training.do_train", "data.eval_files"),
         lambda f: f.eval_only and not f.has_eval_data,
         "training.do_train=false evaluates the model on the eval data and trains nothing, but there is no eval "
         "data (data.eval_files, data.eval_split or data.eval_split_ratio)",
         "give the data to evaluate on as data.eval_files (e.g. `sft-dist evaluate RUN data.eval_files=test.jsonl`), "
         "or remove training.do_train to train"),
    Rule("generated-eval-without-eval", "error", ("metrics.generate_eval_rows", "training.eval_strategy",
                                                  "data.eval_files"),
         lambda f: f.generate_eval_rows > 0 and ((f.eval_strategy == "no" and not f.eval_only) or not f.has_eval_data),
         "metrics.generate_eval_rows={f.generate_eval_rows} answers eval rows at each evaluation, but {reason}",
         "set training.eval_strategy (steps or epoch) and data.eval_files / data.eval_split_ratio, or "
         "metrics.generate_eval_rows: 0"),
    Rule("best-metric-unknown", "error", ("training.metric_for_best_model",),
         lambda f: f.best_metric is not None and bare(f.best_metric) not in choices(f.generate_eval_rows,
                                                                                    f.eval_sets),
         "{f.best_metric!r} is not a metric this run's evaluation reports a best checkpoint can be chosen by: the "
         "Trainer would fail (or keep checkpoints by, e.g., eval_runtime) at the first evaluation, after training "
         "up to it",
         "name one of {best_choices}{text_hint}"),
    Rule("best-metric-direction", "warning", ("training.metric_for_best_model", "training.greater_is_better"),
         lambda f: (f.best_metric is not None and f.greater_is_better is not None
                    and greater_is_better(f.best_metric, f.eval_sets) not in (None, f.greater_is_better)),
         "training.greater_is_better={f.greater_is_better} keeps the checkpoint with the "
         "{worst} {f.best_metric}",
         "remove training.greater_is_better (sft_dist sets it from the metric) or set it to {right}"),
    Rule("hub-strategy-checkpoints", "error", ("training.push_to_hub", "training.hub_strategy"),
         lambda f: f.push_to_hub and f.hub_strategy in ("checkpoint", "all_checkpoints"),
         "hub_strategy={f.hub_strategy} would push resumable checkpoints, and sft_dist's are its own sharded "
         "format (checkpoint.dir), not a model a Hub repo serves; sft_dist pushes the final adapter or model, once, "
         "at the end",
         "remove training.hub_strategy (or set it to end); resume from checkpoint.dir (a shared path or s3://)"),
    Rule("loss-per-device", "warning", ("training.average_tokens_across_devices",),
         lambda f: f.per_device_loss and f.world_size > 1 and not f.eval_only,
         "training.average_tokens_across_devices=false divides each rank's loss by that rank's own loss-carrying "
         "tokens: a step's gradient is then a mean of per-rank means, not of its tokens, and depends on how the "
         "tokens fall across the {f.world_size} ranks (another number of workers trains differently)",
         "remove it: sft_dist's default (true) normalises by the step's loss-carrying tokens over all ranks"),
    Rule("save-only-model-ignored", "warning", ("training.save_only_model",),
         lambda f: f.save_only_model and not f.eval_only,
         "training.save_only_model would leave the optimizer, scheduler and RNG state out of checkpoints; sft_dist's "
         "checkpoints always hold them (only the trainable weights' shards, not the frozen base), so that a resume "
         "continues exactly: the setting is ignored",
         "remove training.save_only_model; to keep fewer checkpoints set save_total_limit (the best is kept with "
         "checkpoint.keep_best)"),
    Rule("global-batch-not-divisible", "error", ("backend.config: train_batch_size",
                                                 "training.per_device_train_batch_size",
                                                 "training.gradient_accumulation_steps", "launcher.num_workers"),
         lambda f: isinstance(f.ds_train_batch_size, int) and f.ds_train_batch_size != f.global_batch,
         "the DeepSpeed config fixes train_batch_size={f.ds_train_batch_size}, but micro batch {f.micro_batch} x "
         "accumulation {f.grad_accum} x {f.world_size} workers = {global_batch} (DeepSpeed asserts they are equal)",
         "set train_batch_size to \"auto\" (derived from training.*), or {accum_fix}"),
    Rule("max-length-beyond-positions", "error", ("data.max_length", "model"),
         lambda f: f.max_positions is not None and f.max_length > f.max_positions,
         "data.max_length={f.max_length} is longer than the model's {f.max_positions} positions "
         "(max_position_embeddings): positions past it have no embedding / RoPE table entry",
         "set data.max_length <= {f.max_positions}, or extend the model's context (rope_scaling) in its config"),
    Rule("packing-without-positions", "error", ("data.packing", "model"),
         lambda f: f.packing_problem is not None,
         "{f.packing_problem}", "set data.packing: false (rows padded to the longest of each micro-batch)"),
    Rule("zero3-adapter-export", "error", ("backend.config: stage3_gather_16bit_weights_on_model_save",
                                           "lora.modules_to_save"),
         lambda f: _zero3(f) and f.lora and not f.zero_gather_on_save,
         "under ZeRO-3 every LoRA weight{saved} is partitioned across ranks; without gathering on save the "
         "exported adapter holds empty tensors",
         "set zero_optimization.stage3_gather_16bit_weights_on_model_save: true (configs/deepspeed/zero3.json "
         "does)"),
    Rule("hybrid-shard-size", "error", ("backend.config: shard_size", "launcher.num_workers"),
         lambda f: f.fsdp_sharding == "hybrid_shard" and f.fsdp_shard_size is not None
         and f.world_size % f.fsdp_shard_size != 0,
         "hybrid sharding groups the {f.world_size} workers into shards of {f.fsdp_shard_size}, which does not "
         "divide them",
         "set shard_size to a divisor of {f.world_size} (e.g. the GPUs per node)"),
)


def evaluate(f: Facts, rules: tuple[Rule, ...] = RULES) -> list[Finding]:
    return [finding for rule in rules if (finding := rule.fire(f)) is not None]
