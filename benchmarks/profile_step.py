"""cProfile of the engine's steps (host overhead), random weights in SmolLM2's shape.

python benchmarks/profile_step.py [--device cuda] [--batch 1]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    from agora import LLM, SamplingParams
    from benchmarks.gpu_decode import SHAPES, build

    with tempfile.TemporaryDirectory() as path:
        build(path, *SHAPES["smollm2-135m"])
        llm = LLM(path, device=args.device, max_num_seqs=args.batch, kv_cache_memory_bytes=1 << 30, max_model_len=2048,
                  speculative_config=None)  # fmt: skip  # plain decode steps
        prompts = [[10 + i, 11, 12, 13] for i in range(args.batch)]
        params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
        llm.generate(prompts, params)
        prof = cProfile.Profile()
        prof.enable()
        llm.generate(prompts, params)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
