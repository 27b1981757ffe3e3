#!/usr/bin/env bash
# The prepared device calls for issue 5 (bench/NOTES.md, "Next GPU session"), each run on the CPU first.
#   bash bench/gpu_session.sh                  host, rle, postprocess, levers: ~9 min; carry [".whl"], timeout_s 560
#   bash bench/gpu_session.sh http             the served Bento on the GPU: ~4 min; carry [".whl", ".whl-serve"]
#   bash bench/gpu_session.sh video            video tracking, full size, 1080p, 300 frames, 1 and 5 prompts: ~4 min
#   on the CPU:  OUT=/tmp/gpu-session EXTRA="--tiny --device cpu" RLE_EXTRA="--device cpu --masks 20" \
#                POST_EXTRA="--device cpu --prompts 4 --instances 3" \
#                HTTP_EXTRA="--weights demo --device cpu" bash bench/gpu_session.sh host rle postprocess levers cold http
# Surest results first; each step has its own time limit, so a slow compile costs only its own step.
# .whl/ (pycocotools) and .whl-serve/ (the serving stack) come from scripts/device-wheels.py.
set -uo pipefail
install_wheels() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$1"/*.whl \
    && export PYTHONPATH=/tmp/site
}
python3 -c "import pycocotools" 2>/dev/null || install_wheels .whl
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-bench/results}
EXTRA=${EXTRA:-}
RLE_EXTRA=${RLE_EXTRA:-}
POST_EXTRA=${POST_EXTRA:---instances 3,100 --passes 32,128 --iterations 3}
HTTP_EXTRA=${HTTP_EXTRA:---weights full --device auto --env GATEWAY_WORKERS=4}
CACHE=/tmp/sam3-compile-cache
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
for step in ${*:-host rle postprocess levers}; do
  echo "=== $step"
  case $step in
    host)  # the GPU box's own CPU: decode pool sizing (decode_threads) and the mask PNG, ~20 s
      timeout 60 python3 bench/decode.py --threads 1,4,8,16 --out "$OUT" 2>&1 | tail -16
      timeout 60 python3 bench/mask_png.py --iterations 10 --out "$OUT" 2>&1 | tail -3 ;;
    rle) timeout 60 python3 bench/rle.py $RLE_EXTRA --out "$OUT" 2>&1 | tail -5 ;;
    postprocess) timeout 60 python3 bench/postprocess.py $POST_EXTRA --out "$OUT" 2>&1 | tail -5 ;;
    levers)
      timeout 400 python3 bench/levers.py $EXTRA --max-pairs 16 --iterations 10 --budget-s 320 \
        --compile-cache "$CACHE" --out "$OUT" 2>&1 \
        | grep --line-buffered -v -E "^[WI][0-9]{4} " | tee "$OUT/levers.log" | cut -c1-400 ;;
    cold) timeout 120 python3 bench/cold_start.py $EXTRA --compile all --max-pairs 16 --cache "$CACHE" --starts 1 \
      --out "$OUT" 2>&1 | tail -3 ;;
    video)  # issue 16: concept tracking on the GPU, full-size architecture, a 10 s 1080p clip at 30 fps, 1 and 5
      # prompts (random weights: the demo's presence bias keeps objects, as bench/video_engine.py explains)
      timeout 300 python3 bench/video_engine.py --device cuda --model full --size 1080x1920 --frames 300 \
        --prompts 1,5 --out "$OUT" 2>&1 | tail -8 ;;
    http)
      python3 -c "import bentoml" 2>/dev/null || install_wheels .whl-serve
      timeout 300 python3 bench/http_overhead.py $HTTP_EXTRA --concurrency 32 --seconds 30 --out "$OUT" 2>&1 \
        | tail -20 ;;
    *) echo "unknown step $step (host, rle, postprocess, levers, cold, video, http)" ;;
  esac
done
ls -la "$OUT"
