"""Named chat templates (`data.chat_template: llama3`, ...) for base models that ship none.

Each renders its family's documented format and wraps every assistant turn's content and end-of-turn token
in `{% generation %}` markers, so the loss mask (formats.py) is the assistant tokens exactly. Roles are
system / user / assistant / tool. A family without one of them renders it as its own documentation does:
mistral and gemma put the system turn before the first user message, gemma and mistral render a tool result as
a user turn, llama3 names it `ipython`, qwen wraps it in `<tool_response>` inside a user turn.

The templates use the tokenizer's `bos_token` / `eos_token` where the family's own template does; the other
delimiters (`<|im_start|>`, `<|eot_id|>`, `[INST]`, ...) are literal text: a tokenizer that does not have them
as single tokens splits them (`missing_delimiters` names them, and the build warns).
"""

from __future__ import annotations

from pathlib import Path

from sft_dist.errors import ConfigError

# ChatML (OpenAI, Qwen, many fine-tunes): no BOS; the turn's newline after <|im_end|> carries no loss.
CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen2.5: ChatML with its default system prompt when the conversation has none, tool results in a user turn.
QWEN = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Llama 3 (Meta's Llama-3-8B-Instruct template): BOS, header, content trimmed, <|eot_id|>.
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
    "{{ '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Mistral 7B Instruct v0.1/v0.2: `<s>[INST] user [/INST]answer</s>[INST] ...`; a system message goes before the
# first user message, separated by a blank line.
MISTRAL = (
    "{{ bos_token }}"
    "{% set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{% set first_user = namespace(done=false) %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% elif message['role'] != 'system' %}"
    "{% if system and not first_user.done %}{{ '[INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% set first_user.done = true %}"
    "{% endif %}"
    "{% endfor %}"
)

# Gemma (2 and 3): BOS, roles user and model, content trimmed; a system message starts the first user turn.
GEMMA = (
    "{{ bos_token }}"
    "{% set system = messages[0]['content'] + '\\n\\n' if messages[0]['role'] == 'system' else '' %}"
    "{% set first_user = namespace(done=false) %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<start_of_turn>model\\n' }}"
    "{% generation %}{{ message['content'] | trim }}{{ '<end_of_turn>' }}{% endgeneration %}{{ '\\n' }}"
    "{% elif message['role'] != 'system' %}"
    "{{ '<start_of_turn>user\\n' }}{% if not first_user.done %}{{ system }}{% endif %}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{% set first_user.done = true %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# Phi-3 / Phi-3.5 (microsoft/Phi-3-mini-4k-instruct's template): <|role|>, <|end|>, EOS after the last turn.
PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% elif message['role'] == 'system' %}{% if message['content'] %}"
    "{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}{% endif %}"
    "{% else %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

CHAT_TEMPLATES: dict[str, str] = {
    "chatml": CHATML, "qwen": QWEN, "llama3": LLAMA3, "mistral": MISTRAL, "gemma": GEMMA, "phi3": PHI3,
}

# The literal delimiters of each template (a tokenizer should have each as one token).
DELIMITERS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "qwen": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral": ("[INST]", "[/INST]"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "phi3": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
}


def resolve_chat_template(value: str, *, key: str = "data.chat_template") -> str:
    """The Jinja text for a preset name, a `.jinja` file or a literal template. Raises ConfigError otherwise."""
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if value.endswith(".jinja"):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"{key}: {value!r} does not exist (a .jinja file)")
        return path.read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    from sft_dist.config.coerce import closest

    hint = closest(value, list(CHAT_TEMPLATES))
    return _raise(f"{key}: {value!r} is neither a preset ({', '.join(CHAT_TEMPLATES)}), a .jinja file nor a Jinja "
                  "template" + (f"; did you mean {hint!r}?" if hint else ""))


def _raise(message: str) -> str:
    raise ConfigError(message)


def missing_delimiters(name: str, tokenizer) -> list[str]:
    """The preset's delimiters that `tokenizer` does not encode as one token."""
    return [d for d in DELIMITERS.get(name, ()) if len(tokenizer(d, add_special_tokens=False)["input_ids"]) != 1]


# What ends an assistant turn in each template (mistral's is the tokenizer's EOS).
END_OF_TURN: dict[str, str] = {"chatml": "<|im_end|>", "qwen": "<|im_end|>", "llama3": "<|eot_id|>",
                               "mistral": "</s>", "gemma": "<end_of_turn>", "phi3": "<|end|>"}


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids generation should stop at, besides EOS: each known end-of-turn delimiter the tokenizer's chat
    template writes and the tokenizer has as one token."""
    template = tokenizer.chat_template or ""
    out = []
    for d in dict.fromkeys(END_OF_TURN.values()):
        ids = tokenizer(d, add_special_tokens=False)["input_ids"] if d in template else []
        if len(ids) == 1 and ids[0] not in out:
            out.append(ids[0])
    return out
