"""Named chat templates: each renders its family's documented format, and the loss mask is exactly the assistant
turns' tokens plus the family's end-of-turn token."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from sft_dist.config.load import builtin_path
from sft_dist.config.schema import DataConfig
from sft_dist.data.build import row_tokenizer
from sft_dist.data.chat_templates import (
    CHAT_TEMPLATES,
    DELIMITERS,
    END_OF_TURN,
    end_of_turn_ids,
    missing_delimiters,
    resolve_chat_template,
)
from sft_dist.data.formats import IGNORE
from sft_dist.errors import ConfigError
from sft_dist.validate import load_config
from tests.conftest import QUICKSTART

CONVERSATION = [
    {"role": "system", "content": "Seja breve."},
    {"role": "user", "content": "Qual é a capital de Portugal?"},
    {"role": "assistant", "content": "Lisboa."},
    {"role": "user", "content": "E da Espanha?"},
    {"role": "assistant", "content": "Madrid."},
]

# The family's own special tokens (bos/eos where its template uses them), added to the shipped tokenizer: each
# delimiter is then one token, as in the family's tokenizer.
SPECIALS = {
    "chatml": {}, "qwen": {}, "mistral": {},  # the shipped tokenizer's <s> / </s> are Mistral's
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
    "gemma": {"bos_token": "<bos>", "eos_token": "<eos>"},
    "phi3": {"eos_token": "<|endoftext|>"},
}

# Each family's documented format for CONVERSATION: ChatML (OpenAI's chatml.md; Qwen's model cards), Meta's Llama 3
# model card, Mistral-7B-Instruct-v0.1's card and chat template, Gemma's "formatting" docs (no system role: it
# opens the first user turn), Phi-3-mini-4k-instruct's card and chat template.
RENDERED = {
    "chatml": "<|im_start|>system\nSeja breve.<|im_end|>\n<|im_start|>user\nQual é a capital de Portugal?<|im_end|>\n"
              "<|im_start|>assistant\nLisboa.<|im_end|>\n<|im_start|>user\nE da Espanha?<|im_end|>\n"
              "<|im_start|>assistant\nMadrid.<|im_end|>\n",
    "qwen": "<|im_start|>system\nSeja breve.<|im_end|>\n<|im_start|>user\nQual é a capital de Portugal?<|im_end|>\n"
            "<|im_start|>assistant\nLisboa.<|im_end|>\n<|im_start|>user\nE da Espanha?<|im_end|>\n"
            "<|im_start|>assistant\nMadrid.<|im_end|>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSeja breve.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nQual é a capital de Portugal?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nLisboa.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nE da Espanha?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nMadrid.<|eot_id|>",
    "mistral": "<s>[INST] Seja breve.\n\nQual é a capital de Portugal? [/INST]Lisboa.</s>[INST] E da Espanha? [/INST]"
               "Madrid.</s>",
    "gemma": "<bos><start_of_turn>user\nSeja breve.\n\nQual é a capital de Portugal?<end_of_turn>\n"
             "<start_of_turn>model\nLisboa.<end_of_turn>\n<start_of_turn>user\nE da Espanha?<end_of_turn>\n"
             "<start_of_turn>model\nMadrid.<end_of_turn>\n",
    "phi3": "<|system|>\nSeja breve.<|end|>\n<|user|>\nQual é a capital de Portugal?<|end|>\n<|assistant|>\nLisboa.<|end|>\n"
            "<|user|>\nE da Espanha?<|end|>\n<|assistant|>\nMadrid.<|end|>\n<|endoftext|>",
}
# What the model is asked to continue, for one user message.
PROMPT = {
    "chatml": "<|im_start|>user\nOi<|im_end|>\n<|im_start|>assistant\n",
    "qwen": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nOi<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nOi<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s>[INST] Oi [/INST]",
    "gemma": "<bos><start_of_turn>user\nOi<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<|user|>\nOi<|end|>\n<|assistant|>\n",
}


def family_tokenizer(name: str):
    tok = AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))
    tok.add_special_tokens({**SPECIALS[name], "additional_special_tokens": list(DELIMITERS[name])})
    return tok


def test_every_preset_is_tested():
    assert set(CHAT_TEMPLATES) == set(RENDERED) == set(PROMPT) == {"chatml", "qwen", "llama3", "mistral", "gemma",
                                                                   "phi3"}


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_preset_renders_the_documented_format(name):
    tok = family_tokenizer(name)
    tok.chat_template = CHAT_TEMPLATES[name]
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == RENDERED[name]
    user = [{"role": "user", "content": "Oi"}]
    assert tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == PROMPT[name]


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_loss_mask_is_the_assistant_tokens_and_end_of_turn(name):
    tok = family_tokenizer(name)
    t = row_tokenizer(DataConfig(format="messages", chat_template=name), tok)
    out = t({"messages": CONVERSATION}, "row 1")
    ids, labels = out["input_ids"], out["labels"]
    assert ids == tok(RENDERED[name], add_special_tokens=False)["input_ids"]
    end = tok.convert_tokens_to_ids(END_OF_TURN[name])
    want = [tok("Lisboa.", add_special_tokens=False)["input_ids"] + [end],
            tok("Madrid.", add_special_tokens=False)["input_ids"] + [end]]
    # the loss-carrying positions are two contiguous runs, exactly those tokens
    runs, run = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE:
            assert label == token
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    assert runs == want
    assert sum(label != IGNORE for label in labels) == len(want[0]) + len(want[1])


def test_sharegpt_under_a_preset_gives_the_same_tokens(tmp_path):
    tok = family_tokenizer("llama3")
    share = {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                                "value": m["content"]} for m in CONVERSATION]}
    a = row_tokenizer(DataConfig(format="messages", chat_template="llama3"), tok)({"messages": CONVERSATION}, "r")
    b = row_tokenizer(DataConfig(format="sharegpt", chat_template="llama3"), tok)(share, "r")
    assert a == b


def test_tool_turns():
    conv = [{"role": "user", "content": "Tempo em Lisboa?"}, {"role": "assistant", "content": '{"call": "tempo"}'},
            {"role": "tool", "content": "22 C"}, {"role": "assistant", "content": "22 graus."}]
    tok = family_tokenizer("qwen")
    tok.chat_template = CHAT_TEMPLATES["qwen"]
    assert "<|im_start|>user\n<tool_response>\n22 C\n</tool_response><|im_end|>\n" in tok.apply_chat_template(
        conv, tokenize=False)
    tok = family_tokenizer("llama3")
    tok.chat_template = CHAT_TEMPLATES["llama3"]
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n22 C<|eot_id|>" in tok.apply_chat_template(conv, tokenize=False)


def test_resolve_names_files_and_templates(tmp_path):
    assert resolve_chat_template("gemma") == CHAT_TEMPLATES["gemma"]
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages[0]['content'] }}")
    assert resolve_chat_template(str(f)) == "{{ messages[0]['content'] }}"
    assert resolve_chat_template("{% for m in messages %}{% endfor %}").startswith("{%")
    with pytest.raises(ConfigError, match=r"'llama-3' is neither a preset .*; did you mean 'llama3'\?"):
        resolve_chat_template("llama-3")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_chat_template(str(tmp_path / "nope.jinja"))


def test_missing_delimiters_are_named():
    tok = AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))
    assert missing_delimiters("chatml", tok) == []  # the shipped tokenizer has <|im_start|>, <|im_end|>
    assert missing_delimiters("llama3", tok) == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert missing_delimiters("llama3", family_tokenizer("llama3")) == []


def test_config_takes_a_preset_and_refuses_an_unknown_name():
    cfg = load_config(QUICKSTART, ["data.format=messages", "data.chat_template=phi3"])
    assert cfg.data.chat_template == "phi3"
    with pytest.raises(ConfigError, match="data.chat_template: 'phi-3' is neither a preset"):
        load_config(QUICKSTART, ["data.format=messages", "data.chat_template=phi-3"])


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_generation_stops_at_the_end_of_turn(name):
    tok = family_tokenizer(name)
    tok.chat_template = CHAT_TEMPLATES[name]
    # mistral's turn ends with EOS, a stop token anyway
    want = [] if name == "mistral" else [tok.convert_tokens_to_ids(END_OF_TURN[name])]
    assert end_of_turn_ids(tok) == want
