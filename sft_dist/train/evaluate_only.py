"""Evaluation without training (`training.do_train: false`, what `sft-dist evaluate` runs).

The same run as training up to the first step: config, plan, data, model (a trained adapter through
`lora.init_adapter`, or a full model through `model.name_or_path`), Trainer and backend. Then the model is wrapped
as HF's evaluation loop wraps it before any training step (ZeRO-3 as a DeepSpeed inference engine, FSDP2 sharded,
DDP with autocast), evaluated once on the eval data by sft_dist's evaluation (train/evaluation.py: the
token-weighted loss, perplexity and token accuracy over all ranks, and the generated answers' scores where
`metrics.generate_eval_rows` asks), and the results written. No optimizer, no checkpoint, no saved model.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from sft_dist.errors import SftDistError

log = logging.getLogger("sft_dist")

RESULTS = "eval_results.json"
# Files a training run leaves in its output_dir: an evaluation there would overwrite the run's own config.yaml,
# metrics.jsonl and report.
TRAINING_MARKS = ("run_summary.json", "checkpoints", "adapter", "model")


def weights(cfg) -> str:
    """What is evaluated, in words: the adapter, else the model (a new LoRA adapter leaves its output as it is)."""
    if cfg.lora.init_adapter:
        return f"adapter {cfg.lora.init_adapter}"
    model = cfg.model.name_or_path or f"model.init_config (seed {cfg.training.seed})"
    return model + (", with a new LoRA adapter (which changes nothing yet)" if cfg.lora.enabled else "")


def refuse_training_dir(out: Path) -> None:
    """An output_dir that holds a training run is not written over by an evaluation."""
    found = [name for name in TRAINING_MARKS if (out / name).exists()]
    if found:
        raise SftDistError(f"output_dir={str(out)!r} holds a training run ({', '.join(found)}); an evaluation writes "
                           f"its own config.yaml and metrics.jsonl: give it another output_dir (`sft-dist evaluate "
                           f"RUN` writes to RUN/eval)")


def prepare(trainer, *, zero_stage: int | None) -> None:
    """The model wrapped for evaluation as HF's `evaluation_loop` does before a first training step, except where
    that fails: ZeRO-1/2, whose every rank holds the whole weights, evaluate the module without an engine, under
    autocast where the run computes in 16 bit (HF refuses a DeepSpeed inference engine below stage 3, and
    accelerate leaves a DeepSpeed model's precision to the engine, which would cast the module), and FSDP2 is sharded as for training (accelerate refuses a model
    without an optimizer)."""
    import torch

    if trainer.is_deepspeed_enabled:
        if zero_stage == 3:
            from transformers.integrations.deepspeed import deepspeed_init

            deepspeed_init(trainer, num_training_steps=0, inference=True)
            trainer.model_wrapped = trainer.deepspeed = trainer.accelerator.prepare(trainer.model)
        elif trainer.args.bf16 or trainer.args.fp16:
            # no engine casts the module to 16 bit here: autocast lets its fp32 LoRA matrices and trained copies
            # meet 16-bit activations, as accelerate's autocast does for the other backends
            half = torch.bfloat16 if trainer.args.bf16 else torch.float16
            trainer.model.forward = torch.autocast(trainer.args.device.type, dtype=half)(trainer.model.forward)
        return
    if trainer.is_fsdp_enabled:
        # accelerate shards an FSDP2 model only together with an optimizer (it maps the optimizer's parameters
        # onto the sharded ones): a plain SGD over the trained parameters, which keeps no state, stands in for the
        # one training would build
        stand_in = torch.optim.SGD([p for p in trainer.model.parameters() if p.requires_grad], lr=0.0)
        model, _ = trainer.accelerator.prepare(trainer.model, stand_in)
        trainer.model = trainer.model_wrapped = model
    else:
        trainer.model_wrapped = trainer.accelerator.prepare_model(trainer.model, evaluation_mode=True)


def evaluate(trainer, *, zero_stage: int | None, out: Path, is_main: bool, summary: dict, gather) -> dict:
    """Evaluate once; rank 0 writes `eval_results.json`: the metrics, `summary`, and what each rank held
    (`gather`: every rank's value, in rank order). Returns the metrics."""
    from sft_dist.backends.verify import shard_report
    from sft_dist.train.evaluation import eval_sets

    sets = eval_sets(trainer.eval_dataset)
    rows = {prefix: len(ds) for prefix, ds in sets.items()}
    if not sum(rows.values()):
        raise SftDistError("training.do_train=false: the eval data is empty; give rows to evaluate on as "
                           "data.eval_files")
    prepare(trainer, zero_stage=zero_stage)
    t0 = time.perf_counter()
    metrics = trainer.evaluate()
    seconds = time.perf_counter() - t0
    report = shard_report(trainer)
    ranks = gather({k: report[k] for k in ("param_numel_local", "param_bytes_local", "peak_rss_bytes")})
    if is_main:
        named = isinstance(trainer.eval_dataset, dict)  # rows per named eval set, by metric prefix
        results = {**summary, "eval_rows": sum(rows.values()), **({"eval_set_rows": rows} if named else {}),
                   "eval_seconds": round(seconds, 3), "metrics": metrics, "ranks": ranks}
        (out / RESULTS).write_text(json.dumps(results, indent=2), encoding="utf-8")
        shown = ", ".join(f"{k.removeprefix('eval_')} {v:.6g}" for k, v in metrics.items()
                          if isinstance(v, float) and k not in ("eval_runtime",))
        log.info("evaluated %d rows in %.1f s: %s (%s)", sum(rows.values()), seconds, shown, out / RESULTS)
        for line in set_table(metrics, rows).splitlines() if named else ():
            log.info("%s", line)
    return metrics


def set_table(metrics: dict, rows: dict[str, int]) -> str:
    """Named eval sets side by side, then all of them together (the metrics' `eval_<set>_` and `eval_` keys)."""
    names = [("all", "eval", sum(rows.values())), *((p.removeprefix("eval_"), p, n) for p, n in rows.items())]
    extra = [k for k in ("exact_match", "token_f1", "rouge_l") if f"eval_{k}" in metrics]
    head = ["eval set", "rows", "tokens", "loss", "perplexity", "accuracy", *extra]
    body = [[name, str(n), str(metrics[f"{p}_tokens"]), f"{metrics[f'{p}_loss']:.4f}",
             f"{metrics[f'{p}_perplexity']:.2f}", f"{metrics[f'{p}_mean_token_accuracy']:.4f}",
             *(f"{metrics[f'{p}_{k}']:.3f}" for k in extra)] for name, p, n in names]
    width = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in [head, *body])


def target(value: str, overrides: list[str]) -> tuple[str, list[str]]:
    """`sft-dist evaluate TARGET [overrides]` as the config and overrides a run takes.

    - A YAML config: itself, with `training.do_train=false`.
    - A run directory: its config.yaml with its trained weights (adapter/, or model/ for a full fine-tune), its
      saved random base (base_model/) where it has one, and output_dir RUN/eval.
    - A checkpoint directory (checkpoint-<step>, with its manifest): its weights exported as `sft-dist export`
      writes them into RUN/eval-checkpoint-<step>/weights, evaluated with the config that wrote it, into that
      directory.
    A run directory is data someone may hand over: its config.yaml never turns on remote code (as for generate
    and export); only an override on this command line does. The user's overrides come last, so they win
    (another eval set: `data.eval_files=test.jsonl`)."""
    import yaml

    from sft_dist.checkpoint.manifest import MANIFEST, NAME

    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        return value, ["training.do_train=false", *overrides]
    config = path / "config.yaml"
    if not config.is_file():
        raise SftDistError(f"{value}: not a sft_dist run or checkpoint directory (no config.yaml); pass a run's "
                           "output_dir, a checkpoint-<step> directory or a YAML config")
    raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    lora = (raw.get("lora") or {}).get("enabled", True)
    if NAME.match(path.name) and (path / MANIFEST).is_file():
        # its run: where the default layout puts it (<run>/checkpoints/checkpoint-<step>), else the config's
        run = path.parent.parent if (path.parent.parent / "config.yaml").is_file() else Path(raw.get("output_dir", "."))
        out = run / f"eval-{path.name}"
        trained = _export(path, out / "weights")
    else:
        run, out, trained = path, path / "eval", path / ("adapter" if lora else "model")
        if not trained.is_dir():
            raise SftDistError(f"{value}: no {trained.name}/ yet, so its training has not finished; evaluate one of "
                               "its checkpoints (checkpoints/checkpoint-<step>), or resume it first")
    own = ["training.do_train=false", f"output_dir={out}", "model.trust_remote_code=false"]
    if not lora:
        own += [f"model.name_or_path={trained}", "model.init_config=null"]
    else:
        own.append(f"lora.init_adapter={trained}")
        if (raw.get("model") or {}).get("init_config") is not None and (run / "base_model").is_dir():
            own += [f"model.name_or_path={run / 'base_model'}", "model.init_config=null"]  # the random base as saved
    return str(config), own + list(overrides)


def _export(checkpoint: Path, weights: Path) -> Path:
    """The checkpoint's trained weights as `sft-dist export CHECKPOINT --output WEIGHTS` writes them (an adapter, or
    the full model), replacing an earlier export there."""
    import argparse

    from sft_dist.export.run import DEFAULT_SHARD, run_export

    run_export(argparse.Namespace(source=str(checkpoint), output=str(weights), merge=False, dequantize=False,
                                  dtype="auto", max_shard_size=DEFAULT_SHARD, overwrite=True, trust_remote_code=False,
                                  push_to_hub=None, private=False))
    return weights
