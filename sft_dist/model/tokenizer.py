"""Load the tokenizer with the real `from_pretrained` (local dir or hub id)."""

from __future__ import annotations

import logging

from sft_dist.config.schema import ModelConfig
from sft_dist.errors import SftDistError

log = logging.getLogger(__name__)


def build_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    except (OSError, ValueError) as e:
        raise SftDistError(f"model.tokenizer: cannot load tokenizer from {source!r}: {e}") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise SftDistError(f"model.tokenizer: {source!r} has neither a pad nor an eos token; add a pad token")
        # Padding positions are excluded from attention and loss, so reusing EOS is safe.
        tok.pad_token = tok.eos_token
        log.info("tokenizer has no pad token; using eos %r for padding", tok.eos_token)
    return tok
