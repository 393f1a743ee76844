#!/usr/bin/env bash
# One GPU-machine call: install, GPU tests, benchmarks, doctor. Every log and result lands in
# /tmp/results, packed into $OUT/results.tgz (the device tool returns at most 8 files).
# The server wheels travel in .whl/ (git-ignored; carry it). To make it, in the repo root:
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: \
#     --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 -d .whl \
#     starlette==1.10.0 anyio==4.16.0 idna==3.20 typing_extensions==4.16.0 uvicorn==0.54.0 \
#     click==8.5.1 h11==0.16.0 httpx==0.28.1 httpcore==1.0.9 certifi==2026.5.20
# Usage: scripts/gpu_check.sh [steps...]
#   steps: tests tests-all bench-prefill bench-decode bench-latency bench-lora bench-serve
#          bench-serve-prefix generate doctor profile-decode tune
#   tune rewrites the checked-in tile tables (GEMV incl. llama-3-8b TP shards, MoE, LoRA) on
#   this GPU; the new tables land in $OUT/results.tgz under tables/ to be committed.
set -uo pipefail
OUT=${OUT:-.}
RES=/tmp/results
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ]; then  # server wheels (starlette, uvicorn, httpx): the GPU image lacks them
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RES/gpu.txt"
steps=${*:-tests bench-prefill generate doctor}
models=${BENCH_MODELS:-qwen3-0.6b llama-3.2-1b}
for step in $steps; do
  echo "=== $step ==="
  case $step in
    tests) timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q tests/gpu ${PYTEST_ARGS:-} 2>&1 | tee "$RES/pytest-gpu.log" | tail -15 ;;
    tests-all) timeout 500 python3 -m pytest -q tests 2>&1 | tee "$RES/pytest-all.log" | tail -15 ;;
    bench-prefill)  # one process per column: a failing column cannot take the others down
      for model in $models; do
        for column in ${BENCH_COLUMNS:-eager,breakable eager,full-graph eager,compiled-eager eager,compiled-inductor eager,compile eager,compile-ro}; do
          timeout ${BENCH_TIMEOUT:-200} python3 -m tesela.cli bench prefill --model "$model" --columns "$column" \
            --attention-backend "${ATTN:-auto}" --output-dir "$RES" >"$RES/bench-prefill-$model-$column.log" 2>&1 \
            || { echo "column $column failed:"; grep -v Capturing "$RES/bench-prefill-$model-$column.log" | tail -4; }
        done
        python3 -m tesela.bench "$RES/prefill-$model-merged.json" "$RES"/prefill-"$model"-*.json 2>&1 | tee "$RES/bench-prefill-$model.txt"
      done ;;
    bench-decode)
      for model in $models; do
        timeout 300 python3 -m tesela.cli bench decode --model "$model" --output-dir "$RES" 2>&1 | tee "$RES/bench-decode-$model.log" | tail -14
      done ;;
    bench-latency)  # offline tok/s, overlap scheduling off then on (same process per setting)
      for model in $models; do
        for overlap in off on; do
          timeout 300 python3 -m tesela.cli bench latency --model "$model" --overlap-schedule $overlap \
            --output-dir "$RES/latency-overlap-$overlap" 2>&1 | tee "$RES/bench-latency-$model-$overlap.log" | tail -6
        done
      done ;;
    bench-lora)  # 4 adapters of rank 16 vs the base model, graphs on and off, graph memory
      for model in $models; do
        timeout 400 python3 -m tesela.cli bench lora --model "$model" --output-dir "$RES" 2>&1 | tee "$RES/bench-lora-$model.log" | tail -12
      done ;;
    bench-serve)
      for graphs in on off; do
        flag=""; [ "$graphs" = off ] && flag=--disable-cudagraph
        timeout 300 python3 -m tesela.cli bench serve --model qwen3-0.6b --concurrency 1,8,32 \
          --num-prompts ${SERVE_PROMPTS:-64} $flag --output-dir "$RES/serve-$graphs" 2>&1 | tee "$RES/bench-serve-$graphs.log" | tail -10
      done ;;
    bench-serve-prefix)  # the prefix cache on and off, one run (tesela/bench/serve_prefix.py)
      timeout 590 python3 -m tesela.cli bench serve --model qwen3-0.6b --workload shared-prefix --num-prompts 256 \
        --output-dir "$RES/serve-prefix" 2>&1 | tee "$RES/bench-serve-prefix.log" | tail -12 ;;
    generate) timeout 200 python3 -m tesela.cli -v generate --model qwen3-0.6b --load-format dummy --max-tokens 16 2>&1 | tee "$RES/generate.log" | tail -8 ;;
    doctor) timeout 60 python3 -m tesela.cli doctor 2>&1 | tee "$RES/doctor.log" | tail -40 ;;
    profile-decode)  # what each kernel adds to a batch-1 decode step
      for model in $models; do
        timeout 120 python3 scripts/profile_decode_step.py --model "$model" 2>&1 | grep -v Warning \
          | tee "$RES/profile-decode-$model.txt" | tail -20
      done ;;
    tune)
      mkdir -p "$RES/tables"
      timeout 300 python3 -m tesela.tune.gemv --models qwen3-0.6b,llama-3.2-1b,llama-3-8b \
        --tensor-parallel-size 1,2 2>&1 | tee "$RES/tune-gemv.log" | tail -3
      timeout 300 python3 -m tesela.tune.moe --model qwen3-30b-a3b --buckets 1,16 2>&1 | tee "$RES/tune-moe.log" | tail -3
      timeout 400 python3 -m tesela.tune.lora --model qwen3-0.6b --output tesela/lora/lora_tile_table.json \
        2>&1 | tee "$RES/tune-lora.log" | tail -3
      cp tesela/layers/gemv_table.json tesela/layers/moe/tile_configs.json tesela/lora/lora_tile_table.json \
        "$RES/tables/" 2>/dev/null ;;
  esac
done
tar czf "$OUT/results.tgz" -C /tmp results
