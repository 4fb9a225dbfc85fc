"""CPU prefill attention: the paged kernel against the masked-SDPA path it replaces, side by side.

    python benchmarks/cpu_prefill_attention.py --out benchmarks/results/cpu_prefill_attention.json
    python benchmarks/cpu_prefill_attention.py --against 8b2b625   # also the kernel of that commit

One layer of SmolLM2-135M's shape (9 query heads, 3 KV heads, head_dim 64, 16-token blocks,
block tables in random order), fp32 cache (``--kv-cache-dtype``: fp16 or bf16). Each case is a prefill group: the chunks of new
tokens of one or more requests, each after a cached prefix (``context``); the last cases are
speculative verification steps (a few draft tokens per request after a long context), which go
through this kernel too. Every path runs alternately in one process; the figure is the median of
``--repeats`` calls, and the largest difference from the SDPA path's output is reported too.

Caches are cold as in the engine, where a step's 30 layers of K/V do not fit in the caches: each
call reads one of ``--copies`` separate copies of the layer's K/V, in turn (``--copies 1``: hot).
Where the CPU has AMX, ``--dtype bfloat16``'s kernel (its two products in bf16 on the tile unit) runs
beside them too (``kernel_bf16_ms``, ``bf16_over_fp32``, ``bf16_max_abs_diff``).
With ``AGORA_CPU_ISA=avx2`` in the environment every kernel here is built for an AVX2 host's paths (``built_for``).
``--against REV`` compiles ``agora/kernels/cpu.c`` as of that git revision with the same flags and
times its kernel beside the current one, both called straight through ctypes so that neither pays for
the engine's Python around the call (``kernel_over_against``; ``same_as_against``: whether their outputs
are equal bit for bit).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
from pathlib import Path

import torch
from kernels_at import attention_kernel, kernels_at

from agora import envs, kernels
from agora.bench.report import cpu_description
from agora.engine.attention import TorchPagedAttention, build_group

# (query tokens per request, cached tokens before them per request)
CASES = [
    ([150], [750]),  # one agent turn: a tool result after a long history
    ([150, 150, 150, 150], [750, 600, 900, 300]),  # four agents' turns in one step
    ([512], [0]),  # a fresh prompt
    ([2048], [0]),  # a long fresh prompt (the whole step budget)
    ([300, 40, 7], [0, 1200, 60]),  # uneven chunks
    ([8], [1300]),  # verifying 7 drafts, one agent
    ([6] * 16, [1300] * 16),  # verifying 5 drafts each, 16 agents
    ([2] * 16, [1300] * 16),  # one draft each, 16 agents
]
KERNEL = "agora_paged_prefill_attention"


def measure(query_lens: list[int], contexts: list[int], repeats: int, copies: int,
            against: ctypes.CDLL | None, kv_dtype: torch.dtype = torch.float32) -> dict:  # fmt: skip
    block, heads, kv_heads, dim = 16, 9, 3, 64
    per_req = [-(-(c + q) // block) for q, c in zip(query_lens, contexts, strict=True)]
    shape = (sum(per_req) + 1, block, kv_heads, dim)
    caches = [(torch.randn(shape).to(kv_dtype), torch.randn(shape).to(kv_dtype)) for _ in range(copies)]
    order = torch.randperm(sum(per_req)).tolist()
    tables, at = [], 0
    for n in per_req:
        tables.append(order[at : at + n])
        at += n
    q = torch.randn(sum(query_lens), heads, dim)
    cpu = torch.device("cpu")
    sdpa = build_group(None, query_lens, contexts, tables, block, {None}, cpu)
    kernel = build_group(None, query_lens, contexts, tables, block, {None}, cpu, paged_kernels=True)

    def run_lib(lib: ctypes.CDLL, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        fn = attention_kernel(lib, KERNEL, kv_dtype, tail=1)
        assert fn is not None, "that revision's kernel does not read this cache"
        fn(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), kernel.block_tables.data_ptr(), kernel.block_tables.shape[1],
            kernel.query_offsets.data_ptr(), kernel.context_starts.data_ptr(), len(query_lens), heads, kv_heads, dim,
            block, 0, dim**-0.5, out.data_ptr(), torch.get_num_threads(), 0,  # fp32 products (older: ignored)
        )  # fmt: skip
        return out

    # the revisions side by side are both called straight through ctypes ("direct", "against"): through the
    # engine's wrapper ("kernel", as SDPA is) a call also pays for the Python around it
    libs = {"direct": kernels.lib(), "against": against} if against is not None else {}
    bf16 = {"kernel_bf16": kernel} if kernels.amx_available() else {}  # --dtype bfloat16's products on AMX
    paths = {"sdpa": sdpa, "kernel": kernel, **bf16, **dict.fromkeys(libs)}
    times: dict[str, list[float]] = {name: [] for name in paths}

    def call(name: str, group: object, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if group is None:
            return run_lib(libs[name], k, v)
        if name == "kernel_bf16":
            return kernels.paged_prefill_attention(q, k, v, group.block_tables, group.query_offsets,  # type: ignore[attr-defined]
                                                   group.context_starts, None, dim**-0.5, bf16=True)  # type: ignore[attr-defined]  # fmt: skip
        return TorchPagedAttention([(k, v)], dim**-0.5, [None])._group(group, q, k, v, None)

    calls = 0
    for _ in range(repeats + 1):
        for name, group in paths.items():
            k, v = caches[calls % copies]  # each call its own copy: none finds what the call before it read
            calls += 1
            start = time.perf_counter()
            call(name, group, k, v)
            times[name].append(time.perf_counter() - start)
    outs = {name: call(name, group, *caches[0]) for name, group in paths.items()}
    ms = {name: statistics.median(t[1:]) * 1000 for name, t in times.items()}
    useful = sum(n * (c + (n + 1) / 2) for n, c in zip(query_lens, contexts, strict=True)) * dim * 4 * heads
    row = {
        "query_lens": query_lens,
        "contexts": contexts,
        "sdpa_ms": round(ms["sdpa"], 3),
        "kernel_ms": round(ms["kernel"], 3),
        "speedup": round(ms["sdpa"] / ms["kernel"], 2),
        "kernel_useful_gflops": round(useful / ms["kernel"] / 1e6, 1),
        "max_abs_diff": (outs["sdpa"] - outs["kernel"]).abs().max().item(),
    }
    if bf16:
        row["kernel_bf16_ms"] = round(ms["kernel_bf16"], 3)
        row["bf16_over_fp32"] = round(ms["kernel_bf16"] / ms["kernel"], 2)
        row["bf16_max_abs_diff"] = (outs["sdpa"] - outs["kernel_bf16"]).abs().max().item()
    if against is not None:
        row["direct_ms"] = round(ms["direct"], 3)
        row["against_ms"] = round(ms["against"], 3)
        row["kernel_over_against"] = round(ms["direct"] / ms["against"], 2)
        row["same_as_against"] = bool(torch.equal(outs["direct"], outs["against"]))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--copies", type=int, default=8, help="separate K/V copies read in turn (1: hot caches)")
    ap.add_argument("--against", metavar="REV", help="also time the kernel of this git revision")
    ap.add_argument("--kv-cache-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not kernels.available():
        raise SystemExit("the CPU kernels are not available (no C compiler, or AGORA_CPU_KERNELS=0)")
    torch.manual_seed(0)
    against = kernels_at(args.against) if args.against else None
    kv_dtype = getattr(torch, args.kv_cache_dtype)
    if against is not None and kv_dtype != torch.float32:
        raise SystemExit("--against compares fp32 caches")
    rows = [measure(q, c, args.repeats, args.copies, against, kv_dtype) for q, c in CASES]
    for r in rows:
        shape = (f"{len(r['query_lens'])} x {r['query_lens'][0]} after {r['contexts'][0]}" if len(r["query_lens"]) > 4
                 else f"{r['query_lens']} after {r['contexts']}")  # fmt: skip
        extra = (f"; called directly {r['direct_ms']:.2f} ms against {args.against}'s {r['against_ms']:.2f} ms "
                 f"({r['kernel_over_against']:.2f}x its time, "
                 f"{'same output' if r['same_as_against'] else 'DIFFERENT output'})" if against else "")  # fmt: skip
        if "kernel_bf16_ms" in r:
            extra += (f"; bf16 on AMX {r['kernel_bf16_ms']:.2f} ms ({r['bf16_over_fp32']:.2f}x the fp32 kernel's time, "
                      f"max diff {r['bf16_max_abs_diff']:.1e})")  # fmt: skip
        print(f"queries {shape}: SDPA {r['sdpa_ms']:.2f} ms, kernel {r['kernel_ms']:.2f} ms ({r['speedup']:.2f}x, "
              f"{r['kernel_useful_gflops']:.0f} GFLOP/s useful), max diff {r['max_abs_diff']:.1e}{extra}")  # fmt: skip
    if args.out:
        result = {"host": cpu_description(), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
                  "built_for": envs.cpu_isa(), "kv_cache_dtype": args.kv_cache_dtype, "copies": args.copies,
                  "against": args.against, "cases": rows}  # fmt: skip
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
