"""Evaluation during training: the eval loss over the whole eval split, split across ranks and reduced
as one token-weighted mean (not a mean of per-batch means, no sample counted twice), its perplexity and
next-token accuracy; greedy completions of fixed prompts, written to output_dir/samples.jsonl; and the eval rows'
prompts answered and scored against their answers (exact match, token F1, ROUGE-L: `EvalGenerations`).

Every rank runs the same number of forward passes (ZeRO-3 and FSDP2 gather weights inside forward, so a
rank that stopped early would hang the others): shards are padded with placeholder rows that carry no
loss, and generation keeps finished ranks stepping (`synced_gpus`).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from sft_dist.data.loader import token_lengths
from sft_dist.data.sampler import PLACEHOLDER, WithPlaceholder
from sft_dist.errors import SftDistError
from sft_dist.model import ulysses

NOT_MODEL_INPUTS = ("sample_ids", "input_tokens", "completion_mask", "assistant_masks", "seq_lengths")


def shard(n: int, world: int, rank: int, lengths: list[int] | None = None) -> list[int]:
    """Rank `rank`'s eval rows, padded with PLACEHOLDER to the same count on every rank: every world-th row, or with
    `lengths` every world-th of the rows sorted longest first, so that the ranks get about the same tokens and a
    batch of consecutive rows little padding (the loss is a sum over rows: their order does not change it)."""
    order = range(n) if lengths is None else sorted(range(n), key=lambda i: (-lengths[i], i))
    mine = list(order[rank::world])
    return mine + [PLACEHOLDER] * (math.ceil(n / world) - len(mine))


def eval_sets(dataset, prefix: str = "eval") -> dict:
    """{metric prefix: dataset}: the eval dataset, or each named eval set (`data.eval_files: {name: files}`) under
    `<prefix>_<name>`, as HF's Trainer names a dict of eval datasets' metrics."""
    if isinstance(dataset, dict):
        return {f"{prefix}_{name}": ds for name, ds in dataset.items()}
    return {prefix: dataset} if dataset is not None else {}


def continued_rows(dataset) -> frozenset[int]:
    """The rows that go on from the row before: the windows of a row of data.truncation=split follow each other with
    its sample_id (data/build.py); they have no prompt of their own to answer."""
    ids = dataset["sample_id"]
    return frozenset(i for i in range(1, len(ids)) if ids[i] == ids[i - 1])


def fused_head(trainer) -> bool:
    """Whether the model scores through TRL's fused LM head (SFTTrainer adds it), as the training step does; not
    where training itself uses the model's own loss (FSDP2 with the output head a unit of its own)."""
    return not getattr(trainer, "_plain_lm_head_loss", False)


def eval_totals(trainer, dataset) -> list[float]:
    """[summed loss, loss tokens, correct top-1 predictions] over the whole dataset, summed over all ranks."""
    args = trainer.args
    model = trainer.model
    was_training = model.training
    model.eval()
    sequence = trainer.sequence  # sequence parallelism: a group's ranks score the same rows
    rows = shard(len(dataset), *trainer.data_parallel, token_lengths(dataset))
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
            scope = contextlib.nullcontext()
            if sequence is not None:  # this rank's slice, its labels already shifted across slices
                batch, whole = trainer.split(batch)
                scope = ulysses.active(whole)
                labels = batch["shift_labels"]
            else:
                labels = batch["labels"][..., 1:]
            mask = labels.ne(-100)
            with scope:
                if fused:
                    # TRL's fused LM head, as the training step: per-token log-probabilities and top-1 hits computed
                    # in tiles, never the (rows, tokens, vocabulary) logits that the model's own forward builds and
                    # its loss upcasts (8 x 2048 tokens x 128,256 vocabulary x 4 bytes: 7.8 GiB, over what training
                    # needed)
                    out = model(**batch, fused_lm_head=True)
                    nll, correct = -out.log_probs.double().sum(), out.is_top1.sum()
                else:
                    out = model(**batch)
                    n = mask.sum()  # the loss is a mean over the batch's loss tokens: NaN for a batch of placeholders
                    nll = torch.where(n > 0, out.loss.double() * n, 0.0)
                    logits = out.logits if sequence is not None else out.logits[..., :-1, :]
                    correct = (logits.argmax(-1).eq(labels) & mask).sum()
            totals += torch.stack([nll, mask.sum().double(), correct.double()])
    if args.world_size > 1:
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    return totals.tolist()


def loss_metrics(totals: list[float], prefix: str) -> dict[str, float]:
    loss_sum, tokens, correct = totals
    loss = loss_sum / max(tokens, 1)
    return {f"{prefix}_loss": loss, f"{prefix}_perplexity": math.exp(min(loss, 50.0)),
            f"{prefix}_mean_token_accuracy": correct / max(tokens, 1), f"{prefix}_tokens": int(tokens)}


def combined(metrics: dict[str, float], totals: dict[str, list[float]], prefix: str) -> dict[str, float]:
    """The metrics of named eval sets all together: the loss of their union (token-weighted), and the answers'
    scores as a mean over every answer (`metrics` holds each set's, under the keys of `totals`)."""
    from sft_dist.metrics.text import NAMES

    out = loss_metrics([sum(col) for col in zip(*totals.values())], prefix)
    answered = {p: metrics[f"{p}_generated"] for p in totals if f"{p}_generated" in metrics}
    if answered:
        n = sum(answered.values())
        out[f"{prefix}_generated"] = n
        out.update({f"{prefix}_{name}": sum(metrics[f"{p}_{name}"] * k for p, k in answered.items()) / max(n, 1)
                    for name in NAMES})
    return out


class Samples:
    """Greedy (or beam search) completions of fixed prompts at each evaluation (formatted as the run's data is)."""

    def __init__(self, prompts: list[str], *, data_cfg: dict, tokenizer, max_new_tokens: int, path: Path | None,
                 sync: bool, num_beams: int = 1):
        from sft_dist.generate import format_prompt

        self.prompts, self.tok, self.max_new_tokens, self.path, self.sync = prompts, tokenizer, max_new_tokens, path, sync
        self.num_beams = num_beams
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
                                     num_beams=self.num_beams,
                                     pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id,
                                     eos_token_id=self.tok.eos_token_id, synced_gpus=self.sync)
                completion = self.tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
                out.append({"step": step, "prompt": prompt, "completion": completion})
        model.train(was_training)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in out)
        return out


class EvalGenerations:
    """`metrics.generate_eval_rows`: at each evaluation the model answers the prompts of the first N eval rows that
    have one (greedy, or beam search), and each answer is scored against the row's own answer (metrics/text.py).

    A row's prompt is its tokens before the first loss-carrying token, its answer the loss-carrying tokens that
    follow (a chat row's first assistant turn). The rows are split across ranks as the eval loss's are, every rank
    calling `generate` as many times (a placeholder answers a dummy prompt: ZeRO-3 and FSDP2 gather weights inside
    each forward, `synced_gpus`), and the scores are summed over all ranks. Each answer may run to twice its
    reference's length plus 8 tokens (a longer one is wrong anyway), within the model's positions. Rank 0 appends
    every answer, with its scores, to output_dir/eval_generations.jsonl."""

    def __init__(self, *, rows: int, tokenizer, num_beams: int, path: Path | None, sync: bool,
                 continued: dict[str, frozenset[int]] | None = None):
        from sft_dist.data.chat_templates import end_of_turn_ids

        self.rows, self.tok, self.num_beams, self.path, self.sync = rows, tokenizer, num_beams, path, sync
        # per eval set (by metric prefix): rows that go on from the row before (data.truncation=split), without a prompt
        self.continued = continued or {}
        self.stop = [tokenizer.eos_token_id, *(i for i in end_of_turn_ids(tokenizer) if i != tokenizer.eos_token_id)]
        self._items: dict[int, list[tuple[int, list[int], list[int]]]] = {}

    def items(self, dataset, prefix: str = "eval") -> list[tuple[int, list[int], list[int]]]:
        """(row index, prompt ids, reference ids) of the first `rows` eval rows with a prompt and an answer (rows are
        cut to data.max_length, which the plan keeps within the model's positions)."""
        key = id(dataset)
        if key not in self._items:
            out = []
            for i in range(len(dataset)):
                if len(out) == self.rows:
                    break
                if i in self.continued.get(prefix, ()):
                    continue
                split = prompt_and_answer(dataset[i]["input_ids"], dataset[i]["labels"])
                if split:
                    out.append((i, *split))
            if not out:
                rows = "the eval rows" if prefix == "eval" else f"the rows of eval set {prefix.removeprefix('eval_')}"
                raise SftDistError(
                    f"metrics.generate_eval_rows: none of {rows} has a prompt to answer (every token carries "
                    "loss, as in data.format text): set metrics.generate_eval_rows: 0, or use a format with prompts")
            self._items[key] = out
        return self._items[key]

    def __call__(self, trainer, dataset, *, step: int, prefix: str = "eval") -> dict[str, float]:
        from sft_dist.generate import max_positions
        from sft_dist.metrics.text import NAMES, scores

        args, model = trainer.args, trainer.model
        limit = max_positions(model)
        items = self.items(dataset, prefix)
        mine = shard(len(items), args.world_size, args.process_index)
        was_training = model.training
        model.eval()
        totals = torch.zeros(1 + len(NAMES), dtype=torch.float64, device=args.device)
        written = []
        with torch.no_grad():
            for k in mine:
                row, prompt, reference = items[0 if k == PLACEHOLDER else k]
                budget = 1 if k == PLACEHOLDER else 2 * len(reference) + 8
                if limit is not None:
                    budget = max(1, min(budget, limit - len(prompt)))
                ids = torch.tensor([prompt], device=args.device)
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget,
                                     do_sample=False, num_beams=self.num_beams, eos_token_id=self.stop,
                                     pad_token_id=self.tok.pad_token_id if self.tok.pad_token_id is not None
                                     else self.tok.eos_token_id, synced_gpus=self.sync)
                if k == PLACEHOLDER:
                    continue
                answer = self.tok.decode(out[0, len(prompt):], skip_special_tokens=True).strip()
                ref = self.tok.decode(reference, skip_special_tokens=True).strip()
                s = scores(answer, ref)
                totals += torch.tensor([1.0, *(s[n] for n in NAMES)], dtype=torch.float64, device=args.device)
                written.append({"step": step, **({"eval_set": prefix[5:]} if prefix.startswith("eval_") else {}),
                                "row": row, "prompt": self.tok.decode(prompt, skip_special_tokens=True),
                                "reference": ref, "answer": answer, **s})
        model.train(was_training)
        if args.world_size > 1:
            torch.distributed.all_reduce(totals)
            gathered: list = [None] * args.world_size
            torch.distributed.all_gather_object(gathered, written)
            written = sorted((r for part in gathered for r in part), key=lambda r: r["row"])
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in written)
        n, *sums = totals.tolist()
        return {f"{prefix}_generated": int(n), **{f"{prefix}_{name}": v / max(n, 1) for name, v in zip(NAMES, sums)}}


def prompt_and_answer(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]] | None:
    """A tokenized row's prompt (the tokens before the first one that carries loss) and its answer (the run of
    loss-carrying tokens from there); None for a row without a prompt or without an answer."""
    start = next((i for i, t in enumerate(labels) if t != -100), None)
    if not start:  # None: no answer; 0: no prompt (every token carries loss)
        return None
    end = next((i for i in range(start, len(labels)) if labels[i] == -100), len(labels))
    return list(input_ids[:start]), list(input_ids[start:end])
