"""Generate with a trained run: base model + adapter (or the full model), prompts in the run's format."""

from __future__ import annotations

from pathlib import Path

import yaml

from sft_dist.errors import SftDistError


def _read_run_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise SftDistError(f"{run_dir}: not a sft_dist run directory (no config.yaml); pass a run's output_dir")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def load_trained(run_dir: str | Path):
    """(model, tokenizer, run config) for a finished run, on CPU in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_dist.quiet import quiet_libraries

    quiet_libraries()
    run_dir = Path(run_dir)
    cfg = _read_run_config(run_dir)
    model_cfg = cfg.get("model", {})
    trust = bool(model_cfg.get("trust_remote_code", False))
    adapter, full = run_dir / "adapter", run_dir / "model"
    if (adapter / "adapter_config.json").is_file():
        from peft import PeftModel

        base_path = run_dir / "base_model" if (run_dir / "base_model").is_dir() else model_cfg.get("name_or_path")
        base = AutoModelForCausalLM.from_pretrained(str(base_path), trust_remote_code=trust)
        model = PeftModel.from_pretrained(base, str(adapter))
        tok_dir = adapter
    elif (full / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(full), trust_remote_code=trust)
        tok_dir = full
    else:
        raise SftDistError(f"{run_dir}: no trained adapter/ or model/ found; has the run finished?")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    model.eval()
    return model, tokenizer, cfg


def format_prompt(cfg: dict, tokenizer, prompt: str, input: str = "") -> str:
    from sft_dist.data.templates import render_prompt, resolve_template

    data = cfg.get("data", {})
    fmt = data.get("format", "alpaca")
    if fmt == "alpaca":
        return render_prompt(resolve_template(data.get("template", "alpaca")), instruction=prompt, input=input)
    if fmt == "messages":
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def generate(run_dir, prompts: list[str], *, input: str = "", max_new_tokens: int = 48,
             temperature: float = 0.0, raw: bool = False) -> list[str]:
    import torch

    model, tok, cfg = load_trained(run_dir)
    fmt = cfg.get("data", {}).get("format", "alpaca")
    stop = [tok.eos_token_id]
    if "<|im_end|>" in tok.get_vocab():
        stop.append(tok.convert_tokens_to_ids("<|im_end|>"))
    outputs = []
    for prompt in prompts:
        text = prompt if raw else format_prompt(cfg, tok, prompt, input)
        # Chat templates render their own BOS; plain prompts get the tokenizer's specials, as in training.
        enc = tok(text, return_tensors="pt", add_special_tokens=not (fmt == "messages" and not raw))
        kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=tok.pad_token_id)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature)
        else:
            kwargs.update(do_sample=False)
        with torch.no_grad():
            out = model.generate(**enc, **kwargs)
        outputs.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return outputs
