"""Load a YAML config plus `key.sub=value` overrides into a validated `Config`.

Every problem found is collected into one `ConfigError` (key, bad value, what is allowed, closest
valid key for typos), raised before anything heavy is imported or any model is loaded.

This is the bottom layer: it parses, coerces and checks what the config alone can tell. The checks that need
the data formats, the model classes or the backends come in through `checks` (`sft_dist.validate`, whose
`load_config` is the one the CLI uses) and land in the same `ConfigError`.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import json
import math
import os
import re
import typing
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from sft_dist.config.adapter import take_shape
from sft_dist.config.coerce import TypeProblem, closest, coerce
from sft_dist.config.schema import SECTIONS, Config
from sft_dist.config.training import DEFAULTS, Training
from sft_dist.config.training_args import validate_training
from sft_dist.errors import ConfigError
from sft_dist.redact import redact_url

BUILTIN = "builtin:"
# Names of secrets (hub_token, wandb_api_key, password...); not tokenizer fields such as eos_token.
SECRET_KEY = re.compile(r"(^|_)(token|secret|password|passwd|api_?key|access_?key|key|credentials?)$", re.IGNORECASE)
NOT_SECRET = {"bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token"}
TOP_LEVEL = ["output_dir", "training", *SECTIONS]
# More cross-field checks, from layers above: (config, the problems found so far) -> further problems.
Checks = Callable[[Config, list[str]], list[str]]


def builtin_path(name: str) -> Path:
    """Path of a shipped asset: `builtin:tokenizer`, `builtin:data/alpaca_demo_train.jsonl`."""
    return Path(str(resources.files("sft_dist") / "assets" / name))


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None, *,
                checks: Checks | None = None) -> Config:
    """Read, override, validate and resolve a config. Raises ConfigError with every problem, `checks`' too."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_mapping(path, what="config file")
    for item in overrides or []:
        _apply_override(raw, item)
    return build_config(raw, checks=checks)


def build_config(raw: dict[str, Any], *, checks: Checks | None = None) -> Config:
    problems: list[str] = []
    parts: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in TOP_LEVEL:
            problems.append(_unknown(key, TOP_LEVEL))
        elif key == "output_dir":
            if not isinstance(value, str) or not value.strip():
                problems.append(f"output_dir: got {value!r}; expected a directory path")
            else:
                parts["output_dir"] = value
        elif key == "training":
            if value is None:
                continue
            if not isinstance(value, dict):
                problems.append(f"training: got {value!r}; expected a mapping of TrainingArguments fields")
                continue
            parts["training"], errs = validate_training(value)
            problems += errs
        else:
            section = _build_section(key, SECTIONS[key], value, problems)
            if section is not None:
                parts[key] = section
    cfg = Config(**parts)
    if not problems and cfg.lora.init_adapter:  # the adapter's shape, before the checks that read the section
        given = raw.get("lora") if isinstance(raw.get("lora"), dict) else {}
        lora, errs = take_shape(cfg.lora, set(given))
        cfg, problems = dataclasses.replace(cfg, lora=lora), problems + errs
    if cfg.backend.config is not None:  # the backend's checks read it (`builtin:` paths too)
        cfg = dataclasses.replace(cfg, backend=dataclasses.replace(cfg.backend, config=str(_resolve(cfg.backend.config))))
    if not problems:
        problems += _check_cross_fields(cfg)
        if checks is not None:
            problems += checks(cfg, list(problems))
    if problems:
        raise ConfigError(problems)
    cfg = _resolve_paths(cfg)
    return dataclasses.replace(cfg, training=Training({**DEFAULTS, **cfg.training}))


def read_mapping(path: str | Path, *, what: str, hint: str = "") -> dict[str, Any]:
    """A YAML (or JSON, which is YAML) file holding a mapping. `what` names the file in errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist{hint}")
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
        else:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(path)!r}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"override {item!r}: expected key.sub=value (e.g. launcher.num_workers=2)")
    key, text = item.split("=", 1)
    value = _parse_override_value(text)
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _parse_override_value(text: str):
    """YAML for numbers, booleans, null, [lists] and {maps}; anything else stays the text as typed
    (so a prompt template such as `### Q: {q}` is not read as a comment or a mapping)."""
    stripped = text.strip()
    if not stripped:
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if value is None and stripped not in ("null", "Null", "NULL", "~"):
        return text
    if isinstance(value, dict) and not stripped.startswith("{"):
        return text
    if isinstance(value, list) and not stripped.startswith("["):
        return text
    return value


# Names users bring from peft / TRL / other tools, for keys too unlike ours for a spelling match.
SYNONYMS = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "dora": "use_dora",
    "max_seq_length": "max_length", "max_seq_len": "max_length", "seq_len": "max_length",
    "model_name": "name_or_path", "model_id": "name_or_path", "world_size": "num_workers",
    "nproc_per_node": "num_workers", "num_processes": "num_workers", "workers": "num_workers",
    "load_in_4bit": "bits", "load_in_8bit": "bits", "bnb_4bit_quant_type": "quant_type",
}


def _unknown(key: str, valid: list[str]) -> str:
    leaf, names = key.split(".")[-1], [v.split(".")[-1] for v in valid]
    hint = SYNONYMS.get(leaf) if SYNONYMS.get(leaf) in names else closest(leaf, names)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    suggestion = f"; did you mean `{prefix}{hint}`?" if hint else f"; valid keys: {', '.join(valid)}"
    return f"{key}: unknown key{suggestion}"


def _build_section(name: str, cls: type, value: Any, problems: list[str]) -> Any:
    if value is None:
        return cls()
    if not isinstance(value, dict):
        problems.append(f"{name}: got {value!r}; expected a mapping")
        return None
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, v in value.items():
        full = f"{name}.{key}"
        if key not in names:
            problems.append(_unknown(full, [f"{name}.{n}" for n in names]))
            continue
        try:
            kwargs[key] = coerce(v, hints[key])
        except TypeProblem as e:
            problems.append(f"{full}: got {v!r}; {e}")
    return cls(**kwargs)


def _check_cross_fields(cfg: Config) -> list[str]:
    p: list[str] = []
    m, d, lo, la, q, b = cfg.model, cfg.data, cfg.lora, cfg.launcher, cfg.quantization, cfg.backend
    if (m.name_or_path is None) == (m.init_config is None):
        p.append("model: set exactly one of `model.name_or_path` (hub id or local dir) or `model.init_config`")
    if m.init_config is not None:
        p += _check_init_config(m.init_config)
        if m.tokenizer is None:
            p.append("model.tokenizer: required with `model.init_config` (e.g. `builtin:tokenizer`)")
    for key, value in (("model.name_or_path", m.name_or_path), ("model.tokenizer", m.tokenizer)):
        if value and _looks_local(value) and not _resolve(value).exists():
            p.append(f"{key}: {value!r} does not exist (a local path; for a hub id use `org/name`)")
    if sum(x is not None for x in (d.train_files, d.dataset, d.mixture)) != 1:
        p.append("data: set exactly one of `data.train_files` (local files), `data.dataset` (hub dataset name) or "
                 "`data.mixture` (weighted sources)")
    p += _check_mixture(d)
    p += _check_streaming(cfg)
    if d.train_files is not None:
        p += _check_files("data.train_files", d.train_files)
    p += _check_eval_sets(d)
    if d.max_length < 8:
        p.append(f"data.max_length: got {d.max_length}; must be >= 8")
    if not 0 <= d.split_overlap <= d.max_length // 2:
        p.append(f"data.split_overlap: got {d.split_overlap}; must be in 0..{d.max_length // 2} (half of "
                 "data.max_length at most: every window must move on by more than it repeats)")
    elif d.split_overlap and d.truncation != "split":
        p.append("data.split_overlap: applies to data.truncation=split only; set that, or leave split_overlap at 0")
    if not 0.0 <= d.eval_split_ratio < 1.0:
        p.append(f"data.eval_split_ratio: got {d.eval_split_ratio}; must be in [0, 1)")
    if d.eval_split_ratio > 0 and (d.eval_files is not None or d.eval_split is not None):
        p.append("data.eval_split_ratio: set it only when no `data.eval_files` / `data.eval_split` is given")
    if d.id_column is not None and not d.id_column.strip():
        p.append("data.id_column: empty; name the column holding row ids, or leave it unset")
    if d.num_proc is not None and d.num_proc < 1:
        p.append(f"data.num_proc: got {d.num_proc}; must be >= 1")
    if lo.enabled:
        if lo.r < 1:
            p.append(f"lora.r: got {lo.r}; must be >= 1")
        if lo.alpha <= 0:
            p.append(f"lora.alpha: got {lo.alpha}; must be > 0")
        if not 0.0 <= lo.dropout < 1.0:
            p.append(f"lora.dropout: got {lo.dropout}; must be in [0, 1)")
        if isinstance(lo.target_modules, list) and not lo.target_modules:
            p.append("lora.target_modules: empty list; use `all-linear` or name the modules")
    if q.bits is not None and not lo.enabled:
        p.append("quantization.bits: a quantized base cannot be fully fine-tuned; set `lora.enabled: true` (QLoRA)")
    if la.num_workers < 1:
        p.append(f"launcher.num_workers: got {la.num_workers}; must be >= 1")
    if la.threads_per_worker is not None and la.threads_per_worker < 1:
        p.append(f"launcher.threads_per_worker: got {la.threads_per_worker}; must be >= 1")
    if la.master_port is not None and not 1 <= la.master_port <= 65535:
        p.append(f"launcher.master_port: got {la.master_port}; must be in 1..65535")
    if cfg.metrics.peak_tflops is not None and not cfg.metrics.peak_tflops > 0:
        p.append(f"metrics.peak_tflops: got {cfg.metrics.peak_tflops}; must be > 0 (TFLOP/s of one device)")
    if not 1 <= cfg.metrics.generate_max_new_tokens <= 4096:
        p.append(f"metrics.generate_max_new_tokens: got {cfg.metrics.generate_max_new_tokens}; must be in 1..4096")
    if cfg.metrics.generate_eval_rows < 0:
        p.append(f"metrics.generate_eval_rows: got {cfg.metrics.generate_eval_rows}; must be >= 0 (0: off)")
    if not 1 <= cfg.metrics.generate_num_beams <= 32:
        p.append(f"metrics.generate_num_beams: got {cfg.metrics.generate_num_beams}; must be in 1..32 (1: greedy)")
    if la.timeout_s < 10:
        p.append(f"launcher.timeout_s: got {la.timeout_s}; must be >= 10")
    if la.max_failures < -1:
        p.append(f"launcher.max_failures: got {la.max_failures}; must be >= 0 (or -1 for unlimited restarts)")
    for name, amount in (la.resources_per_worker or {}).items():
        if not isinstance(amount, (int, float)) or isinstance(amount, bool) or amount < 0:
            p.append(f"launcher.resources_per_worker.{name}: got {amount!r}; must be a number >= 0")
    p += _check_checkpoint(cfg)
    p += _check_sequence_parallel(cfg)
    return p


def _check_sequence_parallel(cfg: Config) -> list[str]:
    """backend.sequence_parallel_size against what model/ulysses.py can split (the model's heads are checked where
    its config is known: here for init_config, else where it loads)."""
    size, key = cfg.backend.sequence_parallel_size, "backend.sequence_parallel_size"
    if size < 1:
        return [f"{key}: got {size}; must be >= 1 (1: off)"]
    if size == 1:
        return []
    p, t = [], cfg.training
    if cfg.launcher.type != "torchrun" and cfg.launcher.num_workers % size:
        p.append(f"{key}: {size} does not divide launcher.num_workers={cfg.launcher.num_workers}; each group of {size} "
                 "workers trains the same rows")
    attn = cfg.model.attn_implementation
    if attn and "/" in attn:
        p.append(f"{key}: model.attn_implementation {attn} cannot be split across workers; use auto, sdpa, eager, "
                 "flex_attention, varlen_attention or flash attention")
    if t.get("label_smoothing_factor"):
        p.append(f"{key}: training.label_smoothing_factor needs every row's whole logits on one rank; with "
                 "sequence parallelism each rank has a slice. Turn one of them off")
    if t.get("average_tokens_across_devices") is False:
        p.append(f"{key}: needs training.average_tokens_across_devices: true (a slice's loss is divided by the step's "
                 "loss tokens over all ranks, so the group's gradients add up to the whole row's)")
    return p


def _check_checkpoint(cfg: Config) -> list[str]:
    p: list[str] = []
    c = cfg.checkpoint
    if c.stop_grace_s <= 0:
        p.append(f"checkpoint.stop_grace_s: got {c.stop_grace_s}; must be > 0 seconds")
    resume = cfg.training.get("resume_from_checkpoint", "auto")  # sft_dist's default: not yet merged in
    for key, value in (("checkpoint.dir", c.dir), ("training.resume_from_checkpoint", resume)):
        if isinstance(value, str) and "://" in value:
            protocol = value.split("://", 1)[0]
            try:
                import fsspec

                fsspec.get_filesystem_class(protocol)
            except (ImportError, ValueError) as e:
                p.append(f"{key}: {value!r} needs an fsspec filesystem for {protocol}:// ({e})")
    strategy = cfg.training.train_sampling_strategy
    if strategy not in ("random", "sequential", "batch_rebalance"):
        p.append(f"training.train_sampling_strategy: {strategy!r} is not supported: sft_dist's sample order is a "
                 "seeded permutation with a resumable cursor that does not depend on the number of workers; use "
                 "`random` (default), `batch_rebalance` (the same samples per step, divided among ranks and "
                 "micro-batches by length: less padding, no rank waiting for another) or `sequential`")
    elif strategy == "batch_rebalance" and cfg.data.streaming:
        p.append("training.train_sampling_strategy: batch_rebalance divides each step's samples by their length, "
                 "which a stream does not know before it reads them; use `random` with data.streaming")
    if resume is not None and not isinstance(resume, (str, bool)):
        p.append(f"training.resume_from_checkpoint: got {resume!r}; expected auto, never, or a checkpoint path")
    return p


def _check_init_config(init: dict[str, Any]) -> list[str]:
    from sft_dist.config.training_args import model_types

    model_type = init.get("model_type")
    if model_type is None:
        return ["model.init_config.model_type: required (e.g. `llama`, `gpt2`, `qwen2`)"]
    known = model_types()
    if model_type not in known:
        hint = closest(str(model_type), known)
        extra = f"; did you mean {hint!r}?" if hint else ""
        return [f"model.init_config.model_type: unknown model type {model_type!r}{extra}"]
    return []


def _looks_local(value: str) -> bool:
    if value.startswith(BUILTIN) or value.startswith(("/", "./", "../", "~")):
        return True
    # A hub id is `name` or `org/name`; anything with more parts, or that exists here, is a path.
    return value.count("/") > 1 or Path(value).exists()


def _resolve(value: str) -> Path:
    if value.startswith(BUILTIN):
        return builtin_path(value[len(BUILTIN) :])
    return Path(value).expanduser().resolve()


def _expand(spec: str | list[str]) -> tuple[list[str], list[str]]:
    """Expand paths/globs to absolute file paths. Returns (files, specs that matched nothing)."""
    files, missing = [], []
    for item in [spec] if isinstance(spec, str) else spec:
        path = str(_resolve(item))
        matches = sorted(glob.glob(path)) if glob.has_magic(path) else ([path] if os.path.exists(path) else [])
        matches = [f for f in matches if os.path.isfile(f)]
        if matches:
            files += matches
        else:
            missing.append(item)
    return files, missing


MIXTURE_KEYS = ("files", "weight", "columns", "name", "eval_split_ratio")


def _check_mixture(d) -> list[str]:
    if d.mixture is None:
        return ["data.mixture_rows: set it only with `data.mixture`"] if d.mixture_rows is not None else []
    p: list[str] = []
    if not d.mixture:
        p.append("data.mixture: empty list; give at least one {files, weight} source")
    for i, src in enumerate(d.mixture):
        key = f"data.mixture[{i}]"
        if not isinstance(src, dict):
            p.append(f"{key}: expected a mapping {{files, weight, columns}}, got {src!r:.60}")
            continue
        for k in src:
            if k not in MIXTURE_KEYS:
                hint = closest(str(k), MIXTURE_KEYS)
                p.append(f"{key}.{k}: unknown key" + (f"; did you mean {hint!r}?" if hint else f"; allowed: {list(MIXTURE_KEYS)}"))
        files = src.get("files")
        if not (isinstance(files, str) or (isinstance(files, list) and files and all(isinstance(f, str) for f in files))):
            p.append(f"{key}.files: required, a path, glob or list of them")
        else:
            p += _check_files(f"{key}.files", files)
        w = src.get("weight")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 or not math.isfinite(w):
            p.append(f"{key}.weight: required, a number > 0 (the source's share of each epoch), got {w!r}")
        cols = src.get("columns")
        if cols is not None and not (isinstance(cols, dict) and all(isinstance(v, str) for v in cols.values())):
            p.append(f"{key}.columns: a mapping of this format's column names to the source's, got {cols!r:.60}")
        p += _check_source_eval(key, src, d)
    names = [src.get("name") for src in d.mixture if isinstance(src, dict) and src.get("name") is not None]
    if len(set(names)) < len(names):
        p.append(f"data.mixture: source names {names} repeat; give each source its own name")
    if d.mixture_rows is not None and d.mixture_rows < 1:
        p.append(f"data.mixture_rows: got {d.mixture_rows}; must be >= 1")
    if d.eval_split_ratio > 0:
        p.append("data.eval_split_ratio: cannot hold out rows of a mixture (a repeated row would be in both); "
                 "set `eval_split_ratio` (with a `name`) on the sources to hold out, or give `data.eval_files`")
    return p


def _check_source_eval(key: str, src: dict, d) -> list[str]:
    """A mixture source's `name` and `eval_split_ratio`: rows held out of it before mixing, as its own eval set."""
    p: list[str] = []
    name, ratio = src.get("name"), src.get("eval_split_ratio")
    if name is not None and not (isinstance(name, str) and EVAL_SET_NAME.fullmatch(name)):
        p.append(f"{key}.name: {name!r}: a source's name is letters and digits, words joined by single underscores "
                 "(it names the source's eval set: eval_<name>_loss)")
    if ratio is None:
        return p
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        p.append(f"{key}.eval_split_ratio: got {ratio!r}; a fraction in (0, 1) of the source's rows to hold out")
    elif name is None:
        p.append(f"{key}.eval_split_ratio: give the source a `name` too: its held-out rows are the eval set "
                 "eval_<name>_loss is reported for")
    return p


def _check_streaming(cfg: Config) -> list[str]:
    d = cfg.data
    if d.shuffle_window < 0:
        return [f"data.shuffle_window: got {d.shuffle_window}; must be >= 0 (0: file order)"]
    if not d.streaming:
        return []
    p = []
    if cfg.training.max_steps <= 0:
        p.append("data.streaming: needs `training.max_steps` (> 0): a stream has no length to count epochs by")
    if d.truncation == "split":
        p.append("data.truncation: split is not supported with data.streaming (one streamed row is one example); "
                 "use right, left_prompt or drop, or split the rows ahead of time")
    for key, why in (("packing", "pack ahead of time"), ("mixture", "mix the files ahead of time"),
                     ("id_column", "unset it"), ("eval_split_ratio", "give data.eval_files")):
        if getattr(d, key) not in (None, False, 0, 0.0):
            p.append(f"data.{key}: not supported with data.streaming (the rows are never all in hand); {why}")
    for f in _expand(d.train_files)[0] if d.train_files else []:
        if Path(f).suffix.lower() not in (".jsonl", ".parquet", ".csv"):
            p.append(f"data.train_files: {f} cannot be streamed (a .json file is one document); use .jsonl, "
                     ".parquet or .csv")
    return p


EVAL_SET_NAME = re.compile(r"[A-Za-z0-9]+(_[A-Za-z0-9]+)*")


def _check_eval_sets(d) -> list[str]:
    """`data.eval_files` (files) or `data.eval_split` (a hub dataset's split), or named sets of either, whose names
    make metric names (eval_<name>_loss)."""
    if d.eval_files is not None and d.eval_split is not None:
        return ["data.eval_split: set it only when no `data.eval_files` is given (the files would be evaluated on, "
                "the split not)"]
    if d.eval_split is not None and d.dataset is None:
        return ["data.eval_split: a split of `data.dataset`; give local eval data as data.eval_files"]
    key, spec = ("data.eval_files", d.eval_files) if d.eval_split is None else ("data.eval_split", d.eval_split)
    if not isinstance(spec, dict):
        return _check_files(key, spec) if key == "data.eval_files" and spec is not None else []
    if not spec:
        return [f"{key}: an empty mapping; give {{name: {key[10:]}}} for each eval set, or leave it unset"]
    p: list[str] = []
    for name, value in spec.items():
        if not EVAL_SET_NAME.fullmatch(str(name)):  # it names metrics: eval_<name>_loss
            p.append(f"{key}.{name}: an eval set's name is letters and digits, words joined by single "
                     "underscores (e.g. `pt`, `held_out`)")
        if key == "data.eval_files":
            p += _check_eval_set_files(f"{key}.{name}", value)
    return p


def _check_eval_set_files(key: str, value) -> list[str]:
    """A named eval set's files: a path, glob or list, or {files, columns} for a set whose columns differ."""
    if not isinstance(value, dict):
        return _check_files(key, value)
    p = [f"{key}.{k}: unknown key; allowed: files, columns" for k in value if k not in ("files", "columns")]
    files, cols = value.get("files"), value.get("columns")
    if not (isinstance(files, str) or (isinstance(files, list) and files and all(isinstance(f, str) for f in files))):
        p.append(f"{key}.files: required, a path, glob or list of them")
    else:
        p += _check_files(f"{key}.files", files)
    if cols is not None and not (isinstance(cols, dict) and all(isinstance(v, str) for v in cols.values())):
        p.append(f"{key}.columns: a mapping of this format's column names to the set's, got {cols!r:.60}")
    return p


def _check_files(key: str, spec: str | list[str]) -> list[str]:
    _, missing = _expand(spec)
    return [f"{key}: {m!r} matches no file (relative paths are taken from the current directory)" for m in missing]


def _resolve_paths(cfg: Config) -> Config:
    """Make every local path absolute, so workers started elsewhere (cwd, node) see the same files."""
    m, d, la, c = cfg.model, cfg.data, cfg.launcher, cfg.checkpoint
    model = dataclasses.replace(m, name_or_path=_resolve_local(m.name_or_path), tokenizer=_resolve_local(m.tokenizer))
    data = dataclasses.replace(
        d, train_files=_expand(d.train_files)[0] if d.train_files is not None else None,
        mixture=[{**src, "files": _expand(src["files"])[0]} for src in d.mixture] if d.mixture is not None else None,
        eval_files=({name: {**spec, "files": _expand(spec["files"])[0]} if isinstance(spec, dict) else _expand(spec)[0]
                     for name, spec in d.eval_files.items()} if isinstance(d.eval_files, dict)
                    else _expand(d.eval_files)[0] if d.eval_files is not None else None),
        cache_dir=str(Path(d.cache_dir).expanduser().resolve()) if d.cache_dir else d.cache_dir)
    training = cfg.training
    resume = training.get("resume_from_checkpoint")
    if isinstance(resume, str) and "://" not in resume and resume.lower() not in ("auto", "never", "no", "none", ""):
        training = training.replace(resume_from_checkpoint=str(Path(resume).expanduser().resolve()))
    return dataclasses.replace(
        cfg, output_dir=str(Path(cfg.output_dir).expanduser().resolve()), model=model, data=data, training=training,
        launcher=dataclasses.replace(la, storage_path=_absolute(la.storage_path)),
        checkpoint=dataclasses.replace(c, dir=_absolute(c.dir)))


def _resolve_local(value: str | None) -> str | None:
    """A local path (or `builtin:` asset) made absolute; a hub id as it is."""
    return str(_resolve(value)) if value and _looks_local(value) else value


def _absolute(value: str | None) -> str | None:
    """A local directory made absolute; a URL (s3://...) as it is."""
    return str(Path(value).expanduser().resolve()) if value and "://" not in value else value


def config_to_dict(cfg: Config, *, redact: bool = True) -> dict[str, Any]:
    data = dataclasses.asdict(dataclasses.replace(cfg, training=Training()))
    data["training"] = copy.deepcopy(cfg.training.as_dict())
    return _redact(data) if redact else data


def _redact(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: ("***" if _is_secret(k) and v not in (None, "") else _redact(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_redact(v) for v in node]
    if isinstance(node, str):
        return redact_url(node)
    return node


def _is_secret(key: object) -> bool:
    return bool(SECRET_KEY.search(str(key))) and str(key) not in NOT_SECRET


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, secrets redacted (what goes to output_dir/config.yaml)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
