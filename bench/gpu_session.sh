#!/usr/bin/env bash
# The one device call for issue 5, prepared and run on the CPU first (bench/NOTES.md, "Next GPU session").
#   device run, carry [".whl"], timeout_s 540:  bash bench/gpu_session.sh
#   on the CPU, to check the script:  OUT=/tmp/gpu-session EXTRA="--tiny --device cpu" RLE_EXTRA="--device cpu --masks 20" bash bench/gpu_session.sh
# Fastest and surest results first; each step has its own time limit, so a slow compile costs only its own step.
# .whl/ holds the pycocotools wheel for the device's Python (see bench/NOTES.md for the download command).
set -uo pipefail
if ! python3 -c "import pycocotools" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-bench/results}
EXTRA=${EXTRA:-}
RLE_EXTRA=${RLE_EXTRA:-}
mkdir -p "$OUT"
CACHE=/tmp/sam3-compile-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
timeout 60 python3 bench/rle.py $RLE_EXTRA --out "$OUT" 2>&1 | tail -5
timeout 300 python3 bench/levers.py $EXTRA --budget-s 220 --compile-cache "$CACHE" --out "$OUT" 2>&1 \
  | grep -v -E "^[WI][0-9]{4} " | tee "$OUT/levers.log" | cut -c1-400
timeout 120 python3 bench/cold_start.py $EXTRA --compile all --cache "$CACHE" --starts 1 --out "$OUT" 2>&1 | tail -3
ls -la "$OUT"
