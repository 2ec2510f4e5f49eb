"""Ray entry: `ray job submit --working-dir . -- python launch/ray_train.py CONFIG [key=value ...]`.

Thin on purpose: runs `sft-dist train CONFIG launcher.type=ray ...`, whose driver joins the cluster the job
runs on (RAY_ADDRESS) and starts the Ray Train workers. Works from an uploaded working directory where
sft_dist is not installed (the directory holding `launch/` is put first on the import path).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sft_dist.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:2], "launcher.type=ray", *sys.argv[2:]]))
