#!/usr/bin/env bash
# Download, here (with PyPI), the wheels a GPU machine without network lacks for `python bench/gpu.py`.
#
#   bash bench/gpu/wheels.sh [DIR] [--no-bnb]    # DIR defaults to .whl in the checkout (keep it out of git)
#
# Made for the image described in ../shared/FIELD-NOTES.md ("On a GPU"): Python 3.12, torch 2.11 cu130,
# accelerate 1.15, tokenizers, huggingface-hub, pyarrow, pandas, fsspec, xxhash, pyyaml, matplotlib and
# triton already there. What travels: trl, datasets (+ dill, multiprocess), liger-kernel, and transformers
# and peft at the versions sft_dist is tested with (~17 MB), and bitsandbytes for QLoRA and paged_adamw_8bit
# (43 MB, CUDA 11.8 to 13.2 builds inside; --no-bnb leaves it out). All of it: 58 MB.
# On the GPU machine, from the checkout: `bash bench/gpu/run.sh`, which does
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
#     PYTHONUNBUFFERED=1 python3 bench/gpu.py --out "$OUT"
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=.whl
BNB=1
for a in "$@"; do
  case "$a" in
    --no-bnb) BNB=0 ;;
    *) DIR="$a" ;;
  esac
done
PY=${PYTHON:-python3}
PKGS=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5
      transformers==5.23.0 peft==0.21.2)
[ "$BNB" = 1 ] && PKGS+=(bitsandbytes==0.50.2)
mkdir -p "$DIR"
for p in "${PKGS[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DIR" "$p"
done
du -sh "$DIR"
ls "$DIR"
