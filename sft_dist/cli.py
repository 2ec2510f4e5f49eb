"""`sft-dist`: train, generate, and show a resolved config."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

from sft_dist import __version__
from sft_dist.errors import ConfigError, DataError, SftDistError
from sft_dist.redact import redact_url

EPILOG = """examples:
  sft-dist train configs/examples/quickstart.yaml
  sft-dist train configs/examples/quickstart.yaml launcher.num_workers=2 training.max_steps=20
  sft-dist plan configs/examples/quickstart.yaml quantization.bits=4 backend.type=fsdp [--json]
  sft-dist preprocess configs/examples/quickstart.yaml data.num_proc=8
  torchrun --nproc-per-node 2 --no-python sft-dist train configs/examples/quickstart.yaml
  sft-dist train configs/examples/quickstart.yaml launcher.type=ray launcher.max_failures=2
  ray job submit --address http://HEAD:8265 -- sft-dist train CONFIG launcher.type=ray
  sft-dist generate outputs/quickstart --prompt "Qual é a capital de Portugal?"
  sft-dist evaluate outputs/quickstart data.eval_files=test.jsonl
  sft-dist export outputs/quickstart --output outputs/quickstart-merged --merge
  sft-dist warm &   # then: export SFT_DIST_WARM=<the socket it prints>; local workers start pre-imported
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sft-dist",
        description="Distributed supervised fine-tuning of causal LMs (TRL SFTTrainer + LoRA) from one config.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"sft-dist {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    OVERRIDES = "overrides: dotted keys, YAML values, e.g. training.learning_rate=1e-4 lora.target_modules=[q_proj,v_proj]"

    def config_command(name: str, help: str, description: str) -> None:
        cmd = sub.add_parser(name, help=help, description=description, epilog=OVERRIDES)
        cmd.add_argument("config", help="YAML config file")
        cmd.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")

    config_command(
        "train",
        "train from a YAML config (with key.sub=value overrides)",
        (
            "Validate the config, then train. With launcher.type=local (default) and launcher.num_workers=N, "
            "N worker processes are started here (gloo on CPU, nccl on GPU); with launcher.type=ray, N Ray Train "
            "workers (an embedded Ray, or the cluster at launcher.address / RAY_ADDRESS). Started by torchrun (or any "
            "launcher that sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT), this process trains as that rank."
        ),
    )
    ev = sub.add_parser(
        "evaluate", help="evaluate a trained run (or a config's model) on eval data: loss, perplexity, answers",
        description="Evaluate without training, on the same launcher and backend a training run would use: the "
        "token-weighted eval loss, perplexity and token accuracy over all ranks, and with metrics.generate_eval_rows "
        "the answers' exact match, token F1 and ROUGE-L. TARGET is a finished run's output_dir (its config, its "
        "trained adapter or model, its eval data; results in RUN/eval), one of its checkpoint-<step> directories "
        "(exported first, into RUN/eval-checkpoint-<step>/weights; results there) or a YAML config (its model as "
        "configured, e.g. lora.init_adapter=DIR; results in its output_dir). Writes eval_results.json and "
        "metrics.jsonl. A run's config.yaml never turns remote code on: only model.trust_remote_code=true here does.",
        epilog=OVERRIDES + "\nexamples:\n  sft-dist evaluate outputs/quickstart\n  sft-dist evaluate outputs/quickstart "
        "data.eval_files=test.jsonl output_dir=outputs/quickstart-test metrics.generate_eval_rows=50\n"
        "  sft-dist evaluate outputs/run/checkpoints/checkpoint-200",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("target", help="a run's output_dir, a checkpoint-<step> directory, or a YAML config")
    ev.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (they win)")
    plan = sub.add_parser(
        "plan", help="preflight a config: changes from defaults, batch geometry, compatibility, memory per rank",
        description="Resolve a config the way `train` will, without loading any weight: print what it changes "
        "from the defaults, the batch geometry, every compatibility rule that fires (an error refuses the run, "
        "as `train` would) and a per-rank memory estimate from the model config (meta device). Exits 1 when "
        "refused. Options may come before, between or after the overrides.", epilog=OVERRIDES)
    plan.__class__ = _OptionsAnywhereParser  # `plan CONFIG --device cuda training.x=1`
    plan.add_argument("config", help="YAML config file")
    plan.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    plan.add_argument("--json", action="store_true", help="print JSON")
    plan.add_argument("--device", choices=["cpu", "cuda"], help="plan for this device (default: launcher.device)")
    plan.add_argument("--world-size", type=int, help="plan for this many workers (default: launcher.num_workers)")
    plan.add_argument("--gpu-memory", metavar="SIZE",
                      help="the memory of the GPUs it will run on, e.g. 80GB or 24GiB: say whether the estimated peak "
                           "fits it, and exit 1 when it is over (plans for cuda unless --device says otherwise)")
    config_command(
        "preprocess",
        "tokenize a config's data into the cache (data.cache_dir), so that `train` starts without tokenizing",
        "Read, tokenize and finalize the train/eval data exactly as `train` would (data.num_proc processes), and "
        "store it in the content-addressed cache at data.cache_dir (default $SFT_DIST_CACHE, else "
        "~/.cache/sft_dist/data). Prints the entry, rows and tokens per split; a later `train` with the same "
        "data options and tokenizer loads it memory-mapped. Run again, it reports a hit.",
    )
    config_command(
        "config",
        "validate a config and print it resolved (defaults filled, paths absolute, secrets redacted)",
        "Validate a config (with overrides) and print the resolved YAML that `train` would use.",
    )

    cmp = sub.add_parser(
        "compare",
        help="compare runs' loss curves and final weights with a reference run (max relative deviation)",
        description="Print, for each RUN, the maximum relative deviation of its per-step loss and of its final "
        "adapter/model weights from REF's. Exits 1 if any exceeds --tol.",
    )
    cmp.add_argument("ref", help="reference run directory (e.g. the DDP run)")
    cmp.add_argument("runs", nargs="+", help="run directories to compare")
    cmp.add_argument("--tol", type=float, default=1e-5, help="allowed relative deviation (default 1e-5)")
    cmp.add_argument("--json", action="store_true", help="print JSON")

    rep = sub.add_parser(
        "report",
        help="(re)build a run's report.html: loss, throughput and memory curves, and the run summary",
        description="Write OUTPUT_DIR/report.html (and report/*.png) from the run's metrics.jsonl, run_summary.json, "
        "plan.json and config.yaml. Training writes it at the end; this rebuilds it, e.g. for a stopped run.",
    )
    rep.add_argument("run_dir", help="a run's output_dir")

    g = sub.add_parser(
        "generate",
        help="generate text with a trained run (adapter or full model), greedy by default",
        description=(
            "Load a run's base model and trained adapter (or full model) and complete prompts, formatted the way "
            "the run's data was (e.g. the alpaca template with the prompt as the instruction)."
        ),
    )
    g.add_argument("run_dir", help="a run's output_dir (holds config.yaml and adapter/ or model/)")
    g.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several)")
    g.add_argument("--input", default="", help="alpaca `input` field for every prompt")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-p", type=float, default=None, help="sampling: nucleus (0, 1] (default off: 1)")
    g.add_argument("--top-k", type=int, default=None, help="sampling: the k likeliest tokens only (default off)")
    g.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (greedy: 1)")
    g.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats (default none)")
    g.add_argument("--seed", type=int, default=None, help="sampling: the same seed gives the same completions")
    g.add_argument("--stream", action="store_true", help="print each completion token by token as it is generated")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where to generate (cuda: this process's GPU, in bf16; default cpu)")
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the run's template")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model that needs code from its repository to run it (never taken from the run's "
                        "config.yaml)")
    g.add_argument("--json", action="store_true", help="print JSON lines")

    w = sub.add_parser(
        "warm",
        help="keep a pre-imported template that local launches and Ray workers fork from (start-up in ~1 s)",
        description="Import torch, transformers, peft, TRL and DeepSpeed once and wait on a Unix socket (only this "
        "user may connect). A `sft-dist train` with launcher.type=local and SFT_DIST_WARM=SOCKET in its "
        "environment forks its workers from it instead of starting Python processes that import all of it again; "
        "with launcher.type=ray, the Ray workers of the run on this node do (export SFT_DIST_WARM before `ray "
        "start` and every job's do). "
        "Runs in the foreground until SIGTERM/Ctrl-C, or until code it imported changes on disk. A launch whose "
        "environment differs (a variable a library may read at import) starts its workers cold and says why.",
    )
    w.add_argument("--socket", type=Path, help="socket path (default: $XDG_RUNTIME_DIR/sft-dist-warm.sock, else "
                   "/tmp/sft-dist-UID/sft-dist-warm.sock)")

    from sft_dist.export.run import add_export_parser

    add_export_parser(sub)
    return p


# The commands that import torch and transformers in this process: with a warm template they run forked from it.
WARM_COMMANDS = frozenset({"train", "evaluate", "plan", "preprocess", "generate", "export"})


def main(argv: list[str] | None = None) -> int:
    from sft_dist.quiet import before_imports

    before_imports()
    args = build_parser().parse_args(argv)
    if argv is None and args.command in WARM_COMMANDS and _may_run_warm():
        from sft_dist.distributed.warm import run_command

        code = run_command(sys.argv[1:])
        if code is not None:
            return code
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "config":
            return _config(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "preprocess":
            return _preprocess(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "report":
            return _run_report(args)
        if args.command == "warm":
            from sft_dist.distributed.warm import default_socket, serve

            return serve(args.socket or default_socket())
        if args.command == "export":
            from sft_dist.export.run import run_export

            return run_export(args)
    except SftDistError as e:
        return _report(e)
    return 2


def _may_run_warm() -> bool:
    """A command typed by the user (or a script) with SFT_DIST_WARM set, not a rank a launcher started (the local
    launcher forks its own workers; torchrun's and Ray's stay theirs)."""
    env = os.environ
    return bool(env.get("SFT_DIST_WARM")) and not any(
        k in env for k in ("SFT_DIST_WARM_TEMPLATE", "RANK", "TORCHELASTIC_RUN_ID", "SFT_DIST_LAUNCHER"))


def _train(args) -> int:
    from sft_dist.validate import load_config
    from sft_dist.distributed.env import detect_env

    try:
        cfg = load_config(args.config, args.overrides)
        env = detect_env()
    except SftDistError as e:
        return _report(e)
    if env is not None:  # a launcher started this process as one rank (the rules run in `run`)
        # torchrun & co: a bad data file stops rank 0 (and so the job) before torch starts. sft_dist's own local
        # launcher checked the files before it started the workers (and said so): not again.
        if env.rank == 0 and env.launched_by != "local":
            try:
                _precheck_data(cfg)
            except SftDistError as e:
                return _report(e)
        return _worker(cfg)
    from sft_dist.distributed.ray_warm import start as start_warm_ray

    warm = start_warm_ray(cfg.launcher)  # a Ray run's worker template: its imports overlap what follows
    try:
        return _check_and_launch(cfg, args, warm)
    finally:
        if warm is not None:
            warm.stop()


def _evaluate(args) -> int:
    """`train` with the evaluation's config and overrides (train/evaluate_only.py: target): the workers a
    launcher starts get the same."""
    from sft_dist.train.evaluate_only import target

    try:
        args.user_overrides = list(args.overrides)
        args.config, args.overrides = target(args.target, args.overrides)
    except SftDistError as e:
        return _report(e)
    return _train(args)


def _command(args, *, overrides: bool = False) -> str:
    """The command as the user typed it (`evaluate` keeps its target; its workers get `train` with its config)."""
    head = ["sft-dist", "evaluate", args.target] if args.command == "evaluate" else ["sft-dist", "train", args.config]
    return " ".join(head + (list(getattr(args, "user_overrides", args.overrides)) if overrides else []))


def _check_and_launch(cfg, args, warm) -> int:
    try:  # before any worker or cluster starts: a setup the rules refuse costs seconds, not a launch
        from sft_dist.plan import check
        from sft_dist.train.trackers import check_installed

        check_installed(cfg.training)
        if cfg.training.eval_only:
            from sft_dist.train.evaluate_only import refuse_training_dir

            refuse_training_dir(Path(cfg.output_dir))
        for warning in check(cfg):
            print(f"sft-dist: warning: {warning.describe()}", file=sys.stderr)
        _precheck_data(cfg)
    except SftDistError as e:
        return _report(e)
    if cfg.launcher.type == "torchrun":
        raise SftDistError(
            "launcher.type is 'torchrun' but RANK/WORLD_SIZE are not set: start with "
            f"`torchrun --nproc-per-node N --no-python {_command(args)}`"
        )
    return _launch_locked(cfg, args, warm)


def _precheck_data(cfg) -> None:
    """Every data check that needs no tokenizer (files, JSON/UTF-8, columns, row structure), in the launcher:
    a bad file is refused in seconds, with its file and row, before any worker imports torch."""
    from sft_dist.data.precheck import precheck

    report = precheck(cfg.data, seed=cfg.training.seed)
    print(f"sft-dist: {report.describe()}", file=sys.stderr)


def _launch_locked(cfg, args, warm) -> int:
    """Launch while holding output_dir's lock: a second run into the same directory is refused at once. The
    token goes to every worker this process starts, so that they count as this run."""
    from sft_dist.rundir.lock import TOKEN_ENV, RunLock

    try:
        lock = RunLock(cfg.output_dir, command=_command(args, overrides=True))
        lock.acquire()
    except SftDistError as e:
        return _report(e)
    os.environ[TOKEN_ENV] = lock.token
    try:
        return _launch(cfg, args, warm)
    finally:
        lock.release()


def _launch(cfg, args, warm) -> int:
    if cfg.launcher.type == "ray":
        # As with the local launcher, the workers check the training arguments (TRL's import alone is ~3.5 CPU s
        # on the driver's critical path); a ConfigError there ends the run without a retry (`ray_trainer`).
        from sft_dist.distributed.ray_train import launch_ray

        code = launch_ray(cfg, warm)
        _skip_final_gc()  # a shell or `ray job submit` waits for this driver's exit (~0.8 s of GC skipped)
        return code
    if cfg.launcher.num_workers == 1:
        return _worker(cfg)
    # The workers check the training arguments (they import TRL anyway; the launcher need not).
    from sft_dist.distributed.local import launch_local

    failure = launch_local(cfg.launcher, ["train", args.config, *args.overrides],
                           stop_grace_s=cfg.checkpoint.stop_grace_s)
    if failure is None:
        return 0
    print(f"sft-dist: {failure.describe()}", file=sys.stderr)
    # Interrupted (rank -1): 128 + signal, like a shell. A failed worker: 1.
    return failure.returncode if failure.rank < 0 else 1


def _worker(cfg) -> int:
    from sft_dist.distributed.lifecycle import (StoppedDuringStartup, die_with_parent, startup_stop_pending,
                                                stop_on_sigterm_during_startup)

    if os.environ.get("SFT_DIST_LAUNCHER") == "local" or "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent()  # the local launcher or torchrun's agent: not a shell the user started us from
    stop_on_sigterm_during_startup()
    try:
        from sft_dist.train.run import run

        run(cfg)
        _skip_final_gc()
        return 0
    except StoppedDuringStartup as e:
        return _stopped_during_startup(str(e))
    except KeyboardInterrupt:
        return 130
    except BaseException as e:  # noqa: BLE001 - the launcher needs every failure reported
        if startup_stop_pending():
            # a peer that stopped on the same SIGTERM left this rank's collective without it: the stop, not a failure
            return _stopped_during_startup(startup_stop_pending(), after=e)
        return _report(e) if isinstance(e, SftDistError) else _report(e, unexpected=True)


def _stopped_during_startup(signal_name: str, *, after: BaseException | None = None) -> int:
    why = ""
    if after is not None:
        why = f" ({type(after).__name__} on the way out: {(str(after).splitlines() or [''])[0][:200]})"
    print(f"sft-dist: {signal_name} before training started: stopped (nothing to checkpoint yet){why}",
          file=sys.stderr)
    _skip_final_gc()
    return 0


def _skip_final_gc() -> None:
    """Skip the interpreter's final GC pass over every object (seconds, with torch and transformers loaded): the
    launcher, and the peers of a failed rank, wait for this process to exit."""
    import gc

    gc.freeze()


def _report(e: BaseException, *, unexpected: bool = False) -> int:
    """Print one message (no traceback for user errors) and leave it for the local launcher to show."""
    from sft_dist.distributed.lifecycle import default_sigterm

    default_sigterm()  # the run is over: a launcher's SIGTERM now ends this process, not a "start-up stop"
    _skip_final_gc()
    rank = int(os.environ.get("RANK", 0))
    error_file = os.environ.get("SFT_DIST_ERROR_FILE")
    tb = "".join(traceback.format_exception(e)) if unexpected else None
    elastic_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if elastic_file:  # torchrun shows this in its failure summary instead of "error_file: <N/A>"
        with open(elastic_file, "w", encoding="utf-8") as f:
            json.dump({"message": {"message": f"{type(e).__name__}: {e}",
                                   "extraInfo": {"py_callstack": tb or " ".join(str(e).split()),
                                                 "timestamp": str(int(time.time()))}}}, f)
    if error_file:  # the local launcher prints it once, for the first rank that failed
        with open(error_file, "w", encoding="utf-8") as f:
            json.dump({"rank": rank, "type": type(e).__name__, "message": redact_url(str(e)), "traceback": tb,
                       "user_error": not unexpected}, f)
        return 1
    if isinstance(e, (ConfigError, DataError)) and rank != 0:
        # Every rank read the same config and data: rank 0 says it once. Leave it time to, before a launcher
        # that stops the group at the first exit (torchrun) kills it mid-sentence.
        time.sleep(5)
        return 1
    prefix = f"[rank {rank}] " if "WORLD_SIZE" in os.environ and rank != 0 else ""
    print(redact_url(tb if tb else f"{prefix}sft-dist: error: {e}"), file=sys.stderr)
    return 1


class _OptionsAnywhereParser(argparse.ArgumentParser):
    """A subcommand whose options may sit between or after its `key=value` overrides. Plain argparse ends a
    nargs='*' positional at the first option and refuses whatever follows (`plan CONFIG --device cuda training.x=1`:
    "unrecognized arguments"); intermixed parsing takes the options out first, then the positionals."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:  # parse_known_intermixed_args calls back in for each of its two passes
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _plan(args) -> int:
    from sft_dist.validate import load_config
    from sft_dist.plan import make_plan
    from sft_dist.plan.fit import fits_text
    from sft_dist.sizes import parse_size
    from sft_dist.plan.report import render
    from sft_dist.quiet import quiet_libraries

    gpu = parse_size(args.gpu_memory, flag="--gpu-memory") if args.gpu_memory else None
    if gpu is not None and args.device == "cpu":
        raise ConfigError("--gpu-memory checks the estimate against a GPU: drop --device cpu (it plans for cuda)")
    cfg = load_config(args.config, args.overrides)
    quiet_libraries()
    plan = make_plan(cfg, device="cuda" if gpu is not None else args.device, world_size=args.world_size)
    out, fits = plan.as_dict(), True
    if gpu is not None:
        if plan.memory is None:
            fits, line = False, f"no memory estimate to check against --gpu-memory: {plan.memory_error}"
        else:
            fits, line = fits_text(plan.memory.detail["peak"], gpu=gpu, label=args.gpu_memory.strip(),
                                   hinted=bool(plan.memory.hints))
        out["gpu_fit"] = {"gpu_bytes": gpu, "fits": fits, "message": line}
    print(json.dumps(out, indent=2, default=str) if args.json else render(plan)
          + (f"\n{out['gpu_fit']['message']}" if gpu is not None else ""))
    return 1 if plan.errors or not fits else 0


def _preprocess(args) -> int:
    import logging

    from sft_dist.validate import load_config
    from sft_dist.quiet import quiet_libraries

    cfg = load_config(args.config, args.overrides)
    if not cfg.data.cache:
        raise ConfigError("data.cache: false, so there is no cache to fill; drop the override (or set "
                          "data.cache=true) to preprocess")
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    quiet_libraries()
    from sft_dist.data.cache import load_or_build
    from sft_dist.model.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(cfg.model)
    data, info = load_or_build(cfg.data, tokenizer, seed=cfg.training.seed,
                               timeout_s=cfg.launcher.timeout_s)
    print(f"{'cache hit' if info.hit else 'cached'}: {info.path}")
    # The summary `train` logs: rows, tokens, loss tokens, truncated / dropped, bad rows skipped, packing. (The
    # skipped rows by kind, and a warning when many rows lost their answer, were logged by load_or_build.)
    for name, stats in data.stats.items():
        print(f"  {stats.describe(name, cfg.data.max_length)}")
    print(f"  tokenized {info.tokenized_rows} rows here in {info.seconds:.2f} s")
    return 0


def _config(args) -> int:
    from sft_dist.config.load import dump_config
    from sft_dist.validate import load_config

    cfg = load_config(args.config, args.overrides)
    print(dump_config(cfg), end="")
    return 0


def _compare(args) -> int:
    from sft_dist.compare import as_json, report

    devs, table = report(args.ref, args.runs, tol=args.tol)
    print(as_json(devs) if args.json else table)
    return 0 if all(d.within(args.tol) for d in devs) else 1


def _run_report(args) -> int:
    from sft_dist.metrics.report import write_report

    if not (Path(args.run_dir) / "metrics.jsonl").exists():
        raise SftDistError(f"{args.run_dir}: no metrics.jsonl; give a run's output_dir")
    print(write_report(Path(args.run_dir)))
    return 0


def _generate(args) -> int:
    from sft_dist.generate import Decoding, generate

    if args.stream and args.json:
        raise SftDistError("--stream prints text as it comes; --json prints one JSON line per completion: pick one")
    decoding = Decoding(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, num_beams=args.num_beams,
                        repetition_penalty=args.repetition_penalty, seed=args.seed)  # checked before the model loads

    def stream(i, prompt, tokenizer):
        from transformers import TextStreamer

        print(f"{chr(10) if i else ''}>>> {prompt}", flush=True)
        return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    outputs = generate(args.run_dir, args.prompt, input=args.input, max_new_tokens=args.max_new_tokens,
                       raw=args.raw, trust_remote_code=args.trust_remote_code, decoding=decoding,
                       device=args.device, stream=stream if args.stream else None)
    if args.stream:
        return 0  # printed as it was generated
    for prompt, text in zip(args.prompt, outputs):
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": text}, ensure_ascii=False))
        else:
            print(f">>> {prompt}\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
