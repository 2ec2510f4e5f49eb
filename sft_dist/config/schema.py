"""The typed config: one frozen dataclass per section. Defaults here are the defaults users get.

`training` is not a dataclass of ours: it takes TRL `SFTConfig` / HF `TrainingArguments` fields by their
own names, is validated against the installed `SFTConfig` (`training_args.py`) and held read-only, with typed
attributes for the fields sft_dist reads itself (`training.py`). The whole config is read-only after
`load_config`: a changed copy is `dataclasses.replace(cfg, ...)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from sft_dist.config.training import Training


@dataclass(frozen=True)
class ModelConfig:
    # Hub id or local directory, loaded with `from_pretrained`. Exclusive with `init_config`.
    name_or_path: str | None = None
    # A transformers config dict (must hold `model_type`) for a randomly initialised model, seeded.
    init_config: dict[str, Any] | None = None
    # Tokenizer path or hub id; defaults to `name_or_path`. `builtin:tokenizer` is the shipped tiny one.
    tokenizer: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # auto: flash attention (3, then 2) when installed, on CUDA with 16-bit weights and supported by the model;
    # else on the same terms torch's varlen flash kernel (varlen_attention) once it checked out on the GPU;
    # else sdpa where the model supports it; else eager (the log says which, and why). Or one of eager, sdpa,
    # flex_attention, varlen_attention, flash_attention_2/3/4: checked against the model class before any
    # weight loads.
    attn_implementation: str | None = "auto"
    # With init_config: write the seeded random base to <output_dir>/base_model (the adapter's base: export,
    # generate and PeftModel.from_pretrained read it). false skips the write (seconds to minutes for a large
    # shape) for a run nothing will export, e.g. a benchmark; a quantized base is always written (it is reloaded).
    # A frozen LoRA base held whole (no ZeRO-3/FSDP2 shards) is written in the background (model/init_base.py).
    save_init_base: bool = True
    trust_remote_code: bool = False
    revision: str | None = None


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = True
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # "all-linear" (every linear layer but the LM head) or a list of module names.
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] | None = None
    # Module names (or suffixes) never to adapt, e.g. [vision_tower] with "all-linear".
    exclude_modules: list[str] | None = None
    use_dora: bool = False
    use_rslora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    # Where the step computes in 16 bit, the adapted layers skip peft's fp32 round trip of their input under
    # autocast and add the scaled adapter output in one addmm (model/lora_forward.py). false: peft's own forward.
    fused_forward: bool = True
    # A trained peft LoRA adapter to start from: a directory with adapter_config.json and adapter_model.safetensors,
    # or a sft_dist run directory (its adapter/). Its shape (r, alpha, target_modules, ...) is taken into this
    # section (config/adapter.py), its tensors into the new adapter; then it trains further, or is evaluated.
    init_adapter: str | None = None


@dataclass(frozen=True)
class QuantizationConfig:
    # None: no quantization. 4 or 8: bitsandbytes (QLoRA when LoRA is on).
    bits: Literal[4, 8] | None = None
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # The dtype 4-bit weights are packed into. auto: the model's dtype under FSDP (FSDP2 shards floating
    # tensors only), else uint8.
    quant_storage: Literal["auto", "uint8", "float32", "bfloat16", "float16"] = "auto"
    # The weights left unquantized (embeddings, norms, the output head) in fp32, as peft's
    # prepare_model_for_kbit_training casts them: twice their memory, and an fp32 residual stream (each layer's
    # saved input twice as large, its elementwise ops twice the traffic). null: only for a float16 model, whose
    # range can overflow there; a bfloat16 one keeps them in bfloat16, as TRL 1.16 does.
    upcast_unquantized: bool | None = None

    def upcasts(self, model_dtype: str) -> bool:
        """`upcast_unquantized` resolved for a base loaded in `model_dtype` (a torch dtype's name). The one rule
        the run (model/lora.py), the plan's facts and the memory estimate follow."""
        return self.upcast_unquantized if self.upcast_unquantized is not None else model_dtype == "float16"


@dataclass(frozen=True)
class DataConfig:
    # Local file(s): a path, a glob, or a list of them (jsonl, json, parquet, csv). Exclusive with `dataset`.
    train_files: str | list[str] | None = None
    # A hub dataset name (loaded with `datasets.load_dataset`).
    dataset: str | None = None
    # Instead of train_files: several sources mixed by weight, e.g.
    #   [{files: a.jsonl, weight: 3}, {files: "b/*.jsonl", weight: 1, columns: {output: answer}}]
    # A source's share of each epoch is weight / sum(weights) (repeated or subsampled, seeded); `columns`
    # maps that source's names like data.columns. All sources share data.format. `eval_split_ratio` (with a
    # `name`) holds that fraction of the source's rows out before mixing, as an eval set of its own (eval_<name>_*;
    # where data.eval_files is given, that is the eval data and the held-out rows only stay out of training).
    mixture: list[dict[str, Any]] | None = None
    # Samples per epoch drawn from the mixture. None: the sources' rows added up.
    mixture_rows: int | None = None
    # Read and tokenize the training rows as they are trained on (jsonl/parquet/csv files or a hub dataset),
    # for data that does not fit on local disk: needs training.max_steps; resumable; passes run into each other.
    streaming: bool = False
    # With streaming: rows shuffled together in windows of this many consecutive rows (seeded); 0: file order.
    shuffle_window: int = 10000
    dataset_config: str | None = None
    train_split: str = "train"
    # alpaca (instruction, input, output), prompt_completion, messages (a list of {role, content}), sharegpt
    # (`conversations`: a list of {from, value}, roles human/gpt/system/...), text.
    format: Literal["alpaca", "prompt_completion", "messages", "sharegpt", "text"] = "alpaca"
    # Alpaca prompt template: a preset name (alpaca, alpaca_pt, alpaca_full) or a literal template.
    template: str = "alpaca"
    # Map this format's column names to the dataset's, e.g. {instruction: question, output: answer}.
    columns: dict[str, str] | None = None
    # For formats messages / sharegpt: the chat template, overriding the tokenizer's: a preset (chatml, llama3,
    # mistral, gemma, qwen, phi3: sft_dist/data/chat_templates.py), a Jinja template, or a .jinja file.
    chat_template: str | None = None
    # For formats messages / sharegpt, when the data spells turns otherwise: each turn's role and content keys
    # (default role/content for messages, from/value for sharegpt) and role names mapped to ours (system, user,
    # assistant, tool), merged over the format's own; e.g. turns {speaker, text}: role_key: speaker,
    # content_key: text, roles: {bot: assistant}.
    role_key: str | None = None
    content_key: str | None = None
    roles: dict[str, str] | None = None
    max_length: int = 512
    # A row longer than max_length: `right` keeps its first max_length tokens (the end of the answer may go);
    # `left_prompt` removes prompt tokens from the left (after BOS and the template's header; chat formats: the
    # earliest whole exchanges, after the system turn) so the answer stays whole, and cuts on the right only a row
    # whose answer alone does not fit; `drop` leaves such rows out. The log counts each, with a warning when
    # many rows lose their answer (build.CUT_WARNING_FRACTION). `split` makes such a row several rows of up to
    # max_length tokens, consecutive windows of it (every token trained on; a window without a loss-carrying token
    # is left out); each window after the first starts with the last `split_overlap` tokens of the one before, as
    # context that carries no loss (each token's loss counts once). `truncate`: the old name of `right`.
    truncation: Literal["right", "left_prompt", "drop", "split", "truncate"] = "right"
    split_overlap: int = 0
    # None: on for alpaca / prompt_completion / messages / sharegpt (loss on the response only), off for text.
    completion_only_loss: bool | None = None
    # Files (path, glob or list), or named eval sets {name: files}: each is evaluated on its own
    # (eval_<name>_loss, ...) and all together (eval_loss, ...), as HF's Trainer does a dict of eval datasets. A set
    # whose columns are named otherwise: {name: {files: ..., columns: {output: answer}}}.
    eval_files: str | list[str] | dict[str, str | list[str] | dict[str, Any]] | None = None
    # With `dataset`: the split to evaluate on, or named eval sets {name: split} (e.g. {val: validation, test: test}).
    eval_split: str | dict[str, str] | None = None
    # Hold out this fraction of the training rows for eval (fixed seed) when no eval set is given.
    eval_split_ratio: float = 0.0
    # Pack the training rows, best-fit decreasing, into rows of max_length tokens (sft_dist/data/packing.py);
    # no document attends to another. Eval rows stay unpacked.
    packing: bool = False
    num_proc: int | None = None
    # Each rank writes the ids of the samples it trained on to output_dir/trace/ (debugging sharding).
    trace_samples: bool = False
    # A row that cannot be used (null or wrong-typed value, empty response, unknown chat role, duplicate id,
    # a corrupt jsonl line): `error` stops at the first, naming file and line; `skip` drops such rows and logs
    # one line counting them by kind. A bad file (missing, unreadable, empty, nothing left) always stops.
    on_bad_row: Literal["error", "skip"] = "error"
    # The column holding each row's id: ids must be unique (a duplicate names both rows' lines).
    id_column: str | None = None
    # Keep the tokenized datasets in a content-addressed cache (data/cache.py), built once by all ranks in
    # parallel and memory-mapped by later runs and by every rank of a node. false: tokenize in memory each run.
    cache: bool = True
    # Where; it must be shared by all nodes of a multi-node job. None: $SFT_DIST_CACHE, else
    # ~/.cache/sft_dist/data.
    cache_dir: str | None = None
    # How a data file enters the cache key: `stat` (path, size, mtime: instant) or `content` (path, size and
    # sha256 of its bytes: a file touched or rewritten unchanged still hits, at the cost of reading every file
    # once per run).
    cache_fingerprint: Literal["stat", "content"] = "stat"

    def __post_init__(self):
        if self.truncation == "truncate":
            object.__setattr__(self, "truncation", "right")

    @property
    def eval_sets(self) -> tuple[str, ...]:
        """The names of the named eval sets (`eval_files: {name: files}`, `eval_split: {name: split}`, or without
        either the mixture sources that hold rows out), in the config's order; () otherwise."""
        named = self.eval_files if self.eval_files is not None else self.eval_split
        if named is not None:
            return tuple(named) if isinstance(named, dict) else ()
        return tuple(src["name"] for src in self.mixture_holdouts)

    def eval_set_files(self) -> dict[str, tuple[str | list[str], dict[str, str] | None]]:
        """name -> (files, columns) of the named sets of `eval_files`; columns None: `data.columns`."""
        if not isinstance(self.eval_files, dict):
            return {}
        return {name: (spec["files"], spec.get("columns")) if isinstance(spec, dict) else (spec, None)
                for name, spec in self.eval_files.items()}

    @property
    def mixture_holdouts(self) -> list[dict]:
        """The mixture sources that hold rows out as an eval set of their own (`eval_split_ratio` and `name`)."""
        return [src for src in self.mixture or () if src.get("eval_split_ratio")]


@dataclass(frozen=True)
class BackendConfig:
    type: Literal["ddp", "deepspeed", "fsdp"] = "ddp"
    # Path to the backend's config file (DeepSpeed JSON, FSDP YAML).
    config: str | None = None
    # Keys merged over the file's (nested mappings merged key by key), e.g. {shard_size: 2} or
    # {zero_optimization: {reduce_bucket_size: 5.0e7}}: tweak a shipped file from the command line.
    options: dict[str, Any] | None = None
    # Sequence parallelism (DeepSpeed-Ulysses' scheme, model/ulysses.py): groups of this many consecutive workers
    # train the same rows, each holding 1/size of their tokens (activations 1/size as large: rows size times
    # longer); attention trades token slices for head slices by all-to-all. Must divide the workers (heads it does
    # not divide are padded with zero heads). With any backend; the data-parallel ranks are workers / size.
    sequence_parallel_size: int = 1


@dataclass(frozen=True)
class LauncherConfig:
    # local: spawn num_workers processes here. torchrun: expect to be started by torchrun (env checked).
    # ray: a Ray Train TorchTrainer with num_workers workers (an embedded local Ray, or the cluster at
    # `address` / RAY_ADDRESS, e.g. under `ray job submit`).
    type: Literal["local", "torchrun", "ray"] = "local"
    num_workers: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    master_addr: str = "127.0.0.1"
    # None: a free port is picked.
    master_port: int | None = None
    # torch/OMP threads per worker. None: cores / workers on the node (at least 1); under Ray the
    # worker's CPU resource.
    threads_per_worker: int | None = None
    # Seconds a worker waits for its peers (rendezvous and collectives) before failing instead of hanging.
    timeout_s: int = 600
    # Ray: the cluster to join ("auto", "ray://host:10001", ...). None: RAY_ADDRESS if set, else an
    # embedded single-node Ray on 127.0.0.1 that stops with the run.
    address: str | None = None
    # Ray: resources each worker reserves, e.g. {CPU: 8, GPU: 1}. None: {CPU: 1} (+ {GPU: 1} on cuda).
    resources_per_worker: dict[str, float] | None = None
    # Ray: restarts of the worker group after a worker or node dies (FailureConfig.max_failures); every
    # restart resumes from the newest complete checkpoint. -1: unlimited.
    max_failures: int = 0
    # Ray: the run's name and where Ray keeps its run state (reported metrics, checkpoint pointers).
    # None: the output_dir's name, and <output_dir>/ray. Keep both stable so a re-submitted job resumes.
    run_name: str | None = None
    storage_path: str | None = None
    # Ray: Ray's worker processes on the driver's node (Train controller, training workers) forked from one process
    # that imported Ray, torch, transformers, peft and TRL once (distributed/ray_warm.py; a node's `sft-dist warm`
    # where SFT_DIST_WARM names one), instead of each importing them. Used on the embedded cluster and a joined
    # single-node one, for CPU workers (GPU ones not yet: unverified on a GPU); a worker it cannot serve starts cold.
    warm_workers: bool = True


@dataclass(frozen=True)
class CheckpointConfig:
    # Where checkpoints go: a local path or an fsspec URL (s3://bucket/run, gs://...) for multi-node runs
    # without a shared filesystem. None: <output_dir>/checkpoints.
    dir: str | None = None
    # fsspec options for a URL, e.g. {endpoint_url: http://minio:9000}. Prefer credentials from the
    # environment (AWS_ACCESS_KEY_ID, ...); secret-looking keys here are redacted in every dump.
    storage_options: dict[str, Any] | None = None
    # After SIGTERM: seconds allowed to finish the step and write the checkpoint (Kubernetes'
    # terminationGracePeriodSeconds should be larger).
    stop_grace_s: float = 300.0
    # Keep the best checkpoint (training.metric_for_best_model, eval loss by default) beyond
    # training.save_total_limit.
    keep_best: bool = True
    # Resume although the learning-rate schedule changed (training.max_steps, num_train_epochs, learning_rate,
    # lr_scheduler_type, warmup...): the new schedule applies from the checkpoint's step on. Off: such a resume
    # is refused, naming what changed.
    allow_schedule_change: bool = False


@dataclass(frozen=True)
class MetricsConfig:
    # Peak dense TFLOP/s of one device for MFU (model FLOPs utilisation). None: looked up for known GPUs
    # (bf16/fp16 tensor peak); on a CPU, MFU is n/a unless this is given.
    peak_tflops: float | None = None
    # At each evaluation: greedy completions of these prompts (formatted like the training data), logged and
    # written to output_dir/samples.jsonl and the report.
    generate_prompts: list[str] | None = None
    generate_max_new_tokens: int = 32
    # At each evaluation: the model answers the prompts of the first N eval rows and each answer is scored against
    # the row's own answer (eval_exact_match, eval_token_f1, eval_rouge_l: metrics/text.py), which
    # training.metric_for_best_model may name; the answers go to output_dir/eval_generations.jsonl. 0: off.
    generate_eval_rows: int = 0
    # Beam search for these generations and the prompts' (1: greedy).
    generate_num_beams: int = 1


@dataclass(frozen=True)
class Config:
    output_dir: str = "outputs/run"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: Training = field(default_factory=Training)
    backend: BackendConfig = field(default_factory=BackendConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self):
        if not isinstance(self.training, Training):  # a plain mapping (tests, dataclasses.replace)
            object.__setattr__(self, "training", Training(self.training))


SECTIONS = {
    "model": ModelConfig,
    "lora": LoraConfig,
    "quantization": QuantizationConfig,
    "data": DataConfig,
    "backend": BackendConfig,
    "launcher": LauncherConfig,
    "checkpoint": CheckpointConfig,
    "metrics": MetricsConfig,
}
