#!/bin/bash
# Served A/B: --gguf-weights fp32 against blocks, alternating, agent-repeat and agent at 16 agents.
cd "$(dirname "$0")/../../.."
out=${OUT:-/tmp/gguf-weights-served}; mkdir -p "$out"
for round in 1 2; do
  for mode in fp32 blocks; do
    .venv/bin/agora serve --port 8021 --gguf-weights $mode > $out/serve_$mode.log 2>&1 &
    pid=$!
    for i in $(seq 60); do curl -s localhost:8021/health > /dev/null && break; sleep 1; done
    for wl in agent-repeat agent; do
      .venv/bin/agora bench serve --base-url http://127.0.0.1:8021 --model SmolLM2-135M-Instruct \
        --workload $wl --concurrency 16 --turns 3 --output-len 256 --seed $round \
        --result-json $out/ab_${wl}_${mode}_r${round}.json > $out/ab_${wl}_${mode}_r${round}.log 2>&1
    done
    grep -o "VmHWM.*" /proc/$pid/status > $out/ab_rss_${mode}_r${round}.txt
    kill $pid; wait $pid
  done
done
echo done > $out/ab_done
