"""CPU prefill attention: the paged kernel against the masked-SDPA path it replaces, side by side.

    python benchmarks/cpu_prefill_attention.py --out benchmarks/results/cpu_prefill_attention.json

One layer of SmolLM2-135M's shape (9 query heads, 3 KV heads, head_dim 64, 16-token blocks,
block tables in random order), fp32 cache. Each case is a prefill group: the chunks of new
tokens of one or more requests, each after a cached prefix (``context``). Both paths run
alternately in one process; the figure is the median of ``--repeats`` calls, and the largest
difference between their outputs is reported too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from agora import kernels
from agora.engine.attention import TorchPagedAttention, build_group

# (query tokens per request, cached tokens before them per request)
CASES = [
    ([150], [750]),  # one agent turn: a tool result after a long history
    ([150, 150, 150, 150], [750, 600, 900, 300]),  # four agents' turns in one step
    ([512], [0]),  # a fresh prompt
    ([2048], [0]),  # a long fresh prompt (the whole step budget)
    ([300, 40, 7], [0, 1200, 60]),  # uneven chunks
]


def measure(query_lens: list[int], contexts: list[int], repeats: int) -> dict:
    block, heads, kv_heads, dim = 16, 9, 3, 64
    per_req = [-(-(c + q) // block) for q, c in zip(query_lens, contexts, strict=True)]
    k = torch.randn(sum(per_req) + 1, block, kv_heads, dim)
    v = torch.randn_like(k)
    order = torch.randperm(sum(per_req)).tolist()
    tables, at = [], 0
    for n in per_req:
        tables.append(order[at : at + n])
        at += n
    q = torch.randn(sum(query_lens), heads, dim)
    backend = TorchPagedAttention([(k, v)], dim**-0.5, [None])
    cpu = torch.device("cpu")
    sdpa = build_group(None, query_lens, contexts, tables, block, {None}, cpu)
    kernel = build_group(None, query_lens, contexts, tables, block, {None}, cpu, paged_kernels=True)
    times: dict[str, list[float]] = {"sdpa": [], "kernel": []}
    outs = {}
    for _ in range(repeats + 1):
        for name, group in (("sdpa", sdpa), ("kernel", kernel)):
            start = time.perf_counter()
            outs[name] = backend._group(group, q, k, v, None)
            times[name].append(time.perf_counter() - start)
    sdpa_ms, kernel_ms = (statistics.median(times[n][1:]) * 1000 for n in ("sdpa", "kernel"))
    useful = sum(n * (c + (n + 1) / 2) for n, c in zip(query_lens, contexts, strict=True)) * dim * 4 * heads
    return {
        "query_lens": query_lens,
        "contexts": contexts,
        "sdpa_ms": round(sdpa_ms, 3),
        "kernel_ms": round(kernel_ms, 3),
        "speedup": round(sdpa_ms / kernel_ms, 2),
        "kernel_useful_gflops": round(useful / kernel_ms / 1e6, 1),
        "max_abs_diff": (outs["sdpa"] - outs["kernel"]).abs().max().item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not kernels.available():
        raise SystemExit("the CPU kernels are not available (no C compiler, or AGORA_CPU_KERNELS=0)")
    torch.manual_seed(0)
    rows = [measure(q, c, args.repeats) for q, c in CASES]
    for r in rows:
        print(
            f"queries {r['query_lens']} after {r['contexts']}: SDPA {r['sdpa_ms']:.2f} ms, kernel "
            f"{r['kernel_ms']:.2f} ms ({r['speedup']:.2f}x, {r['kernel_useful_gflops']:.0f} GFLOP/s useful), "
            f"max diff {r['max_abs_diff']:.1e}"
        )
    if args.out:
        result = {"threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "cases": rows}
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
