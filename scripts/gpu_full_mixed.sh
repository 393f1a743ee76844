#!/usr/bin/env bash
# FULL mixed graphs on a GPU, one command per step (run from the repository root):
#   scripts/gpu_full_mixed.sh tests            GPU tests of FULL mixed graphs and the kernels
#   scripts/gpu_full_mixed.sh bench [MODEL]    bench prefill: eager, breakable, full-mixed,
#                                              full-graph at n=16..4096 and the mixed step
# Results (JSON, PNG) go to ${OUT:-results}.
set -euo pipefail
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case "${1:-tests}" in
  tests)
    python -m pytest -q -x -s -p no:cacheprovider \
      tests/gpu/test_full_mixed_gpu.py tests/gpu/test_triton_attention_gpu.py 2>&1 |
      grep -v "^bench\|Capturing" | tail -40
    ;;
  bench)
    python -m tesela.cli bench prefill --model "${2:-qwen3-0.6b}" --num-tokens 16,64,256,1024,4096 \
      --columns eager,breakable,full-mixed,full-graph --repeat 20 \
      --output-dir "${OUT:-results}" 2>&1 | grep -v "^bench prefill\|Capturing" | tail -25
    ;;
esac
