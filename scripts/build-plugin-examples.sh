#!/usr/bin/env bash
# Builds every example policy in plugins-examples/ for wasm32-wasip2 and validates it in the
# gateway's own policy runtime: the world and WIT version are checked, the component is
# instantiated and configured with `{}`, and its route / choose-victims call must succeed
# (a serve decision for a ready model; victims on a node of idle residents). Prints each
# component's size and call cost (p50/p99; set CALLS=20000 for benchmark-grade figures).
#
# The Rust examples build in `<target dir>/policies`, the nested target dir that
# host/policy-runtime/build.rs uses for the default policies, so a warm cache stays warm.
# The Python example (plugins-examples/py-router) is built only when `componentize-py` is
# on PATH (or COMPONENTIZE_PY names it): it is a PyPI tool, not part of the Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."

target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
wasm_target_dir="$target_dir/policies"
out="$wasm_target_dir/wasm32-wasip2/policy"
calls="${CALLS:-2000}"

examples=(helexa-example-pin-router helexa-example-latency-router helexa-example-priority-evictor)
package_args=()
for package in "${examples[@]}"; do package_args+=(-p "$package"); done

echo "building ${examples[*]} for wasm32-wasip2 (profile policy)"
cargo build --locked --target wasm32-wasip2 --profile policy --target-dir "$wasm_target_dir" \
  "${package_args[@]}"

components=(
  "router=$out/helexa_example_pin_router.wasm"
  "router=$out/helexa_example_latency_router.wasm"
  "evictor=$out/helexa_example_priority_evictor.wasm"
)

componentize_py="${COMPONENTIZE_PY:-$(command -v componentize-py || true)}"
if [ -n "$componentize_py" ]; then
  echo "building plugins-examples/py-router with $componentize_py"
  py_out="$target_dir/plugin-examples"
  mkdir -p "$py_out"
  (cd plugins-examples/py-router &&
    "$componentize_py" -d ../../wit/deps/helexa-policy@0.1.0 -w router componentize app \
      -o "$py_out/py_router.wasm")
  cargo run --locked --quiet -p helexa-example-call-cost -- --calls "$calls" \
    "router=$py_out/py_router.wasm"
else
  echo "componentize-py not found: skipping plugins-examples/py-router (see its README)"
fi

echo "validating and timing in helexa-policy-runtime"
cargo run --locked --quiet -p helexa-example-call-cost -- --calls "$calls" "${components[@]}"
