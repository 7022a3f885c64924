#!/usr/bin/env bash
# Builds the release binaries that the GPU machine runs and copies them, with
# the corpus and scripts/gpu_run.sh, into .gpu/ (ignored by git), which the
# device tool carries. The GPU machine has no Rust; its python3 holds
# torch 2.11.0+cu130, whose lib/ folder the binaries load (they are linked
# with --no-as-needed -ltorch, so libtorch_cuda loads; see build.rs).
#
#   bash scripts/gpu_bundle.sh        # here
#   bash .gpu/gpu_run.sh STAGE        # there (see gpu_run.sh for the stages)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(cargo xtask env)"
examples=(shakespeare generate)
lab=(train_bench dispatch_bench compare_routers)
cargo build --release $(printf -- '--example %s ' "${examples[@]}")
cargo build --release -p moe-lab $(printf -- '--bin %s ' "${lab[@]}")
# The CUDA tests (tests/cuda.rs), as a test binary. They are #[ignore]d, so
# that machines without a GPU count them as skipped: gpu_run.sh passes --ignored.
test_bin=$(cargo test --release --test cuda --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["executable"])' | tail -1)
# c10d's tests with the NCCL group (moe-aten's `nccl` feature; the NCCL test
# is #[ignore]d, so gpu_run.sh passes --include-ignored).
dist_bin=$(cargo xtask run test --release -p moe-layers-aten --features nccl --test dist --no-run \
  --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    try: m = json.loads(l)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "dist" and m.get("executable"):
        print(m["executable"])' | tail -1)
rm -rf .gpu && mkdir -p .gpu
cp "$dist_bin" .gpu/dist_tests
for e in "${examples[@]}"; do cp "target/release/examples/$e" .gpu/; done
for b in "${lab[@]}"; do cp "target/release/$b" .gpu/; done
cp "$test_bin" .gpu/cuda_tests
cp data/tinyshakespeare.txt .gpu/
cp scripts/gpu_run.sh scripts/makemoe_reference.py scripts/check_host_syncs.py .gpu/
echo "bundled into .gpu/ at $(git rev-parse --short HEAD):"; ls .gpu
