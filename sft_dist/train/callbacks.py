"""What rank 0 shows and writes while training: metrics.jsonl, a progress bar, and the sample trace."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from transformers import TrainerCallback

# What marks HF's last log of a run, its summary (train_loss, train_runtime, ...), rather than a per-step line. Not
# train_runtime: with include_num_input_tokens_seen every step's log carries it (and train_tokens_per_second) too.
SUMMARY_KEYS = ("train_loss",)


class MetricsFile(TrainerCallback):
    """Rank 0 appends one JSON object per logged step (and per eval) to output_dir/metrics.jsonl."""

    def __init__(self, path: Path, *, resume_step: int | None = None, is_main: bool = True):
        self.path = path
        self.summary: dict = {}
        self.first: dict = {}  # first and last logged train loss / eval loss
        self.last: dict = {}
        if not is_main:
            return
        if resume_step is None:
            path.unlink(missing_ok=True)  # a new run starts a new file (rank 0 owns it)
        elif path.exists():
            # Resuming from step N: what was logged after N (before a crash) is trained again; drop it.
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if any(k in logs for k in SUMMARY_KEYS) and "loss" not in logs:
            self.summary.update(logs)
            return
        record = {"step": state.global_step, **logs}
        if "eval_loss" in logs:
            record["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        for key in ("loss", "eval_loss"):
            if key in logs:
                self.first.setdefault(key, logs[key])
                self.last[key] = logs[key]
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class Progress(TrainerCallback):
    """A progress bar with loss and tokens/s on a terminal; a log line per ~10% of the run otherwise."""

    def __init__(self, *, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.bar = None
        self._next_line = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if not (self.enabled and state.is_world_process_zero):
            return
        if self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True,
                            file=self.stream)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (self.enabled and state.is_world_process_zero) or not logs or "loss" not in logs:
            return
        if self.bar is not None:
            extra = {"mfu": f"{logs['mfu']:.1%}"} if "mfu" in logs else {}
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{logs.get('tokens_per_s', 0):.0f}", **extra)
            return
        every = max(1, state.max_steps // 10)
        if state.global_step >= self._next_line or state.global_step == state.max_steps:
            self._next_line = (state.global_step // every + 1) * every
            mfu = f"  mfu {logs['mfu']:.1%}" if "mfu" in logs else ""
            eta = f"  eta {_duration(logs['eta_s'])}" if "eta_s" in logs else ""
            print(
                f"step {state.global_step}/{state.max_steps}  loss {logs['loss']:.4f}  "
                f"lr {logs.get('learning_rate', 0):.2e}  tokens/s {logs.get('tokens_per_s', 0):.0f}{mfu}{eta}",
                file=self.stream,
                flush=True,
            )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.enabled and state.is_world_process_zero and metrics and "eval_loss" in metrics:
            msg = f"eval at step {state.global_step}: loss {metrics['eval_loss']:.4f}"
            sets = [f"{k[5:-5]} {v:.4f}" for k, v in metrics.items() if k.startswith("eval_") and k.endswith("_loss")
                    and k != "eval_loss"]  # named eval sets: eval_<name>_loss
            if sets:
                msg += f" ({', '.join(sets)})"
            (self.bar.write if self.bar is not None else lambda m: print(m, file=self.stream, flush=True))(msg)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class SampleIdCollator:
    """Wraps the collator: carries each example's `sample_id` (a packed row's `sample_ids`, flattened) into
    the batch as `sample_ids`, so the trainer knows which samples a micro-batch holds when it trains on it
    (not when it is prefetched); and the number of real tokens as `input_tokens`, against which the batch's
    size gives the padding the model processed."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples):
        import torch

        ids = [i for ex in examples for i in _as_list(ex.pop("sample_id", ex.pop("sample_ids", None)))]
        tokens = sum(len(ex["input_ids"]) for ex in examples)
        batch = self.inner(examples)
        if ids:
            batch["sample_ids"] = torch.tensor(ids, dtype=torch.long)
        batch["input_tokens"] = torch.tensor(tokens, dtype=torch.long)
        return batch


def _as_list(value) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]
