#!/usr/bin/env bash
# Runs on the GPU machine, from the folder that scripts/gpu_bundle.sh filled
# (carried as .gpu/): `bash .gpu/gpu_run.sh STAGE`, results under $OUT.
#   routers  - compare_routers, 2000 steps x 2 seeds, 12 runs in parallel (issue #4)
#   bench    - host-sync check of Grouped/Capacity, CUDA tests, train_bench (phases, makeMoE's PyTorch step side by
#              side), dispatch_bench (issues #5, #6)
#   train    - the 5000-step makemoe run on CUDA (issue #6)
#   dist     - c10d on the GPU machine: the single-rank NCCL smoke test and the
#              Gloo tests (issue #14)
# The GPU tests are #[ignore]d (a machine without a GPU counts them as
# ignored): `--ignored` runs only them, `--include-ignored` them and the rest.
# Each stage fits in one device call (under 10 minutes).
set -uo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; } > "$OUT/machine.txt"
case "${1:-}" in
routers)
  timeout 540 ./compare_routers --device cuda --max-iters 2000 --seeds 2 --eval-iters 400 \
    --jobs 12 --threads 1 --data tinyshakespeare.txt --out "$OUT/routers.md" \
    --metrics "$OUT/routers.jsonl" > "$OUT/routers.log" 2>&1
  echo "exit $?"; tail -20 "$OUT/routers.log"
  ;;
bench)
  timeout 60 python3 check_host_syncs.py | tee "$OUT/host_syncs.txt"
  MOE_CUDA_TESTS=1 timeout 90 ./cuda_tests --ignored --test-threads=1 > "$OUT/cuda_tests.txt" 2>&1
  echo "cuda tests exit $?"; tail -5 "$OUT/cuda_tests.txt"
  timeout 150 ./train_bench --device cuda --steps 40 --eval-iters 400 --phases \
    --data tinyshakespeare.txt | tee "$OUT/train_bench_cuda.jsonl"
  timeout 120 ./train_bench --device cuda --steps 40 --eval-iters 0 --dispatch auto \
    --versus-makemoe --python python3 --reference-script makemoe_reference.py \
    --data tinyshakespeare.txt | tee -a "$OUT/train_bench_cuda.jsonl"
  timeout 150 ./dispatch_bench --device cuda | tee "$OUT/dispatch_cuda.jsonl"
  ;;
train)
  mkdir -p "$OUT/cuda"
  timeout 540 ./shakespeare --preset makemoe --device cuda --data tinyshakespeare.txt \
    --out "$OUT/cuda" --sample-chars 300 > "$OUT/shakespeare_cuda.log" 2>&1
  echo "exit $?"; grep -E "step (0|1000|2000|3000|4000|4999):" "$OUT/shakespeare_cuda.log"
  cp "$OUT/cuda/metrics.jsonl" "$OUT/shakespeare_cuda_metrics.jsonl"; rm -rf "$OUT/cuda"
  ;;
dist)
  MOE_CUDA_TESTS=1 timeout 120 ./dist_tests --include-ignored --test-threads=1 > "$OUT/dist_tests.txt" 2>&1
  echo "dist tests exit $?"; tail -12 "$OUT/dist_tests.txt"
  ;;
*) echo "usage: gpu_run.sh routers|bench|train|dist"; exit 2 ;;
esac
