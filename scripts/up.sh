#!/usr/bin/env bash
# Start the whole stack on this machine: one helexa-node with the CPU engine serving the bundled
# tiny-qwen3 model (fixtures/tiny-qwen3: a 5.8 MB Qwen3-architecture model trained on Rust-book
# prose and synthetic chats; it chats, thinks and calls tools, but knows little), and the helexa
# gateway in front of it. Ctrl-C stops both.
#
#   ./scripts/up.sh                 # gateway on 127.0.0.1:31313, node on 127.0.0.1:13131
#   HELEXA_MODEL=/path/to/model ./scripts/up.sh   # another model directory or .gguf file
#   HELEXA_PROFILE=dev ./scripts/up.sh             # debug build (quicker to build; default release)
#
# (`helexa up` replaces this script once the CLI grows it.)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
model="${HELEXA_MODEL:-$root/fixtures/tiny-qwen3}"
model_id="${HELEXA_MODEL_ID:-tiny-qwen3}"
listen="${HELEXA_LISTEN:-127.0.0.1:31313}"
node_listen="${HELEXA_NODE_LISTEN:-127.0.0.1:13131}"

profile="${HELEXA_PROFILE:-release}"
case "$profile" in
  release) profile_dir=release ;;
  dev | debug) profile=dev; profile_dir=debug ;;
  *) echo "HELEXA_PROFILE must be release or dev, not '$profile'" >&2; exit 2 ;;
esac
echo "building ($profile) ..."
cargo build --profile "$profile" --locked -p helexa -p helexa-node -p helexa-engine-cuda
target="${CARGO_TARGET_DIR:-$root/target}/$profile_dir"

run_dir="$(mktemp -d "${TMPDIR:-/tmp}/helexa-up.XXXXXX")"
cat > "$run_dir/node.toml" <<TOML
listen = "$node_listen"
engine = "$target/libhelexa_engine_cuda.so"

[[models]]
id = "$model_id"
source = "$model"
TOML
cat > "$run_dir/models.toml" <<TOML
[[models]]
id = "$model_id"
source = "$model"
vram_mb = 64
aliases = ["claude-sonnet-4-5", "claude-haiku-4-5", "gpt-4o-mini"]
capabilities = ["chat", "tools", "reasoning"]
context_length = 4096
TOML
cat > "$run_dir/gateway.toml" <<TOML
listen = "$listen"
models = "models.toml"

[[nodes]]
name = "local"
endpoint = "http://$node_listen"
TOML

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$run_dir"; }
trap cleanup EXIT INT TERM

"$target/helexa-node" --config "$run_dir/node.toml" &
pids+=($!)
"$target/helexa" serve --config "$run_dir/gateway.toml" &
pids+=($!)

# Ready = the gateway lists the model as loaded on a node (it is in the catalogue, and so in
# /v1/models, from the start; "loaded" turns true once a node reports it ready).
ready=
for _ in $(seq 1 300); do
  if curl -fsS "http://$listen/v1/models" 2>/dev/null | tr -d ' \n' \
      | grep -q "\"id\":\"$model_id\",[^}]*\"loaded\":true"; then
    ready=1
    break
  fi
  for pid in "${pids[@]}"; do
    kill -0 "$pid" 2>/dev/null || { echo "a helexa process exited during start-up" >&2; exit 1; }
  done
  sleep 0.2
done
if [ -z "$ready" ]; then
  echo "$model_id was not loaded after 60 s; see the logs above" >&2
  exit 1
fi
cat <<TXT

helexa is up (model: $model_id).
  OpenAI clients:    OPENAI_BASE_URL=http://$listen/v1  OPENAI_API_KEY=anything
  Anthropic clients: ANTHROPIC_BASE_URL=http://$listen  ANTHROPIC_API_KEY=anything
  curl http://$listen/v1/chat/completions -H 'content-type: application/json' \\
    -d '{"model":"$model_id","messages":[{"role":"user","content":"What is Rust?"}],"max_tokens":64}'
Ctrl-C stops everything.
TXT
wait -n "${pids[@]}"
