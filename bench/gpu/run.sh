#!/usr/bin/env bash
# The GPU benchmark in one command, on a machine with a GPU and no network, from the checkout:
#
#   bash bench/gpu/run.sh [bench/gpu.py arguments]      # e.g. --budget-s 600, --only sft_dist,trl_fastest
#
# Installs the wheels carried in .whl/ (made with network by `bash bench/gpu/wheels.sh`) into a folder of their
# own ($SFT_DIST_BENCH_SITE, default /tmp/site; once: a second run reuses it), puts it and the checkout first on
# PYTHONPATH, sets the offline switches (a hub probe would wait for its timeout) and runs bench/gpu.py with
# --out "$OUT" (default outputs/bench_gpu). Without .whl/ the machine's own packages are used as they are.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
SITE=${SFT_DIST_BENCH_SITE:-/tmp/site}
if compgen -G ".whl/*.whl" > /dev/null; then
  if ! ls .whl | cmp -s - "$SITE/.sft_dist_wheels"; then  # not yet installed there, or other wheels
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" .whl/*.whl
    ls .whl > "$SITE/.sft_dist_wheels"
  fi
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "bench/gpu/run.sh: no .whl/ here: using the machine's packages (bench/gpu/wheels.sh makes the wheels)" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} PYTHONUNBUFFERED=1
exec "$PY" bench/gpu.py --out "${OUT:-outputs/bench_gpu}" "$@"
