"""Packed attention alone: forward + backward time of a few decoder layers of the 1.5B Llama shape (hidden 2048,
32 heads on 8 KV heads) on one packed micro-batch (8 rows x 2048 tokens of documents of ~16 to ~1,950 tokens,
collated by sft_dist's PackedCollator), per attention implementation here. It isolates what the attention choice
costs from the rest of a training step (the LM head, LoRA, the optimizer). bench/gpu.py's `attention` step.

    python bench/gpu/attention.py --out FILE [--device cuda] [--layers 4] [--iters 10]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
from pathlib import Path

from timing import time_steps, write_json


def documents(rng: random.Random, row: int, rows: int) -> list[list[int]]:
    """Lengths spread log-uniformly from ~16 to ~row, as bench/gpu.py's rows are; enough to fill `rows` rows."""
    out, total = [], 0
    while total < rows * row * 1.1:
        n = min(int(2 ** rng.uniform(4, math.log2(row * 0.95))), row)
        out.append([rng.randrange(3, 1000) for _ in range(n)])
        total += n
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    a = p.parse_args()
    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoModel
    from transformers.utils import import_utils
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from sft_dist.data.packing import PackedCollator, pack_dataset
    from sft_dist.model import varlen

    varlen.register()
    cuda = a.device == "cuda"
    row, rows = (2048, 8) if cuda else (256, 4)
    config = AutoConfig.for_model("llama", hidden_size=2048 if cuda else 128, intermediate_size=64,
                                  num_hidden_layers=a.layers, num_attention_heads=32 if cuda else 4,
                                  num_key_value_heads=8 if cuda else 2, vocab_size=1024,
                                  max_position_embeddings=2 * row)
    docs = documents(random.Random(0), row, rows)
    packed = pack_dataset(Dataset.from_dict({"input_ids": docs, "labels": docs, "sample_id": list(range(len(docs)))}),
                          row)
    batch_rows = sorted(packed, key=lambda r: -sum(r["seq_lengths"]))[:rows]
    dtype = torch.bfloat16 if cuda else torch.float32
    # as a run starts: the kernel checked on this GPU, which also settles how grouped k/v heads are passed
    probe = varlen.kernel_problem(torch.cuda.current_device(), dtype, *varlen.head_layout(config)) if cuda else None
    native = varlen._KERNEL["native_gqa"]
    cases = [("sdpa", "sdpa", native), (varlen.NAME, varlen.NAME, native)]
    if native:  # the same kernel given repeated k/v heads, as before the probe found it takes them grouped
        cases.append((f"{varlen.NAME} (k/v heads repeated)", varlen.NAME, False))
    if cuda:
        cases.append(("flex_attention", "flex_attention", native))
    if cuda and import_utils.is_flash_attn_2_available():
        cases.append(("flash_attention_2", "flash_attention_2", native))
    results = []
    for label, impl, gqa in cases:
        case = {"attn": label}
        varlen._KERNEL["native_gqa"] = gqa
        try:
            torch.manual_seed(0)
            # the decoder's layers (MLP made tiny: attention and its projections dominate), no embedding lookup cost
            model = AutoModel.from_config(config, attn_implementation=impl, dtype=dtype).to(a.device)
            collate = PackedCollator(DataCollatorForLanguageModeling(pad_token_id=0), attn_implementation=impl)
            keys = ("input_ids", "labels", "position_ids", "seq_lengths")
            batch = collate([{k: r[k] for k in keys} for r in batch_rows])
            batch.pop("labels")
            batch = {k: v.to(a.device) if torch.is_tensor(v) else v for k, v in batch.items()}

            def step():
                out = model(**batch).last_hidden_state
                out.float().square().mean().backward()

            ms, _ = time_steps(step, a.iters, cuda=cuda)  # flex attention compiles in the warm-up
            real = sum(sum(r["seq_lengths"]) for r in batch_rows)
            case.update(ms_per_step=round(ms, 2), processed_tokens=int(batch["input_ids"].numel()),
                        real_tokens_per_s=round(real / ms * 1e3),
                        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None)
        except Exception as e:  # noqa: BLE001 - one implementation failing is a result
            case["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        finally:  # a failed case's model, gradients and frames freed too: the next case starts from an empty GPU
            model = batch = step = None
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        results.append(case)
        print(json.dumps(case), flush=True)
        base = next((c.get("ms_per_step") for c in results if c["attn"] == "sdpa"), None)
        for c in results:
            if base and c.get("ms_per_step"):
                c["speedup_vs_sdpa"] = round(base / c["ms_per_step"], 2)
        # after every case: flex attention compiles first, and a timeout then keeps what was measured before
        write_json(Path(a.out), {"device": a.device, "row": row, "rows": rows, "layers": a.layers,
                                           "varlen_probe": probe or ("ok" if cuda else "not run (no GPU)"),
                                           "varlen_native_gqa": native,
                                           "documents": sum(len(r["seq_lengths"]) for r in batch_rows),
                                           "cases": results})
    return 0 if all("error" not in c for c in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
