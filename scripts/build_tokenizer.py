"""Build the tiny byte-level BPE tokenizer shipped in sft_dist/assets/tokenizer.

Trained on the bundled demo data and the prompt templates, so it is small (1024 ids) yet tokenizes
the demo sensibly. Byte-level: any UTF-8 text (Portuguese included) round-trips. Run from the repo root
after scripts/build_demo_data.py:
    python scripts/build_tokenizer.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "sft_dist" / "assets"

SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

# ChatML-style template; {% generation %} marks the assistant spans so that
# `return_assistant_tokens_mask=True` works and assistant-only loss is exact.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus() -> list[str]:
    from sft_dist.data.templates import PRESETS  # the same templates the trainer uses

    lines = [t for t in PRESETS.values()] * 20
    for name in ("alpaca_demo_train.jsonl", "alpaca_demo_eval.jsonl"):
        with open(ASSETS / "data" / name, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                lines.append(" ".join(str(row[k]) for k in ("instruction", "input", "output")))
    lines += ["user", "assistant", "system", "You are a helpful assistant.", "Você é um assistente útil."] * 20
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--out-dir", type=Path, default=ASSETS / "tokenizer")
    args = ap.parse_args()

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=2048,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(args.out_dir)
    print(f"wrote tokenizer ({len(fast)} tokens) to {args.out_dir}")


if __name__ == "__main__":
    main()
