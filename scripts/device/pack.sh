#!/usr/bin/env bash
# Build what a GPU visit needs and pack it into .carry/ (git-ignored, < 64 MiB, xz-compressed):
#   engine-cuda.tar.xz  the CUDA engine (candle + CUDA kernels, sm_90a for H100/H200) and its unit
#                       tests (fused kernels against candle's ops): one archive, since the two
#                       share most bytes (candle's kernels) and xz stores them once
#   engine-cpu.so.xz    the CPU engine, for the CPU-vs-GPU agreement check
#   helexa-node.xz      the node binary, for `helexa-node bench`
# The fixtures travel as tracked files. On the device, scripts/device/gpu-check.sh unpacks them.
#
#   scripts/device/pack.sh            # CUDA toolkit: nvcc on PATH, or ../shared/cuda/toolkit.sh
#
# Environment: HELEXA_CUDA_TARGET_DIR (default /work/cuda-target: keep it, a cold CUDA build takes
# ~30 min on 2 cores, an incremental one 1-7), CUDA_COMPUTE_CAP (default 90), HELEXA_CUDA_TOOLKIT
# (a script printing the toolkit environment, default ../shared/cuda/toolkit.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
cuda_target=${HELEXA_CUDA_TARGET_DIR:-/work/cuda-target}
cpu_target=${CARGO_TARGET_DIR:-target}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
mkdir -p .carry

# CPU engine and node first: they do not need the toolkit.
cargo build --release --locked -p helexa-engine-cuda -p helexa-node
(
  if ! command -v nvcc >/dev/null; then
    eval "$("${HELEXA_CUDA_TOOLKIT:-../shared/cuda/toolkit.sh}")"
  fi
  CARGO_TARGET_DIR=$cuda_target cargo build --release --locked -p helexa-engine-cuda --features cuda
  CARGO_TARGET_DIR=$cuda_target cargo test --release --locked -p helexa-engine-cuda --features cuda \
    --lib --no-run --message-format=json \
    | python3 -c 'import json,sys; [print(m["executable"]) for m in map(json.loads, sys.stdin) if m.get("executable")]' \
    > /tmp/helexa-cuda-tests-path
)

pack() { # pack SRC NAME: strip debug info, compress
  strip -o "/tmp/helexa-pack-$2" "$1"
  xz -T2 -6 -c "/tmp/helexa-pack-$2" > ".carry/$2.xz"
  rm -f "/tmp/helexa-pack-$2"
}
rm -rf /tmp/helexa-pack-cuda && mkdir -p /tmp/helexa-pack-cuda
strip -o /tmp/helexa-pack-cuda/engine-cuda.so "$cuda_target/release/libhelexa_engine_cuda.so"
strip -o /tmp/helexa-pack-cuda/engine-cuda-tests "$(tail -1 /tmp/helexa-cuda-tests-path)"
# A dictionary larger than both files, so the second is stored as matches into the first.
tar -C /tmp/helexa-pack-cuda -cf - . | xz -T1 --lzma2=preset=9,dict=192MiB > .carry/engine-cuda.tar.xz
rm -rf /tmp/helexa-pack-cuda .carry/engine-cuda.so.xz .carry/engine-cuda-tests.xz
pack "$cpu_target/release/libhelexa_engine_cuda.so" engine-cpu.so
pack "$cpu_target/release/helexa-node" helexa-node
git rev-parse HEAD > .carry/commit
git status --porcelain --untracked-files=no | grep -q . && echo "dirty" >> .carry/commit || true
ls -la .carry
total=$(du -cb .carry/* | tail -1 | cut -f1)
echo "carry: $((total / 1024 / 1024)) MiB (limit 64)"
[ "$total" -lt $((64 * 1024 * 1024)) ] || { echo "too large to carry"; exit 1; }
