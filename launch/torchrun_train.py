"""torchrun entry: `torchrun --nproc-per-node N launch/torchrun_train.py CONFIG [key=value ...]`.

On M nodes, the same command on each: `torchrun --nnodes M --nproc-per-node N --rdzv-backend c10d
--rdzv-endpoint HOST:PORT --rdzv-id JOB launch/torchrun_train.py CONFIG launcher.type=torchrun`.

Thin on purpose: each rank runs the same `sft-dist train`, which reads its rank from the environment.
"""

import sys

from sft_dist.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
