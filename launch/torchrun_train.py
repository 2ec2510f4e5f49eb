"""torchrun entry: `torchrun --nproc-per-node N launch/torchrun_train.py CONFIG [key=value ...]`.

Thin on purpose: each rank runs the same `sft-dist train`, which reads its rank from the environment.
"""

import sys

from sft_dist.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
