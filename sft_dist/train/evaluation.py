"""Evaluation during training: the eval loss over the whole eval split, split across ranks and reduced
as one token-weighted mean (not a mean of per-batch means, no sample counted twice), its perplexity and
next-token accuracy; and greedy completions of fixed prompts, written to output_dir/samples.jsonl.

Every rank runs the same number of forward passes (ZeRO-3 and FSDP2 gather weights inside forward, so a
rank that stopped early would hang the others): shards are padded with placeholder rows that carry no
loss, and generation keeps finished ranks stepping (`synced_gpus`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from sft_dist.data.sampler import PLACEHOLDER, WithPlaceholder

NOT_MODEL_INPUTS = ("sample_ids", "input_tokens", "completion_mask", "assistant_masks", "seq_lengths")


def shard(n: int, world: int, rank: int) -> list[int]:
    """Rank `rank`'s eval rows (every world-th), padded with PLACEHOLDER to the same count on every rank."""
    mine = list(range(rank, n, world))
    return mine + [PLACEHOLDER] * (math.ceil(n / world) - len(mine))


def fused_head(trainer) -> bool:
    """Whether the model scores through TRL's fused LM head (SFTTrainer adds it), as the training step does; not
    where training itself uses the model's own loss (FSDP2 with the output head a unit of its own)."""
    return not getattr(trainer, "_plain_lm_head_loss", False)


def eval_loss(trainer, dataset, prefix: str = "eval") -> dict[str, float]:
    args = trainer.args
    model = trainer.model
    was_training = model.training
    model.eval()
    rows = shard(len(dataset), args.world_size, args.process_index)
    bs = args.per_device_eval_batch_size
    loader = torch.utils.data.DataLoader(WithPlaceholder(dataset), batch_sampler=[rows[i:i + bs] for i in
                                                                                 range(0, len(rows), bs)],
                                         collate_fn=trainer.data_collator)
    totals = torch.zeros(3, dtype=torch.float64, device=args.device)  # summed loss, loss tokens, correct
    fused = fused_head(trainer)
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
                     if k not in NOT_MODEL_INPUTS}
            batch["use_cache"] = False  # a KV cache would also join packed documents (data/packing.py)
            labels = batch["labels"][..., 1:]
            mask = labels.ne(-100)
            if fused:
                # TRL's fused LM head, as the training step: per-token log-probabilities and top-1 hits computed
                # in tiles, never the (rows, tokens, vocabulary) logits that the model's own forward builds and its
                # loss upcasts (8 x 2048 tokens x 128,256 vocabulary x 4 bytes: 7.8 GiB, over what training needed)
                out = model(**batch, fused_lm_head=True)
                nll, correct = -out.log_probs.double().sum(), out.is_top1.sum()
            else:
                out = model(**batch)
                n = mask.sum()  # the loss is a mean over the batch's loss tokens: NaN for a batch of placeholders
                nll = torch.where(n > 0, out.loss.double() * n, 0.0)
                correct = (out.logits[..., :-1, :].argmax(-1).eq(labels) & mask).sum()
            totals += torch.stack([nll, mask.sum().double(), correct.double()])
    if args.world_size > 1:
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    loss_sum, tokens, correct = totals.tolist()
    loss = loss_sum / max(tokens, 1)
    return {f"{prefix}_loss": loss, f"{prefix}_perplexity": math.exp(min(loss, 50.0)),
            f"{prefix}_mean_token_accuracy": correct / max(tokens, 1), f"{prefix}_tokens": int(tokens)}


class Samples:
    """Greedy completions of fixed prompts at each evaluation (formatted as the run's data is)."""

    def __init__(self, prompts: list[str], *, data_cfg: dict, tokenizer, max_new_tokens: int, path: Path | None,
                 sync: bool):
        from sft_dist.generate import format_prompt

        self.prompts, self.tok, self.max_new_tokens, self.path, self.sync = prompts, tokenizer, max_new_tokens, path, sync
        fmt = data_cfg.get("format", "alpaca")
        self.texts = [format_prompt({"data": data_cfg}, tokenizer, p) for p in prompts]
        from sft_dist.data.formats import CHAT_FORMATS

        self.add_special = fmt not in CHAT_FORMATS  # chat templates render their own BOS

    def __call__(self, model, *, step: int, device) -> list[dict]:
        was_training = model.training
        model.eval()
        out = []
        with torch.no_grad():
            for prompt, text in zip(self.prompts, self.texts):
                enc = self.tok(text, return_tensors="pt", add_special_tokens=self.add_special).to(device)
                ids = model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                     pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id,
                                     eos_token_id=self.tok.eos_token_id, synced_gpus=self.sync)
                completion = self.tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
                out.append({"step": step, "prompt": prompt, "completion": completion})
        model.train(was_training)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in out)
        return out
