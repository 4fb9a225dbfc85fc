#!/usr/bin/env bash
# Serve the same GGUF file agora serves with llama-server on PORT, SLOTS parallel slots, 2 threads.
set -euo pipefail
source "$(dirname "$0")/common.sh"
PORT="${1:-8002}"
SLOTS="${2:-16}"
GGUF="${AGORA_CACHE_DIR:-$HOME/.cache/agora}/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$GGUF" ] || "$AGORA" export smollm2-135m-instruct "$PEERS_DIR/.fetch-only" >/dev/null  # fetches the GGUF
SERVER="$(find "$PEERS_DIR/llamacpp-venv" -name 'llama-server' -type f | head -n 1)"
exec "$SERVER" -m "$GGUF" --host 127.0.0.1 --port "$PORT" -np "$SLOTS" -t 2 -c $((4096 * SLOTS)) \
  --alias "$MODEL_NAME"
