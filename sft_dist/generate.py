"""Generate with a trained run: base model + adapter (or the full model), prompts in the run's format.

A run directory is data someone may hand over: its config.yaml never turns on remote code. A model that needs
its own code runs only with `trust_remote_code=True` from the caller (`sft-dist generate --trust-remote-code`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from sft_dist.data.chat_templates import end_of_turn_ids
from sft_dist.data.formats import CHAT_FORMATS
from sft_dist.errors import SftDistError

REMOTE_CODE_FLAG = "--trust-remote-code"
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Decoding:
    """How tokens are picked: greedy (temperature 0, one beam), beam search, or sampling (temperature > 0, with
    top_p / top_k); `seed` makes sampling repeatable. The command line's names, checked before any model loads."""

    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    num_beams: int = 1
    repetition_penalty: float | None = None
    seed: int | None = None

    def check(self, *, stream: bool = False) -> None:
        if self.temperature < 0:
            raise SftDistError(f"--temperature: got {self.temperature}; must be >= 0 (0 = greedy)")
        sampling = self.temperature > 0
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SftDistError(f"--top-p: got {self.top_p}; must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise SftDistError(f"--top-k: got {self.top_k}; must be >= 1")
        for flag, value in (("--top-p", self.top_p), ("--top-k", self.top_k)):
            if value is not None and not sampling:
                raise SftDistError(f"{flag} applies to sampling: give --temperature > 0 with it (0 is greedy)")
        if self.num_beams < 1:
            raise SftDistError(f"--num-beams: got {self.num_beams}; must be >= 1")
        if self.num_beams > 1 and sampling:
            raise SftDistError("--num-beams with --temperature > 0: choose beam search or sampling")
        if self.num_beams > 1 and stream:
            raise SftDistError("--stream shows one sequence as it grows; beam search keeps several: drop --stream "
                               "or --num-beams")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise SftDistError(f"--repetition-penalty: got {self.repetition_penalty}; must be > 0 (1 = none)")

    def generate_kwargs(self) -> dict:
        kw: dict = {"do_sample": self.temperature > 0, "num_beams": self.num_beams}
        if self.temperature > 0:
            kw.update(temperature=self.temperature, top_p=self.top_p if self.top_p is not None else 1.0,
                      top_k=self.top_k if self.top_k is not None else 0)  # the model's generation_config: not ours
        if self.repetition_penalty is not None:
            kw["repetition_penalty"] = self.repetition_penalty
        return kw


def _read_run_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise SftDistError(f"{run_dir}: not a sft_dist run directory (no config.yaml); pass a run's output_dir")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def remote_code_refused(source: str, run_dir: Path | None = None) -> SftDistError:
    """The error for a model whose loading needs code from its repository, which was not allowed."""
    where = " (the run's config.yaml asks for model.trust_remote_code, which a run directory cannot turn on)" \
        if run_dir is not None else ""
    return SftDistError(f"{source} needs to run code from its repository to load{where}. Read that code, then pass "
                        f"{REMOTE_CODE_FLAG} to allow it")


def _needs_remote_code(e: Exception) -> bool:
    return "trust_remote_code" in str(e)


def load_trained(run_dir: str | Path, *, trust_remote_code: bool = False, device: str = "cpu"):
    """(model, tokenizer, run config) for a finished run, in eval mode, on `device` (cpu, or cuda: this process's
    GPU, in bf16 where it has it, else fp16). `trust_remote_code` comes from the caller only, never from the run's
    config.yaml."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_dist.quiet import quiet_libraries

    quiet_libraries()
    run_dir = Path(run_dir)
    if device not in DEVICES:
        raise SftDistError(f"--device: got {device!r}; expected one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise SftDistError("--device cuda: no CUDA device is visible to this process; use --device cpu")
    cfg = _read_run_config(run_dir)
    model_cfg = cfg.get("model", {})
    asked = bool(model_cfg.get("trust_remote_code", False))
    adapter, full = run_dir / "adapter", run_dir / "model"
    on_gpu: dict = {}
    if device == "cuda":  # straight onto this GPU in 16 bit (an 8B model is 16 GB there, not 32 GB of host fp32)
        on_gpu = {"device_map": {"": torch.cuda.current_device()},
                  "dtype": torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16}

    def load(path, **kwargs):
        try:
            return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=trust_remote_code, **on_gpu,
                                                        **kwargs)
        except (OSError, ValueError) as e:
            if _needs_remote_code(e) and not trust_remote_code:
                raise remote_code_refused(str(path), run_dir if asked else None) from None
            raise SftDistError(f"{path}: cannot load the model: {e}") from None

    if (adapter / "adapter_config.json").is_file():
        from peft import PeftModel

        base_path = run_dir / "base_model" if (run_dir / "base_model").is_dir() else model_cfg.get("name_or_path")
        if base_path is None:
            why = (" (model.save_init_base was false)" if model_cfg.get("save_init_base") is False else "")
            raise SftDistError(f"{run_dir}: the adapter's base is a random init (model.init_config) and "
                               f"{run_dir / 'base_model'} does not exist{why}; there is no base to generate with")
        tokenizer = _tokenizer(AutoTokenizer, adapter, trust_remote_code, run_dir if asked else None)
        base = load(base_path)
        _fit_embedding(base, tokenizer)
        model = PeftModel.from_pretrained(base, str(adapter))
    elif (full / "config.json").is_file():
        tokenizer = _tokenizer(AutoTokenizer, full, trust_remote_code, run_dir if asked else None)
        model = load(full)
    else:
        raise SftDistError(f"{run_dir}: no trained adapter/ or model/ found; has the run finished?")
    model.eval()
    return model, tokenizer, cfg


def _tokenizer(auto, path: Path, trust: bool, run_dir: Path | None):
    try:
        return auto.from_pretrained(str(path), trust_remote_code=trust)
    except (OSError, ValueError) as e:
        if _needs_remote_code(e) and not trust:
            raise remote_code_refused(str(path), run_dir) from None
        raise SftDistError(f"{path}: cannot load the tokenizer: {e}") from None


def _fit_embedding(base, tokenizer) -> None:
    """A run that resized the embedding for its tokenizer (model/build.py `fit_vocab`) saved the trained
    embedding and head with the adapter; the base gets the same number of rows before they are loaded."""
    rows = base.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)


def format_prompt(cfg: dict, tokenizer, prompt: str, input: str = "") -> str:
    from sft_dist.data.templates import render_prompt, resolve_template

    data = cfg.get("data", {})
    fmt = data.get("format", "alpaca")
    if fmt == "alpaca":
        return render_prompt(resolve_template(data.get("template", "alpaca")), instruction=prompt, input=input)
    if fmt in CHAT_FORMATS:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    new_tokens: list[int]  # the generated ids, stop token included
    why_empty: str | None = None  # for an empty text: the reason, one line


def complete(run_dir, prompts: list[str], *, input: str = "", max_new_tokens: int = 48, temperature: float = 0.0,
             raw: bool = False, trust_remote_code: bool = False, decoding: Decoding | None = None,
             device: str = "cpu", stream=None) -> list[Completion]:
    """Complete each prompt; an empty completion carries the reason it is empty. `decoding` (else greedy, or
    sampling at `temperature`); `stream(i, prompt, tokenizer)`: a transformers streamer for prompt i, which is
    handed each new token as it is generated (or None)."""
    import torch

    decoding = decoding or Decoding(temperature=temperature)
    decoding.check(stream=stream is not None)
    if max_new_tokens < 0:
        raise SftDistError(f"--max-new-tokens: got {max_new_tokens}; must be >= 0")
    model, tok, cfg = load_trained(run_dir, trust_remote_code=trust_remote_code, device=device)
    fmt = cfg.get("data", {}).get("format", "alpaca")
    stop = [tok.eos_token_id, *(i for i in end_of_turn_ids(tok) if i != tok.eos_token_id)]
    limit = max_positions(model)
    outputs = []
    for i, prompt in enumerate(prompts):
        text = prompt if raw else format_prompt(cfg, tok, prompt, input)
        # Chat templates render their own BOS; plain prompts get the tokenizer's specials, as in training.
        enc = tok(text, return_tensors="pt", add_special_tokens=not (fmt in CHAT_FORMATS and not raw)).to(model.device)
        n = int(enc["input_ids"].shape[1])
        budget = max_new_tokens if limit is None else min(max_new_tokens, max(0, limit - n))
        streamer = stream(i, prompt, tok) if stream is not None else None
        new: list[int] = []
        if budget > 0:
            kwargs = dict(max_new_tokens=budget, eos_token_id=stop, pad_token_id=tok.pad_token_id,
                          **decoding.generate_kwargs())
            if decoding.seed is not None:  # each prompt from the same seed: its completion alone is repeatable
                torch.manual_seed(decoding.seed)
            with torch.no_grad():
                out = model.generate(**enc, **kwargs, streamer=streamer)
            new = out[0, n:].tolist()
        elif streamer is not None:
            streamer.end()
        c = Completion(tok.decode(new, skip_special_tokens=True).strip(), n, new)
        if not c.text:
            c.why_empty = _why_empty(c, tok, stop=stop, max_new_tokens=max_new_tokens, limit=limit)
        outputs.append(c)
    return outputs


def generate(run_dir, prompts: list[str], *, input: str = "", max_new_tokens: int = 48,
             temperature: float = 0.0, raw: bool = False, trust_remote_code: bool = False,
             decoding: Decoding | None = None, device: str = "cpu", stream=None) -> list[str]:
    """The completions' texts; why any of them is empty goes to stderr, one line each."""
    outputs = complete(run_dir, prompts, input=input, max_new_tokens=max_new_tokens, temperature=temperature,
                       raw=raw, trust_remote_code=trust_remote_code, decoding=decoding, device=device, stream=stream)
    for i, c in enumerate(outputs, 1):
        if c.why_empty:
            print(f"sft-dist: note: prompt {i} got an empty completion: {c.why_empty}", file=sys.stderr)
    return [c.text for c in outputs]


def max_positions(model) -> int | None:
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _why_empty(c: Completion, tok, *, stop: list[int], max_new_tokens: int, limit: int | None) -> str:
    if max_new_tokens == 0:
        return "--max-new-tokens is 0"
    if not c.new_tokens:
        return (f"the prompt has {c.prompt_tokens} tokens and the model has {limit} positions "
                "(max_position_embeddings): no room left to generate; shorten the prompt")
    first = c.new_tokens[0]
    if first in stop:
        return (f"the model's first token was the stop token {tok.convert_ids_to_tokens(first)!r} (id {first}), "
                "which ends the answer at once: an undertrained model does this, and so does a prompt unlike the "
                "run's training format (its data.format / data.template; --raw sends a prompt untemplated)")
    shown = ", ".join(f"{tok.convert_ids_to_tokens(t)!r}" for t in c.new_tokens[:5])
    more = " ..." if len(c.new_tokens) > 5 else ""
    return (f"the model generated {len(c.new_tokens)} token(s) that decode to nothing but special tokens or "
            f"whitespace: {shown}{more}")
