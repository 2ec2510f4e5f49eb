"""Plain TRL SFTTrainer on one device, written the way a user would (LoRA, TRL's own packing): bench/gpu.py's
baseline. Writes, as JSON: each optimizer step's end time, its loss-carrying and real tokens, the losses, the peak
device memory, and MFU counted the way sft_dist counts it (sft_dist/metrics/flops.py, real tokens).

    python bench/gpu/trl_run.py --model DIR --data FILE --out FILE [--attn sdpa] [--packing-strategy bfd] ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

T_START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl import SFTConfig  # noqa: E402
from trl_baseline import Counting  # noqa: E402  (counts loss-carrying tokens per micro-batch)


class RealCounting(Counting):
    """Also counts the real (non-padding) input tokens, which MFU is computed from."""

    step_real: list[int]

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs.get("attention_mask")
        self.step_real[-1] += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        return super().training_step(model, inputs, num_items_in_batch)


class Clock(TrainerCallback):
    def __init__(self, trainer: RealCounting, steps: int):
        self.trainer, self.steps, self.ends = trainer, steps, []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())
        self.trainer.step_tokens.append(0)
        self.trainer.step_real.append(0)
        # the line bench/gpu.py watches for (the first optimizer step), like sft_dist's progress line
        print(f"step {state.global_step}/{self.steps}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--packing-strategy", default="bfd", help="bfd (TRL's default: padding-free) or wrapped")
    p.add_argument("--activation-checkpointing", type=int, default=None, help="unset: TRL's default (on)")
    p.add_argument("--liger", type=int, default=0, help="TRL's (deprecated) use_liger_kernel")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--device", default="cuda")
    p.add_argument("--peak-tflops", type=float, default=None, help="default: the device's (sft_dist's table)")
    a = p.parse_args()
    cuda = a.device == "cuda"
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation=a.attn, device_map=a.device if cuda else None)
    extra = {} if a.activation_checkpointing is None else {"activation_checkpointing": bool(a.activation_checkpointing)}
    args = SFTConfig(output_dir=a.out + ".trainer", max_steps=a.steps, per_device_train_batch_size=a.batch,
                     learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none", seed=42,
                     max_length=a.max_length, packing=True, packing_strategy=a.packing_strategy, bf16=cuda,
                     use_cpu=not cuda, dataloader_pin_memory=cuda, disable_tqdm=True, use_liger_kernel=bool(a.liger),
                     **extra)
    trainer = RealCounting(model=model, args=args, processing_class=tok,
                           train_dataset=load_dataset("json", data_files=a.data, split="train"),
                           peft_config=LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0,
                                                  target_modules="all-linear"))
    trainer.step_tokens, trainer.step_real = [0], [0]
    clock = Clock(trainer, a.steps)
    trainer.add_callback(clock)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()

    from sft_dist.metrics.flops import device_peak_tflops, model_flops

    peak, source = device_peak_tflops(a.device, given=a.peak_tflops, half_precision=cuda)
    flops = model_flops(trainer.model)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = {"step_ends": clock.ends, "tokens": trainer.step_tokens[:-1], "real_tokens": trainer.step_real[:-1],
           "losses": losses, "rows_per_step": a.batch, "start_to_first_step_s": clock.ends[0] - T_START,
           "peak_mem_bytes": torch.cuda.max_memory_allocated() if cuda else None,
           "flops_per_token_at_seq": {"trainable_matmul": flops.trainable_matmul, "frozen_matmul": flops.frozen_matmul,
                                      "layers": flops.layers, "hidden": flops.hidden},
           "peak_tflops": peak, "peak_source": source, "attn": model.config._attn_implementation,
           "padding_free": bool(getattr(trainer, "padding_free", False))}
    Path(a.out).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
