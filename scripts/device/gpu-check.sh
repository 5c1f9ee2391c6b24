#!/usr/bin/env bash
# One device visit: unpack the CUDA engine carried in .carry/, run the ABI parity check on the
# GPU, and leave the results under $OUT. Built here with:
#   eval "$(../shared/cuda/toolkit.sh)"; CARGO_TARGET_DIR=/work/cuda-target \
#     cargo build --release -p helexa-engine-cuda --features cuda
#   strip -o /tmp/engine.so /work/cuda-target/release/libhelexa_engine_cuda.so; xz -T2 -6 -c /tmp/engine.so > .carry/engine-cuda.so.xz
set -uo pipefail
python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' \
  .carry/engine-cuda.so.xz /tmp/libhelexa_engine_cuda.so
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python3 scripts/device/abi_check.py /tmp/libhelexa_engine_cuda.so fixtures "$OUT/abi_check.json" \
  2>&1 | tee "$OUT/abi_check.log"
echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/abi_check.log"
