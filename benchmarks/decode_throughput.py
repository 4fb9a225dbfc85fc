"""Offline decode throughput of the engine (no HTTP), single stream and batched.

    python benchmarks/decode_throughput.py [--model smollm2-135m-instruct] [--batch 1 32] [--tokens 64]

Prints tokens/s per batch size (median of --repeats runs) and, with --json, writes them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from agora import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    llm = LLM(args.model, kv_cache_memory_bytes=1 << 30, speculative_config=None)  # plain decode steps
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    llm.generate([[11] * 8], params)  # warm-up
    results = {}
    for b in args.batch:
        # Distinct prompts so the prefix cache does not turn the prefill into a no-op.
        prompts = [[100 + i] + [(7 * i + j) % 5000 + 50 for j in range(args.prompt_len - 1)] for i in range(b)]
        prefill = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        rates = []
        for _ in range(args.repeats):
            llm.engine.kv.reset_prefix_cache()
            t0 = time.perf_counter()
            llm.generate(prompts, prefill)
            t_prefill = time.perf_counter() - t0
            llm.engine.kv.reset_prefix_cache()
            t0 = time.perf_counter()
            llm.generate(prompts, params)
            total = time.perf_counter() - t0
            rates.append(b * (args.tokens - 1) / max(total - t_prefill, 1e-9))
        results[b] = statistics.median(rates)
        print(f"batch {b:>3}: {results[b]:7.1f} decode tok/s (median of {args.repeats})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "tokens": args.tokens, "decode_tok_s": results}, f, indent=2)


if __name__ == "__main__":
    main()
