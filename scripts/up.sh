#!/usr/bin/env bash
# Build helexa (gateway), helexa-node and the CPU engine in release mode, then run
# `helexa up`: the gateway and a local node serving the embedded tiny-qwen3 demo model (a
# 5.8 MB Qwen3-architecture model trained on Rust-book prose and synthetic chats; it chats,
# thinks and calls tools, but knows little). Ctrl-C stops everything.
#
#   ./scripts/up.sh                          # gateway on 127.0.0.1:31313
#   ./scripts/up.sh --model /path/to/model   # a model directory or a .gguf file instead
#   ./scripts/up.sh --help                   # every flag of `helexa up`
#   HELEXA_PROFILE=dev ./scripts/up.sh       # debug build (quicker to build)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
profile="${HELEXA_PROFILE:-release}"
case "$profile" in
  release) profile_dir=release ;;
  dev | debug) profile=dev; profile_dir=debug ;;
  *) echo "HELEXA_PROFILE must be release or dev, not '$profile'" >&2; exit 2 ;;
esac
echo "building ($profile) ..." >&2
cargo build --profile "$profile" --locked -p helexa -p helexa-node -p helexa-engine-cuda
target_dir=$(cargo metadata --format-version 1 --no-deps --locked \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])' 2>/dev/null \
  || echo "${CARGO_TARGET_DIR:-$root/target}")
exec "$target_dir/$profile_dir/helexa" up "$@"
