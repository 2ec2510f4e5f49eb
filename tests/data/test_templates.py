"""Alpaca templates: presets render exactly; an empty input drops its block."""

from __future__ import annotations

import pytest

from sft_dist.data.templates import (
    PRESETS,
    render_completion,
    render_prompt,
    resolve_template,
)
from sft_dist.errors import ConfigError


def test_portuguese_preset_is_the_documented_template():
    assert PRESETS["alpaca_pt"] == "### Instrução:\n{instruction}\n\n### Entrada:\n{input}\n\n### Resposta:\n{output}"


def test_render_with_input():
    t = resolve_template("alpaca_pt")
    assert render_prompt(t, "Some os números.", "2 e 3") == (
        "### Instrução:\nSome os números.\n\n### Entrada:\n2 e 3\n\n### Resposta:\n"
    )
    assert render_completion(t, "5") == "5"


@pytest.mark.parametrize("empty", ["", "   ", None])
def test_empty_input_drops_its_block(empty):
    t = resolve_template("alpaca")
    assert render_prompt(t, "Name a color.", empty) == "### Instruction:\nName a color.\n\n### Response:\n"


def test_custom_template_and_errors():
    t = resolve_template("Q: {instruction}\nA: {output}")
    assert render_prompt(t, "hi") == "Q: hi\nA: "
    with pytest.raises(ConfigError, match="must appear once, at the end"):
        resolve_template("{output} then {instruction}")
    with pytest.raises(ConfigError, match="neither a preset"):
        resolve_template("alpaca_fr")
