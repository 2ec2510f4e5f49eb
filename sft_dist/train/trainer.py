"""TRL's SFTTrainer plus the per-step numbers sft_dist logs: loss-carrying tokens and step time."""

from __future__ import annotations

import functools
import logging
import json
import time
from pathlib import Path

import torch
from transformers import Trainer
from trl import SFTTrainer

from sft_dist.backends import Backend
from sft_dist.backends.verify import grad_bytes, watch_deepspeed_grads
from sft_dist.config.batch import global_batch
from sft_dist.model import ulysses
from sft_dist.train.hooks import CheckpointHooks
from sft_dist.train.seams import check_private_seams


log = logging.getLogger("sft_dist")


class SFTDistTrainer(CheckpointHooks, SFTTrainer):
    """SFTTrainer that counts the tokens carrying loss (summed over ranks and micro-batches) per log window."""

    def __init__(self, *args, backend: Backend, local_world_size: int = 1, trace_path: Path | None = None,
                 **kwargs):
        check_private_seams()  # an upgrade that moved an overridden private method fails here, not silently
        # read by create_accelerator_and_postprocess, which super().__init__ calls
        self.backend = backend
        self.local_world_size = local_world_size
        self.backend_info: dict = {}
        self.grad_bytes_seen: int | None = None  # max gradient bytes held before an optimizer step
        self.sequence = None  # model/ulysses.Layout under backend.sequence_parallel_size > 1
        model = kwargs.get("model")
        originals = {n: p.data for n, p in model.named_parameters() if p.requires_grad} if model is not None else {}
        super().__init__(*args, **kwargs)
        _restore_trainable(self.model, originals)
        self._trace = None
        if trace_path is not None:
            trace_path.parent.mkdir(parents=True, exist_ok=True)
            self._trace = open(trace_path, "w", encoding="utf-8")
        self._window_tokens = 0
        self._window_start: float | None = None
        self._window_step = 0
        self._window_data_wait = 0.0
        self.total_loss_tokens = 0
        self.peak_tflops: float | None = None  # set by the run (metrics.peak_tflops or the device table)
        self.samples = None  # train/evaluation.Samples when metrics.generate_prompts is set
        self.eval_generations = None  # train/evaluation.EvalGenerations when metrics.generate_eval_rows is set
        self.early_stopping = None  # train/early_stop.EarlyStopping when training.early_stopping_patience is set
        self.eval_samples: list[dict] = []
        self._flops = None
        # [real tokens, tokens the model processed (padding included)] over ranks: this window, this run
        self._window_seen = [0, 0]
        self._total_seen = [0, 0]

    def _run_epoch(self, *args, **kwargs):
        # HF checks should_training_stop only after a step: a run resumed from a checkpoint written once early
        # stopping had stopped it (train/early_stop.py sets the flag at train begin) would train one step more.
        if self.control.should_training_stop:
            return None
        return super()._run_epoch(*args, **kwargs)

    def _track_num_input_tokens(self, inputs):
        before = self.state.num_input_tokens_seen
        super()._track_num_input_tokens(inputs)
        if self.sequence is not None:  # HF sums over ranks, and a group's ranks hold the same rows
            self.state.num_input_tokens_seen = before + (self.state.num_input_tokens_seen - before) // self.sequence.size

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        self.backend.after_accelerator(self, world_size=self.args.world_size, local_world_size=self.local_world_size)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._plain_lm_head_loss:
            # TRL's fused LM head reads `lm_head.weight` without calling the module, so FSDP2 never runs the
            # hooks of a trainable head that is its own shard unit (peft modules_to_save): its gradient skips
            # FSDP's reduce-scatter and comes out wrong. Use the model's own loss (same token normalisation).
            inputs["use_cache"] = False
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    @functools.cached_property
    def _plain_lm_head_loss(self) -> bool:
        """Whether the output head is trainable and sharded as an FSDP2 unit of its own (known after wrapping)."""
        if not self.is_fsdp_enabled:
            return False
        from torch.distributed.fsdp import FSDPModule

        head = self.model.get_output_embeddings()
        return head is not None and any(
            isinstance(m, FSDPModule) and any(p.requires_grad for p in m.parameters()) for m in head.modules()
        )

    def _prepare_for_training(self, *args, **kwargs):
        model, dataloader = super()._prepare_for_training(*args, **kwargs)
        # The model is wrapped now: fail here if the requested backend did not apply.
        self.backend_info = self.backend.verify(self, world_size=self.args.world_size)
        if self.is_deepspeed_enabled:
            watch_deepspeed_grads(self)
        return model, dataloader

    def _clip_grad_norm(self, model):
        # Called after backward and before the optimizer step, when this rank's gradients exist.
        if not self.is_deepspeed_enabled:
            self.grad_bytes_seen = max(self.grad_bytes_seen or 0, grad_bytes(self.model))
        return super()._clip_grad_norm(model)

    def training_step(self, model, inputs, num_items_in_batch=None):
        ids = inputs.pop("sample_ids", None)
        if self._trace is not None and ids is not None:
            # The placeholder of an epoch's last, smaller step (sampler.PLACEHOLDER) trained on no sample.
            record = {"step": self.state.global_step + 1, "sample_ids": [i for i in ids.tolist() if i >= 0]}
            self._trace.write(json.dumps(record) + "\n")
            self._trace.flush()
        if self.sequence is None:
            return super().training_step(model, inputs, num_items_in_batch)
        inputs, rows = self.split(inputs)
        with ulysses.active(rows):  # the backward too: activation checkpointing runs the attention again
            return super().training_step(model, inputs, num_items_in_batch)

    def split(self, inputs: dict) -> tuple[dict, "ulysses.Rows"]:
        """This rank's slice of a micro-batch its sequence-parallel group shares (model/ulysses.py)."""
        return ulysses.split(inputs, self.sequence, flat=ulysses.inner_reads_boundaries())

    @property
    def data_parallel(self) -> tuple[int, int]:
        """(data-parallel ranks, this rank's index among them): the workers, or under sequence parallelism their
        groups, whose ranks share rows (the sampler and the eval shards deal by these)."""
        if self.sequence is None:
            return self.args.world_size, self.args.process_index
        return self.sequence.dp_world, self.sequence.dp_rank

    def close_trace(self) -> None:
        if self._trace is not None:
            self._trace.close()
            self._trace = None

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self._window_start is None:
            self._window_start = time.perf_counter()
            self._window_step = self.state.global_step
        t0 = time.perf_counter()
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._window_data_wait += time.perf_counter() - t0
        tokens, real, processed = self._count_global(batch_samples, device)
        if self.sequence is not None:  # a group's ranks hold the same rows: count them once
            tokens, real, processed = (x // self.sequence.size for x in (tokens, real, processed))
            if num_items is not None:
                num_items = num_items // self.sequence.size
        if num_items is not None and self.args.average_tokens_across_devices:
            tokens = int(num_items)  # already summed over ranks by the Trainer
        self._window_tokens += tokens
        self.total_loss_tokens += tokens
        for seen in (self._window_seen, self._total_seen):
            seen[0] += real
            seen[1] += processed
        return batch_samples, num_items

    def _count_global(self, batch_samples, device) -> tuple[int, int, int]:
        """Loss-carrying tokens, real tokens and processed tokens (what the model ran on: rows x padded
        length, or the flattened length) in these micro-batches, summed over ranks."""
        local = [0, 0, 0]
        for b in batch_samples:
            if "labels" in b:
                local[0] += int(b["labels"][..., 1:].ne(-100).sum())
            real = b.pop("input_tokens", None)  # from SampleIdCollator; not a model input
            if real is not None:
                local[1] += int(real)
                local[2] += b["input_ids"].numel()
        if self.args.world_size > 1:
            t = torch.tensor(local, device=device)
            torch.distributed.all_reduce(t)
            return tuple(int(x) for x in t)
        return tuple(local)

    def padding_fraction(self, seen: list[int] | None = None) -> float | None:
        """The share of the tokens the model processed that were padding (this run's, by default)."""
        real, processed = seen or self._total_seen
        return 1 - real / processed if processed else None

    def prediction_step(self, model, inputs, *args, **kwargs):
        inputs.pop("input_tokens", None)
        return super().prediction_step(model, inputs, *args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """sft_dist's evaluation (train/evaluation.py): one token-weighted eval loss over all ranks, and the
        generation samples. Named eval sets (a dict, as HF's Trainer takes them) are each scored under
        `<prefix>_<name>`, and all together under `<prefix>`. Evaluation time is not training step time: the window
        start moves past it."""
        from sft_dist.train.evaluation import combined, eval_sets, eval_totals, loss_metrics

        t0 = time.perf_counter()
        try:
            dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
            sets, metrics, totals = eval_sets(dataset, metric_key_prefix), {}, {}
            for prefix, ds in sets.items():
                totals[prefix] = eval_totals(self, ds)
                metrics.update(loss_metrics(totals[prefix], prefix))
                if self.eval_generations is not None:
                    metrics.update(self.eval_generations(self, ds, step=self.state.global_step, prefix=prefix))
            if isinstance(dataset, dict):  # named eval sets: each, and all of them together
                metrics = {**combined(metrics, totals, metric_key_prefix), **metrics}
            metrics[f"{metric_key_prefix}_runtime"] = round(time.perf_counter() - t0, 4)
            if self.samples is not None:
                for s in self.samples(self.model, step=self.state.global_step, device=self.args.device):
                    self.eval_samples.append(s)
                    if self.is_world_process_zero():
                        log.info("sample at step %d: %r -> %r", s["step"], s["prompt"], s["completion"])
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics
        finally:
            if self._window_start is not None:
                self._window_start += time.perf_counter() - t0

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._window_start is not None:
            # Every rank logs at the same steps, so the one collective here (peak memory) is safe.
            now = time.perf_counter()
            elapsed = now - self._window_start
            steps = max(1, self.state.global_step - self._window_step)
            world = self.args.world_size
            logs["tokens"] = self._window_tokens
            logs["tokens_total"] = self.total_loss_tokens
            logs["step_time_s"] = elapsed / steps
            logs["data_wait_s"] = self._window_data_wait / steps
            logs["tokens_per_s"] = self._window_tokens / elapsed if elapsed > 0 else 0.0
            logs["tokens_per_s_per_device"] = logs["tokens_per_s"] / world
            mfu = self._mfu(self._window_seen[0], elapsed, steps)
            if mfu is not None:
                logs["mfu"] = mfu
            logs["peak_mem_bytes"] = self._peak_memory()
            if self.state.max_steps > 0:
                logs["eta_s"] = logs["step_time_s"] * (self.state.max_steps - self.state.global_step)
            if self._window_seen[1]:
                logs["padding_fraction"] = self.padding_fraction(self._window_seen)
            if self._metrics["train"].get("num_tokens") and self._total_seen[0]:
                # TRL counts a batch without attention_mask (packed rows) as one row of position_ids: give
                # its `num_tokens` the real tokens, the same number it reports for padded batches.
                self._metrics["train"]["num_tokens"] = [self._total_seen[0]]
            self._window_tokens = 0
            self._window_data_wait = 0.0
            self._window_seen = [0, 0]
            self._window_start = now
            self._window_step = self.state.global_step
        super().log(logs, start_time)

    def _mfu(self, tokens: int, elapsed: float, steps: int) -> float | None:
        """Model FLOPs of the window's real (non-padding) input tokens, all ranks, per device-second, over the
        device peak."""
        if self.peak_tflops is None or elapsed <= 0 or not tokens:
            return None
        if self._flops is None:
            from sft_dist.metrics.flops import model_flops

            self._flops = model_flops(self.model)
        rows = steps * global_batch(self.args.per_device_train_batch_size, self.args.gradient_accumulation_steps,
                                    self.data_parallel[0])
        seq = tokens / rows  # mean tokens per row: the attention span, approximately (a packed row: its documents')
        return self._flops.per_token(seq) * tokens / elapsed / self.args.world_size / (self.peak_tflops * 1e12)

    def _peak_memory(self) -> int:
        """The largest peak over ranks: allocated device memory on a GPU, the process's peak RSS on a CPU."""
        if torch.cuda.is_available() and self.args.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.args.device)
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
        if self.args.world_size > 1:
            t = torch.tensor(peak, dtype=torch.long, device=self.args.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            peak = int(t)
        return int(peak)


def _restore_trainable(model, originals: dict) -> None:
    """Undo TRL's cast of a quantized model's trainable parameters to bf16: they stay the tensors peft gave them
    (fp32 masters, as for every LoRA run), values included: a cast back would keep them rounded to bf16 (a loaded
    `lora.init_adapter`, the random init). In bf16 the small updates of the adapter are rounded away, a trainable
    head (`modules_to_save`) no longer matches fp32 activations, and FSDP2 would shard bf16 masters."""
    for name, param in model.named_parameters():
        want = originals.get(name)
        if want is None or param.dtype == want.dtype:
            continue
        # the original tensor where it is still on the parameter's device, else a cast of what is there
        param.data = want if want.device == param.device else param.data.to(want.dtype)

