"""Build a seeded random causal LM from a config dict directly on the device in the run's dtype, and save it with
the bundled tokenizer: the base bench/gpu.py's 1.5B steps load, sft_dist and plain TRL alike (same weights).

    python bench/gpu/make_model.py --config '{"model_type": "llama", ...}' --out DIR [--device cuda] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True, help="transformers config dict (JSON), with model_type")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    a = p.parse_args()
    t0 = time.perf_counter()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ROOT / "sft_dist" / "assets" / "tokenizer")
    init = json.loads(a.config)
    config = AutoConfig.for_model(init.pop("model_type"), **{"vocab_size": len(tok), **init},
                                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    t1 = time.perf_counter()
    with torch.device(a.device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, a.dtype))
    if a.device == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    model.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    (Path(a.out) / "complete").write_text("")  # bench/gpu.py reuses a model only once it is all there
    t3 = time.perf_counter()
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"params": params, "import_s": round(t1 - t0, 1), "build_s": round(t2 - t1, 1),
                      "save_s": round(t3 - t2, 1)}))


if __name__ == "__main__":
    main()
