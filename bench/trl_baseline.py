"""The baseline bench/vs_trl.py measures sft_dist against: a hand-written TRL SFTTrainer script, LoRA, the way
a user would write it, started with `torchrun --nproc-per-node N bench/trl_baseline.py ...`. It records, on
rank 0, each optimizer step's end time and its loss-carrying tokens summed over ranks."""

from __future__ import annotations

import argparse
import json
import time

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer


class Counting(SFTTrainer):
    """Counts the loss-carrying tokens of every micro-batch this rank trains on."""

    step_tokens: list[int]

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.step_tokens[-1] += int(inputs["labels"][..., 1:].ne(-100).sum())
        return super().training_step(model, inputs, num_items_in_batch)


class StepClock(TrainerCallback):
    def __init__(self, trainer: Counting):
        self.trainer, self.ends = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())
        self.trainer.step_tokens.append(0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--trl-defaults", action="store_true",
                   help="keep TRL's defaults (activation checkpointing on); else match sft_dist's (off)")
    a = p.parse_args()
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model)
    args = SFTConfig(output_dir=a.out + ".trainer", max_steps=a.steps, per_device_train_batch_size=a.batch,
                     learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none",
                     max_length=a.max_length, use_cpu=True, seed=42, bf16=False, dataloader_pin_memory=False,
                     disable_tqdm=True, **({} if a.trl_defaults else {"activation_checkpointing": False}))
    trainer = Counting(model=model, args=args, train_dataset=load_dataset("json", data_files=a.data, split="train"),
                       processing_class=tok,
                       peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    trainer.step_tokens = [0]
    clock = StepClock(trainer)
    trainer.add_callback(clock)
    trainer.train()
    tokens = torch.tensor(trainer.step_tokens[:-1], dtype=torch.long)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tokens)
    if trainer.is_world_process_zero():
        with open(a.out, "w") as f:
            json.dump({"step_ends": clock.ends, "tokens": tokens.tolist()}, f)


if __name__ == "__main__":
    main()
