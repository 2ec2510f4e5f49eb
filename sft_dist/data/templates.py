"""Prompt templates for the alpaca format, with named presets.

A template has the fields {instruction}, {input} and {output}. `{output}` must come last: what
precedes it is the prompt (masked out of the loss), what follows it is the completion. The block that
holds {input} is dropped when a row's input is empty (blocks are separated by a blank line).
"""

from __future__ import annotations

import functools
import string

from sft_dist.errors import ConfigError

PRESETS: dict[str, str] = {
    # Stanford Alpaca's template (the variant without the preamble line).
    "alpaca": "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}",
    "alpaca_pt": "### Instrução:\n{instruction}\n\n### Entrada:\n{input}\n\n### Resposta:\n{output}",
    # Stanford Alpaca's full template, with the preamble.
    "alpaca_full": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
    ),
}

FIELDS = ("instruction", "input", "output")


def resolve_template(name_or_text: str, *, key: str = "data.template") -> str:
    """Return the template text for a preset name or a literal template, validated."""
    text = PRESETS.get(name_or_text, name_or_text)
    if "{" not in text:
        raise ConfigError(
            f"{key}: {name_or_text!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
            "nor a template with {instruction}, {input} and {output} fields"
        )
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as e:
        raise ConfigError(f"{key}: cannot parse template {text!r}: {e}") from None
    unknown = sorted(set(names) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{key}: unknown field(s) {unknown} in template; allowed: {list(FIELDS)}")
    if "instruction" not in names or "output" not in names:
        raise ConfigError(f"{key}: template must contain {{instruction}} and {{output}}")
    if names.count("output") != 1 or not text.rstrip().endswith("{output}"):
        raise ConfigError(f"{key}: {{output}} must appear once, at the end of the template")
    return text


@functools.lru_cache(maxsize=32)
def split_template(template: str) -> tuple[str, str]:
    """Split a template into (prompt part, completion part) at {output}."""
    i = template.index("{output}")
    return template[:i], template[i:]


@functools.lru_cache(maxsize=32)
def _prompt_without_input(prompt_part: str) -> str:
    return "\n\n".join(b for b in prompt_part.split("\n\n") if "{input}" not in b)


def render_prompt(template: str, instruction: str, input: str = "") -> str:
    """The prompt text for one row: the template up to {output}, input block dropped when empty."""
    prompt_part, _ = split_template(template)
    if not (input or "").strip() and "{input}" in prompt_part:
        prompt_part = _prompt_without_input(prompt_part)
    return prompt_part.format(instruction=instruction, input=input or "")


def render_completion(template: str, output: str) -> str:
    _, completion_part = split_template(template)
    return completion_part.format(output=output)
