"""Config loading: overrides, validation messages, path resolution, redaction."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sft_dist.config.load import builtin_path, dump_config
from sft_dist.errors import ConfigError
from sft_dist.validate import load_config
from tests.conftest import QUICKSTART


def problems(path, overrides=()):
    with pytest.raises(ConfigError) as ei:
        load_config(path, list(overrides))
    return ei.value.problems


def test_quickstart_loads_with_paths_resolved():
    cfg = load_config(QUICKSTART)
    assert cfg.launcher.num_workers == 2
    assert cfg.model.tokenizer == str(builtin_path("tokenizer"))
    assert cfg.data.train_files == [str(builtin_path("data/alpaca_demo_train.jsonl"))]
    assert cfg.output_dir.startswith("/")
    # sft_dist defaults under training, user values win
    assert cfg.training["report_to"] == "none"
    assert cfg.training["activation_checkpointing"] is False
    assert cfg.training["max_steps"] == 200


def test_overrides_are_yaml_typed():
    cfg = load_config(QUICKSTART, [
        "launcher.num_workers=3", "training.learning_rate=2e-4", "lora.target_modules=[q_proj, v_proj]",
        "data.max_length=64", "training.bf16=false",
    ])
    assert cfg.launcher.num_workers == 3
    assert cfg.training["learning_rate"] == pytest.approx(2e-4)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.max_length == 64
    assert cfg.training["bf16"] is False


def test_learning_rate_without_dot_in_yaml_file(write_config):
    # PyYAML reads 2e-4 as a string; sft_dist takes it as the number users meant.
    cfg = load_config(write_config({"training.learning_rate": "2e-4"}))
    assert cfg.training["learning_rate"] == pytest.approx(2e-4)


def test_unknown_keys_name_the_closest_valid_one():
    msgs = problems(QUICKSTART, ["ouput_dir=x", "lora.alpah=8", "training.learning_rat=1", "data.max_lenght=3"])
    text = "\n".join(msgs)
    assert len(msgs) == 4  # every problem reported at once
    assert "ouput_dir: unknown key; did you mean `output_dir`?" in text
    assert "lora.alpah: unknown key; did you mean `lora.alpha`?" in text
    assert "did you mean `training.learning_rate`?" in text
    assert "did you mean `data.max_length`?" in text


def test_names_from_other_tools_point_to_ours():
    text = "\n".join(problems(QUICKSTART, ["lora.rank=8", "lora.lora_alpha=16", "data.max_seq_length=512",
                                           "launcher.nproc_per_node=2"]))
    assert "lora.rank: unknown key; did you mean `lora.r`?" in text
    assert "lora.lora_alpha: unknown key; did you mean `lora.alpha`?" in text
    assert "data.max_seq_length: unknown key; did you mean `data.max_length`?" in text
    assert "launcher.nproc_per_node: unknown key; did you mean `launcher.num_workers`?" in text


def test_wrong_type_names_key_value_and_expected():
    (msg,) = problems(QUICKSTART, ["launcher.num_workers=two"])
    assert msg == "launcher.num_workers: got 'two'; expected an integer"
    (msg,) = problems(QUICKSTART, ["data.format=csv"])
    assert "data.format: got 'csv'; expected one of 'alpaca', 'prompt_completion', 'messages', 'sharegpt', 'text'" == msg


def test_training_enum_and_range_checks():
    msgs = problems(QUICKSTART, ["training.lr_scheduler_type=cosinus", "training.learning_rate=-1",
                                 "training.report_to=wandbx", "training.per_device_train_batch_size=0"])
    text = "\n".join(msgs)
    assert "training.lr_scheduler_type: got 'cosinus'; expected one of 'linear', 'cosine'" in text
    assert "training.learning_rate: got -1; must be > 0.0" in text
    assert "training.report_to: got 'wandbx'; unknown tracker(s) ['wandbx']" in text
    assert "training.per_device_train_batch_size: got 0; must be >= 1" in text


def test_training_knobs_from_developers_guide_are_accepted(tmp_path):
    knobs = {
        "num_train_epochs": 2, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
        "gradient_accumulation_steps": 4, "learning_rate": 2e-4, "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.03, "warmup_steps": 0, "weight_decay": 0.01, "max_grad_norm": 0.3,
        "optim": "paged_adamw_8bit", "bf16": False, "fp16": False, "eval_strategy": "steps", "eval_steps": 5,
        "save_strategy": "steps", "save_steps": 5, "save_total_limit": 2, "load_best_model_at_end": True,
        "metric_for_best_model": "eval_loss", "greater_is_better": False, "report_to": "none",
        "logging_steps": 1, "logging_dir": "logs", "push_to_hub": False, "seed": 7,
        "resume_from_checkpoint": None, "max_steps": 10,
    }
    knobs.pop("warmup_steps")  # warmup_ratio is its alias since transformers 5
    base = yaml.safe_load(QUICKSTART.read_text())
    base["training"] = {}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(base))
    cfg = load_config(path, [f"training.{k}={v if v is not None else 'null'}" for k, v in knobs.items()])
    for k, v in knobs.items():
        assert cfg.training["warmup_steps" if k == "warmup_ratio" else k] == v, k
    from sft_dist.train.args import build_sft_config

    args = build_sft_config(cfg, device="cpu")
    assert args.warmup_steps == 0.03 and args.optim == "paged_adamw_8bit" and args.max_grad_norm == 0.3


def test_fields_owned_by_other_sections_point_there():
    msgs = problems(QUICKSTART, ["training.max_seq_length=512", "training.deepspeed=x.json", "training.use_cpu=true",
                                 "training.padding_free=true"])
    text = "\n".join(msgs)
    assert "training.max_seq_length: not set here; set `data.max_length`" in text
    assert "training.padding_free: not set here; set `data.packing`" in text
    assert "training.deepspeed: not set here; set `backend.type: deepspeed`" in text
    assert "training.use_cpu: not set here; set `launcher.device: cpu`" in text


def test_missing_files_and_exclusive_fields(tmp_path):
    msgs = problems(QUICKSTART, [f"data.train_files={tmp_path}/nope.jsonl", "model.name_or_path=/no/such/model"])
    text = "\n".join(msgs)
    assert f"data.train_files: '{tmp_path}/nope.jsonl' matches no file" in text
    assert "model: set exactly one of `model.name_or_path`" in text
    assert "model.name_or_path: '/no/such/model' does not exist" in text


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_unknown_model_type_suggests():
    (msg,) = problems(QUICKSTART, ["model.init_config.model_type=lama"])
    assert "unknown model type 'lama'; did you mean 'llama'?" in msg


def test_alpaca_template_is_validated():
    (msg,) = problems(QUICKSTART, ["data.template=### Q: {question}\n{output}"])
    assert "data.template: unknown field(s) ['question']" in msg


def test_backend_needs_its_config_file():
    (msg,) = problems(QUICKSTART, ["backend.type=fsdp"])
    assert "backend.config: required with backend.type=fsdp (e.g. configs/fsdp/full_shard.yaml)" in msg


def test_dump_redacts_secrets_but_not_tokenizer(tmp_path):
    cfg = load_config(QUICKSTART, ["training.hub_token=hf_SECRET123", "output_dir=" + str(tmp_path)])
    text = dump_config(cfg)
    assert "hf_SECRET123" not in text
    dumped = yaml.safe_load(text)
    assert dumped["training"]["hub_token"] == "***"
    assert dumped["model"]["tokenizer"].endswith("assets/tokenizer")
    # the dump is itself a valid config
    assert load_config_from_text(tmp_path, text.replace("'***'", "null")).launcher.num_workers == 2


def load_config_from_text(tmp_path, text):
    p = tmp_path / "dumped.yaml"
    p.write_text(text)
    return load_config(p)


def test_cross_field_training_errors_caught_before_launch():
    from sft_dist.train.args import validate_sft_config

    cfg = load_config(QUICKSTART, ["training.load_best_model_at_end=true", "training.save_strategy=epoch"])
    with pytest.raises(ConfigError, match="load_best_model_at_end requires the save and eval strategy to match"):
        validate_sft_config(cfg, device="cpu")


def test_precision_never_defaults_to_bf16_on_cpu():
    from sft_dist.model.build import resolve_precision
    from sft_dist.train.args import build_sft_config

    assert resolve_precision({}, device="cpu") == {"bf16": False, "fp16": False}
    assert resolve_precision({"bf16": True}, device="cpu") == {"bf16": True, "fp16": False}
    args = build_sft_config(load_config(QUICKSTART), device="cpu")
    assert args.bf16 is False and args.fp16 is False
    assert args.activation_checkpointing is False  # TRL's default True is not let through
    assert args.max_length == 128


def test_bare_no_in_yaml_means_the_strategy_no():
    cfg = load_config(QUICKSTART, ["training.save_strategy=no", "training.eval_strategy=no"])
    assert cfg.training["save_strategy"] == "no" and cfg.training["eval_strategy"] == "no"


def test_hub_token_never_reaches_the_pickled_training_args(monkeypatch):
    from sft_dist.train.args import build_sft_config

    monkeypatch.delenv("HF_TOKEN", raising=False)
    cfg = load_config(QUICKSTART, ["training.hub_token=hf_SECRET123"])
    args = build_sft_config(cfg, device="cpu")
    assert args.hub_token is None
    import os

    assert os.environ["HF_TOKEN"] == "hf_SECRET123"


def test_checkpoint_section_and_resume_settings_are_checked():
    cfg = load_config(QUICKSTART, ["checkpoint.dir=ckpts", "training.resume_from_checkpoint=runs/a/checkpoint-5"])
    assert Path(cfg.checkpoint.dir).is_absolute() and cfg.training["resume_from_checkpoint"].endswith(
        "runs/a/checkpoint-5") and Path(cfg.training["resume_from_checkpoint"]).is_absolute()
    assert load_config(QUICKSTART).training["resume_from_checkpoint"] == "auto"
    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, ["checkpoint.stop_grace_s=0", "training.train_sampling_strategy=group_by_length",
                                 "checkpoint.dir=nosuchfs://bucket/x"])
    msg = str(e.value)
    assert "checkpoint.stop_grace_s" in msg and "train_sampling_strategy" in msg and "nosuchfs://" in msg


def test_storage_credentials_are_redacted_in_dumps():
    cfg = load_config(QUICKSTART, ["checkpoint.storage_options={key: AKIA1, secret: s3cr3t, endpoint_url: http://x}"])
    dumped = dump_config(cfg)
    assert "AKIA1" not in dumped and "s3cr3t" not in dumped and "http://x" in dumped


def test_credentials_inside_urls_are_redacted_in_every_dump(tmp_path):
    import subprocess
    import sys

    from tests.conftest import QUICKSTART, cli_env

    url = "checkpoint.storage_options={client_kwargs: {endpoint_url: 'http://minio:s3cr3t-pass@minio:9000'}}"
    r = subprocess.run([sys.executable, "-m", "sft_dist", "config", str(QUICKSTART), url],
                       capture_output=True, text=True, env=cli_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "s3cr3t-pass" not in r.stdout and "http://minio:***@minio:9000" in r.stdout
    # a value quoted by an error message is shown the same way
    r = subprocess.run([sys.executable, "-m", "sft_dist", "config", str(QUICKSTART),
                        "model.tokenizer=https://ghp_tok3n@github.com/x/tok"],
                       capture_output=True, text=True, env=cli_env(), timeout=120)
    assert r.returncode == 1 and "ghp_tok3n" not in r.stderr and "https://***@github.com/x/tok" in r.stderr


def test_sequence_parallel_is_checked_before_launch():
    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, ["backend.sequence_parallel_size=3", "training.label_smoothing_factor=0.1",
                                 "training.average_tokens_across_devices=false", "model.attn_implementation=sdpa"])
    msg = str(e.value)
    assert "3 does not divide launcher.num_workers=2" in msg
    assert "attention heads" not in msg  # heads it does not divide are padded (model/ulysses.py Heads)
    assert "label_smoothing_factor" in msg and "average_tokens_across_devices" in msg
    with pytest.raises(ConfigError, match="must be >= 1"):
        load_config(QUICKSTART, ["backend.sequence_parallel_size=0"])
    with pytest.raises(ConfigError, match="kernels-community/flash-attn3 cannot be split"):
        load_config(QUICKSTART, ["backend.sequence_parallel_size=2",
                                 "model.attn_implementation=kernels-community/flash-attn3", "launcher.device=cuda"])
    assert load_config(QUICKSTART, ["backend.sequence_parallel_size=2", "model.attn_implementation=flex_attention",
                                    "launcher.device=cuda"]).backend.sequence_parallel_size == 2
    # torchrun's world is known only when the workers start (train/run.py checks it there)
    assert load_config(QUICKSTART, ["backend.sequence_parallel_size=4", "launcher.type=torchrun",
                                    "launcher.num_workers=1"]).backend.sequence_parallel_size == 4
