"""One rank of a parallel cache build, joined as sft_dist's run() joins (gloo, one broadcast to share the plan).

usage: python cache_worker.py CONFIG.json   (RANK, WORLD_SIZE, MASTER_ADDR/PORT and SFT_DIST_CACHE set)
CONFIG.json holds DataConfig fields. Prints one JSON line: rows this rank tokenized, hit or build, the entry.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
from transformers import AutoTokenizer

from sft_dist.config.load import builtin_path
from sft_dist.config.schema import DataConfig
from sft_dist.data.cache import load_or_build
from sft_dist.distributed.env import detect_env, init_distributed, shutdown_distributed
from sft_dist.errors import SftDistError


def share(plan: dict) -> dict:
    box = [plan]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main() -> int:
    cfg = DataConfig(**json.loads(Path(sys.argv[1]).read_text()))
    env = detect_env()
    init_distributed(env, device="cpu", timeout_s=60)
    tok = AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))
    try:
        data, info = load_or_build(cfg, tok, seed=0, rank=env.rank, world_size=env.world_size, share=share,
                                   timeout_s=60)
    except SftDistError as e:
        print(json.dumps({"rank": env.rank, "error": type(e).__name__, "message": str(e)}), flush=True)
        return 1
    finally:
        shutdown_distributed()
    print(json.dumps({"rank": env.rank, "hit": info.hit, "tokenized": info.tokenized_rows, "path": str(info.path),
                      "train_rows": len(data.train)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
