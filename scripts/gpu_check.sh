#!/usr/bin/env bash
# One GPU-machine call: install, GPU tests, benchmarks, doctor. Logs and results go to $OUT.
# Usage: scripts/gpu_check.sh [steps...]   (steps: tests bench-prefill bench-decode generate doctor)
set -uo pipefail
OUT=${OUT:-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-build-isolation -e . --no-deps 2>&1 | grep -v WARNING
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
steps=${*:-tests bench-prefill generate doctor}
for step in $steps; do
  echo "=== $step ==="
  case $step in
    tests) timeout 400 python3 -m pytest -q tests/gpu -x 2>&1 | tee "$OUT/pytest-gpu.log" | tail -25 ;;
    tests-all) timeout 500 python3 -m pytest -q tests 2>&1 | tee "$OUT/pytest-all.log" | tail -25 ;;
    bench-prefill)
      for model in ${BENCH_MODELS:-qwen3-0.6b llama-3.2-1b}; do
        timeout 420 python3 -m tesela.cli bench prefill --model "$model" \
          --columns "${BENCH_COLUMNS:-eager,compile,compile-ro,breakable,compiled-eager,compiled-inductor,full-graph}" \
          --attention-backend "${ATTN:-auto}" --output-dir "$OUT" 2>&1 | tee "$OUT/bench-prefill-$model.log" | tail -14
      done ;;
    bench-decode)
      for model in ${BENCH_MODELS:-qwen3-0.6b llama-3.2-1b}; do
        timeout 300 python3 -m tesela.cli bench decode --model "$model" --output-dir "$OUT" 2>&1 | tee "$OUT/bench-decode-$model.log" | tail -14
      done ;;
    generate) timeout 200 python3 -m tesela.cli -v generate --model qwen3-0.6b --load-format dummy --max-tokens 16 2>&1 | tail -8 ;;
    doctor) timeout 60 python3 -m tesela.cli doctor 2>&1 | tail -30 ;;
  esac
done
