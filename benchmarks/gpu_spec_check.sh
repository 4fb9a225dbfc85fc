#!/usr/bin/env bash
# Speculative decoding on a GPU (issue 18's GPU part) in one device run, about 5 minutes on an H100:
# the CUDA tests (decode and verification steps replayed as CUDA graphs against eager steps and
# transformers), then speculation at fixed draft acceptance against none, on random weights in
# SmolLM2-135M's shape, bf16 with CUDA graphs and eager.
#
# The device machines lack one of agora's imports: before the run, here (pure Python):
#   echo /.whl/ >> .git/info/exclude && .venv/bin/pip download --no-deps gguf==<the venv's version> -d .whl
# then run this with `.whl` carried:  bash benchmarks/gpu_spec_check.sh   (results under $OUT)
set -uo pipefail
out=${OUT:-/tmp/gpu-spec-check}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/models/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
common=(--device cuda --shape smollm2-135m --dtype bfloat16 --concurrency 1,16,64 --rounds 2)
python3 benchmarks/spec_acceptance.py "${common[@]}" --out "$out/spec_acceptance_gpu.json" 2>&1 | tee "$out/graphs.log"
python3 benchmarks/spec_acceptance.py "${common[@]}" --enforce-eager --alphas 0,0.8 \
  --out "$out/spec_acceptance_gpu_eager.json" 2>&1 | tee "$out/eager.log"
